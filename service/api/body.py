"""JSON request bodies, read on the event loop and parsed off it, with one answer for every kind of bad body.

FastAPI parses a typed JSON body with ``json.loads`` and validates it on the event loop, before any dependency runs:
a 16 MiB body holds the loop for seconds. Routes here declare their body with :class:`JsonBody` instead: the bytes
are read as they stream (the body limit still applies: 413), then parsed and validated in one pass by pydantic's
Rust parser on the io pool. The same rules everywhere:

- a content type other than ``application/json`` (or ``+json``): 415 ``unsupported_media``;
- no body: 422 naming the model's required fields;
- bytes that are not JSON: 422 ``body is not valid JSON: ...`` (never FastAPI's 400);
- a field the model does not know: 422 naming it, with a hint where a common mistake has one;
- any other validation error: 422 with each field's path and message.

The OpenAPI document still shows each body: :attr:`JsonBody.openapi` goes into the route's ``openapi_extra`` and
:data:`MODELS` into the schema's components (``service.api.app``).
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any, Generic, TypeVar

from fastapi import Depends, Request
from pydantic import BaseModel, ValidationError
from starlette.datastructures import FormData
from starlette.exceptions import HTTPException as StarletteHTTPException

from service.errors import InvalidRequest, UnsupportedMedia

__all__ = ["MODELS", "JsonBody", "is_json", "parse_model", "read_form", "validation_message"]

M = TypeVar("M", bound=BaseModel)

MODELS: dict[str, type[BaseModel]] = {}
"""Every model used as a JSON body, by name: their schemas are added to the OpenAPI components."""

HINTS: dict[str, str] = {
    "classes": "put classes inside label_set: {\"label_set\": {\"classes\": [...], \"templates\": [...]}}",
    "templates": "put templates inside label_set: {\"label_set\": {\"classes\": [...], \"templates\": [...]}}",
    "labels": "labels belong to an inline dataset: {\"dataset\": {\"images\": [...], \"labels\": [...]}}",
}
"""Extra top-level fields that users send by mistake, and what to send instead."""


def is_json(content_type: str) -> bool:
    main = content_type.split(";", 1)[0].strip().lower()
    return main == "application/json" or (main.startswith("application/") and main.endswith("+json"))


def validation_message(exc: ValidationError, model: type[BaseModel] | None = None) -> str:
    """One line per problem: ``field.path: message``; unknown fields are named with a hint."""
    parts = []
    for e in exc.errors():
        loc = ".".join(str(p) for p in e.get("loc", ()))
        if e.get("type") == "extra_forbidden":
            field = str(e.get("loc", ("?",))[-1])
            hint = HINTS.get(field) if len(e.get("loc", ())) == 1 else None
            known = sorted(model.model_fields) if model is not None and len(e.get("loc", ())) == 1 else None
            msg = f"unknown field {loc!r}"
            if hint:
                msg += f"; {hint}"
            elif known:
                msg += f"; the fields are {', '.join(known)}"
            parts.append(msg)
            continue
        parts.append(f"{loc}: {e.get('msg')}" if loc else str(e.get("msg")))
    return "; ".join(parts) or "invalid request body"


def parse_model(model: type[M], raw: bytes) -> M:
    """Blocking (io pool): JSON bytes -> a validated ``model`` (pydantic's Rust parser, one pass); 422 otherwise."""
    if not raw.strip():
        required = [n for n, f in model.model_fields.items() if f.is_required()]
        fields = ", ".join(required) if required else "all optional"
        raise InvalidRequest(f"this route needs a JSON body ({model.__name__}; required fields: {fields})")
    try:
        return model.model_validate_json(raw)
    except ValidationError as exc:
        first = exc.errors()[0] if exc.errors() else {}
        if first.get("type") == "json_invalid":
            detail = first.get("ctx", {}).get("error", "parse error")
            raise InvalidRequest(f"body is not valid JSON: {detail}") from exc
        if first.get("type") == "model_type" and not first.get("loc"):
            raise InvalidRequest(f"the body must be a JSON object ({model.__name__})") from exc
        raise InvalidRequest(validation_message(exc, model)) from exc


@contextlib.asynccontextmanager
async def read_form(request: Request, max_files: int, max_fields: int, max_part_size: int = 1024 * 1024,
                    what: str = "") -> AsyncIterator[FormData]:
    """``request.form(...)`` whose refusals (too many parts, a part too large, a malformed body) answer 422 with
    the parser's reason and ``what`` the route expects, instead of Starlette's undocumented 400."""
    try:
        async with request.form(max_files=max_files, max_fields=max_fields, max_part_size=max_part_size) as form:
            yield form
    except StarletteHTTPException as exc:
        if exc.status_code != 400:
            raise
        raise InvalidRequest(f"the multipart body was refused: {exc.detail}" + (f"; {what}" if what else "")) from exc


class JsonBody(Generic[M]):
    """A route's JSON body: ``body: Model = JsonBody(Model).depends`` and ``openapi_extra=JsonBody(Model).openapi``.

    The dependency reads the body on the event loop (streaming; the body limit middleware counts it) and parses it
    on the runtime's io pool.
    """

    def __init__(self, model: type[M]) -> None:
        self.model = model
        MODELS[model.__name__] = model

    @property
    def openapi(self) -> dict[str, Any]:
        ref = {"$ref": f"#/components/schemas/{self.model.__name__}"}
        return {"requestBody": {"required": True, "content": {"application/json": {"schema": ref}}}}

    async def __call__(self, request: Request) -> M:
        ctype = request.headers.get("content-type", "")
        if not is_json(ctype):
            shown = ctype.split(";", 1)[0] or "none"
            raise UnsupportedMedia(f"send the body as application/json (a {self.model.__name__}); the content type "
                                   f"was {shown}")
        raw = await request.body()
        pool = request.app.state.runtime.io
        return await pool.run(parse_model, self.model, raw)

    @property
    def depends(self) -> Any:
        return Depends(self)
