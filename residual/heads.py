"""Head analysis (docs/method.md §5): per-unit spectra, head-text alignment, head ablation, text descriptions.

- :func:`unit_spectra`: one row per unit (cumulative EVR, k at 0.9 / 0.99, participation ratio, TwoNN) from a
  :class:`~residual.basis.Basis` and, for the intrinsic dimension, a sample of output-space units (4.1);
- :func:`head_scores`: per head, the supervised score (zero-shot accuracy of the head's contribution alone) and
  the correlation with the task's text subspace, the paper's U|T score (4.3);
- :func:`ablation_curve`: accuracy when keeping only the top fraction of heads by a score, against random heads
  and all units, every other unit replaced by its mean over the data (or zero) (4.3);
- :func:`somp`, :func:`textspan`, :func:`describe_head`, :func:`describe_component`: text descriptions of a
  head's outputs and of its principal components over a text dictionary (4.4).

Every function takes output-space tensors (``project_units`` / ``decompose(...).units``), so it works the same
for the embedded model and any open_clip ViT.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F

from residual.basis import Basis
from residual.classifier import zero_shot_logits
from residual.decomposition import Unit
from residual.spectral import k_at, participation_ratio, twonn

__all__ = [
    "DEFAULT_FRACTIONS",
    "Description",
    "HeadScores",
    "UnitSpectrum",
    "ablation_curve",
    "reference_ks",
    "describe_component",
    "describe_head",
    "head_alignment",
    "head_scores",
    "somp",
    "textspan",
    "unit_spectra",
]

DEFAULT_FRACTIONS = (0.01, 0.05, 0.10, 0.25, 0.50)
"""Fractions the API offers as examples; the default curve uses :func:`reference_ks` (the reference's points)."""


def reference_ks(n_heads: int) -> list[int]:
    """The top-k points of the reference code: k in {1, max(2, 1%), 5%, 10%, 25%, 50%, 75%} of N (floors).

    Sorted, without repeats, each between 1 and N: for N = 144 (ViT-B) [1, 2, 7, 14, 36, 72, 108].
    """
    ks = [1, max(2, n_heads // 100)] + [n_heads * p // 100 for p in (5, 10, 25, 50, 75)]
    return sorted({min(n_heads, max(1, k)) for k in ks})


# ---------------------------------------------------------------------------------------------------------------
# 4.1 spectra and intrinsic dimension


@dataclass(frozen=True)
class UnitSpectrum:
    """Spectral summary of one unit; ``twonn`` is None when no sample was given."""

    unit: int
    type: str
    layer: int
    head: int
    evr: list[float]  # cumulative explained-variance ratio, first ``n_evr`` components
    k_90: int
    k_99: int
    participation_ratio: float
    evr_1: float
    twonn: float | None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def unit_spectra(basis: Basis, units: torch.Tensor | None = None, n_evr: int = 32,
                 fraction: float = 0.9) -> list[UnitSpectrum]:
    """One :class:`UnitSpectrum` per unit in the paper's order.

    ``units`` (n, U, d): an output-space sample (e.g. the first images of the reference set) for TwoNN.
    """
    pca = basis.pca()
    evr = pca.evr  # (U, d) cumulative
    k90, k99 = k_at(evr, 0.9), k_at(evr, 0.99)  # (U,)
    pr = participation_ratio(basis.eigenvalues)  # (U,)
    table: list[Unit] = basis.table
    if units is not None and units.shape[1] != len(table):
        raise ValueError(f"units has {units.shape[1]} units; the basis has {len(table)}")
    rows = []
    for u, unit in enumerate(table):
        ident = twonn(units[:, u], fraction) if units is not None else None
        rows.append(UnitSpectrum(
            unit=u, type=unit.type, layer=unit.layer, head=unit.head,
            evr=[round(float(v), 6) for v in evr[u, :n_evr]], k_90=int(k90[u]), k_99=int(k99[u]),
            participation_ratio=float(pr[u]), evr_1=float(evr[u, 0]),
            twonn=None if ident is None or math.isnan(ident) else float(ident)))
    return rows


# ---------------------------------------------------------------------------------------------------------------
# 4.3 head-text alignment and the top-k ablation


@dataclass
class HeadScores:
    """Per-head scores, each (L*H,) in (layer, head) order."""

    supervised: torch.Tensor  # zero-shot accuracy of the head's contribution alone
    text_correlation: torch.Tensor  # U|T: mean correlation with the sum of heads inside the text subspace

    def by_name(self, name: str) -> torch.Tensor:
        if name not in ("supervised", "text_correlation"):
            raise ValueError(f"unknown score {name!r}; expected 'supervised' or 'text_correlation'")
        return self.supervised if name == "supervised" else self.text_correlation

    def ranking(self, name: str) -> torch.Tensor:
        """(L*H,) head indices, best first (ties broken by index)."""
        s = self.by_name(name)
        return torch.sort(s, descending=True, stable=True).indices


def head_scores(heads: torch.Tensor, labels: torch.Tensor, class_emb: torch.Tensor,
                logit_scale: torch.Tensor | float) -> HeadScores:
    """Scores of every head for a task (docs/method.md §5.3).

    Args:
        heads: (n, R, d) output-space head contributions (R = L*H).
        labels: (n,) class indices. class_emb: (C, d) unit-norm class embeddings.
    """
    heads = heads.float()
    n, r, d = heads.shape
    logits = zero_shot_logits(heads.reshape(n * r, d), class_emb, logit_scale)  # (n*R, d) -> (n*R, C)
    pred = logits.reshape(n, r, -1).argmax(-1)  # (n*R, C) -> (n, R, C) -> (n, R)
    supervised = (pred == labels[:, None]).float().mean(0)  # (R,)

    q, _ = torch.linalg.qr(class_emb.float().T.double())  # (d, C) orthonormal basis of the text subspace
    q = q.float()
    o = heads.sum(1) @ q  # (n, d) @ (d, C) -> (n, C): the sum of heads in the text subspace
    u = torch.einsum("nrd,dc->nrc", heads, q)  # (n, R, d) x (d, C) -> (n, R, C)
    oc, uc = o - o.mean(0), u - u.mean(0)
    cov = (oc[:, None, :] * uc).mean(0)  # (R, C), 1/n
    std = o.std(0, unbiased=True)[None, :] * u.std(0, unbiased=True)  # (1, C) * (R, C), n-1
    corr = torch.where(std > 0, cov / std.clamp_min(1e-30), torch.zeros_like(cov))
    return HeadScores(supervised=supervised, text_correlation=corr.mean(-1))


def _accuracy(y: torch.Tensor, labels: torch.Tensor, class_emb: torch.Tensor, logit_scale: torch.Tensor | float
              ) -> float:
    return float((zero_shot_logits(y, class_emb, logit_scale).argmax(-1) == labels).float().mean())


def ablation_curve(units: torch.Tensor, labels: torch.Tensor, class_emb: torch.Tensor,
                   logit_scale: torch.Tensor | float, rankings: dict[str, torch.Tensor], n_heads: int,
                   fractions: Sequence[float] | None = None, seeds: int = 10, ablation: str = "mean"
                   ) -> dict[str, Any]:
    """Accuracy keeping only the top k heads, every other unit ablated (docs/method.md §5.3).

    Args:
        units: (n, U, d) output-space units of the evaluation images, heads last (paper order).
        rankings: score name -> (R,) head indices best first (R = ``n_heads``).
        fractions: None for the reference's points (:func:`reference_ks`), or fractions of the heads
            (k = round(fraction * N), at least 1).
        ablation: "mean" (an ablated unit becomes its mean over ``units``) or "zero".
    Returns ``{"fractions" (k / N), "k", "points", "<score>": [acc per k], "random": [mean], "random_std": [...],
    "all_units": acc, "heads_only": acc}``.
    """
    if ablation not in ("mean", "zero"):
        raise ValueError(f"ablation must be 'mean' or 'zero', not {ablation!r}")
    units = units.float()
    n, n_units, d = units.shape
    first_head = n_units - n_heads
    base = units.mean(0) if ablation == "mean" else torch.zeros(n_units, d)  # (U, d) what an ablated unit becomes
    delta = units - base  # (n, U, d): keeping unit u adds delta[:, u] to the ablated sum
    ablated = base.sum(0)  # (d,)

    def acc_keeping(head_idx: torch.Tensor) -> float:
        y = ablated + delta[:, first_head + head_idx].sum(1)  # (n, k, d) -> (n, d)
        return _accuracy(y, labels, class_emb, logit_scale)

    if fractions is None:
        ks = reference_ks(n_heads)
        fractions = [k / n_heads for k in ks]
        points = "reference: k in {1, max(2, 1%), 5%, 10%, 25%, 50%, 75%} of the heads (floors)"
    else:
        ks = [max(1, round(f * n_heads)) for f in fractions]
        points = "requested fractions"
    out: dict[str, Any] = {"fractions": [round(f, 6) for f in fractions], "k": ks, "points": points,
                           "ablation": ablation}
    for name, order in rankings.items():
        out[name] = [acc_keeping(order[:k]) for k in ks]
    gen = torch.Generator().manual_seed(0)
    rand = torch.tensor([[acc_keeping(torch.randperm(n_heads, generator=gen)[:k]) for k in ks]
                         for _ in range(seeds)])  # (seeds, len(ks))
    out["random"] = rand.mean(0).tolist()
    out["random_std"] = rand.std(0).tolist() if seeds > 1 else [0.0] * len(ks)
    out["all_units"] = _accuracy(units.sum(1), labels, class_emb, logit_scale)
    out["heads_only"] = acc_keeping(torch.arange(n_heads))
    return out


# ---------------------------------------------------------------------------------------------------------------
# 4.4 text descriptions


@dataclass(frozen=True)
class Description:
    """Chosen dictionary atoms, best first, with their weights and the variance explained after each step."""

    atoms: list[int]
    weights: list[float]
    explained: list[float]  # cumulative fraction of the (centred) variance explained, in selection order

    def named(self, texts: Sequence[str]) -> list[dict[str, Any]]:
        return [{"text": texts[a], "weight": round(w, 6)} for a, w in zip(self.atoms, self.weights, strict=True)]


def _explained(x: torch.Tensor, r: torch.Tensor) -> float:
    total = float((x * x).sum())
    return 1.0 - float((r * r).sum()) / total if total > 0 else 0.0


def somp(x: torch.Tensor, dictionary: torch.Tensor, k: int = 10, criterion: str = "l1", center: bool = True
         ) -> Description:
    """Simultaneous orthogonal matching pursuit of ``x`` (n, d) over ``dictionary`` (m, d) (docs/method.md §5.4).

    Each step picks the unchosen atom with the largest sum of |<residual_n, atom>| ("l1") or std over n ("std"),
    then refits all chosen atoms by least squares. Atoms are returned ordered by the RMS of their coefficients
    (signed coefficient when n = 1, which is plain OMP on one vector).
    """
    if criterion not in ("l1", "std"):
        raise ValueError(f"criterion must be 'l1' or 'std', not {criterion!r}")
    x = x.double()
    x = x - x.mean(0) if center else x
    dic = F.normalize(dictionary.double(), dim=-1)  # (m, d)
    k = min(k, dic.shape[0])
    chosen: list[int] = []
    explained: list[float] = []
    resid = x
    w = torch.zeros(x.shape[0], 0, dtype=torch.float64)
    for _ in range(k):
        proj = resid @ dic.T  # (n, d) @ (d, m) -> (n, m)
        score = proj.abs().sum(0) if criterion == "l1" else proj.std(0, unbiased=False)
        if chosen:
            score[chosen] = -math.inf
        chosen.append(int(score.argmax()))
        atoms = dic[chosen]  # (s, d)
        w = torch.linalg.lstsq(atoms.T, x.T).solution.T  # solve atoms^T w^T = x^T: (n, s)
        resid = x - w @ atoms
        explained.append(_explained(x, resid))
    # one vector (OMP): its signed coefficients; several: the RMS coefficient of each atom over n, (s,)
    weight = w[0] if x.shape[0] == 1 else w.pow(2).mean(0).sqrt()
    order = torch.argsort(weight.abs(), descending=True, stable=True).tolist()
    return Description(atoms=[chosen[i] for i in order], weights=[float(weight[i]) for i in order],
                       explained=explained)


def textspan(x: torch.Tensor, dictionary: torch.Tensor, k: int = 10, rank: int = 80) -> Description:
    """TextSpan (Gandelsman et al., Algorithm 1; docs/method.md §5.4), as the authors' code implements it.

    The dictionary is projected on the span of the top ``rank`` right singular vectors of the *uncentred* ``x``
    (n, d); the data are then centred. Each step takes the atom whose projections ``x @ atom`` (on the projected
    atom as it is, *not* normalised: an atom mostly outside the span has short projections) have the largest std
    over n, removes that atom's direction from the data and from the remaining atoms. Weights are the variance
    each atom explained when it was taken.
    """
    x = x.double()
    _, _, vh = torch.linalg.svd(x, full_matrices=False)  # uncentred, as the reference; vh (min(n, d), d)
    vr = vh[: min(rank, vh.shape[0])]  # (r, d) orthonormal rows
    dic = dictionary.double() @ vr.T @ vr  # (m, d) -> (m, r) -> (m, d): projection on the span
    x = x - x.mean(0)
    total = float((x * x).sum())
    resid = x.clone()
    chosen: list[int] = []
    weights: list[float] = []
    explained: list[float] = []
    k = min(k, dic.shape[0])
    for _ in range(k):
        std = (resid @ dic.T).std(0)  # (n, m) projections on the unnormalised atoms -> (m,)
        if chosen:
            std[chosen] = -math.inf  # their projections are 0 after the removal; never taken twice
        j = int(std.argmax())
        norm2 = float(dic[j] @ dic[j])
        if not math.isfinite(float(std[j])) or norm2 < 1e-18:
            break
        before = float((resid * resid).sum())
        resid = resid - (resid @ dic[j] / norm2)[:, None] * dic[j][None, :]  # remove the atom's direction
        dic = dic - (dic @ dic[j] / norm2)[:, None] * dic[j][None, :]  # orthogonalise the remaining atoms
        chosen.append(j)
        weights.append((before - float((resid * resid).sum())) / total if total > 0 else 0.0)
        explained.append(_explained(x, resid))
    return Description(atoms=chosen, weights=weights, explained=explained)


def describe_head(x: torch.Tensor, dictionary: torch.Tensor, k: int = 10, method: str = "somp") -> Description:
    """Text description of one head's outputs ``x`` (n, d): SOMP (default) or TextSpan."""
    if method == "somp":
        return somp(x, dictionary, k)
    if method == "textspan":
        return textspan(x, dictionary, k)
    raise ValueError(f"method must be 'somp' or 'textspan', not {method!r}")


def describe_component(component: torch.Tensor, dictionary: torch.Tensor, k: int = 5) -> Description:
    """OMP of one principal component (d,) over the dictionary (docs/method.md §5.4, ``ood_somp``).

    A component's sign is arbitrary, so the weights are signed: a negative weight means the text lies along
    the negative direction of the component.
    """
    return somp(component[None, :], dictionary, k, center=False)


# ---------------------------------------------------------------------------------------------------------------
# the whole head-alignment report of a task


def head_alignment(units: torch.Tensor, labels: torch.Tensor, class_emb: torch.Tensor,
                   logit_scale: torch.Tensor | float, n_layers: int, n_heads_per_layer: int,
                   eval_units: torch.Tensor | None = None, eval_labels: torch.Tensor | None = None,
                   fractions: Sequence[float] | None = None, seeds: int = 10, ablation: str = "mean",
                   top: int = 5) -> dict[str, Any]:
    """Head scores on (``units``, ``labels``) and the ablation curve on the evaluation set (docs/method.md §5.3).

    Args:
        units: (n, U, d) output-space units (paper order, heads last) of the scoring images.
        eval_units, eval_labels: the evaluation images (the paper scores on val and evaluates on test); when
            absent, the images are split into stratified halves (scores on one, ablation on the other), or used
            for both when a class has a single image.
    Returns a JSON-ready dict: one row per head (scores and ranks, 1 = best), the ``top`` heads per score, the
    ablation curve, the sample sizes and how the images were split.
    """
    split = "separate evaluation images"
    if eval_units is None or eval_labels is None:
        counts = torch.bincount(labels)
        if int(counts[counts > 0].min()) >= 2:
            from residual.fitting import stratified_split

            score_idx, eval_idx = stratified_split(labels, 0.5, seed=0)
            units, eval_units = units[score_idx], units[eval_idx]
            labels, eval_labels = labels[score_idx], labels[eval_idx]
            split = "stratified halves: scores on one, ablation on the other"
        else:
            eval_units, eval_labels = units, labels
            split = "all images for both scores and ablation (a class has a single image)"
    r = n_layers * n_heads_per_layer
    scores = head_scores(units[:, -r:], labels, class_emb, logit_scale)
    names = ("text_correlation", "supervised")
    rankings = {name: scores.ranking(name) for name in names}
    rank_of = {name: torch.empty(r, dtype=torch.int64).scatter_(0, order, torch.arange(1, r + 1))
               for name, order in rankings.items()}  # head index -> 1-based rank
    rows = [{"layer": i // n_heads_per_layer, "head": i % n_heads_per_layer,
             "supervised": round(float(scores.supervised[i]), 6),
             "text_correlation": round(float(scores.text_correlation[i]), 6),
             "rank_supervised": int(rank_of["supervised"][i]),
             "rank_text_correlation": int(rank_of["text_correlation"][i])} for i in range(r)]
    curve = ablation_curve(eval_units, eval_labels, class_emb, logit_scale, rankings, r, fractions, seeds, ablation)
    top_heads = {name: [{"layer": int(i) // n_heads_per_layer, "head": int(i) % n_heads_per_layer,
                         "score": round(float(scores.by_name(name)[i]), 6)} for i in order[:top]]
                 for name, order in rankings.items()}
    return {"heads": rows, "top_heads": top_heads, "ablation": curve, "n_score": int(units.shape[0]),
            "n_eval": int(eval_units.shape[0]), "split": split}
