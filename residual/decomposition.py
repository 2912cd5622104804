"""Exact residual decomposition of an open_clip ViT's CLS embedding into units (docs/method.md §1).

One forward pass with forward hooks on the model's own modules captures, at the CLS token:

- the embedding unit: output of ``ln_pre`` (n, D);
- each head's attention-weighted values before ``out_proj``: input of ``out_proj`` (n, L, H, hd);
- each MLP's output (after LayerScale when present): output of ``ls_2`` (n, L, D);
- the pre-LN residual stream r: input of ``ln_post`` (n, D).

These raw features (:class:`RawFeatures`) are what serving caches. :func:`project_units` maps them to the
output space: head h of layer l contributes r_{l,h} = g_1 * (W_O[:, h] z_{l,h} + b_O / H) before the LayerNorm
(g_1 the LayerScale gain, 1 without it), and every unit's pre-LN contribution r_u is linearised through ln_post
with the sample's own statistics (population std, eps inside the sqrt):

    c_u = [ (gamma / s) * r_u - ((gamma / s) * mu - beta) / N_u ] @ P,   s = sqrt(var + eps)

with N_u = 2L+1 for the embedding and MLP units and (2L+1)*H for heads, so that sum_u c_u = ln_post(r) @ P.

Unit order (paper): emb -> 0, MLP of layer l -> 1 + l, head (l, h) -> 1 + L + l*H + h.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import torch
from torch import nn

from residual.backbone import Backbone, Geometry

__all__ = ["Decomposition", "LinearisedLN", "RawFeatures", "Unit", "decompose", "extract", "extract_batched",
           "project_units",
           "unit_table"]


@dataclass(frozen=True)
class Unit:
    """One residual unit: ``type`` is "emb", "mlp" or "head"; layer/head are -1 where not applicable."""

    type: str
    layer: int = -1
    head: int = -1

    @property
    def label(self) -> str:
        return {"emb": "emb", "mlp": f"mlp.{self.layer}"}.get(self.type, f"head.{self.layer}.{self.head}")

    @property
    def name(self) -> str:
        """The API's unit name: ``emb``, ``L<layer>.MLP`` or ``L<layer>.H<head>``."""
        return {"emb": "emb", "mlp": f"L{self.layer}.MLP"}.get(self.type, f"L{self.layer}.H{self.head}")


def unit_table(geometry: Geometry) -> list[Unit]:
    """Units in the paper's order: emb, MLPs by layer, heads by (layer, head)."""
    units = [Unit("emb")]
    units += [Unit("mlp", layer=l) for l in range(geometry.layers)]
    units += [Unit("head", layer=l, head=h) for l in range(geometry.layers) for h in range(geometry.heads)]
    return units


@dataclass
class RawFeatures:
    """Per-sample CLS features captured in one forward pass (float32, on the backbone's device)."""

    emb: torch.Tensor  # (n, D) output of ln_pre at CLS
    mlp: torch.Tensor  # (n, L, D) MLP outputs at CLS (after LayerScale)
    heads: torch.Tensor  # (n, L, H, hd) per-head attention values at CLS, before out_proj
    pre_ln: torch.Tensor  # (n, D) residual stream at CLS entering ln_post

    def __len__(self) -> int:
        return int(self.emb.shape[0])

    def flat(self) -> torch.Tensor:
        """(n, L*H*hd + L*D + D): heads, then MLPs, then emb, each flattened in (layer, head, dim) order."""
        n = len(self)
        return torch.cat([self.heads.reshape(n, -1), self.mlp.reshape(n, -1), self.emb], dim=1)

    def select(self, index: torch.Tensor | slice) -> RawFeatures:
        return RawFeatures(self.emb[index], self.mlp[index], self.heads[index], self.pre_ln[index])

    def to(self, device: torch.device | str) -> RawFeatures:
        return RawFeatures(self.emb.to(device), self.mlp.to(device), self.heads.to(device), self.pre_ln.to(device))

    @staticmethod
    def cat(parts: list[RawFeatures]) -> RawFeatures:
        return RawFeatures(*(torch.cat([getattr(p, f) for p in parts]) for f in ("emb", "mlp", "heads", "pre_ln")))


@dataclass
class Decomposition:
    """Units in the output space; ``units.sum(1)`` equals ``embedding`` up to float rounding."""

    units: torch.Tensor  # (n, U, d)
    table: list[Unit]  # U entries, order of dim 1 of ``units``
    embedding: torch.Tensor  # (n, d) the model's own encode_image output
    raw: RawFeatures


class LinearisedLN:
    """ln_post, the LayerScale gains and the projection of a backbone, as float32 tensors for the unit algebra."""

    def __init__(self, backbone: Backbone) -> None:
        visual = backbone.visual
        g = backbone.geometry
        dev = backbone.device
        f32 = {"dtype": torch.float32, "device": dev}
        self.geometry = g
        self.gamma = visual.ln_post.weight.detach().to(**f32)  # (D,)
        self.beta = visual.ln_post.bias.detach().to(**f32)  # (D,)
        self.eps = float(visual.ln_post.eps)
        self.proj = visual.proj.detach().to(**f32)  # (D, d)
        blocks = list(visual.transformer.resblocks)
        # out_proj weight (D, D) viewed per head: (L, D, H, hd); bias (L, D)
        self.w_o = torch.stack([b.attn.out_proj.weight.detach().to(**f32) for b in blocks]).view(
            g.layers, g.width, g.heads, g.head_dim)
        self.b_o = torch.stack([b.attn.out_proj.bias.detach().to(**f32) for b in blocks])
        self.ls_1 = torch.stack([_gain(b.ls_1, g.width, f32) for b in blocks])  # (L, D)

    def stats(self, pre_ln: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(n, D) -> per-sample mean (n,) and s = sqrt(population var + eps) (n,)."""
        mu = pre_ln.mean(dim=-1)
        var = pre_ln.var(dim=-1, unbiased=False)
        return mu, torch.sqrt(var + self.eps)

    def head_contributions(self, heads: torch.Tensor) -> torch.Tensor:
        """(n, L, H, hd) values -> (n, L, H, D) pre-LN head contributions (out_proj slice + bias/H, LayerScale)."""
        r = torch.einsum("nlhe,ldhe->nlhd", heads, self.w_o)  # (n, L, H, hd) x (L, D, H, hd) -> (n, L, H, D)
        r = r + (self.b_o / self.geometry.heads)[None, :, None, :]  # bias split equally over heads
        return r * self.ls_1[None, :, None, :]


def _gain(module: nn.Module, width: int, f32: dict[str, object]) -> torch.Tensor:
    gamma = getattr(module, "gamma", None)
    if gamma is None:
        return torch.ones(width, **f32)  # type: ignore[arg-type]
    return gamma.detach().to(**f32)  # type: ignore[arg-type]


class _Capture:
    """The CLS features of one :func:`extract` call (per-call state: never shared between calls)."""

    def __init__(self) -> None:
        self.single: dict[str, torch.Tensor] = {}
        self.mlp: list[torch.Tensor] = []
        self.heads: list[torch.Tensor] = []


_ACTIVE = threading.local()  # .capture: the _Capture of the extract() running on this thread, or absent
_HOOKED_ATTR = "_residual_capture_hooks"


def _cls(t: torch.Tensor) -> torch.Tensor:
    # (n, T, D) -> (n, D) at the class token, as a copy: a view would keep every token's activations alive
    return (t[:, 0] if t.dim() == 3 else t).to(torch.float32, copy=True)


def _current() -> _Capture | None:
    return getattr(_ACTIVE, "capture", None)


def _install_capture_hooks(visual: nn.Module) -> None:
    """Register the capture hooks once per vision tower; they are permanent and stateless.

    Each hook writes into the :class:`_Capture` of the ``extract`` call running on the *calling thread* and does
    nothing when there is none, so forwards on other threads (another ``extract``, a plain ``encode_image``) never
    see or disturb each other's activations, and no hook list is mutated while a forward iterates it.
    """
    if getattr(visual, _HOOKED_ATTR, False):
        return

    def on_emb(m: nn.Module, i: tuple[torch.Tensor, ...], o: torch.Tensor) -> None:
        c = _current()
        if c is not None:
            c.single["emb"] = _cls(o)

    def on_pre_ln(m: nn.Module, i: tuple[torch.Tensor, ...]) -> None:
        c = _current()
        if c is not None:
            c.single["pre_ln"] = _cls(i[0])

    def on_heads(m: nn.Module, i: tuple[torch.Tensor, ...]) -> None:
        c = _current()
        if c is not None:
            c.heads.append(_cls(i[0]))

    def on_mlp(m: nn.Module, i: tuple[torch.Tensor, ...], o: torch.Tensor) -> None:
        c = _current()
        if c is not None:
            c.mlp.append(_cls(o))

    visual.ln_pre.register_forward_hook(on_emb)
    visual.ln_post.register_forward_pre_hook(on_pre_ln)
    for block in visual.transformer.resblocks:
        block.attn.out_proj.register_forward_pre_hook(on_heads)
        block.ls_2.register_forward_hook(on_mlp)
    setattr(visual, _HOOKED_ATTR, True)


_install_lock = threading.Lock()


def extract(backbone: Backbone, pixels: torch.Tensor) -> tuple[RawFeatures, torch.Tensor]:
    """One forward pass: raw CLS features and the model's embedding (n, d), both float32.

    Re-entrant: the captured values live in per-call state bound to the calling thread, so any number of
    threads may call ``extract`` on the same backbone at once and each gets exactly its own images' features
    (tested with concurrent threads). Any batch size works.
    """
    visual = backbone.visual
    g = backbone.geometry
    with _install_lock:
        _install_capture_hooks(visual)
    capture = _Capture()
    outer = _current()  # a nested extract on the same thread (never done here, but kept correct)
    _ACTIVE.capture = capture
    try:
        with torch.no_grad():
            embedding = backbone.encode_image(pixels).float()
    finally:
        _ACTIVE.capture = outer
    n = embedding.shape[0]
    if len(capture.heads) != g.layers or len(capture.mlp) != g.layers or len(capture.single) != 2:
        raise RuntimeError(f"capture saw {len(capture.heads)} attention and {len(capture.mlp)} MLP outputs for "
                           f"{g.layers} layers; the vision tower was changed after load_backbone")
    raw = RawFeatures(
        emb=capture.single["emb"],
        mlp=torch.stack(capture.mlp, dim=1),  # L x (n, D) -> (n, L, D)
        heads=torch.stack(capture.heads, dim=1).view(n, g.layers, g.heads, g.head_dim),  # (n,L,D) -> (n,L,H,hd)
        pre_ln=capture.single["pre_ln"],
    )
    return raw, embedding


def project_units(raw: RawFeatures, ln: LinearisedLN) -> torch.Tensor:
    """Raw features -> (n, U, d) unit contributions in the output space, paper order."""
    g = ln.geometry
    n = len(raw)
    mu, s = ln.stats(raw.pre_ln)  # (n,), (n,)
    heads = ln.head_contributions(raw.heads).reshape(n, g.layers * g.heads, g.width)  # (n,L,H,D) -> (n, L*H, D)
    pre = torch.cat([raw.emb[:, None], raw.mlp, heads], dim=1)  # (n, U, D) pre-LN contributions
    blocks = 2 * g.layers + 1
    n_u = torch.full((g.n_units,), float(blocks), device=pre.device)
    n_u[g.head_units] = blocks * g.heads
    scale = ln.gamma[None, :] / s[:, None]  # (n, D)
    const = scale * mu[:, None] - ln.beta[None, :]  # (n, D)
    lin = pre * scale[:, None, :] - const[:, None, :] / n_u[None, :, None]  # (n, U, D)
    return lin @ ln.proj  # (n, U, D) @ (D, d) -> (n, U, d)


def decompose(backbone: Backbone, pixels: torch.Tensor, ln: LinearisedLN | None = None) -> Decomposition:
    """Decompose the CLS embedding of ``pixels`` (n, 3, S, S) into its U units (one forward pass).

    Example:
        >>> import torch
        >>> from residual import load_backbone, decompose
        >>> bb = load_backbone("residual-tiny")
        >>> dec = decompose(bb, torch.randn(2, 3, 48, 48))
        >>> torch.allclose(dec.units.sum(1), dec.embedding, atol=1e-4)
        True
    """
    raw, embedding = extract(backbone, pixels)
    units = project_units(raw, ln or LinearisedLN(backbone))
    return Decomposition(units=units, table=unit_table(backbone.geometry), embedding=embedding, raw=raw)


def extract_batched(backbone: Backbone, pixels: torch.Tensor, batch_size: int = 256
                    ) -> tuple[RawFeatures, torch.Tensor]:
    """:func:`extract` over (n, 3, S, S) pixels in batches; features stay on the backbone's device."""
    parts, embs = [], []
    for i in range(0, pixels.shape[0], batch_size):
        raw, emb = extract(backbone, pixels[i : i + batch_size])
        parts.append(raw)
        embs.append(emb)
    return RawFeatures.cat(parts), torch.cat(embs)
