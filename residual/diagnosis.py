"""Label-set diagnosis before a fit (docs/method.md §5.5): which classes the text tower can hardly tell apart,
which heads carry the label set's text directions, and, on labelled images, where zero-shot goes wrong.

Everything here is a pure function of tensors: class embeddings (C, d), a basis, logits and labels.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from residual.basis import Basis
from residual.spectral import explained_variance, k_at

__all__ = ["closest_pairs", "confused_pairs", "confusion_matrix", "head_text_share"]


def closest_pairs(class_emb: torch.Tensor, classes: list[str], top: int = 10) -> list[dict[str, object]]:
    """The ``top`` class pairs whose (prompt-averaged) text embeddings are closest, by cosine, highest first."""
    e = F.normalize(class_emb.double(), dim=-1)  # (C, d)
    sim = e @ e.T  # (C, C)
    i, j = torch.triu_indices(len(classes), len(classes), offset=1)
    values = sim[i, j]
    order = values.argsort(descending=True)[:top]
    return [{"a": classes[int(i[o])], "b": classes[int(j[o])], "cosine": round(float(values[o]), 6)} for o in order]


def head_text_share(basis: Basis, class_emb: torch.Tensor, tau: float = 0.9) -> torch.Tensor:
    """(L*H,) how much of the label set's text directions lie in each head's subspace.

    Q: an orthonormal basis of the span of the mean-centred class embeddings (r = rank, at most C - 1 directions);
    P_h: head h's components up to k at ``tau``. The share is ||Q P_h^T||_F^2 / r, in [0, 1]: 1 when every
    direction that separates the classes lies in the head's subspace, 0 when none of it does.
    """
    e = F.normalize(class_emb.double(), dim=-1)
    centred = e - e.mean(0, keepdim=True)  # (C, d)
    u, s, vh = torch.linalg.svd(centred, full_matrices=False)
    r = int((s > s.max() * 1e-6).sum()) if s.numel() else 0
    if r == 0:
        return torch.zeros(basis.geometry.layers * basis.geometry.heads, dtype=torch.float64)
    q = vh[:r]  # (r, d) orthonormal rows
    g = basis.geometry
    heads = basis.eigenvalues[g.head_units]  # (L*H, d)
    ks = k_at(explained_variance(heads), tau)  # (L*H,)
    out = torch.empty(g.layers * g.heads, dtype=torch.float64)
    for h in range(out.numel()):
        p = basis.head_components[h, : int(ks[h])].double()  # (k, d)
        out[h] = (q @ p.T).pow(2).sum() / r  # ||Q P^T||_F^2 / r
    return out


def confusion_matrix(logits: torch.Tensor, labels: torch.Tensor, n_classes: int) -> torch.Tensor:
    """(C, C) counts: row = true class, column = predicted class (argmax of ``logits`` (n, C))."""
    pred = logits.argmax(-1)
    flat = labels.long() * n_classes + pred.long()  # (n,)
    return torch.bincount(flat, minlength=n_classes * n_classes).reshape(n_classes, n_classes)  # (C, C)


def confused_pairs(confusion: torch.Tensor, classes: list[str], top: int = 10) -> list[dict[str, object]]:
    """The most confused (true, predicted) pairs: off-diagonal counts as a share of the true class's images."""
    totals = confusion.sum(1).clamp_min(1).double()  # (C,)
    rate = confusion.double() / totals[:, None]
    rate.fill_diagonal_(0.0)
    order = rate.flatten().argsort(descending=True)[:top]
    n = len(classes)
    rows = []
    for o in order.tolist():
        t, p = divmod(o, n)
        if confusion[t, p] == 0:
            break
        rows.append({"true": classes[t], "predicted": classes[p], "count": int(confusion[t, p]),
                     "share": round(float(rate[t, p]), 6)})
    return rows
