"""Fit cost against dataset size: wall time and peak memory, split into rendering, extraction and fitting.

Each size runs in its own subprocess (so peak resident memory is that size's own): world images of the texture
task (train split drawn at that size, a fixed 500-image validation split), raw features of the train split
extracted once in batches of 256 (timed; the validation split is extracted outside the timer), then a ``full``
fit for a fixed number of epochs (no early stopping, so fit time is comparable across sizes). The table
reports seconds per phase and how each phase grows (the ratio of times divided by the ratio of sizes:
1.0 = linear).

    python bench/fit_scaling.py --json bench/out/fit_scaling.json          # 1k, 5k, 20k images
    python bench/fit_scaling.py --smoke
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch


def _peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def one(n: int, epochs: int) -> dict[str, Any]:
    from residual import Basis, FitConfig, LinearisedLN, RawFeatures, class_embeddings, extract, fit, load_backbone
    from residual.tiny import tasks
    from residual.tiny.reference import shipped_basis_path

    torch.set_num_threads(2)
    bb = load_backbone("residual-tiny", device="cpu")
    ln = LinearisedLN(bb)
    basis = Basis.load(shipped_basis_path())
    task = tasks.TASKS["texture"]
    cls = class_embeddings(bb.encode_text, bb.tokenizer, task.classes, task.templates)
    base_mib = _peak_mib()
    t0 = time.perf_counter()
    images, labels, _ = tasks.task_images("texture", "train", n=n)
    v_images, v_labels, _ = tasks.task_images("texture", "val", n=500)
    render_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    parts = []
    for i in range(0, n, 256):
        parts.append(extract(bb, bb.pixels_from_arrays(images[i : i + 256]))[0])
    raw = RawFeatures.cat(parts)
    extract_s = time.perf_counter() - t0
    val = extract(bb, bb.pixels_from_arrays(v_images))[0]
    extract_mib = _peak_mib()
    t0 = time.perf_counter()
    cfg = FitConfig(variant="full", max_epochs=epochs, patience=epochs + 1)
    result = fit((raw, torch.from_numpy(labels)), cls, bb.logit_scale, basis, ln, list(task.classes),
                 list(task.templates), cfg, val=(val, torch.from_numpy(v_labels)))
    fit_s = time.perf_counter() - t0
    feature_mib = sum(t.numel() * t.element_size() for t in (raw.emb, raw.mlp, raw.heads, raw.pre_ln)) / 2**20
    return {"images": n, "epochs": epochs, "render_s": render_s, "extract_s": extract_s, "fit_s": fit_s,
            "feature_cache_mib": feature_mib, "peak_rss_mib_before": base_mib, "peak_rss_mib_after_extract":
            extract_mib, "peak_rss_mib": _peak_mib(), "peak_rss_growth_mib": _peak_mib() - base_mib,
            "val_accuracy": result.report["val_accuracy"]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="1000,5000,20000")
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--one", type=int, help=argparse.SUPPRESS)
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    if args.one:
        sys.stdout.write(json.dumps(one(args.one, args.epochs)) + "\n")
        return 0
    if args.smoke:
        args.sizes, args.epochs = "100,300", 1
    rows = []
    for n in (int(v) for v in args.sizes.split(",")):
        out = subprocess.run([sys.executable, __file__, "--one", str(n), "--epochs", str(args.epochs)],
                             capture_output=True, text=True, check=True).stdout
        row = json.loads(out.strip().splitlines()[-1])
        rows.append(row)
        print(f"{n:>6} images: render {row['render_s']:6.1f} s | extract {row['extract_s']:6.1f} s | fit "
              f"{row['fit_s']:6.1f} s ({args.epochs} epochs) | features {row['feature_cache_mib']:6.1f} MiB | "
              f"peak RSS {row['peak_rss_mib']:6.0f} MiB (+{row['peak_rss_growth_mib']:.0f} over the loaded model)",
              flush=True)
    first = rows[0]
    for row in rows[1:]:
        scale = row["images"] / first["images"]
        row["growth"] = {k: round(row[f"{k}_s"] / first[f"{k}_s"] / scale, 2) for k in ("render", "extract", "fit")}
        print(f"{row['images']:>6} vs {first['images']}: time ratio / size ratio = {row['growth']}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
