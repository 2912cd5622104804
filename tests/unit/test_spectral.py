from __future__ import annotations

import math

import pytest
import torch

from residual import StreamingPCA, k_at, participation_ratio, spectral_cosine, twonn


def test_streaming_pca_matches_svd() -> None:
    n, u, d = 3000, 3, 24
    scales = torch.logspace(1, -2, d)
    x = torch.randn(n, u, d, dtype=torch.float64) * scales + 5.0  # offset exercises the centring
    acc = StreamingPCA(u, d)
    for chunk in x.split(700):
        acc.update(chunk)
    pca = acc.result()
    for unit in range(u):
        xc = x[:, unit] - x[:, unit].mean(0)
        _, s, vh = torch.linalg.svd(xc, full_matrices=False)
        ev = s**2 / (n - 1)
        torch.testing.assert_close(pca.eigenvalues[unit].double(), ev, rtol=1e-4, atol=1e-9)
        # components equal up to sign
        dots = (pca.components[unit].double() * vh).sum(-1).abs()
        assert float((dots[:10] - 1).abs().max()) < 1e-4
        torch.testing.assert_close(pca.mean[unit].double(), x[:, unit].mean(0), rtol=1e-5, atol=1e-5)


def test_k_at_uses_strict_inequality_and_is_one_based() -> None:
    evr = torch.tensor([0.5, 0.9, 0.95, 1.0])
    assert int(k_at(evr, 0.9)) == 3  # 0.9 is not > 0.9
    assert int(k_at(evr, 0.4)) == 1
    assert int(k_at(torch.tensor([0.2, 0.3]), 0.99)) == 1  # none above: argmax of all-False is 0


def test_participation_ratio() -> None:
    assert float(participation_ratio(torch.ones(7))) == pytest.approx(7.0)
    assert float(participation_ratio(torch.tensor([1.0, 0.0, 0.0]))) == pytest.approx(1.0)


def test_twonn_recovers_plane_dimension() -> None:
    gen = torch.Generator().manual_seed(0)
    plane = torch.randn(1500, 2, generator=gen) @ torch.randn(2, 12, generator=gen)
    assert twonn(plane) == pytest.approx(2.0, abs=0.3)
    cube = torch.rand(1500, 5, generator=gen)
    assert twonn(cube) == pytest.approx(5.0, abs=1.0)


def test_spectral_cosine_identity_and_orthogonal() -> None:
    q, _ = torch.linalg.qr(torch.randn(16, 16))
    x = q.T[:4]  # 4 orthonormal rows
    w = torch.tensor([4.0, 3.0, 2.0, 1.0])
    assert spectral_cosine(x, x, w, w) == pytest.approx(1.0, abs=1e-6)
    assert spectral_cosine(x, x) == pytest.approx(1.0, abs=1e-6)
    y = q.T[4:8]
    assert spectral_cosine(x, y, w, w) == pytest.approx(0.0, abs=1e-6)
    # greedy matching pairs a component with its own copy even when the order differs (unweighted would not)
    permuted = x[[1, 0, 2, 3]]
    assert spectral_cosine(x, permuted, w, w) > spectral_cosine(x, permuted)
    assert math.isfinite(spectral_cosine(x, q.T[:2], w, w[:2]))
