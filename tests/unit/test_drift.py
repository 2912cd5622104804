"""residual.drift: the statistics add like sums, travel as bytes, and score what they should."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from residual import Basis, LinearisedLN, extract, load_backbone
from residual.decomposition import project_units
from residual.drift import DriftReference, DriftStats, deployment_score, drift_scores
from residual.spectral import explained_variance
from residual.tiny import world
from residual.tiny.reference import shipped_basis_path

BB = load_backbone("residual-tiny", device="cpu")


@pytest.fixture(scope="module")
def setup() -> tuple[LinearisedLN, Basis, DriftReference]:
    basis = Basis.load(shipped_basis_path())
    return LinearisedLN(BB), basis, DriftReference.from_basis(basis)


def _units(ln: LinearisedLN, seed: int, n: int, **fixed: str) -> torch.Tensor:
    """(n, U, d) units of world scenes drawn like the training mixture (with ``fixed`` attributes pinned)."""
    rng = np.random.default_rng(seed)
    arrays = world.render_batch([world.sample_scene(rng, **fixed) for _ in range(n)], seed=seed)
    raw, _ = extract(BB, BB.pixels_from_arrays(arrays))
    return project_units(raw, ln)


def test_sums_add_across_batches_and_travel_as_bytes(setup: tuple) -> None:
    ln, basis, ref = setup
    units = _units(ln, 1, 96)
    whole = DriftStats.zeros(*ref.shape)
    whole.add(units, ref)
    parts = [DriftStats.zeros(*ref.shape) for _ in range(3)]
    for i, p in enumerate(parts):
        p.add(units[32 * i : 32 * (i + 1)], ref)
    summed = parts[0] + parts[1] + parts[2]
    assert summed.n == whole.n == 96
    for field in ("energy", "inside", "coords"):
        assert torch.allclose(getattr(summed, field), getattr(whole, field), rtol=1e-5, atol=1e-6)  # float32 batches
    back = DriftStats.from_bytes(whole.to_bytes())
    assert back.n == 96 and torch.equal(back.coords, whole.coords) and torch.equal(back.energy, whole.energy)
    assert torch.allclose((summed - parts[2]).energy, (parts[0] + parts[1]).energy)
    with pytest.raises(ValueError):
        DriftStats.from_bytes(b"pickle?")


def test_the_basis_reference_is_its_own_data(setup: tuple) -> None:
    _, basis, ref = setup
    evr = explained_variance(basis.eigenvalues.double())
    for u in (0, 3, basis.geometry.n_units - 1):
        k = int(ref.k[u])
        assert evr[u, k - 1] > 0.9 and (k == 1 or evr[u, k - 2] <= 0.9)  # k at 0.9, as the spectra report it
        assert ref.ref_outside[u] == pytest.approx(max(1e-6, 1 - float(evr[u, k - 1])))
        assert torch.allclose(ref.components[u, :k], basis.components(u)[:k].double())
        assert torch.all(ref.components[u, k:] == 0)


def test_in_distribution_traffic_scores_low_and_a_shift_scores_high(setup: tuple) -> None:
    ln, _, ref = setup
    scores = {}
    for name, fixed in (("mixture", {}), ("one background", {"background": next(iter(world.BACKGROUNDS))})):
        stats = DriftStats.zeros(*ref.shape)
        stats.add(_units(ln, 7, 512, **fixed), ref)
        scores[name] = deployment_score(drift_scores(stats, ref)["score"])
    assert scores["mixture"] < 0.2  # the documented noise band at 512 images
    assert scores["one background"] > 3 * scores["mixture"]


def test_a_reference_from_training_data_matches_that_data(setup: tuple) -> None:
    ln, basis, _ = setup
    units = _units(ln, 3, 256, position="left")
    ref = DriftReference.from_units(basis, [units[:128], units[128:]])
    same = DriftStats.zeros(*ref.shape)
    same.add(units, ref)
    scores = drift_scores(same, ref)
    assert float(scores["mean_shift"].max()) < 1e-3  # its own training data: no shift (float32 rounding only)
    assert torch.allclose(scores["energy_outside"], ref.ref_outside, atol=1e-5)
    other = DriftStats.zeros(*ref.shape)
    other.add(_units(ln, 4, 256, position="right"), ref)
    assert deployment_score(drift_scores(other, ref)["score"]) > 0.3
