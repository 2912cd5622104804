"""What every classification route shares (``POST /classify``, the Open Inference Protocol's ``infer``): the
coefficient set, the label set, images from bytes or URLs, one trip through the batcher, the scores, the deadline.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Sequence
from typing import Literal, TypeVar

import torch

from residual import RawFeatures, adapted_units, apply_fused, explain_logits, project_units, zero_shot_logits
from service import tracing
from service.api.deps import Ready, validate_label_set
from service.engine.drift import coefficients_reference
from service.errors import InvalidRequest, Timeout
from service.fetch import is_url
from service.images import decode_base64
from service.stores.coefficients import LoadedCoefficients

__all__ = ["Scored", "image_items", "labels_for", "load_coefficients", "score", "within_deadline"]

T = TypeVar("T")
Scored = tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]  # shown scores (n, C), logits (n, C), (n, U, C)


def image_items(texts: Sequence[str], what: str = "images") -> list[bytes | str]:
    """Blocking (io pool): each image string -> its bytes (base64, data URI), or the URL itself (fetched later by
    :meth:`service.fetch.ImageFetcher.resolve`)."""
    return [t if is_url(t) else decode_base64(t, i, what) for i, t in enumerate(texts)]


async def load_coefficients(rt: Ready, ref: str | None) -> LoadedCoefficients | None:
    """The coefficient set a request names (None: zero-shot); from then on the drift monitor also compares traffic
    with the data it was fitted on (``GET /drift?coefficients=``)."""
    if not ref:
        return None
    loaded = await rt.io.run(rt.coefficients.resolve, ref)
    drift = rt.engine.drift
    if drift is not None and not drift.is_tracked(f"coefficients:{loaded.ref}"):
        await rt.io.run(drift.track, f"coefficients:{loaded.ref}", lambda: coefficients_reference(loaded, rt.artifacts))
    return loaded


async def labels_for(rt: Ready, classes: list[str] | None, templates: list[str] | None, label_set_id: str | None,
                     loaded: LoadedCoefficients | None) -> tuple[list[str], list[str], str]:
    """(classes, templates, label set id) from inline classes, a registered id, or the coefficient set's own."""
    if classes is not None and label_set_id is not None:
        raise InvalidRequest("give label_set or label_set_id, not both")
    chosen: tuple[list[str], list[str]]
    if classes is not None:
        chosen = validate_label_set(classes, templates, rt.settings)
    elif label_set_id is not None:
        chosen = await rt.io.run(rt.label_sets.get, label_set_id)
    elif loaded is not None:
        chosen = loaded.coefficients.classes, loaded.coefficients.templates
    else:
        raise InvalidRequest("give label_set, label_set_id, or coefficients (whose label set is then used)")
    return chosen[0], chosen[1], label_set_id or rt.label_sets.id_of(*chosen)


async def score(rt: Ready, items: Sequence[bytes | str], classes: list[str], templates: list[str], ls_id: str,
                loaded: LoadedCoefficients | None, scores: Literal["softmax", "cosine"] = "softmax",
                explain: int = 0) -> Scored:
    """Images (bytes, or URLs to fetch) -> (shown scores, logits, each unit's share of each logit with explain)."""
    scale = rt.model.backbone.logit_scale

    def apply(raw: RawFeatures, emb: torch.Tensor, class_emb: torch.Tensor) -> Scored:
        """Blocking (io pool): the fused coefficient set (one matmul), cosine logits, softmax or cosine; with
        explain, every unit's exact share of every logit."""
        with tracing.span("apply coefficients", {"residual.coefficients": loaded.ref if loaded else "",
                                                 "residual.explain": explain}):
            y = apply_fused(raw, loaded.fused, rt.model.ln) if loaded is not None else emb
            class_emb = class_emb.to(y.device)
            logits = zero_shot_logits(y, class_emb, scale.to(y.device)).float()
            shown = logits.softmax(-1) if scores == "softmax" else logits / scale.exp().to(y.device)
            contrib = None
            if explain:
                units = project_units(raw, rt.model.ln)  # (n, U, d), the model's own units
                if loaded is not None:
                    units = adapted_units(loaded.coefficients, loaded.basis, units)  # each unit's share of y
                contrib = explain_logits(units, class_emb, scale.to(y.device)).cpu()  # (n, U, C)
            return shown.cpu(), logits.cpu(), contrib

    def text() -> torch.Tensor:
        with tracing.span("text embeddings", {"residual.classes": len(classes), "residual.templates": len(templates)}):
            return rt.text.class_embeddings(ls_id, classes, templates)

    class_emb_task = asyncio.ensure_future(rt.io.run(text))
    try:
        with tracing.span("decode", {"residual.images": len(items)}):
            if any(isinstance(i, str) for i in items):
                with tracing.span("fetch", {"residual.urls": sum(isinstance(i, str) for i in items)}):
                    blobs = await rt.urls.resolve(items)
            else:
                blobs = list(items)  # type: ignore[arg-type]
            pixels = await rt.images(blobs)  # parallel decode + preprocess (pil on CPU, tensor ops on CUDA)
        (raw, emb), class_emb = await asyncio.gather(rt.batcher.submit(pixels), class_emb_task)
    finally:  # a failed decode or fetch: the text work is cancelled, or its outcome collected
        if not class_emb_task.done():
            class_emb_task.cancel()
        elif not class_emb_task.cancelled():
            class_emb_task.exception()
    return await rt.io.run(apply, raw, emb, class_emb)


async def within_deadline(rt: Ready, work: Awaitable[T]) -> T:
    """``work`` within the request timeout (504 after it)."""
    s = rt.settings
    try:
        return await asyncio.wait_for(work, s.request_timeout_s)
    except TimeoutError as exc:
        rt.metrics.rejected.labels(reason="timeout").inc()
        raise Timeout(f"the request did not finish within {s.request_timeout_s:g} s") from exc
