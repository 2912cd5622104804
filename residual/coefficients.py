"""Coefficient sets (the lambdas of a task) and how they turn unit contributions into an adapted embedding.

Variants (docs/method.md §3):

- ``coarse``: one lambda per head, no centring; y = sum_h lambda_h c_h; emb and MLPs dropped.
- ``fine``: heads only; lambda per principal component for the first k_h components (k_h = EVR threshold,
  default 0.9), padding 0 beyond k_h (a projection onto the top-k_h subspace); emb and MLPs dropped.
- ``full``: heads and MLPs, every stored component has a lambda, padding 1 (what the basis does not span
  passes through unchanged); the embedding unit is added back raw.
- ``linear``: a baseline on the output embedding, y = z W + b (d x d + d, identity init).

Per adapted unit u with basis B_u (K_u, d) of orthonormal rows and mean mu_u, padding p and padded lambda:

    y_u = m_u + (c_u - mu_u) A_u,   A_u = p I + B_u^T diag(lambda_u - p) B_u

Back-projection uses B_u itself (not the transposed branch of the reference code, docs/method.md §D1). m_u = mu_u
when ``add_mean`` (our default; the reference code never adds the mean back, docs/method.md §D2), else 0. With
``add_mean``, ``full`` at lambda = 1 reproduces the model's embedding exactly, so a fit starts from zero-shot
behaviour.

Every variant is thus y = sum_u c_u A_u + offset, which :class:`ResolvedAdapter` holds, and which
:func:`fuse` folds with the LayerNorm linearisation into one matrix over the raw per-head values
(:class:`FusedAdapter`).
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
from dataclasses import dataclass, field
from typing import Any

import torch

from residual.basis import Basis
from residual.classifier import LOGIT_CONVENTION
from residual.decomposition import LinearisedLN, RawFeatures
from residual.errors import BasisMismatchError, CoefficientShapeError
from residual.io import load_tensors, save_tensors, tensors_hash

__all__ = ["VARIANTS", "VARIANT_INFO", "CoefficientSet", "FusedAdapter", "ResolvedAdapter", "VariantInfo",
           "adapted_units", "apply_fused", "apply_many", "fuse", "init_coefficients", "resolve"]

VARIANTS = ("coarse", "fine", "full", "linear")
FORMAT = "residual.coefficients/1"


@dataclass(frozen=True)
class VariantInfo:
    """What a variant learns, whether it needs a basis, and whether its initial coefficients are zero-shot."""

    parameters: str  # what the learned numbers are, in words
    uses_basis: bool  # needs a per-unit PCA basis
    starts_at_zero_shot: bool  # the initial coefficients reproduce the unadapted model exactly
    starting_point: str  # what the initial coefficients (epoch 0 of a fit) compute, in words


VARIANT_INFO: dict[str, VariantInfo] = {
    "coarse": VariantInfo(
        "one lambda per head (L*H)", False, False,
        "not zero-shot: coarse keeps the heads only (the embedding and MLP units are dropped), so the initial "
        "lambdas (all ones) give the heads-only model"),
    "fine": VariantInfo(
        "one lambda per principal component kept per head (k at the EVR threshold, default 0.9)", True, False,
        "not zero-shot: fine keeps the heads only, each projected on its top-k components (the embedding, the MLPs "
        "and the remaining components are dropped), so the initial lambdas give that projected model"),
    "full": VariantInfo(
        "one lambda per stored principal component of every head and MLP", True, True,
        "zero-shot: with all lambdas 1 (the initial coefficients) full is exactly the unadapted model"),
    "linear": VariantInfo(
        "a d x d matrix and a bias on the output embedding (a baseline, not ResiDual)", False, True,
        "zero-shot: the linear map starts at the identity (y = z)"),
}
"""Each variant in words (the README, the API docs and every fit report use these)."""


@dataclass
class CoefficientSet:
    """The task-specific numbers of one fitted adapter, plus what they are valid with."""

    variant: str  # one of VARIANTS
    lambdas: torch.Tensor  # coarse: (L*H,); fine/full: (sum_u k_u,) concatenated in unit order; linear: (0,)
    k: torch.Tensor  # (U,) int64 trainable lambdas per unit (0 for units without lambdas)
    model: str
    weights_id: str
    basis_hash: str | None  # None for coarse and linear (no basis used)
    classes: list[str]
    templates: list[str]
    add_mean: bool = True
    linear_weight: torch.Tensor | None = None  # (d, d), linear variant only
    linear_bias: torch.Tensor | None = None  # (d,), linear variant only
    convention: str = LOGIT_CONVENTION
    report: dict[str, Any] = field(default_factory=dict)
    created_at: str = field(default_factory=lambda: _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"))

    @property
    def n_parameters(self) -> int:
        if self.variant == "linear":
            assert self.linear_weight is not None
            assert self.linear_bias is not None
            return self.linear_weight.numel() + self.linear_bias.numel()
        return int(self.lambdas.numel())

    def identity(self) -> str:
        """Content hash of everything that changes this set's answers: ``sha256:<16 hex>``.

        The lambdas, k, the linear weight and bias, the label set (classes and templates, in order), the variant,
        the basis, ``add_mean``, the model weights and the logit convention. Two sets with the same identity score
        every image identically; a refit with a new label set but unchanged lambdas gets a new identity.
        """
        tensors = {"lambdas": self.lambdas.float(), "k": self.k.to(torch.int64)}
        if self.linear_weight is not None:
            tensors["linear_weight"] = self.linear_weight.float()
        if self.linear_bias is not None:
            tensors["linear_bias"] = self.linear_bias.float()
        meta = json.dumps({"variant": self.variant, "weights_id": self.weights_id, "basis_hash": self.basis_hash,
                           "classes": self.classes, "templates": self.templates, "add_mean": self.add_mean,
                           "convention": self.convention}, sort_keys=True, ensure_ascii=False)
        h = hashlib.sha256(tensors_hash(tensors).encode() + b"\0" + meta.encode())
        return "sha256:" + h.hexdigest()[:16]

    def save(self, path: str | os.PathLike[str]) -> None:
        tensors = {"lambdas": self.lambdas.float(), "k": self.k.to(torch.int64)}
        if self.variant == "linear":
            assert self.linear_weight is not None
            assert self.linear_bias is not None
            tensors |= {"linear_weight": self.linear_weight.float(), "linear_bias": self.linear_bias.float()}
        meta = {"format": FORMAT, "variant": self.variant, "model": self.model, "weights_id": self.weights_id,
                "basis_hash": self.basis_hash, "label_set": {"classes": self.classes, "templates": self.templates},
                "add_mean": self.add_mean, "convention": self.convention, "report": self.report,
                "created_at": self.created_at, "n_parameters": self.n_parameters}
        save_tensors(path, tensors, meta)

    @classmethod
    def load(cls, path: str | os.PathLike[str], basis: Basis | None = None) -> CoefficientSet:
        """Load and validate; with ``basis``, also check it is the basis (and model) the set was fitted on."""
        tensors, meta = load_tensors(path)
        if meta.get("format") != FORMAT:
            raise CoefficientShapeError(f"{path}: not a coefficient-set file (format {meta.get('format')!r})")
        variant = meta.get("variant")
        if variant not in VARIANTS:
            raise CoefficientShapeError(f"{path}: unknown variant {variant!r}; expected one of {VARIANTS}")
        for name in ("lambdas", "k") + (("linear_weight", "linear_bias") if variant == "linear" else ()):
            if name not in tensors:
                raise CoefficientShapeError(f"{path}: missing tensor {name!r}")
        cs = cls(variant=variant, lambdas=tensors["lambdas"], k=tensors["k"], model=meta["model"],
                 weights_id=meta["weights_id"], basis_hash=meta.get("basis_hash"),
                 classes=list(meta["label_set"]["classes"]), templates=list(meta["label_set"]["templates"]),
                 add_mean=bool(meta.get("add_mean", True)), linear_weight=tensors.get("linear_weight"),
                 linear_bias=tensors.get("linear_bias"), convention=meta.get("convention", LOGIT_CONVENTION),
                 report=meta.get("report", {}), created_at=meta.get("created_at", ""))
        if int(cs.k.sum()) != cs.lambdas.numel() and variant != "linear":
            raise CoefficientShapeError(
                f"{path}: {cs.lambdas.numel()} lambdas but the unit table asks for sum(k) = {int(cs.k.sum())}")
        if basis is not None:
            check_compatible(cs, basis)
        return cs


def check_compatible(cs: CoefficientSet, basis: Basis) -> None:
    """Raise :class:`BasisMismatchError` / :class:`CoefficientShapeError` if ``cs`` cannot run on ``basis``."""
    if cs.weights_id != basis.weights_id:
        raise BasisMismatchError(f"coefficient set was fitted on model weights {cs.weights_id}, "
                                 f"the basis belongs to {basis.weights_id}")
    if cs.basis_hash is not None and cs.basis_hash != basis.hash:
        raise BasisMismatchError(f"coefficient set needs basis {cs.basis_hash}, got {basis.hash}")
    g = basis.geometry
    if cs.k.shape != (g.n_units,):
        raise CoefficientShapeError(f"k has shape {tuple(cs.k.shape)}, the model has {g.n_units} units")
    if cs.convention != LOGIT_CONVENTION:
        raise CoefficientShapeError(f"coefficient set uses logit convention {cs.convention!r}; "
                                    f"this library serves {LOGIT_CONVENTION!r} only")
    if cs.variant == "linear":
        d = g.out_dim
        assert cs.linear_weight is not None
        assert cs.linear_bias is not None
        if cs.linear_weight.shape != (d, d) or cs.linear_bias.shape != (d,):
            raise CoefficientShapeError(f"linear adapter must be ({d}, {d}) + ({d},)")
        return
    for u in range(g.n_units):
        limit = 1 if cs.variant == "coarse" else basis.components(u).shape[0]
        if int(cs.k[u]) > limit:
            raise CoefficientShapeError(f"unit {u} has k = {int(cs.k[u])} > {limit} available components")


def _adapted_units(variant: str, basis: Basis) -> list[int]:
    g = basis.geometry
    heads = list(range(g.n_units))[g.head_units]
    if variant in ("coarse", "fine"):
        return heads
    if variant == "full":
        return list(range(g.n_units))[g.mlp_units] + heads
    return []


def init_coefficients(
    variant: str,
    basis: Basis,
    classes: list[str],
    templates: list[str],
    init: str = "ones",
    evr_threshold: float = 0.9,
    add_mean: bool = True,
    generator: torch.Generator | None = None,
) -> CoefficientSet:
    """A fresh coefficient set: lambda = 1 (``"ones"``) or N(0, 1) + 1 (``"randn"``, the paper's init)."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; expected one of {VARIANTS}")
    if init not in ("ones", "randn"):
        raise ValueError(f"unknown init {init!r}; expected 'ones' or 'randn'")
    g = basis.geometry
    k = torch.zeros(g.n_units, dtype=torch.int64)
    if variant == "coarse":
        k[g.head_units] = 1
    elif variant == "fine":
        kt = basis.pca().k_at(evr_threshold)  # (U,)
        for u in _adapted_units(variant, basis):
            k[u] = min(int(kt[u]), basis.components(u).shape[0])
    elif variant == "full":
        for u in _adapted_units(variant, basis):
            k[u] = basis.components(u).shape[0]
    n = int(k.sum())
    lambdas = torch.ones(n) if init == "ones" else torch.randn(n, generator=generator) + 1
    d = g.out_dim
    return CoefficientSet(
        variant=variant, lambdas=lambdas, k=k, model=basis.model, weights_id=basis.weights_id,
        basis_hash=basis.hash if variant in ("fine", "full") else None, classes=list(classes),
        templates=list(templates), add_mean=add_mean,
        linear_weight=torch.eye(d) if variant == "linear" else None,
        linear_bias=torch.zeros(d) if variant == "linear" else None,
    )


@dataclass
class ResolvedAdapter:
    """y = sum_u c_u A_u + offset, with A (U, d, d) (zeros for dropped units) and offset (d,)."""

    A: torch.Tensor  # (U, d, d)
    offset: torch.Tensor  # (d,)

    def apply(self, units: torch.Tensor) -> torch.Tensor:
        """(n, U, d) unit contributions -> (n, d) adapted embedding (the unfused reference formula)."""
        return torch.einsum("nud,ude->ne", units, self.A) + self.offset  # (n,U,d) x (U,d,d) -> (n,d)


def adapted_units(cs: CoefficientSet, basis: Basis, units: torch.Tensor) -> torch.Tensor:
    """(n, U, d) unit contributions -> (n, U, d): each unit's share of the adapted embedding.

    y_u = m_u + (c_u - mu_u) A_u for adapted units (the unit's own mean term included), c_u for the embedding unit
    of ``full``, 0 for dropped units; ``linear`` gives c_u W with its bias split equally over the units. The shares
    sum over u to ``resolve(cs, basis).apply(units)`` (tested), without building the (U, d, d) matrices.
    """
    check_compatible(cs, basis)
    n, n_units, d = units.shape
    units = units.float()
    if cs.variant == "linear":
        assert cs.linear_weight is not None
        assert cs.linear_bias is not None
        return units @ cs.linear_weight.float() + cs.linear_bias.float() / n_units  # (n, U, d) @ (d, d)
    out = torch.zeros_like(units)
    if cs.variant == "full":
        out[:, 0] = units[:, 0]  # embedding unit added back raw
    pad = 1.0 if cs.variant == "full" else 0.0
    lambdas = cs.lambdas.float().split(cs.k.tolist())
    for u in _adapted_units(cs.variant, basis):
        if cs.variant == "coarse":
            out[:, u] = lambdas[u][0] * units[:, u]
            continue
        b = basis.components(u).to(units)  # (K, d)
        lam = torch.full((b.shape[0],), pad, dtype=units.dtype, device=units.device)
        lam[: int(cs.k[u])] = lambdas[u].to(units)
        mu = basis.mean[u].to(units)
        x = units[:, u] - mu  # (n, d)
        # (c_u - mu_u) (pad I + B^T diag(lam - pad) B) + m_u, with (n, d) @ (d, K) -> (n, K) -> (n, d)
        out[:, u] = pad * x + ((x @ b.T) * (lam - pad)) @ b + (mu if cs.add_mean else 0.0)
    return out


def resolve(cs: CoefficientSet, basis: Basis) -> ResolvedAdapter:
    """Per-unit matrices A_u and the constant offset of a coefficient set on its basis."""
    check_compatible(cs, basis)
    g = basis.geometry
    d = g.out_dim
    eye = torch.eye(d)
    A = torch.zeros(g.n_units, d, d)
    offset = torch.zeros(d)
    if cs.variant == "linear":
        assert cs.linear_weight is not None
        assert cs.linear_bias is not None
        A[:] = cs.linear_weight.float()
        return ResolvedAdapter(A, cs.linear_bias.float().clone())
    if cs.variant == "full":
        A[0] = eye  # embedding unit added back raw
    pad = 1.0 if cs.variant == "full" else 0.0
    lambdas = cs.lambdas.float().split(cs.k.tolist())
    for u in _adapted_units(cs.variant, basis):
        if cs.variant == "coarse":
            A[u] = lambdas[u][0] * eye
            continue
        b = basis.components(u)  # (K, d)
        lam = torch.full((b.shape[0],), pad)
        lam[: int(cs.k[u])] = lambdas[u]
        A[u] = pad * eye + b.T @ torch.diag(lam - pad) @ b  # (d, K) (K, K) (K, d) -> (d, d)
        mu = basis.mean[u]
        offset += (mu if cs.add_mean else 0.0) - mu @ A[u]
    return ResolvedAdapter(A, offset)


@dataclass
class FusedAdapter:
    """y = (flat @ weight + e) / s - (mu / s) * alpha + beta, over ``RawFeatures.flat()`` and pre-LN stats."""

    weight: torch.Tensor  # (L*H*hd + L*D + D, d)
    e: torch.Tensor  # (d,) head bias terms
    alpha: torch.Tensor  # (d,) coefficient of -mu/s
    beta: torch.Tensor  # (d,) constant

    def to(self, device: torch.device | str, dtype: torch.dtype = torch.float32) -> FusedAdapter:
        return FusedAdapter(*(t.to(device, dtype) for t in (self.weight, self.e, self.alpha, self.beta)))


def fuse(adapter: ResolvedAdapter, ln: LinearisedLN) -> FusedAdapter:
    """Fold out_proj, LayerScale, the ln_post linearisation and the projection into the adapter."""
    g = ln.geometry
    dev = ln.proj.device
    A = adapter.A.to(dev)  # (U, d, d)
    G = ln.gamma[:, None] * ln.proj  # (D, d): diag(gamma) P
    a = ln.gamma @ ln.proj  # (d,)
    bvec = ln.beta @ ln.proj  # (d,)
    blocks = 2 * g.layers + 1
    n_u = torch.full((g.n_units,), float(blocks), device=dev)
    n_u[g.head_units] = blocks * g.heads
    GA = torch.einsum("Dd,ude->uDe", G, A)  # (D, d) x (U, d, d) -> (U, D, d)
    # head rows: W_O[:, h]^T diag(ls_1) G A_h, (L, D, H, hd) x (L, D) x (L*H, D, d) -> (L, H, hd, d)
    w_heads = ln.w_o * ln.ls_1[:, :, None, None]  # (L, D, H, hd)
    ga_heads = GA[g.head_units].view(g.layers, g.heads, g.width, g.out_dim)  # (L, H, D, d)
    head_rows = torch.einsum("ldhe,lhdf->lhef", w_heads, ga_heads)  # -> (L, H, hd, d)
    bias_heads = (ln.b_o * ln.ls_1) / g.heads  # (L, D) per-head share of out_proj bias
    e = torch.einsum("ld,lhdf->f", bias_heads, ga_heads)  # sum over layers and heads -> (d,)
    weight = torch.cat([
        head_rows.reshape(-1, g.out_dim),  # (L*H*hd, d)
        GA[g.mlp_units].reshape(-1, g.out_dim),  # (L*D, d) MLP rows
        GA[0],  # (D, d) embedding rows
    ])
    aA = torch.einsum("d,ude->ue", a, A)  # (U, d)
    bA = torch.einsum("d,ude->ue", bvec, A)  # (U, d)
    alpha = (aA / n_u[:, None]).sum(0)
    beta = (bA / n_u[:, None]).sum(0) + adapter.offset.to(dev)
    return FusedAdapter(weight=weight, e=e, alpha=alpha, beta=beta)


def apply_fused(raw: RawFeatures, fused: FusedAdapter, ln: LinearisedLN) -> torch.Tensor:
    """(n, ...) raw features -> (n, d) adapted embedding with one matmul."""
    mu, s = ln.stats(raw.pre_ln)  # (n,), (n,)
    y = raw.flat() @ fused.weight + fused.e  # (n, F) @ (F, d) -> (n, d)
    return y / s[:, None] - (mu / s)[:, None] * fused.alpha + fused.beta


def apply_many(raw: RawFeatures, adapters: list[FusedAdapter], assignment: list[int], ln: LinearisedLN
               ) -> torch.Tensor:
    """One shared batch, several adapters: sample i uses ``adapters[assignment[i]]``. Returns (n, d)."""
    index = torch.as_tensor(assignment, device=raw.emb.device)
    out = torch.empty(len(raw), ln.proj.shape[1], device=raw.emb.device)
    for j in index.unique().tolist():
        rows = (index == j).nonzero().squeeze(1)
        out[rows] = apply_fused(raw.select(rows), adapters[j], ln)
    return out
