"""OpenAI-shaped embeddings for images and texts: ``POST /v1/embeddings``, ``GET /v1/models`` (API key).

``model`` is a served model (``residual-tiny``; ``GET /v1/models`` lists them) or
``<model>:<coefficient set>[@version]``: images then get the embedding adapted by that set (the fused path, as
/classify uses it). Coefficient sets adapt the image side only, so texts are the same under every set. Embeddings
are L2-normalised; ``encoding_format: "base64"`` sends each as the base64 of little-endian float32 bytes (what the
official ``openai`` client asks for by default). Images go through the image pipeline and the batcher like
/classify; texts use the Redis-backed prompt cache.
"""

from __future__ import annotations

import base64
import time
from typing import Any

import torch
import torch.nn.functional as F
from fastapi import APIRouter

from residual import apply_fused
from service.api.auth import ApiKey
from service.api.body import JsonBody
from service.api.deps import Ready, ReadyDep
from service.api.schemas import EmbeddingItem, EmbeddingsRequest, EmbeddingsResponse, ModelList, Usage
from service.api.scoring import image_items
from service.errors import InvalidRequest, NotFound
from service.images import looks_like_image
from service.stores.coefficients import LoadedCoefficients
from service.validation import clean_text

router = APIRouter(tags=["embeddings"])

MAX_TEXTS = 2048
_STARTED = int(time.time())
_BODY = JsonBody(EmbeddingsRequest)


def _coefficients(rt: Ready, model: str) -> LoadedCoefficients | None:
    """Blocking (io pool): the coefficient set a model string names (``rt`` is bound to its model), or None."""
    _, sep, ref = model.partition(":")
    if not sep:
        return None
    if not ref:
        raise InvalidRequest(f"model {model[:80]!r}: name a coefficient set after ':'")
    return rt.coefficients.resolve(ref)


def _model_ids(rt: Ready) -> list[str]:
    """Blocking: every served model, and ``<model>:<set>`` for each coefficient set whose active version belongs to
    one (read from the versions' metadata: listing never loads a model)."""
    ids = list(rt.models.names)
    for name in rt.artifacts.names():
        active = rt.artifacts.active(name)
        meta = rt.artifacts.version_meta(name, active) if active is not None else None
        owner = rt.models.weights_owner(str(meta.get("weights_id"))) if meta is not None else None
        if owner is not None:
            ids.append(f"{owner}:{name}")
    return ids


def _encode(vectors: torch.Tensor, fmt: str) -> list[list[float] | str]:
    rows = vectors.detach().to("cpu", torch.float32).numpy().astype("<f4", copy=False)
    if fmt == "base64":
        return [base64.b64encode(r.tobytes()).decode() for r in rows]
    return [r.tolist() for r in rows]


def _texts(inputs: list[str], limit: int) -> list[str]:
    """Blocking: texts checked like label-set classes; an input that is an encoded image says how to send it."""
    out = []
    for i, t in enumerate(inputs):
        if looks_like_image(t):
            raise InvalidRequest(f"input[{i}] looks like an image; pass \"modality\": \"image\" (with the openai "
                                 "client: extra_body={\"modality\": \"image\"})")
        out.append(clean_text(t, f"input[{i}]", limit))
    return out


@router.post("/v1/embeddings", response_model=EmbeddingsResponse, dependencies=[ApiKey],
             openapi_extra=_BODY.openapi,
             summary="OpenAI-compatible embeddings of texts or images (optionally adapted by a coefficient set)",
             responses={404: {"description": "unknown model or coefficient set"},
                        409: {"description": "the coefficient set belongs to another model (the message names it)"},
                        413: {"description": "body, image or pixels too large"},
                        415: {"description": "not application/json, or an undecodable image"},
                        422: {"description": "invalid request"}, 429: {"description": "overloaded"},
                        503: {"description": "not ready or shutting down"}})
async def embeddings(rt: ReadyDep, body: EmbeddingsRequest = _BODY.depends) -> EmbeddingsResponse:
    """Texts: the text tower's embedding (normalised; prompt embeddings cached in Redis). Images: the model's
    embedding, or with ``<model>:<set>`` the embedding adapted by that coefficient set (normalised)."""
    s = rt.settings
    requested = body.model or rt.models.default
    name = requested.partition(":")[0]
    if name not in rt.models.names:
        raise NotFound(f"model {requested[:80]!r} is not served here; the models are {', '.join(rt.models.names)}, "
                       "each also as '<model>:<coefficient set>' (GET /v1/models lists them)")
    rt = await rt.use(name)
    inputs = [body.input] if isinstance(body.input, str) else list(body.input)
    if not inputs:
        raise InvalidRequest("input is empty")
    d = rt.model.backbone.geometry.out_dim
    if body.dimensions is not None and body.dimensions != d:
        raise InvalidRequest(f"dimensions {body.dimensions}: this model's embeddings have {d} (no truncation)")
    loaded = await rt.io.run(_coefficients, rt, requested)
    tokens = 0
    if body.modality == "text":
        if len(inputs) > MAX_TEXTS:
            raise InvalidRequest(f"{len(inputs)} texts; the limit is {MAX_TEXTS}")
        texts = await rt.io.run(_texts, inputs, s.max_prompt_chars)
        raw = await rt.io.run(rt.text.prompt_embeddings, texts)
        tokens = await rt.io.run(lambda: int((rt.model.backbone.tokenizer(texts) != 0).sum()))  # usage, off the loop
        vectors = F.normalize(raw.float(), dim=-1)
    else:
        if len(inputs) > s.max_images:
            raise InvalidRequest(f"{len(inputs)} images; the limit per request is {s.max_images}")
        items = await rt.io.run(image_items, inputs, "input")
        blobs = await rt.urls.resolve(items, "input")
        pixels = await rt.images(blobs)
        feats, emb = await rt.batcher.submit(pixels)

        def adapt() -> torch.Tensor:
            y = apply_fused(feats, loaded.fused, rt.model.ln) if loaded is not None else emb
            return F.normalize(y.float(), dim=-1).cpu()

        vectors = await rt.io.run(adapt)
    encoded = await rt.io.run(_encode, vectors, body.encoding_format)
    rt.engine.metrics.embeddings.labels(modality=body.modality).inc(len(inputs))
    model = requested if loaded is None else f"{rt.model.name}:{loaded.ref}"
    return EmbeddingsResponse(data=[EmbeddingItem(index=i, embedding=e) for i, e in enumerate(encoded)],
                              model=model, usage=Usage(prompt_tokens=tokens, total_tokens=tokens))


@router.get("/v1/models", response_model=ModelList, dependencies=[ApiKey],
            summary="Every served model and one entry per coefficient set ('<model>:<set>')")
async def models(rt: ReadyDep) -> dict[str, Any]:
    """The models first (the default first), then ``<model>:<set>`` for each coefficient set whose active version
    belongs to a served model. A model that has not loaded yet (memory budget) lists its sets once it has."""
    ids = await rt.io.run(_model_ids, rt)
    return {"object": "list", "data": [{"id": i, "created": _STARTED} for i in ids]}
