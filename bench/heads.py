"""Head specialisation on the embedded model: per task, head scores, top heads, and the top-k ablation.

    python bench/heads.py --json bench/out/heads.json --markdown bench/out/heads.md --pictures docs
    python bench/heads.py --smoke          # tiny sizes (CI)

For every benchmark task: heads scored on the val split (U|T text correlation and supervised accuracy), the
ablation curve on the test split (top heads by each score, random heads over 10 seeds, all units), the top three
heads by U|T; the best head of each task described by SOMP over the shipped text dictionary. Pictures (layer x
head U|T heatmap with the top heads framed, and the ablation curve) for the tasks given by ``--picture-tasks``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from residual import LinearisedLN, class_embeddings, extract_batched, load_backbone, project_units
from residual.dictionary import load_dictionary
from residual.heads import describe_head, head_alignment
from residual.plots import ablation_png, head_heatmap_png
from residual.tiny import tasks
from residual.tiny.reference import reference_images


def _units(bb: Any, ln: LinearisedLN, images: np.ndarray) -> torch.Tensor:
    raw, _ = extract_batched(bb, bb.pixels_from_arrays(images))
    return project_units(raw, ln)


def run(n_score: int, n_eval: int, n_sample: int, seeds: int) -> dict[str, Any]:
    bb = load_backbone("residual-tiny", device="cpu")
    ln = LinearisedLN(bb)
    g = bb.geometry
    texts = load_dictionary()
    dic = class_embeddings(bb.encode_text, bb.tokenizer, texts, ["{}"])
    sample = _units(bb, ln, reference_images(n_sample, g.image_size))
    out: dict[str, Any] = {"model": bb.name, "weights_id": bb.weights_id, "n_score": n_score, "n_eval": n_eval,
                           "seeds": seeds, "tasks": {}}
    for name, task in tasks.TASKS.items():
        t0 = time.perf_counter()
        s_img, s_lab, _ = tasks.task_images(name, "val", n=n_score)
        e_img, e_lab, _ = tasks.task_images(name, "test", n=n_eval)
        cls = class_embeddings(bb.encode_text, bb.tokenizer, task.classes, task.templates)
        rep = head_alignment(_units(bb, ln, s_img), torch.from_numpy(s_lab), cls, bb.logit_scale, g.layers, g.heads,
                             _units(bb, ln, e_img), torch.from_numpy(e_lab), seeds=seeds, top=3)
        best = rep["top_heads"]["text_correlation"][0]
        unit = g.head_unit(best["layer"], best["head"])
        desc = describe_head(sample[:, unit], dic, k=5)
        i10 = rep["ablation"]["k"].index(max(1, g.layers * g.heads * 10 // 100))  # the reference's 10 % point
        out["tasks"][name] = {**rep, "best_head_description": desc.named(texts),
                              "top10_text_correlation": rep["ablation"]["text_correlation"][i10],
                              "top10_supervised": rep["ablation"]["supervised"][i10],
                              "top10_random": rep["ablation"]["random"][i10],
                              "seconds": round(time.perf_counter() - t0, 2)}
    return out


def markdown(res: dict[str, Any]) -> str:
    lines = [f"Head specialisation of `{res['model']}` ({res['weights_id']}): scores on {res['n_score']} val images, "
             f"ablation on {res['n_eval']} test images, random = mean of {res['seeds']} seeds.", "",
             "| task | top 3 heads by U\\|T (layer.head: score) | all units | heads only | top 10 % by U\\|T | "
             "top 10 % by supervised | 10 % random | best head described as |", "|---|---|---|---|---|---|---|---|"]
    for name, t in res["tasks"].items():
        top = ", ".join(f"{h['layer']}.{h['head']}: {h['score']:.3f}" for h in t["top_heads"]["text_correlation"])
        desc = "; ".join(d["text"] for d in t["best_head_description"][:3])
        lines.append(f"| {name} | {top} | {t['ablation']['all_units']:.3f} | {t['ablation']['heads_only']:.3f} | "
                     f"{t['top10_text_correlation']:.3f} | {t['top10_supervised']:.3f} | {t['top10_random']:.3f} | "
                     f"{desc} |")
    wins = sum(t["top10_text_correlation"] > t["top10_random"] for t in res["tasks"].values())
    lines += ["", f"Top 10 % of heads by U|T beat 10 % random heads on {wins} of {len(res['tasks'])} tasks."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="tiny sizes, seconds (CI)")
    p.add_argument("--json", type=Path)
    p.add_argument("--markdown", type=Path)
    p.add_argument("--pictures", type=Path, help="folder for PNG pictures")
    p.add_argument("--picture-tasks", default="colour,position")
    args = p.parse_args(argv)
    torch.set_num_threads(2)
    sizes = (40, 40, 100, 2) if args.smoke else (500, 1000, 1000, 10)
    res = run(*sizes)
    md = markdown(res)
    sys.stdout.write(md)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(res, indent=1))
    if args.markdown:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text(md)
    if args.pictures:
        args.pictures.mkdir(parents=True, exist_ok=True)
        for name in args.picture_tasks.split(","):
            t = res["tasks"][name]
            matrix = np.full((6, 4), np.nan)
            for h in t["heads"]:
                matrix[h["layer"], h["head"]] = h["text_correlation"]
            marked = [(h["layer"], h["head"]) for h in t["top_heads"]["text_correlation"]]
            (args.pictures / f"heads-{name}-text-correlation.png").write_bytes(head_heatmap_png(
                matrix, f"{name}: U|T score per head (top 3 framed)", "U|T", marked))
            (args.pictures / f"heads-{name}-ablation.png").write_bytes(ablation_png(
                t["ablation"], f"{name}: keeping the top heads", ["text_correlation", "supervised"]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
