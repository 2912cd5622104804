from __future__ import annotations

import threading

import open_clip
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from open_clip.model import CLIP
from safetensors.torch import save_file

from residual import decompose, extract, load_backbone, unit_table, wrap_model
from residual.decomposition import LinearisedLN, project_units


def _rel_err(units: torch.Tensor, emb: torch.Tensor) -> float:
    return float(((units.sum(1) - emb).norm(dim=-1) / emb.norm(dim=-1)).max())


@pytest.mark.parametrize("name", ["ViT-B-32", "ViT-B-16"])
def test_units_sum_to_embedding_on_openclip_geometry(name: str) -> None:
    bb = load_backbone(name, device="cpu")
    dec = decompose(bb, torch.randn(2, 3, 224, 224))
    assert dec.units.shape == (2, 1 + 12 + 144, 512)
    assert _rel_err(dec.units, dec.embedding) <= 1e-5


def test_units_sum_to_embedding_on_shipped_model(tiny) -> None:
    dec = decompose(tiny, torch.randn(5, 3, 48, 48))
    assert _rel_err(dec.units, dec.embedding) <= 1e-5


def test_swapped_attention_matches_plain_open_clip(tmp_path) -> None:
    """The head-visible attention swap changes no number: compare with an untouched open_clip model."""
    torch.manual_seed(7)
    ref = open_clip.create_model("ViT-B-32").eval()
    path = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(path))
    bb = load_backbone("ViT-B-32", pretrained=path, device="cpu")
    x = torch.randn(3, 3, 224, 224)
    with torch.no_grad():
        expected = ref.encode_image(x)
    got = bb.encode_image(x)
    assert float((got - expected).abs().max() / expected.abs().max()) < 1e-5
    assert bb.weights_id == load_backbone("ViT-B-32", pretrained=path, device="cpu").weights_id


@pytest.mark.parametrize("n", [1, 3, 17])
def test_any_batch_size_and_raw_shapes(tiny_random, n: int) -> None:
    g = tiny_random.geometry
    raw, emb = extract(tiny_random, torch.randn(n, 3, 48, 48))
    assert raw.emb.shape == (n, g.width)
    assert raw.mlp.shape == (n, g.layers, g.width)
    assert raw.heads.shape == (n, g.layers, g.heads, g.head_dim)
    assert raw.pre_ln.shape == (n, g.width)
    assert emb.shape == (n, g.out_dim)
    assert _rel_err(project_units(raw, LinearisedLN(tiny_random)), emb) <= 1e-5


def test_capture_hooks_are_installed_once_and_idle_outside_extract(tiny_random) -> None:
    """The hooks are permanent (never added or removed while another thread's forward iterates them) and a
    forward that is not an extract captures nothing, so it keeps no activations alive."""
    import residual.decomposition as d

    visual = tiny_random.visual

    def counts() -> list[int]:
        blocks = visual.transformer.resblocks
        return [len(visual.ln_pre._forward_hooks), len(visual.ln_post._forward_pre_hooks),
                *[len(b.attn.out_proj._forward_pre_hooks) + len(b.ls_2._forward_hooks) for b in blocks]]

    extract(tiny_random, torch.randn(1, 3, 48, 48))
    first = counts()
    assert first == [1, 1] + [2] * tiny_random.geometry.layers
    for n in (1, 3):
        extract(tiny_random, torch.randn(n, 3, 48, 48))
    assert counts() == first
    assert d._current() is None
    tiny_random.encode_image(torch.randn(2, 3, 48, 48))  # a plain forward: the hooks see no capture
    assert d._current() is None


def test_unit_table_order(tiny_random) -> None:
    g = tiny_random.geometry
    table = unit_table(g)
    assert table[0].type == "emb"
    assert [u.layer for u in table[1 : 1 + g.layers]] == list(range(g.layers))
    assert all(u.type == "mlp" for u in table[1 : 1 + g.layers])
    heads = table[1 + g.layers :]
    assert [(u.layer, u.head) for u in heads] == [(l, h) for l in range(g.layers) for h in range(g.heads)]


def test_head_units_match_direct_out_proj_slices(tiny_random) -> None:
    """A head's unit is its slice of out_proj (plus bias/H) pushed through the linearised ln_post."""
    g = tiny_random.geometry
    x = torch.randn(2, 3, 48, 48)
    dec = decompose(tiny_random, x)
    ln = LinearisedLN(tiny_random)
    mu, s = ln.stats(dec.raw.pre_ln)
    l, h = 3, 2
    w = tiny_random.visual.transformer.resblocks[l].attn.out_proj.weight.detach()
    b = tiny_random.visual.transformer.resblocks[l].attn.out_proj.bias.detach()
    r = dec.raw.heads[:, l, h] @ w[:, h * g.head_dim : (h + 1) * g.head_dim].T + b / g.heads  # (n, D)
    n_u = (2 * g.layers + 1) * g.heads
    c = ((ln.gamma / s[:, None]) * r - ((ln.gamma / s[:, None]) * mu[:, None] - ln.beta) / n_u) @ ln.proj
    torch.testing.assert_close(dec.units[:, 1 + g.layers + l * g.heads + h], c, rtol=1e-5, atol=1e-6)


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    layers=st.integers(1, 3),
    heads=st.sampled_from([1, 2, 4]),
    head_width=st.sampled_from([8, 16]),
    patch=st.sampled_from([4, 8]),
    grid=st.integers(2, 4),
    embed_dim=st.sampled_from([16, 24, 32]),
    layer_scale=st.booleans(),
    n=st.integers(1, 4),
)
def test_decomposition_identity_property(layers, heads, head_width, patch, grid, embed_dim, layer_scale, n) -> None:
    width = heads * head_width
    vision = {"image_size": patch * grid, "layers": layers, "width": width, "head_width": head_width,
              "patch_size": patch, "mlp_ratio": 2.0}
    if layer_scale:
        vision["ls_init_value"] = 0.5
    text = {"context_length": 8, "vocab_size": 100, "width": 16, "heads": 2, "layers": 1}
    model = CLIP(embed_dim=embed_dim, vision_cfg=vision, text_cfg=text)
    with torch.no_grad():  # non-trivial LayerNorm affine parameters
        for p in model.visual.parameters():
            p.add_(0.05 * torch.randn_like(p))
    bb = wrap_model(model, "custom", device="cpu")
    dec = decompose(bb, torch.randn(n, 3, patch * grid, patch * grid))
    assert dec.units.shape == (n, 1 + layers + layers * heads, embed_dim)
    assert _rel_err(dec.units, dec.embedding) <= 1e-5


def test_captured_features_do_not_hold_every_token(tiny_random) -> None:  # type: ignore[no-untyped-def]
    """Raw features are CLS copies: a view into the (n, T, D) activations would keep all tokens alive (65x)."""
    from residual import extract

    raw, _ = extract(tiny_random, torch.randn(4, 3, 48, 48))
    for name in ("emb", "mlp", "heads", "pre_ln"):
        t = getattr(raw, name)
        assert t.untyped_storage().nbytes() == t.numel() * t.element_size(), name


def test_extract_is_reentrant_across_threads(tiny_random) -> None:
    """Several threads extract different batches from one backbone at once (what an API that serves and
    analyses heads does); each must get exactly its own features. Hooks on shared modules with shared lists
    mixed the captures (a stack of (2, D) and (500, D) tensors) before capture state was per call."""
    from concurrent.futures import ThreadPoolExecutor

    batches = [torch.randn(n, 3, 48, 48, generator=torch.Generator().manual_seed(n)) for n in (1, 2, 3, 5, 8, 13)]
    solo = [extract(tiny_random, x) for x in batches]
    barrier = threading.Barrier(len(batches))

    def run(i: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        barrier.wait()
        out = []
        for _ in range(6):
            raw, emb = extract(tiny_random, batches[i])
            out.append((raw.flat(), emb))
        return out

    with ThreadPoolExecutor(len(batches)) as pool:
        results = list(pool.map(run, range(len(batches))))
    for (raw0, emb0), runs in zip(solo, results, strict=True):
        for flat, emb in runs:
            assert flat.shape == raw0.flat().shape
            torch.testing.assert_close(flat, raw0.flat(), rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(emb, emb0, rtol=1e-5, atol=1e-5)
