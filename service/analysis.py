"""Head-alignment reports and per-head matrices, shared by the API (small requests, pictures) and the worker (jobs).

:func:`alignment_report` runs the library's :func:`residual.heads.head_alignment` and adds the request context
(model, label set, source, basis) and, per head, the basis's spectrum (``k_90``, ``evr_1``): how specialised each head
is next to how well it aligns. :func:`heads_matrix` turns per-head rows into the (L, H) matrix the pictures draw.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from residual import Backbone, Basis
from residual.heads import head_alignment, unit_spectra
from service.errors import InvalidRequest

__all__ = ["alignment_report", "heads_matrix"]


def alignment_report(units: torch.Tensor, labels: torch.Tensor, eval_units: torch.Tensor | None,
                     eval_labels: torch.Tensor | None, class_emb: torch.Tensor, bb: Backbone, classes: list[str],
                     label_set_id: str | None, dataset: str, params: dict[str, Any], split: str, basis: Basis,
                     basis_ref: dict[str, Any], model: str | None = None) -> dict[str, Any]:
    """The alignment of every head with the label set (``units``: (n, U, d) of the scored images), the top-k
    ablation on ``eval_units`` (or stratified halves), the context, and each head's ``k_90`` and ``evr_1``."""
    g = bb.geometry
    report = head_alignment(units, labels, class_emb, bb.logit_scale, g.layers, g.heads, eval_units, eval_labels,
                            fractions=params.get("fractions"), seeds=params.get("seeds", 10),
                            ablation=params.get("ablation", "mean"), top=params.get("top", 5))
    if split:
        report["split"] = split
    spectrum = {(r.layer, r.head): r for r in unit_spectra(basis, n_evr=1) if r.type == "head"}
    for row in report["heads"]:
        r = spectrum[(row["layer"], row["head"])]
        row |= {"k_90": r.k_90, "evr_1": round(r.evr_1, 6)}
    return {"model": model or bb.name, "weights_id": bb.weights_id, "classes": classes, "label_set_id": label_set_id,
            "dataset": dataset, "basis": basis_ref, **report}


def heads_matrix(report: dict[str, Any], key: str, layers: int, heads: int) -> np.ndarray:
    """(L, H) matrix of one per-head field of an alignment report or spectra rows."""
    rows = report["heads"] if "heads" in report else [u for u in report["units"] if u["type"] == "head"]
    out = np.full((layers, heads), np.nan)
    for r in rows:
        value = r.get(key)
        if value is None:
            raise InvalidRequest(f"no per-head value {key!r}")
        out[r["layer"], r["head"]] = float(value)
    return out
