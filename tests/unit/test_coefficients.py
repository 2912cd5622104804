from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from residual import (
    VARIANTS,
    Basis,
    BasisMismatchError,
    CoefficientSet,
    CoefficientShapeError,
    NonFiniteCoefficientsError,
    apply_fused,
    apply_many,
    decompose,
    fit_basis,
    fuse,
    init_coefficients,
    resolve,
)
from residual.decomposition import LinearisedLN
from residual.errors import ArtifactError
from residual.io import load_tensors, save_tensors


@pytest.fixture(scope="module")
def setup(tiny_random):
    torch.manual_seed(3)
    basis = fit_basis(tiny_random, [torch.randn(96, 3, 48, 48) for _ in range(3)], source={"kind": "noise"})
    ln = LinearisedLN(tiny_random)
    dec = decompose(tiny_random, torch.randn(9, 3, 48, 48), ln)
    return tiny_random, basis, ln, dec


def _random_set(variant: str, basis: Basis, seed: int) -> CoefficientSet:
    gen = torch.Generator().manual_seed(seed)
    cs = init_coefficients(variant, basis, ["a", "b"], ["{}"], init="randn", generator=gen)
    if variant == "linear":
        d = basis.geometry.out_dim
        cs.linear_weight = torch.eye(d) + 0.1 * torch.randn(d, d, generator=gen)
        cs.linear_bias = torch.randn(d, generator=gen)
    return cs


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(((a - b).norm(dim=-1) / b.norm(dim=-1).clamp_min(1e-12)).max())


def test_full_with_unit_lambdas_is_the_identity(setup) -> None:
    _, basis, ln, dec = setup
    cs = init_coefficients("full", basis, ["a"], ["{}"])
    assert _rel(resolve(cs, basis).apply(dec.units), dec.embedding) < 1e-5
    assert _rel(apply_fused(dec.raw, fuse(resolve(cs, basis), ln), ln), dec.embedding) < 1e-5


def test_fine_is_a_projection_onto_top_k(setup) -> None:
    _, basis, _, dec = setup
    cs = init_coefficients("fine", basis, ["a"], ["{}"], evr_threshold=0.5)
    g = basis.geometry
    y = resolve(cs, basis).apply(dec.units)
    expected = torch.zeros_like(y)
    for u in range(1 + g.layers, g.n_units):
        b = basis.components(u)[: int(cs.k[u])]
        expected += basis.mean[u] + (dec.units[:, u] - basis.mean[u]) @ b.T @ b
    assert _rel(y, expected) < 1e-5
    assert int(cs.k[: 1 + g.layers].sum()) == 0  # emb and MLPs have no lambdas


def test_coarse_is_a_weighted_sum_of_heads(setup) -> None:
    _, basis, _, dec = setup
    cs = _random_set("coarse", basis, 0)
    g = basis.geometry
    expected = torch.einsum("h,nhd->nd", cs.lambdas, dec.units[:, 1 + g.layers :])
    assert _rel(resolve(cs, basis).apply(dec.units), expected) < 1e-5


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(variant=st.sampled_from(VARIANTS), seed=st.integers(0, 10_000))
def test_fused_equals_unfused(setup, variant: str, seed: int) -> None:
    _, basis, ln, dec = setup
    adapter = resolve(_random_set(variant, basis, seed), basis)
    unfused = adapter.apply(dec.units)
    fused = apply_fused(dec.raw, fuse(adapter, ln), ln)
    assert _rel(fused, unfused) <= 1e-4


def test_mixed_batch_equals_each_alone(setup) -> None:
    _, basis, ln, dec = setup
    sets = [fuse(resolve(_random_set(v, basis, i), basis), ln) for i, v in enumerate(("full", "fine", "coarse"))]
    assignment = [0, 1, 2, 0, 2, 1, 1, 0, 2]
    mixed = apply_many(dec.raw, sets, assignment, ln)
    for i, j in enumerate(assignment):
        alone = apply_fused(dec.raw.select(slice(i, i + 1)), sets[j], ln)
        torch.testing.assert_close(mixed[i : i + 1], alone, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("variant", VARIANTS)
def test_save_load_roundtrip(setup, tmp_path, variant: str) -> None:
    _, basis, _, dec = setup
    cs = _random_set(variant, basis, 5)
    cs.report = {"val_accuracy": 0.5}
    path = tmp_path / "cs.safetensors"
    cs.save(path)
    back = CoefficientSet.load(path, basis)
    assert back.variant == variant and back.report == {"val_accuracy": 0.5} and back.classes == ["a", "b"]
    torch.testing.assert_close(resolve(back, basis).apply(dec.units), resolve(cs, basis).apply(dec.units))


def test_basis_roundtrip_and_hash(setup, tmp_path) -> None:
    _, basis, _, _ = setup
    path = tmp_path / "basis.safetensors"
    h = basis.save(path)
    back = Basis.load(path)
    assert back.hash == h == basis.hash
    assert back.source == {"kind": "noise"}
    rows = back.head_components[0]
    torch.testing.assert_close(rows @ rows.T, torch.eye(rows.shape[0]), atol=1e-4, rtol=0)


def test_nan_lambdas_are_refused(setup, tmp_path) -> None:
    _, basis, _, _ = setup
    cs = _random_set("full", basis, 1)
    cs.lambdas[3] = float("nan")
    cs.save(tmp_path / "bad.safetensors")
    with pytest.raises(NonFiniteCoefficientsError, match="lambdas"):
        CoefficientSet.load(tmp_path / "bad.safetensors", basis)


def test_wrong_shape_is_refused(setup, tmp_path) -> None:
    _, basis, _, _ = setup
    cs = _random_set("full", basis, 1)
    tensors = {"lambdas": cs.lambdas[:-1], "k": cs.k}
    cs.save(tmp_path / "ok.safetensors")
    _, meta = load_tensors(tmp_path / "ok.safetensors")
    save_tensors(tmp_path / "short.safetensors", tensors, meta)
    with pytest.raises(CoefficientShapeError, match="sum\\(k\\)"):
        CoefficientSet.load(tmp_path / "short.safetensors", basis)


def test_other_basis_is_refused(setup, tmp_path) -> None:
    bb, basis, _, _ = setup
    other = fit_basis(bb, [torch.randn(64, 3, 48, 48)])
    cs = _random_set("fine", basis, 2)
    cs.save(tmp_path / "cs.safetensors")
    with pytest.raises(BasisMismatchError, match="basis"):
        CoefficientSet.load(tmp_path / "cs.safetensors", other)


def test_pickle_files_are_never_loaded(tmp_path) -> None:
    sentinel = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (open, (str(sentinel), "w"))

    path = tmp_path / "evil.pt"
    torch.save({"lambdas": Evil()}, path)
    with pytest.raises(ArtifactError, match="only .safetensors"):
        CoefficientSet.load(path)
    renamed = path.rename(tmp_path / "evil.safetensors")  # a pickle wearing the right suffix
    with pytest.raises(ArtifactError, match="not a readable safetensors"):
        load_tensors(renamed)
    assert not sentinel.exists()


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("add_mean", [True, False])
def test_unit_shares_sum_to_the_adapter_and_explain_the_logits_exactly(setup, variant: str, add_mean: bool) -> None:
    from residual import adapted_units, explain_logits, zero_shot_logits

    bb, basis, ln, dec = setup
    cs = _random_set(variant, basis, 7)
    cs.add_mean = add_mean
    shares = adapted_units(cs, basis, dec.units)  # (n, U, d)
    assert shares.shape == dec.units.shape
    assert _rel(shares.sum(1), resolve(cs, basis).apply(dec.units)) <= 1e-5
    class_emb = torch.nn.functional.normalize(torch.randn(5, basis.geometry.out_dim), dim=-1)
    contrib = explain_logits(shares, class_emb, bb.logit_scale)  # (n, U, C)
    logits = zero_shot_logits(shares.sum(1), class_emb, bb.logit_scale)
    assert float((contrib.sum(1) - logits).abs().max()) <= 1e-4
    if variant in ("coarse", "fine"):
        assert float(shares[:, : 1 + basis.geometry.layers].abs().max()) == 0.0  # emb and MLPs are dropped
    # zero-shot: the model's own units explain its own logits
    zs = explain_logits(dec.units, class_emb, bb.logit_scale)
    assert float((zs.sum(1) - zero_shot_logits(dec.embedding, class_emb, bb.logit_scale)).abs().max()) <= 1e-4


def test_identity_covers_everything_that_changes_the_answers(setup) -> None:
    """A version id is this identity: each field that changes the scores must change it (issue 23.1)."""
    import dataclasses

    _, basis, _, _ = setup
    base = init_coefficients("full", basis, ["a", "b"], ["a photo of a {}."])
    same = init_coefficients("full", basis, ["a", "b"], ["a photo of a {}."])
    assert base.identity() == same.identity()  # created_at and the report do not count
    same.report = {"job_id": "other"}
    assert base.identity() == same.identity()
    changed = {
        "templates": dataclasses.replace(base, templates=["a {}."]),
        "classes": dataclasses.replace(base, classes=["a", "c"]),
        "class order": dataclasses.replace(base, classes=["b", "a"]),
        "variant": dataclasses.replace(base, variant="fine"),
        "basis": dataclasses.replace(base, basis_hash="sha256:0000000000000000"),
        "add_mean": dataclasses.replace(base, add_mean=False),
        "weights": dataclasses.replace(base, weights_id="sha256:1111111111111111"),
        "lambdas": dataclasses.replace(base, lambdas=base.lambdas + 1e-3),
    }
    ids = {name: cs.identity() for name, cs in changed.items()}
    assert base.identity() not in ids.values()
    assert len(set(ids.values())) == len(ids)
    linear = init_coefficients("linear", basis, ["a", "b"], ["{}"])
    assert linear.linear_bias is not None
    shifted = dataclasses.replace(linear, linear_bias=linear.linear_bias + 1.0)
    assert linear.identity() != shifted.identity()
