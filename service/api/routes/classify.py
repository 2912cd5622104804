"""``POST /classify``: images against a label set, zero-shot or through a fitted coefficient set.

Images come as JSON (base64 strings, data URIs, or ``http(s)://`` URLs where the deployment allows them:
``service.fetch``) or multipart (file parts named ``images``, or text parts holding URLs). The body is read on
the event loop and parsed off it; decoding, scoring and the response's JSON are built on pools, so a large answer
(many images x ``top_k`` x ``explain``) never holds the loop. Its size is bounded before any work:
images x top_k x (explain + 1) <= ``max_response_items`` (413 beyond).
"""

from __future__ import annotations

import json
from typing import Any

import torch
from fastapi import APIRouter, Request, Response
from pydantic import ValidationError

from residual import Geometry, unit_table
from service.api.auth import ApiKey
from service.api.body import JsonBody, is_json, parse_model, read_form, validation_message
from service.api.deps import Ready, ReadyDep
from service.api.schemas import (
    COEFFICIENT_REF,
    FORM_LABEL_SET,
    LABEL_SET_ID,
    MODEL_NAME,
    ClassifyRequest,
    ClassifyResponse,
)
from service.api.scoring import image_items, labels_for, load_coefficients, score, within_deadline
from service.errors import InvalidRequest, PayloadTooLarge, UnsupportedMedia
from service.fetch import is_url
from service.stores.coefficients import LoadedCoefficients

router = APIRouter(tags=["classify"])

_BODY = JsonBody(ClassifyRequest)
MULTIPART_FIELDS = ("images", "label_set", "label_set_id", "coefficients", "top_k", "scores", "explain", "model")

_ERRORS: dict[int | str, dict[str, Any]] = {
    404: {"description": "unknown model, label set or coefficient set"},
    409: {"description": "the coefficient set or label set belongs to another model (the message names it)"},
    413: {"description": "request, image or answer too large (images x top_k x (explain + 1)), or too many pixels"},
    415: {"description": "not JSON or multipart, or an unsupported or undecodable image"},
    422: {"description": "invalid request"},
    429: {"description": "overloaded; retry after Retry-After seconds"},
    503: {"description": "not ready, shutting down, or the backbone failed on this batch"},
    504: {"description": "the request did not finish within the request timeout"},
}


def _unit_names(g: Geometry) -> list[str]:
    """Unit names in the paper's order: emb, L<l>.MLP, L<l>.H<h>."""
    return [u.name for u in unit_table(g)]


async def _parse(request: Request, rt: Ready) -> tuple[ClassifyRequest, list[bytes | str]]:
    """JSON body (base64 images or URLs) or multipart (file parts named 'images', URL text parts, form fields)."""
    ctype = request.headers.get("content-type", "")
    if ctype.startswith("multipart/form-data"):
        limit = rt.settings.max_images + 8
        async with read_form(request, limit, limit, rt.settings.max_request_bytes,
                             f"send at most {rt.settings.max_images} image file parts") as form:
            items: list[bytes | str] = []
            fields: dict[str, Any] = {"images": []}
            for key, value in form.multi_items():  # the files are closed when the form closes, also on errors
                if key == "images" and not isinstance(value, str):
                    items.append(await value.read())
                elif key == "images" and isinstance(value, str) and is_url(value):
                    items.append(value)
                elif key == "label_set" and isinstance(value, str):
                    try:
                        fields[key] = json.loads(value)
                    except json.JSONDecodeError as exc:
                        raise InvalidRequest("the label_set form field must be JSON, e.g. "
                                             "'{\"classes\": [\"cat\", \"dog\"]}'") from exc
                elif key in ("top_k", "explain") and isinstance(value, str):
                    try:
                        fields[key] = int(value)
                    except ValueError as exc:
                        raise InvalidRequest(f"the {key} form field must be an integer, not {value[:20]!r}") from exc
                elif key in MULTIPART_FIELDS[2:] and isinstance(value, str):
                    fields[key] = value
                else:
                    raise InvalidRequest(f"unexpected form field {key[:64]!r}; the fields are "
                                         f"{', '.join(MULTIPART_FIELDS)} (images as file parts, or URL text parts)")
        if not items:
            raise InvalidRequest("no image file parts: send each image as a file part named 'images'")
        fields["images"] = ["<file>"] * len(items)  # the bytes are in items
        try:
            body = ClassifyRequest.model_validate(fields)
        except ValidationError as exc:
            raise InvalidRequest(validation_message(exc, ClassifyRequest)) from exc
        return body, items
    if not is_json(ctype):
        raise UnsupportedMedia("send application/json (base64 images) or multipart/form-data (image files)")
    raw = await request.body()
    return await rt.io.run(_parse_json, raw)


def _parse_json(raw: bytes) -> tuple[ClassifyRequest, list[bytes | str]]:
    """Blocking (io pool): JSON parse and validation in one pass (pydantic's Rust parser), then base64."""
    body = parse_model(ClassifyRequest, raw)
    return body, image_items(body.images)


def _answer(rt: Ready, body: ClassifyRequest, classes: list[str], ls_id: str, loaded: LoadedCoefficients | None,
            probs: torch.Tensor, logits: torch.Tensor, contrib: torch.Tensor | None) -> bytes:
    """Blocking (io pool): the response's JSON bytes (top-k, and each label's unit contributions with explain)."""
    k = min(body.top_k or rt.settings.default_top_k, len(classes))
    top = probs.topk(k, dim=-1)
    names = _unit_names(rt.model.backbone.geometry) if contrib is not None else []
    results = []
    for i in range(probs.shape[0]):
        preds: list[dict[str, Any]] = []
        for p, j in zip(top.values[i].tolist(), top.indices[i].tolist(), strict=True):
            pred: dict[str, Any] = {"label": classes[j], "score": float(p)}
            if contrib is not None and body.explain:
                c = contrib[i, :, j]  # (U,)
                order = c.abs().argsort(descending=True)[: body.explain].tolist()
                pred["logit"] = float(logits[i, j])
                pred["contributions"] = [{"unit": names[u], "logit": float(c[u])} for u in order]
            preds.append(pred)
        results.append({"top": preds})
    out: dict[str, Any] = {"model": rt.model.name, "weights_id": rt.model.weights_id,
                           "coefficients": loaded.ref if loaded else None,
                           "basis": loaded.basis_ref if loaded else None, "label_set_id": ls_id, "results": results}
    return json.dumps(out, ensure_ascii=False, allow_nan=False).encode("utf-8", "backslashreplace")


@router.post("/classify", response_model=ClassifyResponse, response_model_exclude_unset=True, dependencies=[ApiKey],
             responses=_ERRORS,
             summary="Classify images against a label set, zero-shot or with a fitted coefficient set",
             openapi_extra={"requestBody": {"required": True, "content": {
                 **_BODY.openapi["requestBody"]["content"],
                 "multipart/form-data": {"schema": {"type": "object", "required": ["images"], "properties": {
                     "images": {"type": "array", "items": {"type": "string", "format": "binary"}, "minItems": 1},
                     "label_set": {"$ref": "#/components/schemas/LabelSet",
                                   "description": "a LabelSet, sent as JSON text in its part"},
                     "label_set_id": {"type": "string", "pattern": LABEL_SET_ID},
                     "coefficients": {"type": "string", "pattern": COEFFICIENT_REF},
                     "top_k": {"type": "integer", "minimum": 1, "maximum": 1000},
                     "scores": {"type": "string", "enum": ["softmax", "cosine"]},
                     "explain": {"type": "integer", "minimum": 1, "maximum": 100000},
                     "model": {"type": "string", "pattern": MODEL_NAME}},
                     "additionalProperties": False, **FORM_LABEL_SET},
                     "encoding": {"label_set": {"contentType": "application/json"}}}}}})
async def classify(request: Request, rt: ReadyDep) -> Response:
    """Images as base64 JSON or multipart files; label set inline, by id, or the coefficient set's own.

    Scores are softmax probabilities of ``exp(logit_scale) * cos(image, class)``, top ``top_k`` per image. The
    answer's ``label_set_id`` is the label set's content hash (nothing is stored; ``POST /label-sets`` registers it).
    """
    s = rt.settings
    body, items = await _parse(request, rt)
    rt = await rt.use(body.model)
    if not items:
        raise InvalidRequest(f"images is empty; send 1 to {s.max_images} images")
    if len(items) > s.max_images:
        raise InvalidRequest(f"{len(items)} images; the limit per request is {s.max_images}")
    if body.label_set is not None and body.label_set_id is not None:
        raise InvalidRequest("give label_set or label_set_id, not both")
    loaded = await load_coefficients(rt, body.coefficients)
    inline = body.label_set
    classes, templates, ls_id = await labels_for(rt, inline.classes if inline else None,
                                                 inline.templates if inline else None, body.label_set_id, loaded)
    explained = min(body.explain or 0, rt.model.backbone.geometry.n_units)  # at most every unit
    n = len(items)
    answered = n * min(body.top_k or s.default_top_k, len(classes)) * (explained + 1)
    if answered > s.max_response_items:
        raise PayloadTooLarge(f"the answer would hold {answered} items (images x top_k x (explain + 1)); the limit "
                              f"is {s.max_response_items}: ask for fewer images, a smaller top_k or explain")

    async def run() -> bytes:
        probs, logits, contrib = await score(rt, items, classes, templates, ls_id, loaded, body.scores,
                                             body.explain or 0)
        return await rt.io.run(_answer, rt, body, classes, ls_id, loaded, probs, logits, contrib)

    content = await within_deadline(rt, run())
    rt.engine.metrics.images_classified.inc(n)
    return Response(content, media_type="application/json")
