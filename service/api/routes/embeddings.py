"""OpenAI-shaped embeddings for images and texts: ``POST /v1/embeddings``, ``GET /v1/models`` (API key).

``model`` is the served model (``residual-tiny``) or ``<model>:<coefficient set>[@version]``: images then get the
embedding adapted by that set (the fused path, as /classify uses it). Coefficient sets adapt the image side only,
so texts are the same under every set. Embeddings are L2-normalised; ``encoding_format: "base64"`` sends each as
the base64 of little-endian float32 bytes (what the official ``openai`` client asks for by default). Images go
through the image pipeline and the batcher like /classify; texts use the Redis-backed prompt cache.
"""

from __future__ import annotations

import base64
import time
from typing import Any, Literal

import torch
import torch.nn.functional as F
from fastapi import APIRouter
from pydantic import BaseModel, ConfigDict, Field

from residual import apply_fused
from service.deps import ApiKey, Runtime, RuntimeDep, clean_text
from service.errors import InvalidRequest, NotFound
from service.images import decode_base64
from service.model_store import LoadedCoefficients

router = APIRouter(tags=["embeddings"])

MAX_TEXTS = 2048
_STARTED = int(time.time())


class EmbeddingsRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [
        {"model": "residual-tiny", "input": ["a red circle", "a blue square"]},
        {"model": "residual-tiny:position", "input": ["data:image/png;base64,..."], "modality": "image",
         "encoding_format": "base64"}]})

    model: str = Field(..., description="'<model>' or '<model>:<coefficient set>[@version]' (GET /v1/models)")
    input: str | list[str] = Field(..., description="texts, or images as base64 / data URIs with modality 'image'")
    modality: Literal["text", "image"] = "text"
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(None, description="accepted only when equal to the model's dimension")
    user: str | None = Field(None, description="ignored (OpenAI compatibility)")


class EmbeddingItem(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str = Field(..., description="floats, or base64 of little-endian float32")


class Usage(BaseModel):
    prompt_tokens: int = Field(..., description="text tokens (without padding); images count 0")
    total_tokens: int


class EmbeddingsResponse(BaseModel):
    object: Literal["list"] = "list"
    data: list[EmbeddingItem]
    model: str
    usage: Usage


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "residual-serve"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


def _coefficients(rt: Runtime, model: str) -> LoadedCoefficients | None:
    """Blocking (io pool): the coefficient set a model string names, or None for the plain model."""
    assert rt.store is not None
    name, sep, ref = model.partition(":")
    served = rt.store.backbone.name
    if name != served:
        raise NotFound(f"model {model!r} is not served here; this replica serves {served!r} and "
                       f"'{served}:<coefficient set>' (GET /v1/models lists them)")
    if not sep:
        return None
    if not ref:
        raise InvalidRequest(f"model {model!r}: name a coefficient set after ':'")
    return rt.store.resolve_coefficients(ref)


def _encode(vectors: torch.Tensor, fmt: str) -> list[list[float] | str]:
    rows = vectors.detach().to("cpu", torch.float32).numpy().astype("<f4", copy=False)
    if fmt == "base64":
        return [base64.b64encode(r.tobytes()).decode() for r in rows]
    return [r.tolist() for r in rows]


@router.post("/v1/embeddings", response_model=EmbeddingsResponse, dependencies=[ApiKey],
             summary="OpenAI-compatible embeddings of texts or images (optionally adapted by a coefficient set)",
             responses={404: {"description": "unknown model or coefficient set"},
                        413: {"description": "image too large"}, 415: {"description": "undecodable image"},
                        422: {"description": "invalid request"}})
async def embeddings(body: EmbeddingsRequest, rt: RuntimeDep) -> EmbeddingsResponse:
    """Texts: the text tower's embedding (normalised; prompt embeddings cached in Redis). Images: the model's
    embedding, or with ``<model>:<set>`` the embedding adapted by that coefficient set (normalised)."""
    store, s = rt.store, rt.settings
    assert store is not None and rt.text is not None and rt.batcher is not None and rt.images is not None
    inputs = [body.input] if isinstance(body.input, str) else list(body.input)
    if not inputs:
        raise InvalidRequest("input is empty")
    d = store.backbone.geometry.out_dim
    if body.dimensions is not None and body.dimensions != d:
        raise InvalidRequest(f"dimensions {body.dimensions}: this model's embeddings have {d} (no truncation)")
    loaded = await rt.io.run(_coefficients, rt, body.model)
    tokens = 0
    if body.modality == "text":
        if len(inputs) > MAX_TEXTS:
            raise InvalidRequest(f"{len(inputs)} texts; the limit is {MAX_TEXTS}")
        texts = [clean_text(t, f"input[{i}]", s.max_prompt_chars) for i, t in enumerate(inputs)]
        raw = await rt.io.run(rt.text.prompt_embeddings, texts)
        tokens = await rt.io.run(lambda: int((store.backbone.tokenizer(texts) != 0).sum()))  # usage, off the loop
        vectors = F.normalize(raw.float(), dim=-1)
    else:
        if len(inputs) > s.max_images:
            raise InvalidRequest(f"{len(inputs)} images; the limit per request is {s.max_images}")
        blobs = await rt.io.run(lambda: [decode_base64(b, i) for i, b in enumerate(inputs)])
        pixels = await rt.images(blobs)
        feats, emb = await rt.batcher.submit(pixels)

        def adapt() -> torch.Tensor:
            y = apply_fused(feats, loaded.fused, store.ln) if loaded is not None else emb
            return F.normalize(y.float(), dim=-1).cpu()

        vectors = await rt.io.run(adapt)
    encoded = await rt.io.run(_encode, vectors, body.encoding_format)
    rt.metrics.embeddings.labels(modality=body.modality).inc(len(inputs))
    model = body.model if loaded is None else f"{store.backbone.name}:{loaded.ref}"
    return EmbeddingsResponse(data=[EmbeddingItem(index=i, embedding=e) for i, e in enumerate(encoded)],
                              model=model, usage=Usage(prompt_tokens=tokens, total_tokens=tokens))


@router.get("/v1/models", response_model=ModelList, dependencies=[ApiKey],
            summary="The served model and one entry per coefficient set ('<model>:<set>')")
async def models(rt: RuntimeDep) -> dict[str, Any]:
    assert rt.store is not None
    served = rt.store.backbone.name

    def listing() -> list[str]:
        return [n for n in rt.artifacts.names() if rt.artifacts.active(n) is not None]

    names = await rt.io.run(listing)
    return {"object": "list", "data": [{"id": served, "created": _STARTED}]
            + [{"id": f"{served}:{n}", "created": _STARTED} for n in names]}

