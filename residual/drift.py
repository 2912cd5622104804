"""Per-unit drift of traffic against a reference, in a basis's coordinates (docs/method.md §5.6).

Every unit u (the embedding, each MLP, each head) of every image is centred on the basis mean and projected on
the basis's top k_u components (k at 0.9). :class:`DriftStats` keeps three sums over images, so statistics of
several replicas or windows add:

- ``energy`` (U,): sum of ||c||^2, the squared norm of the centred unit;
- ``inside`` (U,): sum of ||P_k c||^2, its part inside the top-k subspace;
- ``coords`` (U, K): sum of P_k c, its coordinates on the top-k components.

:func:`drift_scores` compares them with a :class:`DriftReference`: the basis's own data (mean 0 and variance
lambda_j on each component, a share 1 - EVR(k) of the energy outside) or a coefficient set's training images
(their measured mean, variance and share outside). Per unit:

- ``energy_outside`` = 1 - inside / energy: the share of the traffic's energy outside the reference subspace;
- ``mean_shift`` = sqrt(mean_j ((coords_j / n - ref_mean_j)^2 / ref_var_j)): the traffic's mean displacement in
  units of the reference's standard deviation, RMS over the k components (about 1/sqrt(n) without drift);
- ``score`` = sqrt(mean_shift^2 + max(0, energy_outside / ref_outside - 1)^2): 0 without drift; 1 means a mean
  displaced by one standard deviation on every component, or twice the reference's share of energy outside.

The deployment score is the mean of the top tenth of the unit scores (at least one unit): a shift that moves a few
heads is not averaged away by the many that do not move.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable
from dataclasses import dataclass

import torch

from residual.basis import Basis
from residual.spectral import explained_variance, k_at

__all__ = ["DriftReference", "DriftStats", "deployment_score", "drift_scores"]

_MAGIC = b"RDRIFT1\0"


@dataclass
class DriftReference:
    """What 'no drift' looks like in a basis's coordinates, per unit."""

    basis_hash: str
    k: torch.Tensor  # (U,) components kept per unit
    components: torch.Tensor  # (U, K, d) the top-K rows, zero beyond k_u
    mean: torch.Tensor  # (U, d) the basis mean: the origin of the coordinates
    ref_mean: torch.Tensor  # (U, K) expected mean coordinates
    ref_var: torch.Tensor  # (U, K) expected variance of each coordinate
    ref_outside: torch.Tensor  # (U,) expected share of energy outside the top k

    @property
    def shape(self) -> tuple[int, int]:
        return int(self.components.shape[0]), int(self.components.shape[1])

    @classmethod
    def from_basis(cls, basis: Basis, tau: float = 0.9) -> DriftReference:
        """The basis's own data: mean 0, variance lambda_j, a share 1 - EVR(k) outside."""
        evr = explained_variance(basis.eigenvalues.double())  # (U, d)
        k = k_at(evr, tau)  # (U,)
        n_units, d = basis.mean.shape
        kmax = int(k.max())
        comps = torch.zeros(n_units, kmax, d, dtype=torch.float64)
        var = torch.ones(n_units, kmax, dtype=torch.float64)
        for u in range(n_units):
            ku = int(k[u])
            comps[u, :ku] = basis.components(u)[:ku].double()
            var[u, :ku] = basis.eigenvalues[u, :ku].double().clamp_min(1e-12)
        outside = (1.0 - evr[torch.arange(n_units), k - 1]).clamp_min(1e-6)  # (U,)
        return cls(basis.hash, k, comps, basis.mean.double(), torch.zeros(n_units, kmax, dtype=torch.float64), var,
                   outside)

    @classmethod
    def from_units(cls, basis: Basis, batches: Iterable[torch.Tensor], tau: float = 0.9) -> DriftReference:
        """A coefficient set's training images (batches of (n, U, d) units) in the basis's coordinates: their
        measured mean, per-component variance and share of energy outside."""
        ref = cls.from_basis(basis, tau)
        stats = DriftStats.zeros(*ref.shape)
        squares = torch.zeros(ref.shape, dtype=torch.float64)  # (U, K) sum of coords^2
        for units in batches:
            proj = stats.add(units, ref)  # (n, U, K)
            squares += proj.pow(2).sum(0)
        n = max(1, stats.n)
        mean = stats.coords / n
        var = (squares / n - mean.pow(2)).clamp_min(1e-12)
        outside = (1.0 - stats.inside / stats.energy.clamp_min(1e-30)).clamp_min(1e-6)
        mask = torch.arange(ref.shape[1])[None, :] < ref.k[:, None]  # (U, K) kept components
        return cls(ref.basis_hash, ref.k, ref.components, ref.mean, mean * mask, torch.where(mask, var, 1.0),
                   outside)

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"k": self.k, "components": self.components, "mean": self.mean, "ref_mean": self.ref_mean,
                "ref_var": self.ref_var, "ref_outside": self.ref_outside}


@dataclass
class DriftStats:
    """Sums over images (they add across batches, windows and replicas)."""

    n: int
    energy: torch.Tensor  # (U,)
    inside: torch.Tensor  # (U,)
    coords: torch.Tensor  # (U, K)

    @classmethod
    def zeros(cls, n_units: int, k: int) -> DriftStats:
        return cls(0, torch.zeros(n_units, dtype=torch.float64), torch.zeros(n_units, dtype=torch.float64),
                   torch.zeros(n_units, k, dtype=torch.float64))

    def add(self, units: torch.Tensor, ref: DriftReference) -> torch.Tensor:
        """Add a batch of (n, U, d) units; returns their (n, U, K) coordinates."""
        # float32 per image (the cost on the serving path), float64 sums (they add over millions of images)
        c = units.float().cpu() - ref.mean.float()  # (n, U, d) centred on the basis mean
        proj = torch.einsum("nud,ukd->nuk", c, ref.components.float())  # (n, U, d) x (U, K, d) -> (n, U, K)
        self.n += int(units.shape[0])
        self.energy += c.pow(2).sum(-1).sum(0).double()
        self.inside += proj.pow(2).sum(-1).sum(0).double()
        self.coords += proj.sum(0).double()
        return proj.double()

    def __add__(self, other: DriftStats) -> DriftStats:
        return DriftStats(self.n + other.n, self.energy + other.energy, self.inside + other.inside,
                          self.coords + other.coords)

    def __sub__(self, other: DriftStats) -> DriftStats:
        return DriftStats(self.n - other.n, self.energy - other.energy, self.inside - other.inside,
                          self.coords - other.coords)

    def to_bytes(self) -> bytes:
        """Raw little-endian float64 with an explicit header (n, U, K): no pickle."""
        u, k = self.coords.shape
        body = torch.cat([self.energy, self.inside, self.coords.flatten()]).numpy().astype("<f8").tobytes()
        return _MAGIC + struct.pack("<qqq", self.n, u, k) + body

    @classmethod
    def from_bytes(cls, data: bytes) -> DriftStats:
        if not data.startswith(_MAGIC):
            raise ValueError("not drift statistics")
        n, u, k = struct.unpack_from("<qqq", data, len(_MAGIC))
        values = torch.frombuffer(bytearray(data[len(_MAGIC) + 24:]), dtype=torch.float64)
        if values.numel() != u * (2 + k):
            raise ValueError(f"drift statistics of {values.numel()} values; expected {u * (2 + k)}")
        return cls(int(n), values[:u].clone(), values[u : 2 * u].clone(), values[2 * u :].reshape(u, k).clone())


def drift_scores(stats: DriftStats, ref: DriftReference) -> dict[str, torch.Tensor]:
    """Per unit: energy_outside, mean_shift and score (U,) of ``stats`` against ``ref`` (see the module)."""
    n = max(1, stats.n)
    outside = 1.0 - stats.inside / stats.energy.clamp_min(1e-30)  # (U,)
    mask = torch.arange(ref.shape[1])[None, :] < ref.k[:, None]  # (U, K)
    z2 = ((stats.coords / n - ref.ref_mean).pow(2) / ref.ref_var) * mask  # (U, K)
    shift = (z2.sum(-1) / ref.k.double()).sqrt()  # (U,) RMS over the kept components
    excess = (outside / ref.ref_outside - 1.0).clamp_min(0.0)
    return {"energy_outside": outside, "mean_shift": shift, "score": (shift.pow(2) + excess.pow(2)).sqrt()}


def deployment_score(unit_scores: torch.Tensor) -> float:
    """The mean of the top tenth of the unit scores (at least one)."""
    k = max(1, unit_scores.numel() // 10)
    return float(unit_scores.topk(k).values.mean())
