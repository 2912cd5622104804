"""PNG pictures of head analyses (matplotlib, Agg canvas; no global pyplot state, so safe in threads).

- :func:`head_heatmap_png`: a layer x head heatmap of any per-head value, top heads marked;
- :func:`evr_curves_png`: cumulative explained-variance curves of some units;
- :func:`ablation_png`: the top-k head ablation curve against random heads and all units.
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

__all__ = ["ablation_png", "evr_curves_png", "head_heatmap_png"]


def _figure(width: float, height: float) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def _png(fig: Any) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", bbox_inches="tight")
    return buf.getvalue()


def head_heatmap_png(values: np.ndarray, title: str, label: str, marked: Sequence[tuple[int, int]] = (),
                     fmt: str = "{:.2f}") -> bytes:
    """``values`` (L, H) -> PNG; rows are layers, columns heads; ``marked`` (layer, head) cells get a frame."""
    values = np.asarray(values, dtype=float)
    n_layers, n_heads = values.shape
    fig = _figure(1.2 + 0.7 * n_heads, 1.0 + 0.45 * n_layers)
    ax = fig.add_subplot()
    im = ax.imshow(values, cmap="viridis", aspect="auto")
    fig.colorbar(im, ax=ax, label=label)
    ax.set_xticks(range(n_heads), [str(h) for h in range(n_heads)])
    ax.set_yticks(range(n_layers), [str(layer) for layer in range(n_layers)])
    ax.set_xlabel("head")
    ax.set_ylabel("layer")
    ax.set_title(title)
    if n_layers * n_heads <= 400:
        mid = np.nanmean(values) if np.isfinite(values).any() else 0.0
        for (layer, head), v in np.ndenumerate(values):
            ax.text(head, layer, fmt.format(v), ha="center", va="center", fontsize=7,
                    color="black" if v > mid else "white")
    for layer, head in marked:
        ax.add_patch(_rect(head - 0.5, layer - 0.5))
    return _png(fig)


def _rect(x: float, y: float) -> Any:
    from matplotlib.patches import Rectangle

    return Rectangle((x, y), 1.0, 1.0, fill=False, edgecolor="red", linewidth=2.0)


def evr_curves_png(curves: Mapping[str, Sequence[float]], title: str) -> bytes:
    """Cumulative explained-variance curves, one per named unit, with the 0.9 and 0.99 levels drawn."""
    fig = _figure(6.0, 4.0)
    ax = fig.add_subplot()
    for name, evr in curves.items():
        ax.plot(np.arange(1, len(evr) + 1), evr, marker=".", label=name)
    for level in (0.9, 0.99):
        ax.axhline(level, color="gray", linestyle=":", linewidth=1)
    ax.set_xlabel("principal components")
    ax.set_ylabel("cumulative explained variance")
    ax.set_ylim(0, 1.02)
    ax.set_title(title)
    if len(curves) <= 12:
        ax.legend(fontsize=7)
    return _png(fig)


def ablation_png(curve: Mapping[str, Any], title: str, scores: Sequence[str]) -> bytes:
    """The output of :func:`residual.heads.ablation_curve` as accuracy against the fraction of heads kept."""
    fig = _figure(6.0, 4.0)
    ax = fig.add_subplot()
    x = np.asarray(curve["fractions"]) * 100
    for name in scores:
        ax.plot(x, curve[name], marker="o", label=f"top heads by {name}")
    rnd, sd = np.asarray(curve["random"]), np.asarray(curve["random_std"])
    ax.plot(x, rnd, marker="s", color="gray", label="random heads (mean)")
    ax.fill_between(x, rnd - sd, rnd + sd, color="gray", alpha=0.2)
    ax.axhline(curve["all_units"], color="black", linestyle="--", label="all units")
    ax.set_xscale("log")
    ax.set_xlabel("% of heads kept")
    ax.set_ylabel("accuracy")
    ax.set_title(title)
    ax.legend(fontsize=7)
    return _png(fig)
