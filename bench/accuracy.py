"""Accuracy table of the embedded model: the analogue of the paper's main table.

Per world task (fixed train/val/test sets by seed): zero-shot accuracy; ResiDual ``coarse``, ``fine`` and
``full`` fitted on train with early stopping on val; a linear probe on the image embedding (multinomial
logistic regression, L2 strength chosen on val); a linear adapter on the embedding (d x d + d, identity init,
trained like the lambdas with the frozen text classifier); and the trainable parameter count of each.

    python bench/accuracy.py --json bench/out/accuracy.json --markdown bench/out/accuracy.md
    python bench/accuracy.py --smoke          # tiny sizes, for CI (well under two minutes)
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from residual import FitConfig, LinearisedLN, class_embeddings, extract_batched, fit, load_backbone
from residual.classifier import zero_shot_logits
from residual.tiny import tasks
from residual.tiny.reference import reference_basis

METHODS = ("zero_shot", "coarse", "fine", "full", "linear_probe", "linear_adapter")


def linear_probe(train: tuple[torch.Tensor, torch.Tensor], val: tuple[torch.Tensor, torch.Tensor],
                 test: tuple[torch.Tensor, torch.Tensor], n_classes: int) -> tuple[float, int]:
    """Logistic regression on L2-normalised embeddings; returns (test accuracy, parameter count)."""
    def prep(x: torch.Tensor) -> torch.Tensor:
        return F.normalize(x.float(), dim=-1)

    xtr, xva, xte = prep(train[0]), prep(val[0]), prep(test[0])
    best = (-1.0, None)
    for wd in (1e-4, 1e-3, 1e-2):
        w = torch.zeros(xtr.shape[1], n_classes, requires_grad=True)
        b = torch.zeros(n_classes, requires_grad=True)
        opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=200, line_search_fn="strong_wolfe")

        def closure(opt: torch.optim.LBFGS = opt, w: torch.Tensor = w, b: torch.Tensor = b, wd: float = wd
                    ) -> torch.Tensor:
            opt.zero_grad()
            loss = F.cross_entropy(xtr @ w * 10 + b, train[1]) + wd * (w**2).sum()
            loss.backward()
            return loss

        opt.step(closure)
        with torch.no_grad():
            acc = float(((xva @ w * 10 + b).argmax(-1) == val[1]).float().mean())
        if acc > best[0]:
            best = (acc, (w.detach().clone(), b.detach().clone()))
    assert best[1] is not None
    w, b = best[1]
    test_acc = float(((xte @ w * 10 + b).argmax(-1) == test[1]).float().mean())
    return test_acc, w.numel() + b.numel()


def run(smoke: bool, task_names: list[str], seed: int) -> dict[str, object]:
    torch.manual_seed(seed)
    bb = load_backbone("residual-tiny", device="cpu")
    basis = reference_basis(bb)
    ln = LinearisedLN(bb)
    sizes = {"train": 200, "val": 100, "test": 200} if smoke else dict(tasks.SPLIT_SIZES)
    epochs = 3 if smoke else 30
    rows = []
    for name in task_names:
        task = tasks.TASKS[name]
        t0 = time.perf_counter()
        data = {}
        for split, n in sizes.items():
            images, labels, _ = tasks.task_images(name, split, n=n, side=bb.geometry.image_size)
            raw, emb = extract_batched(bb, bb.pixels_from_arrays(images))
            data[split] = (raw, emb, torch.from_numpy(labels))
        cls = class_embeddings(bb.encode_text, bb.tokenizer, task.classes, task.templates)
        zs = float((zero_shot_logits(data["test"][1], cls, bb.logit_scale).argmax(-1) == data["test"][2])
                   .float().mean())
        row: dict[str, object] = {"task": name, "classes": len(task.classes), "chance": 1 / len(task.classes),
                                  "zero_shot": zs, "params": {"zero_shot": 0}}
        for variant, key in (("coarse", "coarse"), ("fine", "fine"), ("full", "full"), ("linear", "linear_adapter")):
            res = fit((data["train"][0], data["train"][2]), cls, bb.logit_scale, basis, ln, list(task.classes),
                      list(task.templates), FitConfig(variant=variant, max_epochs=epochs, seed=seed),
                      val=(data["val"][0], data["val"][2]), test=(data["test"][0], data["test"][2]))
            row[key] = res.report["test_accuracy"]
            row["params"][key] = res.report["n_parameters"]  # type: ignore[index]
            row.setdefault("epochs", {})[key] = res.report["epochs"]  # type: ignore[union-attr]
        probe, probe_params = linear_probe((data["train"][1], data["train"][2]), (data["val"][1], data["val"][2]),
                                           (data["test"][1], data["test"][2]), len(task.classes))
        row["linear_probe"] = probe
        row["params"]["linear_probe"] = probe_params  # type: ignore[index]
        row["seconds"] = round(time.perf_counter() - t0, 1)
        rows.append(row)
        print(f"{name}: " + " ".join(f"{m}={row[m]:.3f}" for m in METHODS), file=sys.stderr)
    return {"model": bb.name, "weights_id": bb.weights_id, "basis": basis.hash, "smoke": smoke, "sizes": sizes,
            "seed": seed, "rows": rows}


def markdown(result: dict[str, object]) -> str:
    rows = result["rows"]
    assert isinstance(rows, list)
    head = "| task | chance | " + " | ".join(METHODS) + " | gap closed by best ResiDual |"
    lines = [head, "|" + "---|" * (len(METHODS) + 3)]
    for r in rows:
        gap = r["linear_probe"] - r["zero_shot"]
        best = max(r["coarse"], r["fine"], r["full"])
        closed = f"{(best - r['zero_shot']) / gap:.0%}" if gap > 0.05 else "n/a (gap < 5 points)"
        lines.append(f"| {r['task']} | {r['chance']:.2f} | " + " | ".join(f"{r[m]:.3f}" for m in METHODS)
                     + f" | {closed} |")
    params = rows[0]["params"]
    lines.append("| trainable parameters | | " + " | ".join(str(params[m]) for m in METHODS) + " | |")
    lines += ["", "Quality bar of the embedded-model issue:", ""]
    lines += [f"- [{'x' if met else ' '}] {name}: {detail}" for name, met, detail in quality_bar(result)]
    return "\n".join(lines) + "\n"


def quality_bar(result: dict[str, object]) -> list[tuple[str, bool, str]]:
    """The embedded-model issue's quality bar, criterion by criterion: (criterion, met, the figures behind it)."""
    rows = result["rows"]
    assert isinstance(rows, list)
    by = {r["task"]: r for r in rows}
    out = []
    weak = [f"{r['task']} {r['zero_shot']:.2f} (chance {r['chance']:.2f})" for r in rows
            if r["zero_shot"] < r["chance"] + 0.10]
    out.append(("zero-shot at least 10 points above chance on every task", not weak, "; ".join(weak) or "all"))
    if "shape" in by:
        out.append(("zero-shot shape >= 0.60", by["shape"]["zero_shot"] >= 0.60, f"{by['shape']['zero_shot']:.3f}"))
    low = [f"{r['task']} {r['linear_probe']:.2f}" for r in rows if r["linear_probe"] < 0.85]
    out.append(("linear probe >= 0.85 on every task", not low, "; ".join(low) or "all"))
    room = [r for r in rows if r["linear_probe"] - r["zero_shot"] >= 0.15]
    out.append(("at least two tasks with zero-shot >= 15 points below the probe", len(room) >= 2,
                ", ".join(r["task"] for r in room) or "none"))
    for r in room:
        gap = r["linear_probe"] - r["zero_shot"]
        best = max(("coarse", "fine", "full"), key=lambda m: r[m])
        closed = (r[best] - r["zero_shot"]) / gap
        params = r["params"]
        adapter = params["linear_adapter"]
        ok = closed >= 0.5 and params[best] < adapter and params["fine"] <= adapter / 10
        out.append((f"{r['task']}: best ResiDual closes >= half the gap with fewer parameters than the adapter", ok,
                    f"{best} {r[best]:.3f} closes {closed:.0%} of {r['zero_shot']:.3f} -> {r['linear_probe']:.3f}"
                    f" with {params[best]} parameters (adapter {params['linear_adapter']}, fine {params['fine']})"))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="tiny sizes and 3 epochs (CI)")
    p.add_argument("--tasks", default=",".join(tasks.TASKS), help="comma-separated task names")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, default=None, help="write the result as JSON")
    p.add_argument("--markdown", type=Path, default=None, help="write the table as Markdown")
    args = p.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    result = run(args.smoke, args.tasks.split(","), args.seed)
    result["quality_bar"] = [{"criterion": c, "met": m, "detail": d} for c, m, d in quality_bar(result)]
    table = markdown(result)
    print(table)
    for path, text in ((args.json, json.dumps(result, indent=2)), (args.markdown, table)):
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
