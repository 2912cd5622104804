"""Backbone throughput: plain open_clip encode_image vs our feature-capturing forward vs the fused ResiDual path.

For each model and batch size, median images/s over ``--repeats`` timed runs, measured side by side in one
process (interleaved, so machine noise hits every path alike):

- ``plain``: an untouched open_clip model's ``encode_image`` + zero-shot logits;
- ``capture``: our ``extract`` (hooks on the swapped attention) + zero-shot logits on its embedding;
- ``fused_full`` / ``fused_fine``: ``extract`` + ``apply_fused`` (one matmul) + logits;
- ``naive_full``: ``decompose`` (all units in the output space) + the unfused per-unit formula + logits.

    python bench/backbone.py --json bench/out/backbone.json
    python bench/backbone.py --smoke
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import open_clip
import torch
from safetensors.torch import save_file

from residual import (
    LinearisedLN,
    apply_fused,
    decompose,
    extract,
    fit_basis,
    fuse,
    init_coefficients,
    load_backbone,
    resolve,
    zero_shot_logits,
)
from residual.backbone import _register_configs


def _paths(name: str, tmp: Path) -> dict[str, Callable[[torch.Tensor], torch.Tensor]]:
    torch.manual_seed(0)
    _register_configs()
    plain = open_clip.create_model(name).eval()
    if name == "residual-tiny":
        bb = load_backbone(name, device="cpu")
        plain.load_state_dict(bb.model.state_dict())
    else:
        path = tmp / f"{name}.safetensors"
        save_file({k: v.contiguous() for k, v in plain.state_dict().items()}, str(path))
        bb = load_backbone(name, pretrained=path, device="cpu")
    size = bb.geometry.image_size
    ln = LinearisedLN(bb)
    basis = fit_basis(bb, [torch.randn(64, 3, size, size)])
    classes = torch.nn.functional.normalize(torch.randn(10, bb.geometry.out_dim), dim=-1)
    scale = bb.logit_scale
    gen = torch.Generator().manual_seed(0)
    full = init_coefficients("full", basis, ["c"], ["{}"], init="randn", generator=gen)
    fine = init_coefficients("fine", basis, ["c"], ["{}"], init="randn", generator=gen)
    full_r, fine_r = resolve(full, basis), resolve(fine, basis)
    fused_full, fused_fine = fuse(full_r, ln), fuse(fine_r, ln)

    @torch.no_grad()
    def run_plain(x: torch.Tensor) -> torch.Tensor:
        return zero_shot_logits(plain.encode_image(x), classes, scale)

    def run_capture(x: torch.Tensor) -> torch.Tensor:
        return zero_shot_logits(extract(bb, x)[1], classes, scale)

    def run_fused(fused):  # type: ignore[no-untyped-def]
        def f(x: torch.Tensor) -> torch.Tensor:
            raw, _ = extract(bb, x)
            return zero_shot_logits(apply_fused(raw, fused, ln), classes, scale)
        return f

    def run_naive(x: torch.Tensor) -> torch.Tensor:
        return zero_shot_logits(full_r.apply(decompose(bb, x, ln).units), classes, scale)

    return {"plain": run_plain, "capture": run_capture, "fused_full": run_fused(fused_full),
            "fused_fine": run_fused(fused_fine), "naive_full": run_naive}


def _max_rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest relative difference of two (n, C) logit tensors, row by row."""
    return float(((a - b).norm(dim=-1) / b.norm(dim=-1).clamp_min(1e-12)).max())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="residual-tiny,ViT-B-16")
    p.add_argument("--batches", default="1,8,32,64")
    p.add_argument("--vit-batches", default="1,8", help="batch sizes for the 224 px models on a CPU")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    if args.smoke:
        args.models, args.batches, args.vit_batches, args.repeats = "residual-tiny", "1,8", "1", 2
    tmp = Path("/tmp/residual-bench")
    tmp.mkdir(exist_ok=True)
    rows = []
    for name in args.models.split(","):
        paths = _paths(name, tmp)
        size = 48 if name == "residual-tiny" else 224
        batches = args.batches if name == "residual-tiny" else args.vit_batches
        for b in (int(v) for v in batches.split(",")):
            x = torch.randn(b, 3, size, size)
            times: dict[str, list[float]] = {k: [] for k in paths}
            outputs = {k: fn(x) for k, fn in paths.items()}  # warm-up, and the answers each path gives
            # the paths must agree: capture = plain logits, fused full = the naive (unfused) formula
            agreement = {"capture_vs_plain": _max_rel(outputs["capture"], outputs["plain"]),
                         "fused_full_vs_naive": _max_rel(outputs["fused_full"], outputs["naive_full"])}
            for _ in range(args.repeats):
                for key, fn in paths.items():  # interleaved
                    t0 = time.perf_counter()
                    fn(x)
                    times[key].append(time.perf_counter() - t0)
            ips = {k: b / statistics.median(v) for k, v in times.items()}
            row = {"model": name, "batch": b, "images_per_s": ips, "max_relative_difference": agreement,
                   "fused_full_vs_plain": ips["fused_full"] / ips["plain"],
                   "fused_fine_vs_plain": ips["fused_fine"] / ips["plain"],
                   "capture_vs_plain": ips["capture"] / ips["plain"],
                   "naive_full_vs_plain": ips["naive_full"] / ips["plain"]}
            rows.append(row)
            print(f"{name:<14} b={b:<3} plain {ips['plain']:8.1f} img/s | capture x{row['capture_vs_plain']:.2f} | "
                  f"fused full x{row['fused_full_vs_plain']:.2f} fine x{row['fused_fine_vs_plain']:.2f} | "
                  f"naive full x{row['naive_full_vs_plain']:.2f}", flush=True)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"repeats": args.repeats, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
