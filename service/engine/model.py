"""The serving model: the backbone, its LayerNorm linearisation, the batched forward and the text encoder.

Every forward of it runs on the model owner (one thread, ``service.engine.pools.ModelOwner``): the batcher's image
batches, text encodings (in chunks, so classify batches interleave with a large label set), head analyses and the
warm-up.
"""

from __future__ import annotations

import torch

from residual import LinearisedLN, RawFeatures, extract, load_backbone
from residual.backbone import Backbone
from service.settings import ModelSpec

__all__ = ["ServingModel", "model_bytes"]


def model_bytes(module: torch.nn.Module) -> int:
    """Bytes of a module's parameters and buffers (what loading it costs on its device)."""
    return sum(t.numel() * t.element_size() for t in (*module.parameters(), *module.buffers()))


class ServingModel:
    """One served model: ``name`` is what requests call it (``RESIDUAL_MODELS``), the backbone its architecture."""

    def __init__(self, spec: ModelSpec) -> None:
        device = None if spec.device == "auto" else spec.device
        self.spec = spec
        self.backbone: Backbone = load_backbone(spec.architecture, spec.weights, device=device,
                                                precision=spec.precision)
        self.ln = LinearisedLN(self.backbone)
        self.nbytes = model_bytes(self.backbone.model)
        self.text_forwards = 0

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def weights_id(self) -> str:
        return self.backbone.weights_id

    def forward(self, pixels: torch.Tensor) -> tuple[RawFeatures, torch.Tensor]:
        """One batched image forward: pinned host memory and bf16 autocast on CUDA, plain fp32 on the CPU."""
        bb = self.backbone
        if bb.device.type == "cuda":
            if pixels.device != bb.device:  # the pil pipeline hands over host memory: pinned, asynchronous copy
                pixels = pixels.pin_memory().to(bb.device, non_blocking=True)
            with torch.autocast("cuda", dtype=torch.bfloat16):
                return extract(bb, pixels)
        return extract(bb, pixels)

    def encode_prompts(self, prompts: list[str]) -> torch.Tensor:
        """(n,) prompts -> (n, d) raw text embeddings (one text-encoder call; callers chunk; counted)."""
        self.text_forwards += 1
        return self.backbone.encode_text(self.backbone.tokenizer(prompts)).float().cpu()

    def warm_up(self) -> None:
        size = self.backbone.geometry.image_size
        extract(self.backbone, torch.zeros(1, 3, size, size))
        self.encode_prompts(["a photo."])
        self.text_forwards = 0
