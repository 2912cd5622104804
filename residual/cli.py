"""``residual``: offline use of the library on image files and folders.

    residual classify cat.jpg dog.png --classes cat,dog         top-k per image (files, flat or class folders)
    residual classify --images DIR [--coefficients cs.safetensors --basis b.safetensors] --json
    residual decompose-check --images DIR           units sum to the embedding? (max relative error)
    residual spectrum --images DIR --out basis.safetensors     per-unit PCA basis (any folder of images; the
                                                               service serves it from artifacts/bases/)
    residual spectrum --basis basis.safetensors --png k90.png  a layer x head picture of a basis
    residual alignment --world colour:val --eval-world colour:test --png colour.png   head-text alignment
    residual fit --train DIR --basis basis.safetensors --out cs.safetensors

Every command takes ``--model`` (default the embedded ``residual-tiny``) and ``--pretrained``; image sources
can also be the embedded world's benchmark tasks, ``--world TASK[:SPLIT]`` (e.g. ``--world shape:test``).
Errors are one line on stderr (exit 2); ``RESIDUAL_DEBUG=1`` shows the traceback. torch is imported only when a
command runs, so ``--help`` answers at once.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from residual.tiny.tasks import TASKS

if TYPE_CHECKING:  # the heavy imports happen inside the commands (``--help`` never loads torch)
    import torch

    from residual.backbone import Backbone

__all__ = ["main"]

VARIANTS = ("coarse", "fine", "full", "linear")  # residual.coefficients.VARIANTS (checked by a test)

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".gif", ".bmp"}
WORLD_HELP = ("an embedded world task as the image source, TASK[:SPLIT] (SPLIT: train, val, test); tasks: "
              + ", ".join(sorted(TASKS)))


class CliError(Exception):
    """A problem with the command's input, reported as one line."""


def _image_folder(root: Path) -> tuple[list[Path], list[int], list[str]]:
    """(files, labels, classes) of an ImageFolder tree; classes sorted by folder name."""
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    if not classes:
        raise CliError(f"{root}: no class sub-folders (expected ROOT/<class>/<image>)")
    files, labels = [], []
    for i, c in enumerate(classes):
        for f in sorted((root / c).iterdir()):
            if f.suffix.lower() in IMAGE_SUFFIXES:
                files.append(f)
                labels.append(i)
    if not files:
        raise CliError(f"{root}: no images with suffix in {sorted(IMAGE_SUFFIXES)}")
    return files, labels, classes


def _is_class_tree(root: Path) -> bool:
    """A folder whose images all sit in sub-folders (ROOT/<class>/<image>), none directly in it."""
    direct = [f for f in root.iterdir() if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES]
    subs = [d for d in root.iterdir() if d.is_dir() and any(f.suffix.lower() in IMAGE_SUFFIXES for f in d.iterdir())]
    return not direct and bool(subs)


def _collect(paths: list[str]) -> tuple[list[Path], list[int] | None, list[str] | None]:
    """Image files from files, flat folders or one class-folder tree: (files, labels, folder classes) where the
    labels and classes come from a class-folder tree only."""
    if len(paths) == 1 and Path(paths[0]).is_dir() and _is_class_tree(Path(paths[0])):
        files, labels, classes = _image_folder(Path(paths[0]))
        return files, labels, classes
    files = []
    for raw in paths:
        path = Path(raw)
        if path.is_file():
            files.append(path)
        elif path.is_dir():
            found = sorted(f for f in path.iterdir() if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                raise CliError(f"{path}: no images with suffix in {sorted(IMAGE_SUFFIXES)}")
            files += found
        else:
            raise CliError(f"{path}: no such file or folder")
    if not files:
        raise CliError("no images: give image files, folders, --images DIR or --world TASK")
    return files, None, None


def _load_pixels(bb: Backbone, files: list[Path], desc: str) -> torch.Tensor:
    import torch
    from PIL import Image, UnidentifiedImageError
    from tqdm import tqdm

    out = []
    for f in tqdm(files, desc=desc, unit="img", disable=None if desc else True):
        try:
            with Image.open(f) as im:
                im.seek(0)
                out.append(bb.preprocess(im.convert("RGB")))
        except (UnidentifiedImageError, OSError) as exc:
            raise CliError(f"{f}: not a readable image ({exc})") from exc
    return torch.stack(out)


def _world(bb: Backbone, spec: str, n: int | None) -> tuple[torch.Tensor, torch.Tensor, list[str], list[str]]:
    import torch

    from residual.tiny import tasks

    name, _, split = spec.partition(":")
    if name not in tasks.TASKS:
        raise CliError(f"unknown world task {name!r}; choose from {', '.join(sorted(tasks.TASKS))}")
    if split and split not in ("train", "val", "test"):
        raise CliError(f"unknown split {split!r} of world task {name!r}; choose train, val or test")
    images, labels, _ = tasks.task_images(name, split or "test", n=n, side=bb.geometry.image_size)
    task = tasks.TASKS[name]
    return bb.pixels_from_arrays(images), torch.from_numpy(labels), list(task.classes), list(task.templates)


def _source(bb: Backbone, args: argparse.Namespace, attr: str = "images"
            ) -> tuple[torch.Tensor, torch.Tensor, list[str], list[str] | None]:
    """(pixels, labels, classes, task templates or None) from --world or an ImageFolder."""
    import torch

    if getattr(args, "world", None):
        return _world(bb, args.world, args.n)
    root = getattr(args, attr)
    if root is None:
        raise CliError(f"give --{attr.replace('_', '-')} DIR or --world TASK")
    files, labels, classes = _image_folder(Path(root))
    return _load_pixels(bb, files, f"decoding {root}"), torch.tensor(labels), classes, None


def _all_images(root: Path) -> list[Path]:
    """Every image under ``root`` (a flat folder or an ImageFolder tree; labels are not needed), sorted."""
    if not root.is_dir():
        raise CliError(f"{root}: not a folder")
    files = sorted(f for f in root.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise CliError(f"{root}: no images with suffix in {sorted(IMAGE_SUFFIXES)}")
    return files


def _decoded_batches(bb: Backbone, files: list[Path], size: int) -> Iterator[torch.Tensor]:
    """Decode and preprocess ``size`` files at a time: memory holds one batch, whatever the folder's size."""
    from tqdm import tqdm

    for i in tqdm(range(0, len(files), size), desc="streaming PCA", unit="batch", disable=None):
        yield _load_pixels(bb, files[i : i + size], "")


def _batches(pixels: torch.Tensor, size: int, desc: str) -> Iterator[torch.Tensor]:
    from tqdm import tqdm

    for i in tqdm(range(0, pixels.shape[0], size), desc=desc, unit="batch", disable=None):
        yield pixels[i : i + size]


def _backbone(args: argparse.Namespace) -> Backbone:
    from residual.backbone import load_backbone

    return load_backbone(args.model, args.pretrained, device=args.device)


def cmd_decompose_check(args: argparse.Namespace) -> int:
    import torch

    from residual.decomposition import LinearisedLN, decompose

    bb = _backbone(args)
    if args.images is None and not args.world:
        pixels = torch.randn(args.n, 3, bb.geometry.image_size, bb.geometry.image_size)
    else:
        pixels = _source(bb, args)[0]
    ln = LinearisedLN(bb)
    worst = 0.0
    for batch in _batches(pixels, args.batch_size, "decomposing"):
        dec = decompose(bb, batch, ln)
        err = ((dec.units.sum(1) - dec.embedding).norm(dim=-1) / dec.embedding.norm(dim=-1)).max()
        worst = max(worst, float(err))
    g = bb.geometry
    print(json.dumps({"model": bb.name, "weights_id": bb.weights_id, "images": int(pixels.shape[0]),
                      "units": g.n_units, "max_relative_error": worst}))
    return 0 if worst <= args.tolerance else 1


def cmd_spectrum(args: argparse.Namespace) -> int:
    import numpy as np

    from residual.basis import Basis, fit_basis

    bb = _backbone(args)
    if args.basis:
        basis = Basis.load(args.basis)
    elif args.world:
        pixels = _source(bb, args)[0]
        task, _, split = args.world.partition(":")
        basis = fit_basis(bb, _batches(pixels, args.batch_size, "streaming PCA"), name=args.name or "",
                          source={"kind": "world-task", "task": task, "split": split or "test",
                                  "n": int(pixels.shape[0])})
    elif args.images:
        files = _all_images(Path(args.images))
        basis = fit_basis(bb, _decoded_batches(bb, files, args.batch_size), name=args.name or "",
                          source={"kind": "images", "images": str(Path(args.images).resolve()), "n": len(files)})
    else:
        raise CliError("give --images DIR, --world TASK[:SPLIT] or --basis FILE")
    if args.out:
        basis.save(args.out)
    if args.png:
        from residual.heads import unit_spectra
        from residual.plots import head_heatmap_png

        g = basis.geometry
        rows = [r for r in unit_spectra(basis) if r.type == "head"]
        grid = np.asarray([getattr(r, args.value) for r in rows], dtype=float).reshape(g.layers, g.heads)
        Path(args.png).write_bytes(head_heatmap_png(grid, f"{bb.name}: {args.value} per head", args.value,
                                                    fmt="{:.0f}" if args.value.startswith("k_") else "{:.2f}"))
        print(f"picture written to {args.png}", file=sys.stderr)
    pca = basis.pca()
    k90, k99, pr = pca.k_at(0.9), pca.k_at(0.99), pca.participation_ratio
    print(f"{'unit':<12}{'k@0.9':>7}{'k@0.99':>8}{'PR':>8}{'EVR1':>7}")
    for u, unit in enumerate(basis.table):
        print(f"{unit.label:<12}{int(k90[u]):>7}{int(k99[u]):>8}{float(pr[u]):>8.2f}{float(pca.evr[u, 0]):>7.2f}")
    if args.out:
        print(f"basis {basis.hash} written to {args.out}")
    return 0


def cmd_alignment(args: argparse.Namespace) -> int:
    import numpy as np
    import torch

    from residual.classifier import DEFAULT_TEMPLATES, class_embeddings
    from residual.decomposition import LinearisedLN, decompose
    from residual.heads import head_alignment
    from residual.plots import ablation_png, head_heatmap_png

    bb = _backbone(args)
    pixels, labels, classes, task_templates = _source(bb, args)
    templates = args.templates or task_templates or list(DEFAULT_TEMPLATES)
    ln = LinearisedLN(bb)
    g = bb.geometry

    def units(px: torch.Tensor) -> torch.Tensor:
        return torch.cat([decompose(bb, b, ln).units.cpu() for b in _batches(px, args.batch_size, "decomposing")])

    eval_units = eval_labels = None
    if args.eval_world:
        ev_pixels, eval_labels, _, _ = _world(bb, args.eval_world, args.n)
        eval_units = units(ev_pixels)
    cls = class_embeddings(bb.encode_text, bb.tokenizer, classes, templates, device=bb.device).cpu()
    report = head_alignment(units(pixels), labels, cls, bb.logit_scale, g.layers, g.heads, eval_units, eval_labels,
                            seeds=args.seeds)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
    for name, top in report["top_heads"].items():
        print(f"top heads by {name}: " + ", ".join(f"{h['layer']}.{h['head']} ({h['score']:.3f})" for h in top))
    a = report["ablation"]
    print(f"{'% heads kept':<14}{'U|T':>8}{'superv.':>9}{'random':>8}   (all units {a['all_units']:.3f})")
    for i, f in enumerate(a["fractions"]):
        print(f"{100 * f:<14.0f}{a['text_correlation'][i]:>8.3f}{a['supervised'][i]:>9.3f}{a['random'][i]:>8.3f}")
    if args.png:
        if args.picture == "ablation":
            png = ablation_png(a, "top-k head ablation", ["text_correlation", "supervised"])
        else:
            grid = np.asarray([h[args.score] for h in report["heads"]], dtype=float).reshape(g.layers, g.heads)
            marked = [(h["layer"], h["head"]) for h in report["top_heads"][args.score]]
            png = head_heatmap_png(grid, f"{args.score} per head (top {len(marked)} framed)", args.score, marked)
        Path(args.png).write_bytes(png)
        print(f"picture written to {args.png}", file=sys.stderr)
    return 0


def cmd_fit(args: argparse.Namespace) -> int:
    from residual.basis import Basis
    from residual.classifier import DEFAULT_TEMPLATES, class_embeddings
    from residual.decomposition import LinearisedLN, extract_batched
    from residual.fitting import FitConfig, fit

    bb = _backbone(args)
    basis = Basis.load(args.basis)
    pixels, labels, classes, task_templates = _source(bb, args, "train")
    templates = args.templates or task_templates or list(DEFAULT_TEMPLATES)
    raw, _ = extract_batched(bb, pixels, args.batch_size)
    ln = LinearisedLN(bb)
    cls = class_embeddings(bb.encode_text, bb.tokenizer, classes, templates, device=bb.device)

    def progress(p: dict[str, object]) -> None:
        print(f"epoch {p['epoch']}/{p['max_epochs']} val_accuracy {p['val_accuracy']:.4f}", file=sys.stderr)

    cfg = FitConfig(variant=args.variant, max_epochs=args.epochs, seed=args.seed, lr=args.lr)
    result = fit((raw, labels), cls, bb.logit_scale, basis, ln, classes, templates, cfg, progress=progress)
    result.coefficients.save(args.out)
    rep = {k: v for k, v in result.report.items() if k != "history"}
    print(json.dumps(rep, indent=2))
    return 0


def cmd_classify(args: argparse.Namespace) -> int:
    """Top-k labels per image, with the service's scores: softmax of exp(logit_scale) * cos (or the cosine)."""
    import torch

    from residual.basis import Basis
    from residual.classifier import DEFAULT_TEMPLATES, class_embeddings, zero_shot_logits
    from residual.coefficients import CoefficientSet, apply_fused, fuse, resolve
    from residual.decomposition import LinearisedLN, extract_batched

    names: list[str]
    labels: torch.Tensor | None = None
    templates: list[str] | None = None
    if args.world:
        bb = _backbone(args)
        pixels, labels, classes, templates = _world(bb, args.world, args.n)
        names = [f"{args.world}[{i}]" for i in range(int(pixels.shape[0]))]
    else:
        files, file_labels, folder_classes = _collect(args.paths + ([args.images] if args.images else []))
        bb = _backbone(args)  # after the paths are checked: a typo costs no model load
        pixels = _load_pixels(bb, files, "decoding")
        names = [str(f) for f in files]
        classes = folder_classes or []
        labels = torch.tensor(file_labels) if file_labels is not None else None
    cs = basis = None
    if args.coefficients:
        basis = Basis.load(args.basis) if args.basis else None
        cs = CoefficientSet.load(args.coefficients, basis)
        if basis is None and cs.basis_hash is not None:
            raise CliError("this coefficient set needs its basis: pass --basis FILE")
        if not args.classes:
            classes, templates = cs.classes, cs.templates
    if args.classes:
        classes = [c.strip() for c in args.classes.split(",") if c.strip()]
    if not classes:
        raise CliError("give --classes a,b,c (or a class-folder tree, a world task or a coefficient set)")
    templates = args.templates or templates or list(DEFAULT_TEMPLATES)
    cls = class_embeddings(bb.encode_text, bb.tokenizer, classes, templates, device=bb.device)
    ln = LinearisedLN(bb)
    fused = fuse(resolve(cs, basis), ln) if cs is not None and basis is not None else None
    scale = bb.logit_scale
    shown = []
    for batch in _batches(pixels, args.batch_size, "classifying"):
        raw, emb = extract_batched(bb, batch, args.batch_size)
        y = apply_fused(raw, fused, ln) if fused is not None else emb
        logits = zero_shot_logits(y, cls, scale).float()
        shown.append((logits.softmax(-1) if args.scores == "softmax" else logits / scale.exp()).cpu())
    scores = torch.cat(shown)  # (n, C)
    k = min(args.top_k, len(classes))
    top = scores.topk(k, dim=-1)
    results: list[dict[str, Any]] = []
    for i, name in enumerate(names):
        row: dict[str, Any] = {"image": name, "top": [{"label": classes[j], "score": float(p)} for p, j in zip(
            top.values[i].tolist(), top.indices[i].tolist(), strict=True)]}
        results.append(row)
    out: dict[str, Any] = {"model": bb.name, "weights_id": bb.weights_id, "coefficients": args.coefficients,
                           "label_set": {"classes": classes, "templates": templates}, "results": results}
    known = labels is not None and (args.world or not args.classes or args.classes.split(",") == classes)
    if known and labels is not None:
        out["accuracy"] = float((scores.argmax(-1) == labels).float().mean())
    if args.json:
        print(json.dumps(out))
        return 0
    for row in results:
        print(row["image"] + "\t" + "\t".join(f"{p['label']} {p['score']:.4f}" for p in row["top"]))
    if "accuracy" in out:
        print(f"accuracy {out['accuracy']:.4f} on {len(names)} images", file=sys.stderr)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="residual", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)

    def common(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--model", default="residual-tiny", help="open_clip architecture or embedded model")
        sp.add_argument("--pretrained", default=None, help="checkpoint path, open_clip tag, or 'random'")
        sp.add_argument("--device", default=None, help="cpu / cuda (default: cuda when available)")
        sp.add_argument("--world", default=None, help=WORLD_HELP)
        sp.add_argument("--n", type=int, default=None, help="images drawn from --world (default: split size)")
        sp.add_argument("--batch-size", type=int, default=128)

    sp = sub.add_parser("decompose-check", help="check that the units sum to the embedding")
    common(sp)
    sp.add_argument("--images", default=None, help="ImageFolder root (default: random pixels)")
    sp.add_argument("--tolerance", type=float, default=1e-5)
    sp.set_defaults(func=cmd_decompose_check, n=8)

    sp = sub.add_parser("spectrum", help="fit per-unit PCA bases and print the spectra")
    common(sp)
    sp.add_argument("--images", default=None, help="a folder of images (flat or with class sub-folders; labels "
                                                   "are not used), read --batch-size at a time")
    sp.add_argument("--out", default=None, help="write the basis (.safetensors); drop it into the service's "
                                                "artifacts/bases/ folder to serve it")
    sp.add_argument("--name", default=None, help="the basis's name (GET /bases)")
    sp.add_argument("--basis", default=None, help="read this basis instead of fitting one")
    sp.add_argument("--png", default=None, help="write a layer x head heatmap of --value")
    sp.add_argument("--value", default="k_90", choices=["k_90", "k_99", "participation_ratio", "evr_1"])
    sp.set_defaults(func=cmd_spectrum)

    sp = sub.add_parser("alignment", help="score heads against a label set and ablate all but the top heads")
    common(sp)
    sp.add_argument("--images", default=None, help="ImageFolder root (split in stratified halves)")
    sp.add_argument("--eval-world", default=None, help="evaluation images, TASK:SPLIT (default: halves)")
    sp.add_argument("--templates", nargs="*", default=None)
    sp.add_argument("--seeds", type=int, default=10, help="random head sets per fraction")
    sp.add_argument("--json", default=None, help="write the full report")
    sp.add_argument("--png", default=None, help="write a picture")
    sp.add_argument("--picture", default="heatmap", choices=["heatmap", "ablation"])
    sp.add_argument("--score", default="text_correlation", choices=["text_correlation", "supervised"])
    sp.set_defaults(func=cmd_alignment)

    sp = sub.add_parser("fit", help="fit a coefficient set on labelled images")
    common(sp)
    sp.add_argument("--train", default=None, help="ImageFolder root of the training images")
    sp.add_argument("--basis", required=True, help="basis file (.safetensors)")
    sp.add_argument("--variant", choices=VARIANTS, default="full")
    sp.add_argument("--templates", nargs="*", default=None, help="prompt templates, each with {}")
    sp.add_argument("--epochs", type=int, default=30)
    sp.add_argument("--lr", type=float, default=None)
    sp.add_argument("--seed", type=int, default=0)
    sp.add_argument("--out", required=True, help="coefficient set to write (.safetensors)")
    sp.set_defaults(func=cmd_fit)

    sp = sub.add_parser("classify", help="top-k labels per image, zero-shot or with a coefficient set",
                        description="Classify image files, flat folders or one class-folder tree (ROOT/<class>/"
                                    "<image>: the folder names are the classes and the accuracy is printed). Scores "
                                    "are those of POST /classify for the same images, classes and templates.")
    common(sp)
    sp.add_argument("paths", nargs="*", help="image files or folders")
    sp.add_argument("--images", default=None, help="a folder (flat, or a class-folder tree)")
    sp.add_argument("--classes", default=None, help="comma-separated class names")
    sp.add_argument("--templates", nargs="*", default=None, help="prompt templates with {} (default: the service's "
                                                                 "four, residual.DEFAULT_TEMPLATES)")
    sp.add_argument("--coefficients", default=None, help="coefficient set (.safetensors)")
    sp.add_argument("--basis", default=None, help="basis of the coefficient set")
    sp.add_argument("--top-k", type=int, default=5, help="labels printed per image")
    sp.add_argument("--scores", choices=["softmax", "cosine"], default="softmax")
    sp.add_argument("--json", action="store_true", help="one JSON document on stdout")
    sp.set_defaults(func=cmd_classify)
    return p


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING)
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # noqa: BLE001 - a CLI reports one line; RESIDUAL_DEBUG=1 shows the traceback
        if os.environ.get("RESIDUAL_DEBUG"):
            raise
        kind = "" if isinstance(exc, CliError) or type(exc).__module__.startswith("residual") else \
            f"{type(exc).__name__}: "
        print(f"error: {kind}{exc}".splitlines()[0], file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
