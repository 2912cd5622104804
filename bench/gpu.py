"""One prepared GPU benchmark: backbone and fused-ResiDual throughput against the card's own matmul ceiling.

On CUDA (bf16 weights, bf16 autocast), for random-init ``ViT-B-16`` and ``ViT-L-14`` geometry at several batch
sizes, interleaved and side by side in one process:

- ``plain``: untouched open_clip ``encode_image`` + zero-shot logits;
- ``capture``: our hooked forward (raw per-head features) + logits;
- ``fused_full`` / ``fused_fine``: capture + the fused coefficient set (one matmul) + logits.

It first measures the card's dense bf16 matmul rate on the spot (8192^3 GEMMs) and reports each path's images/s
and its fraction of that ceiling (analytic FLOPs per image of the vision tower). A short table is printed last
and everything is written as JSON. Budget: under 8 minutes on one modern GPU (``--budget-s`` stops adding work).
On a CPU the same code runs at small sizes (fp32, batch 1-2), so CI proves the script works.

    python bench/gpu.py --json bench/out/gpu.json
    python bench/gpu.py --smoke          # CPU smoke, seconds
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import open_clip
import torch
from safetensors.torch import save_file

from residual import (
    LinearisedLN,
    apply_fused,
    extract,
    fit_basis,
    fuse,
    init_coefficients,
    load_backbone,
    resolve,
    zero_shot_logits,
)
from residual.backbone import _register_configs


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_tflops(device: torch.device, size: int, dtype: torch.dtype, repeats: int) -> float:
    """Dense GEMM rate measured now: 2 * size^3 FLOPs per product."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(repeats):
        a @ b
    _sync(device)
    return 2 * size**3 * repeats / (time.perf_counter() - t0) / 1e12


def vision_gflops(width: int, layers: int, tokens: int, patch: int, mlp_ratio: float = 4.0) -> float:
    """Forward FLOPs of a ViT vision tower per image: per block 2T(4D^2 + 2 r D^2) + 4 T^2 D, plus the patch
    embedding 2 T (3 p^2) D (GEMM FLOPs only; norms and softmax are a few %)."""
    per_block = 2 * tokens * (4 + 2 * mlp_ratio) * width**2 + 4 * tokens**2 * width
    return (layers * per_block + 2 * tokens * 3 * patch**2 * width) / 1e9


def build(name: str, device: torch.device, precision: str, tmp: Path) -> tuple[dict[str, Callable[..., Any]], float]:
    torch.manual_seed(0)
    _register_configs()
    plain = open_clip.create_model(name).eval()
    path = tmp / f"{name}.safetensors"
    save_file({k: v.contiguous() for k, v in plain.state_dict().items()}, str(path))
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[precision]
    plain = plain.to(device=device, dtype=dtype)
    bb = load_backbone(name, pretrained=path, device=device, precision=precision)
    g = bb.geometry
    patch = int(bb.visual.conv1.kernel_size[0])
    tokens = (g.image_size // patch) ** 2 + 1
    gflops = vision_gflops(g.width, g.layers, tokens, patch)
    ln = LinearisedLN(bb)
    size = g.image_size
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        basis = fit_basis(bb, [torch.randn(32 if device.type == "cuda" else 4, 3, size, size)])
    gen = torch.Generator().manual_seed(0)
    fused = {v: fuse(resolve(init_coefficients(v, basis, ["c"], ["{}"], init="randn", generator=gen), basis), ln)
             for v in ("full", "fine")}
    classes = torch.nn.functional.normalize(torch.randn(1000, g.out_dim, device=device), dim=-1)
    scale = bb.logit_scale.to(device)

    def autocast() -> Any:
        return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")

    @torch.no_grad()
    def run_plain(x: torch.Tensor) -> torch.Tensor:
        with autocast():
            return zero_shot_logits(plain.encode_image(x.to(dtype)).float(), classes, scale)

    def run_capture(x: torch.Tensor) -> torch.Tensor:
        with autocast():
            return zero_shot_logits(extract(bb, x)[1], classes, scale)

    def run_fused(variant: str) -> Callable[[torch.Tensor], torch.Tensor]:
        def f(x: torch.Tensor) -> torch.Tensor:
            with autocast():
                raw, _ = extract(bb, x)
            return zero_shot_logits(apply_fused(raw, fused[variant], ln), classes, scale)
        return f

    paths = {"plain": run_plain, "capture": run_capture, "fused_full": run_fused("full"),
             "fused_fine": run_fused("fine")}
    return paths, gflops


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="ViT-B-16,ViT-L-14")
    p.add_argument("--batches", default=None, help="default: 32,128,256 on CUDA, 1,2 on a CPU")
    p.add_argument("--repeats", type=int, default=None, help="default: 10 on CUDA, 2 on a CPU")
    p.add_argument("--budget-s", type=float, default=420.0, help="stop starting new measurements after this")
    p.add_argument("--smoke", action="store_true", help="ViT-B-16 only, batch 1, one repeat")
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    started = time.perf_counter()
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    precision = "bf16" if cuda else "fp32"
    batches = [int(b) for b in (args.batches or ("32,128,256" if cuda else "1,2")).split(",")]
    repeats = args.repeats or (10 if cuda else 2)
    models = args.models.split(",")
    if args.smoke:
        models, batches, repeats = ["ViT-B-16"], [1], 1
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
        ceiling = matmul_tflops(device, 8192, torch.bfloat16, 20)
    else:
        torch.set_num_threads(2)
        ceiling = matmul_tflops(device, 512 if args.smoke else 1024, torch.float32, 3)
    info = {"device": torch.cuda.get_device_name(0) if cuda else "cpu", "precision": precision,
            "matmul_tflops": ceiling, "torch": torch.__version__}
    print(f"{info['device']}: dense {'bf16' if cuda else 'fp32'} matmul {ceiling:.1f} TFLOP/s", flush=True)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in models:
            if time.perf_counter() - started > args.budget_s:
                break
            paths, gflops = build(name, device, precision, Path(tmp))
            size = 224
            for b in batches:
                if time.perf_counter() - started > args.budget_s:
                    break
                x = torch.randn(b, 3, size, size, device=device)
                try:
                    for fn in paths.values():
                        fn(x)  # warm-up
                    _sync(device)
                    times: dict[str, list[float]] = {k: [] for k in paths}
                    for _ in range(repeats):
                        for key, fn in paths.items():
                            _sync(device)
                            t0 = time.perf_counter()
                            fn(x)
                            _sync(device)
                            times[key].append(time.perf_counter() - t0)
                except torch.OutOfMemoryError:
                    print(f"{name} batch {b}: out of memory, skipped", flush=True)
                    torch.cuda.empty_cache()
                    continue
                ips = {k: b / statistics.median(v) for k, v in times.items()}
                row = {"model": name, "batch": b, "gflops_per_image": gflops, "images_per_s": ips,
                       "fraction_of_ceiling": {k: v * gflops / 1e3 / ceiling for k, v in ips.items()},
                       "fused_full_vs_plain": ips["fused_full"] / ips["plain"],
                       "fused_fine_vs_plain": ips["fused_fine"] / ips["plain"],
                       "capture_vs_plain": ips["capture"] / ips["plain"]}
                rows.append(row)
                print(f"{name} b={b}: plain {ips['plain']:.1f} img/s", flush=True)
            del paths
            if cuda:
                torch.cuda.empty_cache()
    info["wall_s"] = round(time.perf_counter() - started, 1)
    print(f"\n{'model':<10}{'batch':>6}{'plain img/s':>13}{'% ceiling':>10}{'capture':>9}{'fused full':>11}"
          f"{'fused fine':>11}")
    for r in rows:
        print(f"{r['model']:<10}{r['batch']:>6}{r['images_per_s']['plain']:>13.1f}"
              f"{100 * r['fraction_of_ceiling']['plain']:>9.1f}%{r['capture_vs_plain']:>9.2f}"
              f"{r['fused_full_vs_plain']:>11.2f}{r['fused_fine_vs_plain']:>11.2f}")
    print(f"(ratios are against plain at the same batch; wall {info['wall_s']} s)")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({**info, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
