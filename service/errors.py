"""Error taxonomy of the service: one JSON body, ``{"error": {"type": ..., "message": ...}}``.

Every HTTP error the service raises is one of these classes (routes never build error bodies themselves).

Hierarchy::

    ServiceError (500 internal)
    ├── InvalidRequest         422 invalid_request
    ├── Unauthorized           401 unauthorized (with WWW-Authenticate)
    ├── Forbidden              403 forbidden
    ├── NotFound               404 not_found
    ├── Conflict               409 conflict
    ├── PayloadTooLarge        413 payload_too_large
    ├── UnsupportedMedia       415 unsupported_media
    ├── Overloaded             429 overloaded (with Retry-After)
    ├── Timeout                504 timeout
    ├── NotReady               503 not_ready
    ├── BackendUnavailable     503 backend_unavailable
    └── ShuttingDown           503 shutting_down (SIGTERM received: no new work)
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from residual.errors import ArtifactError, ResidualError

logger = logging.getLogger(__name__)


class ServiceError(Exception):
    status = 500
    type = "internal"

    def __init__(self, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.headers = headers


class InvalidRequest(ServiceError):
    status, type = 422, "invalid_request"


class Unauthorized(ServiceError):
    status, type = 401, "unauthorized"


class Forbidden(ServiceError):
    status, type = 403, "forbidden"


class NotFound(ServiceError):
    status, type = 404, "not_found"


class Conflict(ServiceError):
    status, type = 409, "conflict"


class PayloadTooLarge(ServiceError):
    status, type = 413, "payload_too_large"


class UnsupportedMedia(ServiceError):
    status, type = 415, "unsupported_media"


class Overloaded(ServiceError):
    status, type = 429, "overloaded"


class Timeout(ServiceError):
    status, type = 504, "timeout"


class NotReady(ServiceError):
    status, type = 503, "not_ready"


class BackendUnavailable(ServiceError):
    status, type = 503, "backend_unavailable"


class ShuttingDown(ServiceError):
    status, type = 503, "shutting_down"


def error_body(type_: str, message: str) -> dict[str, dict[str, str]]:
    return {"error": {"type": type_, "message": message}}


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
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = {404: "not_found", 405: "method_not_allowed", 401: "unauthorized", 403: "forbidden"}.get(
            exc.status_code, "http_error")
        return JSONResponse(error_body(kind, str(exc.detail)), status_code=exc.status_code,
                            headers=getattr(exc, "headers", None))

    @app.exception_handler(ArtifactError)
    async def _artifact(_: Request, exc: ArtifactError) -> JSONResponse:
        return JSONResponse(error_body("invalid_artifact", str(exc)), status_code=422)

    @app.exception_handler(ResidualError)
    async def _residual(_: Request, exc: ResidualError) -> JSONResponse:
        return JSONResponse(error_body("invalid_request", str(exc)), status_code=422)

    @app.exception_handler(Exception)
    async def _unknown(_: Request, exc: Exception) -> JSONResponse:
        logger.exception("unhandled error", exc_info=exc)
        return JSONResponse(error_body("internal", "internal server error"), status_code=500)
