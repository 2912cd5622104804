"""Several coefficient sets in one batch against one batch per set.

A batch of ``--batch`` images is served for K = 1, 4, 16 coefficient sets (each image names one set, round
robin), two ways, timed side by side in one process (interleaved, median of ``--repeats``):

- ``mixed``: one backbone forward for the whole batch, then each set's fused matrix on its rows (``apply_many``),
  which is what the service's batcher does;
- ``separate``: one backbone forward per set on that set's rows, then its fused matrix.

    python bench/multi_adapter.py --json bench/out/multi_adapter.json
    python bench/multi_adapter.py --smoke
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from residual import Basis, LinearisedLN, apply_fused, apply_many, extract, fuse, init_coefficients, load_backbone
from residual import resolve as resolve_set
from residual.tiny.reference import reference_images, shipped_basis_path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--ks", default="1,4,16")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    if args.smoke:
        args.batch, args.ks, args.repeats = 16, "1,4", 2
    torch.set_num_threads(2)
    bb = load_backbone("residual-tiny", device="cpu")
    ln = LinearisedLN(bb)
    basis = Basis.load(shipped_basis_path())
    x = bb.pixels_from_arrays(reference_images(args.batch))
    gen = torch.Generator().manual_seed(0)
    ks = [int(k) for k in args.ks.split(",")]
    fused = [fuse(resolve_set(init_coefficients("full", basis, ["c"], ["{}"], init="randn", generator=gen), basis),
                  ln) for _ in range(max(ks))]
    rows = []
    for k in ks:
        assignment = [i % k for i in range(args.batch)]
        groups = [torch.tensor([i for i, a in enumerate(assignment) if a == j]) for j in range(k)]

        def mixed(k: int = k, assignment: list[int] = assignment) -> torch.Tensor:
            raw, _ = extract(bb, x)
            return apply_many(raw, fused[:k], assignment, ln)

        def separate(k: int = k, groups: list[torch.Tensor] = groups) -> torch.Tensor:
            out = torch.empty(args.batch, ln.proj.shape[1])
            for j in range(k):
                raw, _ = extract(bb, x[groups[j]])
                out[groups[j]] = apply_fused(raw, fused[j], ln)
            return out

        difference = float((mixed() - separate()).abs().max())  # the same answers both ways
        times: dict[str, list[float]] = {"mixed": [], "separate": []}
        for _ in range(args.repeats):
            for name, fn in (("mixed", mixed), ("separate", separate)):
                t0 = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t0)
        ips = {n: args.batch / statistics.median(v) for n, v in times.items()}
        row = {"k": k, "batch": args.batch, "images_per_s": ips, "mixed_vs_separate": ips["mixed"] / ips["separate"],
               "max_abs_difference": difference}
        rows.append(row)
        print(f"K={k:<3} batch {args.batch}: mixed {ips['mixed']:7.1f} img/s | separate {ips['separate']:7.1f} "
              f"img/s | mixed/separate x{row['mixed_vs_separate']:.2f}", flush=True)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"repeats": args.repeats, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
