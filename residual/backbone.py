"""Loading open_clip backbones (the embedded ``residual-tiny`` or any open_clip ViT) through one factory.

``load_backbone`` is the single entry point. It registers this package's model configs with open_clip (so the
embedded model is created by open_clip's own factory exactly like a pretrained OpenCLIP checkpoint), loads the
weights safely (safetensors, or a torch file with ``weights_only=True``), computes a content hash of the weights
(``weights_id``: coefficient sets, bases and caches are keyed by it), and swaps each vision block's
``nn.MultiheadAttention`` for :class:`HeadVisibleAttention`, an equivalent module with the same parameter names
that calls ``out_proj`` as a module, so the per-head values before ``out_proj`` can be read with a forward
pre-hook (``nn.MultiheadAttention`` reads ``out_proj.weight`` inside ``F.multi_head_attention_forward`` and never
runs the module, so hooks on it never fire).
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import open_clip
import torch
import torch.nn.functional as F
from open_clip.transform import PreprocessCfg, image_transform_v2
from open_clip.transformer import ResidualAttentionBlock, VisionTransformer
from torch import nn

from residual.errors import UnsupportedModelError, WeightsError

__all__ = ["EMBEDDED_MODELS", "Backbone", "Geometry", "HeadVisibleAttention", "check_model", "load_backbone",
           "resize_crop", "shipped_basis_path", "wrap_model"]

logger = logging.getLogger(__name__)

_PACKAGE_DIR = Path(__file__).resolve().parent
_CONFIG_DIR = _PACKAGE_DIR / "model_configs"
EMBEDDED_MODELS: dict[str, Path] = {"residual-tiny": _PACKAGE_DIR / "weights" / "residual-tiny.safetensors"}
"""Models whose weights ship with this package: name -> default weights file."""

_configs_registered = False


def shipped_basis_path(name: str = "residual-tiny") -> Path:
    """Where the reference basis of an embedded model's shipped weights lies (next to them)."""
    return EMBEDDED_MODELS[name].with_name(f"{name}.basis.safetensors")


def _register_configs() -> None:
    global _configs_registered
    if not _configs_registered:
        open_clip.add_model_config(_CONFIG_DIR)
        _configs_registered = True


@dataclass(frozen=True)
class Geometry:
    """Shape of a decomposable vision tower."""

    layers: int  # L, transformer blocks
    heads: int  # H, heads per block
    width: int  # D, residual width
    head_dim: int  # D / H
    out_dim: int  # d, columns of visual.proj
    image_size: int  # input side in pixels

    @property
    def n_units(self) -> int:
        """U = 1 (embedding) + L (MLPs) + L*H (heads)."""
        return 1 + self.layers + self.layers * self.heads

    # unit order (docs/method.md): emb -> 0, MLP of layer l -> 1 + l, head (l, h) -> 1 + L + l*H + h
    EMB_UNIT = 0

    def mlp_unit(self, layer: int) -> int:
        """Index of layer ``layer``'s MLP among the U units."""
        return 1 + layer

    def head_unit(self, layer: int, head: int) -> int:
        """Index of head (``layer``, ``head``) among the U units."""
        return 1 + self.layers + layer * self.heads + head

    @property
    def mlp_units(self) -> slice:
        """The L MLP units, in layer order."""
        return slice(1, 1 + self.layers)

    @property
    def head_units(self) -> slice:
        """The L*H head units, layer-major."""
        return slice(1 + self.layers, self.n_units)


@dataclass
class Backbone:
    """An open_clip CLIP model ready for decomposition, with what is needed to feed it."""

    name: str  # open_clip architecture / embedded model name
    model: nn.Module  # the open_clip CLIP model, eval mode, vision attention swapped
    preprocess: Callable[[Any], torch.Tensor]  # PIL image -> (3, S, S) tensor, open_clip's eval transform
    tokenizer: Callable[[list[str]], torch.Tensor]  # open_clip tokenizer of the model
    weights_id: str  # content hash of the weights ("sha256:<16 hex>")
    geometry: Geometry
    device: torch.device
    precision: str  # "fp32" | "fp16" | "bf16"

    @property
    def visual(self) -> VisionTransformer:
        visual = self.model.visual
        assert isinstance(visual, VisionTransformer)
        return visual

    @torch.no_grad()
    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        """(n, 3, S, S) -> (n, d) unnormalised image embeddings."""
        return self.model.encode_image(pixels.to(self.device, self._dtype))

    @torch.no_grad()
    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        """(n, context) token ids -> (n, d) unnormalised text embeddings."""
        return self.model.encode_text(tokens.to(self.device))

    def pixels_from_arrays(self, images: Any) -> torch.Tensor:
        """(n, h, w, 3) uint8 array -> (n, 3, S, S) float32 pixels, as open_clip's eval transform would.

        At the model's native size the resize and crop are identities, so the arrays are normalised directly
        (exactly ``preprocess``); other sizes are resized as one batch (:func:`resize_crop`: within 2 levels of 255
        of ``preprocess``'s PIL resize) when the transform is shortest-side bicubic/bilinear, else image by image.
        """
        import numpy as np
        from PIL import Image

        arr = np.asarray(images)
        if arr.ndim != 4 or arr.shape[-1] != 3 or arr.dtype != np.uint8:
            raise ValueError(f"expected (n, h, w, 3) uint8 images, got {arr.shape} {arr.dtype}")
        s = self.geometry.image_size
        cfg = self.visual.preprocess_cfg
        x = torch.from_numpy(np.ascontiguousarray(arr)).permute(0, 3, 1, 2)  # (n, h, w, 3) -> (n, 3, h, w) uint8
        if arr.shape[1:3] != (s, s):
            if cfg.get("resize_mode", "shortest") != "shortest" or cfg.get("interpolation", "bicubic") not in (
                    "bicubic", "bilinear"):
                return torch.stack([self.preprocess(Image.fromarray(a)) for a in arr])
            x = resize_crop(x, s, cfg.get("interpolation", "bicubic"))
        mean = torch.tensor(cfg["mean"], dtype=torch.float32)[None, :, None, None]
        std = torch.tensor(cfg["std"], dtype=torch.float32)[None, :, None, None]
        return (x.float().div_(255.0) - mean) / std

    @property
    def logit_scale(self) -> torch.Tensor:
        """The model's log logit scale (a 0-d float32 tensor on the CPU)."""
        return self.model.logit_scale.detach().float().cpu().reshape(())

    @property
    def _dtype(self) -> torch.dtype:
        return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[self.precision]


def resize_crop(images: torch.Tensor, size: int, interpolation: str = "bicubic") -> torch.Tensor:
    """(n, 3, h, w) or (3, h, w) uint8 -> the same with (size, size): open_clip's 'shortest' eval resize as tensor
    ops on the images' device (shortest side to ``size``, antialiased, then a centre crop).

    Measured against open_clip's PIL transform: at most 2 levels of 255 apart, 0.004 on average
    (tests/service/test_pipeline.py).
    """
    from torchvision.transforms.v2 import InterpolationMode
    from torchvision.transforms.v2 import functional as TF

    if tuple(images.shape[-2:]) == (size, size):
        return images
    mode = InterpolationMode.BICUBIC if interpolation == "bicubic" else InterpolationMode.BILINEAR
    images = TF.resize(images, [size], interpolation=mode, antialias=True)
    return TF.center_crop(images, [size, size])


class HeadVisibleAttention(nn.Module):
    """Drop-in replacement of a self-attention ``nn.MultiheadAttention`` that runs ``out_proj`` as a module.

    Parameters keep their names (``in_proj_weight``, ``in_proj_bias``, ``out_proj.weight``, ``out_proj.bias``)
    and are shared with the module it replaces, so checkpoints load unchanged. The forward is scaled-dot-product
    attention; the input of ``out_proj`` is the concatenation of the per-head values (n, T, H * head_dim).
    """

    def __init__(self, mha: nn.MultiheadAttention) -> None:
        super().__init__()
        if not mha._qkv_same_embed_dim or mha.bias_k is not None or mha.add_zero_attn:
            raise UnsupportedModelError("only plain self-attention nn.MultiheadAttention can be swapped")
        self.embed_dim = mha.embed_dim
        self.num_heads = mha.num_heads
        self.head_dim = mha.head_dim
        self.batch_first = mha.batch_first
        self.in_proj_weight = mha.in_proj_weight
        self.in_proj_bias = mha.in_proj_bias
        self.out_proj = mha.out_proj

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor | None = None,
        value: torch.Tensor | None = None,
        need_weights: bool = False,
        attn_mask: torch.Tensor | None = None,
        **_: Any,
    ) -> tuple[torch.Tensor, None]:
        if key is not None and key is not query or value is not None and value is not query:
            raise UnsupportedModelError("HeadVisibleAttention supports self-attention only")
        x = query if self.batch_first else query.transpose(0, 1)  # (n, T, D)
        n, t, d = x.shape
        qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias)  # (n, T, 3D)
        # (n, T, 3D) -> (n, T, 3, H, hd) -> (3, n, H, T, hd)
        qkv = qkv.view(n, t, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        if attn_mask is not None and attn_mask.dtype != torch.bool:
            attn_mask = attn_mask.to(x.dtype)
        values = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2], attn_mask=attn_mask)  # (n, H, T, hd)
        values = values.transpose(1, 2).reshape(n, t, d)  # (n, H, T, hd) -> (n, T, H*hd): heads concatenated
        out = self.out_proj(values)  # (n, T, D)
        return (out if self.batch_first else out.transpose(0, 1)), None


def _check_decomposable(visual: nn.Module) -> None:
    if not isinstance(visual, VisionTransformer):
        raise UnsupportedModelError(
            f"the vision tower is a {type(visual).__name__}; only open_clip VisionTransformer towers decompose")
    if visual.attn_pool is not None or visual.pool_type != "tok":
        raise UnsupportedModelError("only class-token pooling (pool_type='tok', no attentional pooler) decomposes")
    if visual.proj is None:
        raise UnsupportedModelError("the vision tower has no output projection")
    for i, block in enumerate(visual.transformer.resblocks):
        if not isinstance(block, ResidualAttentionBlock):
            raise UnsupportedModelError(
                f"vision block {i} is a {type(block).__name__}; expected ResidualAttentionBlock")
        if not isinstance(block.ln_1, nn.LayerNorm) or not isinstance(visual.ln_post, nn.LayerNorm):
            raise UnsupportedModelError("the decomposition needs LayerNorm (not RMSNorm) blocks")


def _swap_attention(visual: VisionTransformer) -> None:
    for block in visual.transformer.resblocks:
        if isinstance(block.attn, nn.MultiheadAttention):
            block.attn = HeadVisibleAttention(block.attn)


def _weights_hash(model: nn.Module) -> str:
    """Content hash of the state dict: names, dtypes, shapes and bytes, in name order."""
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().to("cpu").contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return "sha256:" + h.hexdigest()[:16]


def _resolve_device(device: str | torch.device | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def check_model(name: str, pretrained: str | os.PathLike[str] | None = None) -> None:
    """Cheap checks before a load (no weights read): the architecture exists, a checkpoint path exists.

    Raises:
        UnsupportedModelError: ``name`` is neither an open_clip architecture nor an embedded model.
        WeightsError: ``pretrained`` looks like a path (a separator or a suffix) and no such file exists.
    """
    _register_configs()
    if name not in open_clip.list_models():
        raise UnsupportedModelError(
            f"unknown model {name!r}; use an open_clip architecture or one of {sorted(EMBEDDED_MODELS)}")
    if pretrained is not None and pretrained != "random" and not Path(pretrained).exists() and (
            os.sep in str(pretrained) or Path(pretrained).suffix):
        raise WeightsError(f"checkpoint {pretrained} does not exist")


def load_backbone(
    name: str,
    pretrained: str | os.PathLike[str] | None = None,
    device: str | torch.device | None = None,
    precision: str = "fp32",
    cache_dir: str | os.PathLike[str] | None = None,
) -> Backbone:
    """Create an open_clip model, load its weights and make its heads observable.

    Args:
        name: an open_clip architecture (``"ViT-B-16"``) or an embedded model (``"residual-tiny"``).
        pretrained: ``None`` (embedded models: their shipped weights; other architectures: random init with the
            real geometry), ``"random"`` (random init, also for embedded models), a local checkpoint path
            (``.safetensors``, or a torch file loaded with ``weights_only=True``), or an open_clip pretrained
            tag resolved from the local cache (no download when ``HF_HUB_OFFLINE=1``).
        device: ``"cuda"``, ``"cpu"``…; default CUDA when available.
        precision: ``"fp32"``, ``"fp16"`` or ``"bf16"`` (parameter storage; decomposition math runs in fp32).
        cache_dir: the Hugging Face hub cache holding pretrained tags (default: the hub's own default).

    Example:
        >>> bb = load_backbone("residual-tiny")
        >>> bb.geometry.layers, bb.weights_id.startswith("sha256:")
        (6, True)
    """
    if precision not in ("fp32", "fp16", "bf16"):
        raise ValueError(f"precision must be 'fp32', 'fp16' or 'bf16', not {precision!r}")
    check_model(name, pretrained)
    if pretrained is None and name in EMBEDDED_MODELS:
        pretrained = EMBEDDED_MODELS[name]
        if not Path(pretrained).is_file():
            raise WeightsError(f"the shipped weights of {name} are missing at {pretrained}; "
                               "train them with `python -m residual.tiny.train`")
    if pretrained == "random":
        pretrained = None
    torch_file = pretrained is not None and Path(pretrained).suffix in (".pt", ".pth", ".bin")
    try:
        model = open_clip.create_model(
            name, pretrained=str(pretrained) if pretrained is not None else None, weights_only=True,
            cache_dir=str(cache_dir) if cache_dir is not None else None)
    except RuntimeError as exc:  # shape mismatches, unreadable files
        raise WeightsError(f"cannot load {pretrained} into {name}: {exc}") from exc
    except Exception as exc:  # noqa: BLE001 - open_clip raises many types; pickle refusals come as UnpicklingError
        if torch_file or "pickle" in type(exc).__name__.lower() or "weights_only" in str(exc):
            raise WeightsError(f"refusing to load {pretrained}: {exc}") from exc
        raise
    return wrap_model(model, name, device=device, precision=precision)


def wrap_model(
    model: nn.Module, name: str, device: str | torch.device | None = None, precision: str = "fp32"
) -> Backbone:
    """Make an already-created open_clip CLIP model decomposable (for custom configs and tests).

    The weights id is hashed before the attention swap and the precision cast.
    """
    model.eval()
    _check_decomposable(model.visual)
    weights_id = _weights_hash(model)
    _swap_attention(model.visual)
    dev = _resolve_device(device)
    model.to(device=dev)
    if precision != "fp32":
        model.to(dtype=torch.float16 if precision == "fp16" else torch.bfloat16)
    visual = model.visual
    block0 = visual.transformer.resblocks[0]
    size = visual.image_size
    geometry = Geometry(
        layers=len(visual.transformer.resblocks),
        heads=block0.attn.num_heads,
        width=visual.transformer.width,
        head_dim=visual.transformer.width // block0.attn.num_heads,
        out_dim=visual.proj.shape[1],
        image_size=int(size[0] if isinstance(size, tuple) else size),
    )
    if not hasattr(visual, "preprocess_cfg"):  # models built without open_clip's factory
        visual.preprocess_cfg = asdict(PreprocessCfg(size=geometry.image_size))
    preprocess = image_transform_v2(PreprocessCfg(**visual.preprocess_cfg), is_train=False)
    try:
        tokenizer = open_clip.get_tokenizer(name)
    except Exception:  # noqa: BLE001 - custom configs without a registered name use the default tokenizer
        tokenizer = open_clip.tokenizer.SimpleTokenizer(context_length=model.context_length)
    logger.info("loaded %s (%s) on %s, %s", name, weights_id, dev, precision)
    return Backbone(name, model, preprocess, tokenizer, weights_id, geometry, dev, precision)
