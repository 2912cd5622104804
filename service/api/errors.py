"""How every exception becomes an HTTP answer: the one JSON error body of :mod:`service.errors`, never a traceback.

- :class:`service.errors.ServiceError` subclasses: their status and type;
- request validation (query and path parameters): 422 ``invalid_request`` naming each parameter;
- Starlette's own HTTP errors: 404 ``not_found``, 405 ``method_not_allowed`` (with ``Allow``), ...;
- the library's artifact and validation errors: 422;
- a full volume (``ENOSPC``, ``EDQUOT``): 507 ``insufficient_storage``;
- a client that went away while its body was read: nothing to answer (logged at debug level);
- anything else: logged with its traceback, answered as a generic 500.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.routing import BaseRoute, Match
from starlette.types import Scope

from residual.errors import ArtifactError, ResidualError
from service.errors import ServiceError, disk_full, error_body

__all__ = ["allowed_methods", "install"]

logger = logging.getLogger(__name__)

_HTTP_TYPES = {400: "bad_request", 401: "unauthorized", 403: "forbidden", 404: "not_found",
               405: "method_not_allowed", 413: "payload_too_large", 415: "unsupported_media"}


def allowed_methods(routes: list[BaseRoute], scope: Scope) -> list[str]:
    """Every method some route takes at this path (the ``Allow`` of a 405)."""
    methods: set[str] = set()
    for route in routes:
        match, _ = route.matches({**scope, "method": "\0"})  # no route takes this method: a path-only match
        if match != Match.NONE:
            methods |= set(getattr(route, "methods", None) or ())
    return sorted(methods)


def install(app: FastAPI) -> None:
    """Map every exception to the one JSON error body; unknown ones become a generic 500."""

    @app.exception_handler(ServiceError)
    async def _service(_: Request, exc: ServiceError) -> JSONResponse:
        return JSONResponse(error_body(exc.type, exc.message), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        parts = []
        for e in exc.errors():
            loc = ".".join(str(p) for p in e.get("loc", ()) if p != "body")
            parts.append(f"{loc}: {e.get('msg')}" if loc else str(e.get("msg")))
        return JSONResponse(error_body("invalid_request", "; ".join(parts) or "invalid request"), status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = _HTTP_TYPES.get(exc.status_code, "http_error")
        headers = dict(getattr(exc, "headers", None) or {})
        message = str(exc.detail)
        if exc.status_code == 405:  # Starlette names the first route's methods; the path may have several routes
            allowed = allowed_methods(request.app.state.routes, request.scope)
            headers["Allow"] = ", ".join(allowed)
            message = f"{request.method} is not allowed here; this path takes {', '.join(allowed)}"
        return JSONResponse(error_body(kind, message), status_code=exc.status_code, headers=headers or None)

    @app.exception_handler(ArtifactError)
    async def _artifact(_: Request, exc: ArtifactError) -> JSONResponse:
        return JSONResponse(error_body("invalid_artifact", str(exc)), status_code=422)

    @app.exception_handler(ResidualError)
    async def _residual(_: Request, exc: ResidualError) -> JSONResponse:
        return JSONResponse(error_body("invalid_request", str(exc)), status_code=422)

    @app.exception_handler(ClientDisconnect)
    async def _gone(_: Request, exc: ClientDisconnect) -> Response:
        logger.debug("client disconnected while its request body was read")
        return Response(status_code=400)  # never delivered: the connection is closed

    @app.exception_handler(Exception)
    async def _unknown(_: Request, exc: Exception) -> JSONResponse:
        full = disk_full(exc) or (disk_full(exc.__cause__) if exc.__cause__ is not None else None)
        if full is not None:
            logger.error("disk full: %s", exc)
            return JSONResponse(error_body(full.type, full.message), status_code=full.status, headers=full.headers)
        logger.exception("unhandled error", exc_info=exc)
        return JSONResponse(error_body("internal", "internal server error"), status_code=500)
