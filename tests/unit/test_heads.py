"""Head analysis: spectra rows, head scores, the ablation curve, SOMP/TextSpan, the dictionary and the pictures."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from residual import Basis, twonn
from residual.dictionary import build_dictionary, load_dictionary
from residual.heads import ablation_curve, describe_component, head_scores, somp, textspan, unit_spectra
from residual.plots import ablation_png, evr_curves_png, head_heatmap_png
from residual.tiny.reference import shipped_basis_path
from tests.pictures import assert_picture


def _planted_heads(n: int = 600, r: int = 6, d: int = 16, c: int = 3, informative: int = 2
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Heads (n, r, d) where only head ``informative`` carries the class direction; the rest is noise."""
    class_emb = F.normalize(torch.randn(c, d), dim=-1)
    labels = torch.arange(n) % c
    heads = 0.3 * torch.randn(n, r, d)
    heads[:, informative] += 2.0 * class_emb[labels]
    return heads, labels, class_emb


def test_head_scores_find_the_planted_head() -> None:
    heads, labels, class_emb = _planted_heads()
    scores = head_scores(heads, labels, class_emb, math.log(10.0))
    assert int(scores.ranking("supervised")[0]) == 2
    assert int(scores.ranking("text_correlation")[0]) == 2
    assert float(scores.supervised[2]) > 0.95
    others = torch.cat([scores.supervised[:2], scores.supervised[3:]])
    assert float(others.max()) < 0.6  # noise heads are near chance (1/3)
    assert float(scores.text_correlation[2]) > 2 * float(scores.text_correlation[[0, 1, 3, 4, 5]].max())


def test_text_correlation_is_the_mean_pearson_correlation_inside_the_text_subspace() -> None:
    heads, labels, class_emb = _planted_heads(n=300)
    got = head_scores(heads, labels, class_emb, 0.0).text_correlation
    q = torch.linalg.qr(class_emb.T.double()).Q.float()  # (d, C)
    o = heads.sum(1) @ q
    for r in range(heads.shape[1]):
        u = heads[:, r] @ q
        corr = [float(torch.corrcoef(torch.stack([o[:, j], u[:, j]]))[0, 1]) for j in range(q.shape[1])]
        # the paper mixes a 1/n covariance with n-1 standard deviations: a factor (n-1)/n on Pearson's r
        assert float(got[r]) == pytest.approx(sum(corr) / len(corr) * (300 - 1) / 300, abs=1e-4)


def test_ablation_curve_keeps_the_best_heads_and_counts_everything() -> None:
    heads, labels, class_emb = _planted_heads(n=300, r=10)
    units = torch.cat([0.1 * torch.randn(300, 3, 16), heads], dim=1)  # 3 non-head units first
    order = head_scores(heads, labels, class_emb, 2.0).ranking("supervised")
    curve = ablation_curve(units, labels, class_emb, 2.0, {"supervised": order}, n_heads=10,
                           fractions=(0.1, 0.5, 1.0), seeds=10)
    assert curve["k"] == [1, 5, 10]
    assert curve["supervised"][0] > 0.95  # keeping the one informative head is enough
    assert curve["random"][0] < 0.6  # one random head usually is not
    assert curve["supervised"][2] == pytest.approx(curve["heads_only"])
    # "zero" ablation of nothing = the full sum
    zero = ablation_curve(units, labels, class_emb, 2.0, {}, n_heads=10, fractions=(1.0,), ablation="zero")
    assert zero["random"][0] == pytest.approx(ablation_curve(heads, labels, class_emb, 2.0, {}, 10, (1.0,),
                                                             ablation="zero")["all_units"])
    with pytest.raises(ValueError):
        ablation_curve(units, labels, class_emb, 2.0, {}, 10, ablation="median")


@pytest.mark.parametrize("method", ["somp", "textspan"])
def test_matching_pursuits_recover_planted_atoms(method: str) -> None:
    torch.manual_seed(3)
    dic = F.normalize(torch.randn(200, 32), dim=-1)
    coef = torch.randn(500, 2) * torch.tensor([3.0, 1.0])
    x = coef @ dic[[17, 123]] + 0.01 * torch.randn(500, 32)  # (n, 2) @ (2, d)
    desc = somp(x, dic, k=2) if method == "somp" else textspan(x, dic, k=2)
    assert sorted(desc.atoms) == [17, 123]
    assert desc.atoms[0] == 17  # the larger coefficient comes first
    assert desc.explained[-1] > 0.99
    assert desc.explained == sorted(desc.explained)


def test_component_description_is_signed() -> None:
    dic = F.normalize(torch.randn(50, 8), dim=-1)
    desc = describe_component(-2.0 * dic[4] + 0.5 * dic[9], dic, k=2)
    assert desc.atoms == [4, 9]
    assert desc.weights[0] == pytest.approx(-2.0, abs=1e-6)
    assert desc.weights[1] == pytest.approx(0.5, abs=1e-6)


def test_unit_spectra_rows_follow_the_basis() -> None:
    basis = Basis.load(shipped_basis_path())
    g = basis.geometry
    # a 2-D plane embedded in R^d for every unit: TwoNN must say about 2
    plane = torch.randn(800, 2) @ torch.randn(2, g.out_dim)
    units = plane[:, None, :].expand(800, g.n_units, g.out_dim).contiguous()
    rows = unit_spectra(basis, units, n_evr=32)
    assert len(rows) == g.n_units == 1 + g.layers + g.layers * g.heads
    assert [r.type for r in rows[: 1 + g.layers]] == ["emb"] + ["mlp"] * g.layers
    assert (rows[-1].layer, rows[-1].head) == (g.layers - 1, g.heads - 1)
    pca = basis.pca()
    for r in rows:
        assert len(r.evr) == 32 and r.evr == sorted(r.evr)
        assert r.k_90 == int(pca.k_at(0.9)[r.unit]) and r.k_99 >= r.k_90
        assert 1.0 <= r.participation_ratio <= g.out_dim
        assert r.twonn == pytest.approx(twonn(plane), rel=1e-6)
        assert 1.5 < r.twonn < 2.5
    assert unit_spectra(basis)[0].twonn is None


def test_shipped_dictionary_is_the_generated_one() -> None:
    shipped = load_dictionary()
    assert shipped == build_dictionary()  # regenerate with: python -m residual.dictionary
    assert len(shipped) >= 2000 and len(set(shipped)) == len(shipped)
    for concept in ("red", "a star", "a striped background", "the number 7", "three objects", "a photo of a dog",
                    "something made of wood", "a photo of a beach"):
        assert concept in shipped


def test_pictures_are_png() -> None:
    import numpy as np

    heat = head_heatmap_png(np.arange(24, dtype=float).reshape(6, 4), "k at 0.9", "k", marked=[(0, 1)])
    curves = evr_curves_png({"head.0.0": [0.5, 0.8, 1.0]}, "spectrum")
    abl = ablation_png({"fractions": [0.1, 0.5], "supervised": [0.5, 0.9], "random": [0.3, 0.6],
                        "random_std": [0.1, 0.1], "all_units": 0.95}, "ablation", ["supervised"])
    for png in (heat, curves, abl):
        assert_picture(png)
    other = head_heatmap_png(np.arange(24, dtype=float)[::-1].reshape(6, 4), "k at 0.9", "k", marked=[(0, 1)])
    assert other != heat  # the picture shows its values


def _reference_textspan(data: np.ndarray, text: np.ndarray, iters: int, rank: int) -> list[int]:
    """An independent transcription of the authors' loop (clip_text_span, ``replace_with_iterative_removal``):
    SVD of the uncentred data, atoms projected on the span, data centred, argmax of the std of the projections
    on the unnormalised atoms, removal from the data and from the atoms."""
    _, _, vh = np.linalg.svd(data, full_matrices=False)
    vh = vh[:rank]
    text = vh.T.dot(np.linalg.inv(vh.dot(vh.T)).dot(vh)).dot(text.T).T
    data = data - data.mean(axis=0, keepdims=True)
    chosen = []
    for _ in range(iters):
        top = int(np.argmax((data @ text.T).std(axis=0, ddof=1)))
        chosen.append(top)
        norm = text[top] @ text[top]
        data = data - (data @ text[top] / norm)[:, None] * text[top][None, :]
        text = text - (text @ text[top] / norm)[:, None] * text[top][None, :]
    return chosen


def test_textspan_prefers_atoms_inside_the_span_like_the_reference() -> None:
    """The issue's minimal case: std 1 along e0, 0.5 along e1, rank 2. a1 is 91 % outside the span; normalising
    the projected atoms made it win; the reference's unnormalised projections pick a0."""
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(2000, 2, generator=gen)
    x = torch.zeros(2000, 3)
    x[:, 0], x[:, 1] = z[:, 0], 0.5 * z[:, 1]
    atoms = torch.tensor([[0.9, 0.436, 0.0], [0.3, 0.0, 0.954]])
    assert textspan(x, atoms, k=1, rank=2).atoms == [0]
    assert _reference_textspan(x.double().numpy(), atoms.double().numpy(), 1, 2) == [0]


def test_textspan_matches_an_independent_transcription_of_the_reference() -> None:
    gen = torch.Generator().manual_seed(3)
    for n, d, m, r in ((300, 32, 200, 12), (500, 64, 400, 80), (120, 16, 50, 16)):
        basis = torch.randn(r, d, generator=gen)
        x = torch.randn(n, r, generator=gen) @ basis + 0.3 * torch.randn(d, generator=gen)  # low rank, off-centre
        dic = torch.nn.functional.normalize(torch.randn(m, d, generator=gen), dim=-1)
        ours = textspan(x, dic, k=10, rank=r).atoms
        assert ours == _reference_textspan(x.double().numpy(), dic.double().numpy(), 10, r), (n, d, m, r)


def test_ablation_points_follow_the_reference() -> None:
    from residual.heads import reference_ks

    assert reference_ks(144) == [1, 2, 7, 14, 36, 72, 108]  # ViT-B: 12 x 12 heads
    assert reference_ks(384) == [1, 3, 19, 38, 96, 192, 288]  # ViT-L: 24 x 16
    assert reference_ks(24) == [1, 2, 6, 12, 18]  # residual-tiny: 5 % and 10 % floor to 1 and 2
    gen = torch.Generator().manual_seed(0)
    units = torch.randn(40, 1 + 24, 8, generator=gen)
    labels = torch.arange(40) % 2
    curve = ablation_curve(units, labels, torch.randn(2, 8, generator=gen), 1.0, {"any": torch.arange(24)}, 24)
    assert curve["k"] == [1, 2, 6, 12, 18] and curve["fractions"] == [round(k / 24, 6) for k in curve["k"]]
    assert curve["points"].startswith("reference")
