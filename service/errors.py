"""Error taxonomy of the service: one JSON body, ``{"error": {"type": ..., "message": ...}}``.

Every HTTP error the service raises is one of these classes (routes never build error bodies themselves); the
stores, the engine and the jobs raise them too, and ``service.api.errors`` maps them (and every other exception)
to responses.

Hierarchy::

    ServiceError (500 internal)
    ├── InvalidRequest         422 invalid_request
    ├── Unauthorized           401 unauthorized (with WWW-Authenticate)
    ├── Forbidden              403 forbidden
    ├── NotFound               404 not_found
    ├── Conflict               409 conflict
    ├── PayloadTooLarge        413 payload_too_large
    ├── HeadersTooLarge        431 headers_too_large (answered by the HTTP server, service.api.server)
    ├── UnsupportedMedia       415 unsupported_media
    ├── Overloaded             429 overloaded (with Retry-After)
    ├── Timeout                504 timeout
    ├── InsufficientStorage    507 insufficient_storage (the artifact volume is full; partial files removed)
    ├── NotReady               503 not_ready
    ├── BackendUnavailable     503 backend_unavailable
    └── ShuttingDown           503 shutting_down (SIGTERM received: no new work)
"""

from __future__ import annotations

import errno

__all__ = ["BackendUnavailable", "Conflict", "Forbidden", "HeadersTooLarge", "InsufficientStorage", "InvalidRequest",
           "NotFound", "NotReady", "Overloaded", "PayloadTooLarge", "ServiceError", "ShuttingDown", "Timeout",
           "Unauthorized", "UnsupportedMedia", "disk_full", "error_body"]

_DISK_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


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


class HeadersTooLarge(ServiceError):
    status, type = 431, "headers_too_large"


class UnsupportedMedia(ServiceError):
    status, type = 415, "unsupported_media"


class Overloaded(ServiceError):
    status, type = 429, "overloaded"


class Timeout(ServiceError):
    status, type = 504, "timeout"


class InsufficientStorage(ServiceError):
    status, type = 507, "insufficient_storage"


class NotReady(ServiceError):
    status, type = 503, "not_ready"


class BackendUnavailable(ServiceError):
    status, type = 503, "backend_unavailable"


class ShuttingDown(ServiceError):
    status, type = 503, "shutting_down"


def error_body(type_: str, message: str) -> dict[str, dict[str, str]]:
    """The one error body. A message that quotes client input is made encodable (a lone surrogate from a non-UTF-8
    archive name is escaped, never a 500 while answering)."""
    return {"error": {"type": type_, "message": message.encode("utf-8", "backslashreplace").decode("utf-8")}}


def disk_full(exc: BaseException) -> InsufficientStorage | None:
    """The 507 for an OSError that means the volume (or a quota) is full, else None."""
    if isinstance(exc, OSError) and exc.errno in _DISK_FULL:
        return InsufficientStorage("the artifact volume is full (" + (exc.strerror or "no space left") + "); nothing "
                                   "was stored, partial files were removed. Free space or grow the volume, then "
                                   "retry", headers={"Retry-After": "60"})
    return None
