"""Spectra of residual units: streaming per-unit PCA, explained variance, intrinsic dimension, spectral cosine.

Conventions (docs/method.md §2, §5.1, §5.2):

- eigenvalues are those of the sample covariance with the n-1 denominator (S^2 / (n-1) of the centred SVD);
- the explained-variance ratio is cumulative over *all* eigenvalues: EVR_j = sum_{i<=j} lambda_i / sum_i lambda_i;
- ``k_at(evr, tau)`` = 1 + the first (0-based) index j with EVR_j > tau (strict), i.e. 1-based; 1 if none;
- participation ratio = (sum lambda)^2 / sum lambda^2.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["PCA", "StreamingPCA", "explained_variance", "k_at", "participation_ratio", "spectral_cosine", "twonn"]


def explained_variance(eigenvalues: torch.Tensor) -> torch.Tensor:
    """(..., d) eigenvalues -> (..., d) cumulative explained-variance ratio over all of them (the one definition)."""
    ev = eigenvalues.double() if eigenvalues.dtype == torch.float64 else eigenvalues
    total = ev.sum(-1, keepdim=True).clamp_min(1e-300 if ev.dtype == torch.float64 else 1e-30)
    return ev.cumsum(-1) / total


@dataclass
class PCA:
    """PCA of a batch of units: components sorted by decreasing eigenvalue."""

    components: torch.Tensor  # (U, K, d) orthonormal rows
    mean: torch.Tensor  # (U, d)
    eigenvalues: torch.Tensor  # (U, d) all eigenvalues, descending (clamped at 0)
    n_samples: int

    @property
    def evr(self) -> torch.Tensor:
        """(U, d) cumulative explained-variance ratio."""
        return explained_variance(self.eigenvalues)

    def k_at(self, tau: float) -> torch.Tensor:
        """(U,) number of components needed to exceed ``tau`` explained variance (paper convention)."""
        return k_at(self.evr, tau)

    @property
    def participation_ratio(self) -> torch.Tensor:
        return participation_ratio(self.eigenvalues)


def k_at(evr: torch.Tensor, tau: float) -> torch.Tensor:
    """(..., d) cumulative EVR -> (...,) 1 + argmax(EVR > tau); 1 when no entry exceeds tau."""
    above = evr > tau
    return above.to(torch.int64).argmax(dim=-1) + 1


def participation_ratio(eigenvalues: torch.Tensor) -> torch.Tensor:
    """(..., d) -> (...,) (sum lambda)^2 / sum lambda^2."""
    ev = eigenvalues.double()
    return (ev.sum(-1) ** 2 / (ev**2).sum(-1).clamp_min(1e-300)).to(eigenvalues.dtype)


class StreamingPCA:
    """Per-unit PCA from running float64 first and second moments; memory O(U d^2), not O(n).

    Feed batches of shape (n, U, d) with :meth:`update`, then call :meth:`result`.
    """

    def __init__(self, n_units: int, dim: int, device: torch.device | str = "cpu") -> None:
        self.n = 0
        self.sum = torch.zeros(n_units, dim, dtype=torch.float64, device=device)  # (U, d)
        self.sum_sq = torch.zeros(n_units, dim, dim, dtype=torch.float64, device=device)  # (U, d, d)
        self._shift: torch.Tensor | None = None  # first batch's mean, for numerical stability

    def update(self, x: torch.Tensor) -> None:
        """Add a batch (n, U, d)."""
        x = x.to(self.sum.device, torch.float64)
        if self._shift is None:
            self._shift = x.mean(0)  # (U, d)
        xc = x - self._shift
        self.n += x.shape[0]
        self.sum += xc.sum(0)
        self.sum_sq += torch.einsum("nud,nue->ude", xc, xc)  # (n, U, d) x (n, U, d) -> (U, d, d)

    def result(self, k: int | None = None) -> PCA:
        """Finish: components (U, k, d) (all d when ``k`` is None), eigenvalues with the n-1 denominator."""
        if self.n < 2 or self._shift is None:
            raise ValueError("StreamingPCA needs at least 2 samples")
        mean_c = self.sum / self.n  # (U, d) mean of the shifted data
        cov = (self.sum_sq - self.n * torch.einsum("ud,ue->ude", mean_c, mean_c)) / (self.n - 1)  # (U, d, d)
        evals, evecs = torch.linalg.eigh(cov)  # ascending; evecs (U, d, d) columns are eigenvectors
        evals = evals.flip(-1).clamp_min(0.0)
        comps = evecs.flip(-1).transpose(-1, -2)  # (U, d, d) rows = components, descending
        k = comps.shape[1] if k is None else k
        return PCA(components=comps[:, :k].float(), mean=(mean_c + self._shift).float(),
                   eigenvalues=evals.float(), n_samples=self.n)


def twonn(x: torch.Tensor, fraction: float = 0.9) -> float:
    """TwoNN intrinsic dimension of points (n, d) (docs/method.md §5.1)."""
    x = x.double()
    dist = torch.cdist(x, x)  # (n, n)
    dist.fill_diagonal_(float("inf"))
    r = dist.topk(2, dim=1, largest=False).values  # (n, 2): first and second neighbour
    r1, r2 = r[:, 0], r[:, 1]
    keep = (r1 > 0) & (r1 != r2)
    mu = (r2[keep] / r1[keep]).sort().values
    n = mu.numel()
    if n < 3:
        return float("nan")
    f = torch.arange(1, n + 1, dtype=torch.float64) / n
    m = int(n * fraction)
    xs = torch.log(mu[:m])
    ys = -torch.log(1 - f[:m])
    if m == n:  # the last point has F = 1 (log 0)
        xs, ys = xs[:-1], ys[:-1]
    return float((xs * ys).sum() / (xs * xs).sum())


def spectral_cosine(
    x: torch.Tensor, y: torch.Tensor, wx: torch.Tensor | None = None, wy: torch.Tensor | None = None
) -> float:
    """Normalised spectral cosine between bases x (kx, d) and y (ky, d) with weights (docs/method.md §5.2).

    With weights: C = |x y^T| * (wx wy^T) / ||(wx_i wy_i)_{i<=m}||, greedy matching over m = min(kx, ky)
    steps, score = ||sigma||. Without weights, component i is compared with component i only and the score is
    ||sigma|| / sqrt(m). Identical bases score 1.
    """
    m = min(x.shape[0], y.shape[0])
    sim = (x.double() @ y.double().T).abs()  # (kx, ky)
    if wx is None or wy is None:
        diag = sim.diagonal()[:m]
        return float(diag.norm() / m**0.5)
    wx, wy = wx.double(), wy.double()
    c = sim * torch.outer(wx, wy) / (wx[:m] * wy[:m]).norm()
    picked = []
    for _ in range(m):
        idx = int(c.argmax())
        i, j = divmod(idx, c.shape[1])
        picked.append(c[i, j].item())
        c[i, :] = -1.0
        c[:, j] = -1.0
    return float(torch.tensor(picked).norm())
