"""Library figures: decomposition exactness, PCA parity, fused-vs-unfused error, fit wall time.

    python bench/library.py [--json bench/out/library.json] [--smoke]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from residual import (
    VARIANTS,
    FitConfig,
    LinearisedLN,
    StreamingPCA,
    apply_fused,
    class_embeddings,
    decompose,
    extract_batched,
    fit,
    fuse,
    init_coefficients,
    load_backbone,
    project_units,
    resolve,
)
from residual.tiny import tasks
from residual.tiny.reference import reference_basis

FIT_TASK = "count"  # the task whose zero-shot leaves the most room on the shipped model (bench/README.md)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(((a - b).norm(dim=-1) / b.norm(dim=-1)).max())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--smoke", action="store_true")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    out: dict[str, object] = {}

    # 1. decomposition identity (float32), max relative error over the batch
    dec_err = {}
    archs = [("residual-tiny", None, 48)] + ([] if args.smoke else [("ViT-B-32", None, 224), ("ViT-B-16", None, 224)])
    for name, pretrained, size in archs:
        bb = load_backbone(name, pretrained, device="cpu")
        if name == "residual-tiny":
            images, _, _ = tasks.task_images("shape", "test", n=64)
            pixels = bb.pixels_from_arrays(images)
        else:
            pixels = torch.randn(8, 3, size, size)
        d = decompose(bb, pixels)
        dec_err[name] = rel(d.units.sum(1), d.embedding)
    out["decomposition_max_relative_error"] = dec_err

    tiny = load_backbone("residual-tiny", device="cpu")
    ln = LinearisedLN(tiny)
    n = 400 if args.smoke else 2000
    images, labels, _ = tasks.task_images(FIT_TASK, "train", n=n)
    t0 = time.perf_counter()
    raw, emb = extract_batched(tiny, tiny.pixels_from_arrays(images))
    extract_s = time.perf_counter() - t0

    # 2. streaming PCA vs SVD on the units of n world images
    units = project_units(raw, ln).double()  # (n, U, d)
    acc = StreamingPCA(units.shape[1], units.shape[2])
    for chunk in units.split(256):
        acc.update(chunk)
    pca = acc.result()
    ev_err, comp_err = 0.0, 0.0
    for u in range(units.shape[1]):
        xc = units[:, u] - units[:, u].mean(0)
        _, s, vh = torch.linalg.svd(xc, full_matrices=False)
        ev = s**2 / (n - 1)
        keep = ev > ev[0] * 1e-6  # relative error is meaningless for numerically-zero eigenvalues
        ev_err = max(ev_err, float(((pca.eigenvalues[u].double()[keep] - ev[keep]).abs() / ev[keep]).max()))
        k = min(8, int(keep.sum()))
        comp_err = max(comp_err, float((1 - (pca.components[u, :k].double() * vh[:k]).sum(-1).abs()).max()))
    out["pca_parity"] = {"n": n, "max_eigenvalue_relative_error": ev_err,
                         "max_component_misalignment_top8": comp_err}

    # 3. fused vs unfused (float32) with random lambdas
    basis = reference_basis(tiny)
    dec = decompose(tiny, tiny.pixels_from_arrays(images[:256]), ln)
    fused_err = {}
    for variant in VARIANTS:
        gen = torch.Generator().manual_seed(1)
        cs = init_coefficients(variant, basis, ["a"], ["{}"], init="randn", generator=gen)
        if variant == "linear":
            cs.linear_weight = torch.eye(128) + 0.1 * torch.randn(128, 128, generator=gen)
        adapter = resolve(cs, basis)
        fused_err[variant] = rel(apply_fused(dec.raw, fuse(adapter, ln), ln), adapter.apply(dec.units))
    out["fused_vs_unfused_max_relative_error"] = fused_err

    # 4. fit wall time on n cached samples (features extracted once)
    task = tasks.TASKS[FIT_TASK]
    cls = class_embeddings(tiny.encode_text, tiny.tokenizer, task.classes, task.templates)
    fits = {}
    for variant in ("full", "fine", "coarse"):
        res = fit((raw, torch.from_numpy(labels)), cls, tiny.logit_scale, basis, ln, list(task.classes),
                  list(task.templates), FitConfig(variant=variant, max_epochs=3 if args.smoke else 30))
        fits[variant] = {k: res.report[k] for k in ("wall_time_s", "feature_prep_s", "epochs", "n_parameters",
                                                    "zero_shot_val_accuracy", "val_accuracy")}
    out["fit"] = {"task": FIT_TASK, "n_samples": n, "feature_extraction_s": round(extract_s, 3), "variants": fits}
    print(json.dumps(out, indent=2))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
