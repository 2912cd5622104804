"""The Open Inference Protocol (KServe v2), REST: what Triton and KServe clients, gateways and dashboards speak.

- ``GET /v2``, ``/v2/health/live``, ``/v2/health/ready`` (unauthenticated, like ``/livez`` and ``/readyz``; not
  ready is 400 with the reason, the protocol's "4xx means false");
- ``GET /v2/models/{model}``, ``/v2/models/{model}/ready``, ``POST /v2/models/{model}/infer`` (the classification
  key): ``{model}`` is a served model (``GET /v1/models``).

``infer`` is ``/classify`` in the protocol's tensors: inputs ``images`` (BYTES ``[n]``, encoded image files, or
http(s) URLs where the deployment allows them) and ``labels`` (BYTES ``[C]``, class names; optional with
``label_set_id`` or ``coefficients``); request parameters ``coefficients``, ``templates``, ``label_set_id``,
``scores``; outputs ``probabilities`` (FP32 ``[n, C]``, in the order of ``labels``) and ``labels`` (BYTES ``[C]``).
JSON tensors and the binary tensor extension (``Inference-Header-Content-Length``) both work, in both directions.
The same batcher, limits and authentication apply; errors carry the protocol's ``{"error": "..."}``
(``service.api.middleware.ProtocolErrors``) with the status codes of the rest of the API.
"""

from __future__ import annotations

import json
import math
import re
import struct
from typing import Any

import torch
from fastapi import APIRouter, Path, Request, Response

from service.api.auth import ApiKey
from service.api.body import is_json, parse_model
from service.api.deps import Ready, ReadyDep, get_runtime
from service.api.schemas import (
    COEFFICIENT_REF,
    LABEL_SET_ID,
    V2Health,
    V2InferRequest,
    V2InferResponse,
    V2ModelMetadata,
    V2ModelReady,
    V2ServerMetadata,
    V2Tensor,
    V2TensorMetadata,
)
from service.api.scoring import labels_for, load_coefficients, score, within_deadline
from service.errors import InvalidRequest, PayloadTooLarge, ServiceError, UnsupportedMedia
from service.fetch import is_url
from service.images import decode_base64
from service.settings import MODEL_NAME

__all__ = ["router"]

router = APIRouter(tags=["open inference protocol (KServe v2)"])

HEADER = "inference-header-content-length"
INPUTS = ("images", "labels")
OUTPUTS = ("probabilities", "labels")
PARAMETERS = ("coefficients", "templates", "label_set_id", "scores", "binary_data_output", "priority", "timeout")
_URL_PREFIXES = (b"http://", b"https://")
_MAX_URL_BYTES = 8192

_ERROR = {"content": {"application/json": {"schema": {"$ref": "#/components/schemas/V2Error"}}}}
_ModelPath: Any = Path(..., pattern=MODEL_NAME, description="a served model (GET /v1/models)")


class NotReadyV2(ServiceError):
    """The protocol's health "false": a 4xx."""

    status = 400
    type = "not_ready"


# ---- health and metadata --------------------------------------------------------------------------------------------


@router.get("/v2", response_model=V2ServerMetadata, summary="Server metadata (Open Inference Protocol)")
async def server_metadata(request: Request) -> V2ServerMetadata:
    return V2ServerMetadata(name="residual-serve", version=request.app.version, extensions=["binary_tensor_data"])


@router.get("/v2/health/live", response_model=V2Health, response_model_exclude_none=True,
            summary="Liveness (Open Inference Protocol)")
async def live() -> V2Health:
    return V2Health(live=True)


@router.get("/v2/health/ready", response_model=V2Health, response_model_exclude_none=True,
            summary="Readiness (Open Inference Protocol): 200 or 400",
            responses={400: {"description": "not ready (the message says why), the protocol's false", **_ERROR}})
async def ready(request: Request) -> V2Health:
    """Exactly ``/readyz``'s predicate; not ready answers 400 (the protocol's "a 4xx status code means false")."""
    problem = get_runtime(request).problem()
    if problem is not None:
        raise NotReadyV2(problem.message, headers=problem.headers)
    return V2Health(ready=True)


def _model_problem(request: Request, model: str) -> ServiceError | None:
    """Why ``model`` would not serve a request now (404 unknown); None when it would (loading on first use counts)."""
    runtime = get_runtime(request)
    runtime.models.slot(model)  # 404 naming the served models
    return runtime.problem() or runtime.models.problem(model)


@router.get("/v2/models/{model}/ready", response_model=V2ModelReady, dependencies=[ApiKey],
            summary="Model readiness (Open Inference Protocol): 200 or 400",
            responses={400: {"description": "the model cannot serve now (the message says why)", **_ERROR},
                       404: {"description": "not a served model", **_ERROR}})
async def model_ready(request: Request, model: str = _ModelPath) -> V2ModelReady:
    """Ready when a request would be served now; a model that loads on first use (a memory budget) is ready."""
    problem = _model_problem(request, model)
    if problem is not None:
        raise NotReadyV2(problem.message, headers=problem.headers)
    return V2ModelReady(name=model, ready=True)


@router.get("/v2/models/{model}", response_model=V2ModelMetadata, dependencies=[ApiKey],
            summary="Model metadata (Open Inference Protocol): its inputs, outputs and version",
            responses={404: {"description": "not a served model", **_ERROR}})
async def model_metadata(request: Request, model: str = _ModelPath) -> V2ModelMetadata:
    runtime = get_runtime(request)
    slot = runtime.models.slot(model)
    return V2ModelMetadata(
        name=model, versions=[slot.weights_id] if slot.weights_id else [], platform="residual-serve/open_clip",
        inputs=[V2TensorMetadata(name="images", datatype="BYTES", shape=[-1]),
                V2TensorMetadata(name="labels", datatype="BYTES", shape=[-1])],
        outputs=[V2TensorMetadata(name="probabilities", datatype="FP32", shape=[-1, -1]),
                 V2TensorMetadata(name="labels", datatype="BYTES", shape=[-1])],
        parameters={"architecture": slot.spec.architecture, "state": slot.state})


# ---- infer ----------------------------------------------------------------------------------------------------------


def _bytes_elements(raw: bytes, name: str) -> list[bytes]:
    """A BYTES tensor's binary data -> its elements (each a 4-byte little-endian length, then that many bytes)."""
    out: list[bytes] = []
    offset = 0
    while offset < len(raw):
        if offset + 4 > len(raw):
            raise InvalidRequest(f"input {name!r}: its binary data ends inside an element's 4-byte length")
        (size,) = struct.unpack_from("<I", raw, offset)
        offset += 4
        if offset + size > len(raw):
            raise InvalidRequest(f"input {name!r}: element {len(out)} claims {size} bytes; {len(raw) - offset} are "
                                 "left")
        out.append(raw[offset : offset + size])
        offset += size
    return out


def _ordered(data: list[Any]) -> list[Any]:
    """Row-major flattening of nested lists."""
    flat: list[Any] = []
    for item in data:
        flat.extend(_ordered(item) if isinstance(item, list) else [item])
    return flat


def _elements(tensor: V2Tensor, binary: bytes | None) -> list[bytes | str]:
    """A BYTES input's elements, checked against its shape: bytes (binary data) or strings (JSON data)."""
    if tensor.datatype != "BYTES":
        raise InvalidRequest(f"input {tensor.name!r} has datatype {tensor.datatype[:16]!r}; it must be BYTES")
    expected = math.prod(tensor.shape)
    if binary is not None:
        if tensor.data is not None:
            raise InvalidRequest(f"input {tensor.name!r} has both binary data and 'data'")
        items: list[bytes | str] = list(_bytes_elements(binary, tensor.name))
    elif tensor.data is not None:
        items = _ordered(tensor.data)
        bad = next((i for i, v in enumerate(items) if not isinstance(v, str)), None)
        if bad is not None:
            raise InvalidRequest(f"input {tensor.name!r}: element {bad} is not a string (BYTES elements in JSON are "
                                 "strings: base64 or a URL for images, text for labels)")
    else:
        raise InvalidRequest(f"input {tensor.name!r} has no data: give 'data', or binary data with "
                             "parameters.binary_data_size")
    if len(items) != expected:
        raise InvalidRequest(f"input {tensor.name!r} has shape {tensor.shape} ({expected} elements) but "
                             f"{len(items)} elements")
    return items


def _image(item: bytes | str, index: int) -> bytes | str:
    """A binary ``images`` element is the encoded file, or a URL when it is one."""
    if isinstance(item, bytes) and len(item) <= _MAX_URL_BYTES and item[:8].lower().startswith(_URL_PREFIXES):
        try:
            return item.decode("ascii")
        except UnicodeDecodeError as exc:
            raise InvalidRequest(f"images[{index}] starts like a URL but is not ASCII") from exc
    return item


def _label(item: bytes | str, index: int) -> str:
    if isinstance(item, str):
        return item
    try:
        return item.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidRequest(f"labels[{index}] is not UTF-8 text") from exc


def _templates(value: Any) -> list[str] | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise InvalidRequest("parameter 'templates' must be a string: one template, or a JSON list of templates")
    text = value.strip()
    if text.startswith("["):
        try:
            parsed = json.loads(text)
        except json.JSONDecodeError as exc:
            raise InvalidRequest(f"parameter 'templates' is not a valid JSON list: {exc}") from exc
        if not isinstance(parsed, list) or not all(isinstance(t, str) for t in parsed):
            raise InvalidRequest("parameter 'templates' must be a JSON list of strings")
        return parsed
    return [value]


class _Parsed:
    def __init__(self, request: V2InferRequest, images: list[bytes | str], labels: list[str] | None) -> None:
        self.request, self.images, self.labels = request, images, labels


def _parse(raw: bytes, header_length: int | None) -> _Parsed:
    """Blocking (io pool): the JSON header (the whole body without the binary extension) and each input's data."""
    if header_length is None:
        req = parse_model(V2InferRequest, raw)
        binary = b""
    else:
        if not 0 < header_length <= len(raw):
            raise InvalidRequest(f"Inference-Header-Content-Length is {header_length}; the body has {len(raw)} bytes")
        req = parse_model(V2InferRequest, raw[:header_length])
        binary = raw[header_length:]
    offset = 0
    found: dict[str, list[bytes | str]] = {}
    for tensor in req.inputs:
        if tensor.name not in INPUTS:
            raise InvalidRequest(f"unknown input {tensor.name[:64]!r}; the inputs are images and labels")
        if tensor.name in found:
            raise InvalidRequest(f"input {tensor.name!r} is given twice")
        size = (tensor.parameters or {}).get("binary_data_size")
        chunk = None
        if size is not None:
            if isinstance(size, bool) or not isinstance(size, int) or size < 0:
                raise InvalidRequest(f"input {tensor.name!r}: binary_data_size must be a non-negative integer")
            if header_length is None:
                raise InvalidRequest(f"input {tensor.name!r} has binary_data_size but the request has no "
                                     "Inference-Header-Content-Length header")
            chunk = binary[offset : offset + size]
            if len(chunk) != size:
                raise InvalidRequest(f"input {tensor.name!r}: binary_data_size {size} runs past the body's end")
            offset += size
        found[tensor.name] = _elements(tensor, chunk)
    if offset != len(binary):
        raise InvalidRequest(f"{len(binary) - offset} bytes of binary data belong to no input (binary_data_size)")
    if "images" not in found:
        raise InvalidRequest("input 'images' is missing (BYTES [n]: encoded image files)")
    images: list[bytes | str] = [
        (item if is_url(item) else decode_base64(item, i)) if isinstance(item, str) else _image(item, i)
        for i, item in enumerate(found["images"])]
    labels = [_label(x, i) for i, x in enumerate(found["labels"])] if "labels" in found else None
    return _Parsed(req, images, labels)


def _outputs(req: V2InferRequest) -> dict[str, bool]:
    """The outputs to send, each with whether it goes as binary data."""
    params = req.parameters or {}
    default_binary = params.get("binary_data_output", False)
    if not isinstance(default_binary, bool):
        raise InvalidRequest("parameter 'binary_data_output' must be a boolean")
    if req.outputs is None:
        return dict.fromkeys(OUTPUTS, default_binary)
    out: dict[str, bool] = {}
    for o in req.outputs:
        if o.name not in OUTPUTS:
            raise InvalidRequest(f"unknown output {o.name[:64]!r}; the outputs are probabilities and labels")
        binary = (o.parameters or {}).get("binary_data", default_binary)
        if not isinstance(binary, bool):
            raise InvalidRequest(f"output {o.name!r}: binary_data must be a boolean")
        out[o.name] = binary
    return out


def _encode(name: str, probs: torch.Tensor, labels: list[str], binary: bool) -> tuple[dict[str, Any], bytes]:
    """One output tensor: its JSON and its binary data (empty for JSON data)."""
    if name == "probabilities":
        values = probs.float().contiguous()  # (n, C)
        tensor: dict[str, Any] = {"name": name, "datatype": "FP32", "shape": list(values.shape)}
        if binary:
            data = values.numpy().astype("<f4").tobytes()
            return {**tensor, "parameters": {"binary_data_size": len(data)}}, data
        return {**tensor, "data": values.flatten().tolist()}, b""
    tensor = {"name": name, "datatype": "BYTES", "shape": [len(labels)]}
    if binary:
        data = b"".join(struct.pack("<I", len(b)) + b for b in (x.encode("utf-8") for x in labels))
        return {**tensor, "parameters": {"binary_data_size": len(data)}}, data
    return {**tensor, "data": labels}, b""


def _answer(rt: Ready, req: V2InferRequest, wanted: dict[str, bool], probs: torch.Tensor, labels: list[str],
            parameters: dict[str, Any]) -> Response:
    """Blocking (io pool): the response, JSON or JSON header + binary data."""
    tensors, chunks = [], []
    for name, binary in wanted.items():
        tensor, data = _encode(name, probs, labels, binary)
        tensors.append(tensor)
        chunks.append(data)
    head: dict[str, Any] = {"model_name": rt.model.name, "model_version": rt.model.weights_id,
                            "parameters": parameters, "outputs": tensors}
    if req.id is not None:
        head["id"] = req.id
    header = json.dumps(head, ensure_ascii=False, allow_nan=False).encode("utf-8")
    data = b"".join(chunks)
    if not data:
        return Response(header, media_type="application/json")
    return Response(header + data, media_type="application/octet-stream",
                    headers={"Inference-Header-Content-Length": str(len(header))})


@router.post("/v2/models/{model}/infer", response_model=V2InferResponse, dependencies=[ApiKey],
             summary="Classify images (Open Inference Protocol): probabilities over the labels",
             openapi_extra={"requestBody": {"required": True, "content": {"application/json": {
                 "schema": {"$ref": "#/components/schemas/V2InferRequest"}}}}},
             responses={404: {"description": "not a served model, label set or coefficient set", **_ERROR},
                        409: {"description": "the coefficient set or label set belongs to another model", **_ERROR},
                        413: {"description": "request, image or answer (images x labels) too large", **_ERROR},
                        415: {"description": "not JSON (or the binary extension), or an undecodable image",
                              **_ERROR},
                        429: {"description": "overloaded; retry after Retry-After seconds", **_ERROR},
                        504: {"description": "the request did not finish within the request timeout", **_ERROR}})
async def infer(request: Request, rt: ReadyDep, model: str = _ModelPath) -> Response:
    """Inputs ``images`` (BYTES ``[n]``) and ``labels`` (BYTES ``[C]``, optional with ``label_set_id`` or
    ``coefficients``); outputs ``probabilities`` (FP32 ``[n, C]``) and ``labels``. The binary tensor extension: the
    JSON header's length in ``Inference-Header-Content-Length``, each input's bytes after it
    (``parameters.binary_data_size``); outputs come as binary data when asked (``binary_data`` on an output,
    ``binary_data_output`` on the request). Probabilities equal ``/classify``'s scores for the same images and label
    set (``scores``: ``softmax``, or ``cosine`` for the raw cosines)."""
    s = rt.settings
    ctype = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    length = request.headers.get(HEADER)
    if ctype and not is_json(ctype) and not (ctype == "application/octet-stream" and length is not None):
        raise UnsupportedMedia("send the inference request as application/json, or with the binary tensor "
                               "extension (an Inference-Header-Content-Length header)")
    try:
        header_length = int(length) if length is not None else None
    except ValueError as exc:
        raise InvalidRequest(f"Inference-Header-Content-Length must be an integer, not {str(length)[:20]!r}") from exc
    raw = await request.body()
    parsed: _Parsed = await rt.io.run(_parse, raw, header_length)
    req = parsed.request
    params = dict(req.parameters or {})
    unknown = sorted(set(params) - set(PARAMETERS))
    if unknown:
        raise InvalidRequest(f"unknown parameter {unknown[0][:64]!r}; the parameters are {', '.join(PARAMETERS)}")
    for key, pattern in (("coefficients", COEFFICIENT_REF), ("label_set_id", LABEL_SET_ID)):
        value = params.get(key)
        if value is not None and not (isinstance(value, str) and re.fullmatch(pattern, value)):
            raise InvalidRequest(f"parameter {key!r} must be a string matching {pattern}")
    scores = params.get("scores", "softmax")
    if scores not in ("softmax", "cosine"):
        raise InvalidRequest("parameter 'scores' must be 'softmax' or 'cosine'")
    wanted = _outputs(req)
    rt = await rt.use(model)
    images = parsed.images
    if not images:
        raise InvalidRequest(f"input 'images' is empty; send 1 to {s.max_images} images")
    if len(images) > s.max_images:
        raise InvalidRequest(f"{len(images)} images; the limit per request is {s.max_images}")
    loaded = await load_coefficients(rt, params.get("coefficients"))  # type: ignore[arg-type]
    if parsed.labels is not None and params.get("label_set_id") is not None:
        raise InvalidRequest("give the input 'labels' or the parameter 'label_set_id', not both")
    if parsed.labels is None and params.get("label_set_id") is None and loaded is None:
        raise InvalidRequest("give the input 'labels' (BYTES [C]), or the parameter 'label_set_id' or "
                             "'coefficients' (whose label set is then used)")
    templates = _templates(params.get("templates"))
    if templates is not None and parsed.labels is None:
        raise InvalidRequest("parameter 'templates' goes with the input 'labels'")
    classes, templates, ls_id = await labels_for(rt, parsed.labels, templates,
                                                 params.get("label_set_id"), loaded)  # type: ignore[arg-type]
    if len(images) * len(classes) > s.max_response_items:
        raise PayloadTooLarge(f"the answer would hold {len(images)} x {len(classes)} probabilities; the limit is "
                              f"{s.max_response_items}")

    async def run() -> Response:
        probs, _, _ = await score(rt, images, classes, templates, ls_id, loaded, scores)  # type: ignore[arg-type]
        answered = {"label_set_id": ls_id, "scores": str(scores)}
        if loaded is not None:
            answered["coefficients"] = loaded.ref
        return await rt.io.run(_answer, rt, req, wanted, probs, classes, answered)

    response = await within_deadline(rt, run())
    rt.engine.metrics.images_classified.inc(len(images))
    return response

