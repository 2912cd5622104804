"""Per-unit PCA bases, fitted once on a reference image set and shared by many coefficient sets.

A basis holds, for every unit, the mean of its output-space contribution, all d eigenvalues (for spectra and
EVR pruning) and the leading components (docs/method.md §2): ``head_dim`` components for each head (a head's
contribution lives in a subspace of rank <= head_dim + 2), d for the MLPs and the embedding unit.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch

from residual.backbone import Backbone, Geometry
from residual.decomposition import LinearisedLN, Unit, decompose, unit_table
from residual.errors import BasisMismatchError, CoefficientShapeError
from residual.io import load_tensors, save_tensors, tensors_hash
from residual.spectral import PCA, StreamingPCA, explained_variance, k_at, spectral_cosine

__all__ = ["Basis", "basis_from_units", "basis_similarity", "fit_basis"]

FORMAT = "residual.basis/1"


@dataclass
class Basis:
    """Frozen per-unit PCA of a backbone's units."""

    model: str  # backbone name
    weights_id: str  # content hash of the backbone weights
    geometry: Geometry
    mean: torch.Tensor  # (U, d) unit means
    eigenvalues: torch.Tensor  # (U, d) descending, n-1 denominator
    head_components: torch.Tensor  # (L*H, hd, d) orthonormal rows
    mlp_components: torch.Tensor  # (L, d, d)
    emb_components: torch.Tensor  # (1, d, d)
    n_samples: int
    source: dict[str, Any] = field(default_factory=dict)  # how the reference set was made
    name: str = ""  # a human label (e.g. "imagenet-train-10k"); not part of the content hash

    @property
    def table(self) -> list[Unit]:
        return unit_table(self.geometry)

    @property
    def hash(self) -> str:
        return tensors_hash(self._tensors())

    def components(self, unit: int) -> torch.Tensor:
        """(K_u, d) components of unit ``unit`` (paper order)."""
        g = self.geometry
        if unit == 0:
            return self.emb_components[0]
        if unit <= g.layers:
            return self.mlp_components[unit - 1]
        return self.head_components[unit - 1 - g.layers]

    def pca(self) -> PCA:
        """A :class:`PCA` view (components truncated to head_dim for every unit)."""
        g = self.geometry
        k = g.head_dim
        comps = torch.cat([self.emb_components[:, :k], self.mlp_components[:, :k], self.head_components])
        return PCA(components=comps, mean=self.mean, eigenvalues=self.eigenvalues, n_samples=self.n_samples)

    def _tensors(self) -> dict[str, torch.Tensor]:
        return {"mean": self.mean, "eigenvalues": self.eigenvalues, "head_components": self.head_components,
                "mlp_components": self.mlp_components, "emb_components": self.emb_components}

    def save(self, path: str | os.PathLike[str]) -> str:
        """Write the basis as safetensors; returns its content hash."""
        meta = {"format": FORMAT, "model": self.model, "weights_id": self.weights_id,
                "geometry": self.geometry.__dict__, "n_samples": self.n_samples, "source": self.source,
                "name": self.name, "hash": self.hash}
        save_tensors(path, self._tensors(), meta)
        return self.hash

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Basis:
        tensors, meta = load_tensors(path)
        if meta.get("format") != FORMAT:
            raise CoefficientShapeError(f"{path}: not a basis file (format {meta.get('format')!r})")
        g = Geometry(**meta["geometry"])
        d, u, lh = g.out_dim, g.n_units, g.layers * g.heads
        expected = {"mean": (u, d), "eigenvalues": (u, d), "head_components": (lh, g.head_dim, d),
                    "mlp_components": (g.layers, d, d), "emb_components": (1, d, d)}
        for name, shape in expected.items():
            if name not in tensors:
                raise CoefficientShapeError(f"{path}: missing tensor {name!r}")
            if tuple(tensors[name].shape) != shape:
                raise CoefficientShapeError(f"{path}: {name} has shape {tuple(tensors[name].shape)}, expected {shape}")
        basis = cls(model=meta["model"], weights_id=meta["weights_id"], geometry=g, n_samples=meta["n_samples"],
                    source=meta.get("source", {}), name=meta.get("name", ""),
                    **{k: v.float() for k, v in tensors.items()})
        if meta.get("hash") and basis.hash != meta["hash"]:
            raise CoefficientShapeError(f"{path}: content hash {basis.hash} differs from the recorded {meta['hash']}")
        return basis


def fit_basis(
    backbone: Backbone, batches: Iterable[torch.Tensor], source: dict[str, Any] | None = None,
    units: Callable[[torch.Tensor], torch.Tensor] | None = None, name: str = "",
) -> Basis:
    """Streaming per-unit PCA over pixel batches (n, 3, S, S); never holds more than one batch of units.

    ``units`` maps a pixel batch to its (n, U, d) units (default: :func:`decompose` here, on this thread); a
    server passes one that runs the forward wherever it runs all forwards of the model.
    """
    if units is None:
        ln = LinearisedLN(backbone)

        def units(pixels: torch.Tensor) -> torch.Tensor:
            return decompose(backbone, pixels, ln).units

    return basis_from_units(backbone, (units(pixels) for pixels in batches), source, name)


def basis_from_units(
    backbone: Backbone, unit_batches: Iterable[torch.Tensor], source: dict[str, Any] | None = None,
    name: str = "",
) -> Basis:
    """Streaming per-unit PCA over batches of output-space units (n, U, d), e.g. from cached raw features."""
    g = backbone.geometry
    acc = StreamingPCA(g.n_units, g.out_dim, device=backbone.device)
    for units in unit_batches:
        acc.update(units)
    pca = acc.result()
    comps = pca.components.cpu()  # (U, d, d)
    return Basis(
        model=backbone.name,
        weights_id=backbone.weights_id,
        geometry=g,
        mean=pca.mean.cpu(),
        eigenvalues=pca.eigenvalues.cpu(),
        head_components=comps[g.head_units, : g.head_dim].contiguous(),
        mlp_components=comps[g.mlp_units].contiguous(),
        emb_components=comps[:1].contiguous(),
        n_samples=pca.n_samples,
        source=source or {},
        name=name,
    )


def basis_similarity(a: Basis, b: Basis, tau: float = 0.9) -> torch.Tensor:
    """(U,) per-unit normalised spectral cosine between two bases of the same weights (docs/method.md §5.2).

    For each unit, the components of each basis up to k at ``tau`` (``k_at`` of its cumulative EVR), weighted by
    their eigenvalues, compared with :func:`residual.spectral.spectral_cosine`: 1 for identical bases, symmetric.
    The paper's Experiment 2 compares every head's basis across datasets this way.

    Raises:
        BasisMismatchError: the bases belong to different model weights (their units are not the same units).
    """
    if a.weights_id != b.weights_id or a.geometry != b.geometry:
        raise BasisMismatchError(f"the bases belong to different model weights ({a.weights_id}, {b.weights_id})")
    ka = k_at(explained_variance(a.eigenvalues), tau)  # (U,)
    kb = k_at(explained_variance(b.eigenvalues), tau)  # (U,)
    out = torch.empty(a.geometry.n_units, dtype=torch.float64)
    for u in range(a.geometry.n_units):
        i, j = int(ka[u]), int(kb[u])
        # symmetric: the greedy matching takes the same pairs whichever basis comes first
        out[u] = spectral_cosine(a.components(u)[:i], b.components(u)[:j], a.eigenvalues[u, :i], b.eigenvalues[u, :j])
    return out
