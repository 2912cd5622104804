"""The serving model: the backbone, its LayerNorm linearisation, the batched forward and the text encoder.

Every forward of it runs on the model owner (one thread, ``service.engine.pools.ModelOwner``): the batcher's image
batches, text encodings (in chunks, so classify batches interleave with a large label set), head analyses and the
warm-up.
"""

from __future__ import annotations

import torch

from residual import LinearisedLN, RawFeatures, extract, load_backbone
from residual.backbone import Backbone
from service.settings import Settings

__all__ = ["ServingModel"]

class ServingModel:
    def __init__(self, settings: Settings) -> None:
        device = None if settings.device == "auto" else settings.device
        self.backbone: Backbone = load_backbone(settings.model_name, settings.model_weights, device=device,
                                                precision=settings.precision)
        self.ln = LinearisedLN(self.backbone)
        self.text_forwards = 0

    @property
    def name(self) -> str:
        return self.backbone.name

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
