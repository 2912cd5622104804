"""ASGI middlewares of the API, outermost first: tracing (when on), request metrics, the Open Inference Protocol's
error body, authentication (``service.api.auth``), body limit.

- :class:`RequestMetrics` observes every answer's duration by route template and status, so refused requests
  (401, 413) count too. Mounted static files are labelled by their mount (``/playground``), never by path, so the
  label set stays bounded.
- :class:`BodyLimit` answers 413 once a body exceeds ``limit`` bytes, counted while it streams: an honest
  ``Content-Length`` is refused before reading, a chunked or lying body as soon as the count passes the limit,
  whichever route reads it (FastAPI's own body parsing would turn that into a 400).
"""

from __future__ import annotations

import json
import time

from starlette.routing import BaseRoute, Mount
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service import tracing
from service.errors import error_body
from service.metrics import Metrics

__all__ = ["BodyLimit", "ProtocolErrors", "RequestMetrics", "Tracing"]


class _TooLarge(Exception):
    pass


async def _send_413(send: Send, limit: int) -> None:
    body = json.dumps(error_body("payload_too_large", f"request body exceeds {limit} bytes")).encode()
    await send({"type": "http.response.start", "status": 413,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})


class BodyLimit:
    """ASGI middleware: 413 once a request body exceeds ``limit`` bytes, counted while it streams."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers", [])).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            await _send_413(send, self.limit)
            return
        seen = 0
        started = False

        async def limited_receive() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise _TooLarge()
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except _TooLarge:
            if not started:
                await _send_413(send, self.limit)
        except Exception as exc:  # a handler that wrapped our signal (e.g. a form parser): still a 413
            if _caused_by_limit(exc) and not started:
                await _send_413(send, self.limit)
                return
            raise


def _caused_by_limit(exc: BaseException) -> bool:
    seen = 0
    cur: BaseException | None = exc
    while cur is not None and seen < 8:
        if isinstance(cur, _TooLarge):
            return True
        cur = cur.__cause__ or cur.__context__
        seen += 1
    return False


def _route_label(scope: Scope, mounts: list[Mount]) -> str:
    """The route template, a mount's path for the files under it, else "unmatched" (bounded either way)."""
    route = scope.get("route")
    if isinstance(route, Mount):
        return route.path or "/"
    if route is not None:
        return str(getattr(route, "path", "unmatched"))
    path = scope.get("path", "")
    for mount in mounts:
        if path == mount.path or path.startswith(mount.path + "/"):
            return mount.path
    return "unmatched"


class RequestMetrics:
    """ASGI middleware: request duration by route template and status (outermost, so 401s and 413s count too)."""

    def __init__(self, app: ASGIApp, metrics: Metrics, routes: list[BaseRoute] | None = None) -> None:
        self.app = app
        self.metrics = metrics
        self.routes = routes if routes is not None else []

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = {"code": 500}

        async def tracking_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                status["code"] = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        finally:
            mounts = [r for r in self.routes if isinstance(r, Mount)]
            self.metrics.request_seconds.labels(route=_route_label(scope, mounts), status=str(status["code"])
                                                ).observe(time.perf_counter() - started)


class Tracing:
    """ASGI middleware (added only when tracing is on): one server span per request, the child of the caller's W3C
    ``traceparent`` when it sends one, named by method and route template once routing has matched."""

    def __init__(self, app: ASGIApp, routes: list[BaseRoute] | None = None) -> None:
        self.app = app
        self.mounts = [r for r in routes or [] if isinstance(r, Mount)]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope.get("headers", [])
                   if k in (b"traceparent", b"tracestate")}
        method = scope.get("method", "GET")
        with tracing.span(method, {"http.request.method": method, "url.path": scope.get("path", "")},
                          context=tracing.extract(headers), kind="server") as span:

            async def traced_send(message: Message) -> None:
                if message["type"] == "http.response.start":
                    span.set_attribute("http.response.status_code", int(message["status"]))
                await send(message)

            try:
                await self.app(scope, receive, traced_send)
            finally:
                route = _route_label(scope, self.mounts)
                span.update_name(f"{method} {route}")
                span.set_attribute("http.route", route)


class ProtocolErrors:
    """ASGI middleware: under ``/v2`` (the Open Inference Protocol) an error answers with the protocol's body,
    ``{"error": "<message>"}``, instead of ``{"error": {"type", "message"}}``: whichever layer refused the request
    (authentication, the body limit, a route). Other paths pass through untouched."""

    def __init__(self, app: ASGIApp, prefix: str = "/v2") -> None:
        self.app = app
        self.prefix = prefix

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "")
        if scope["type"] != "http" or not (path == self.prefix or path.startswith(self.prefix + "/")):
            await self.app(scope, receive, send)
            return
        start: dict[str, Message] = {}
        chunks: list[bytes] = []

        async def rewriting_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                if int(message["status"]) < 400:
                    await send(message)
                else:
                    start["message"] = message  # held until the (small) error body is complete
                return
            if "message" not in start:
                await send(message)
                return
            chunks.append(message.get("body", b""))
            if message.get("more_body", False):
                return
            body = b"".join(chunks)
            try:
                parsed = json.loads(body)
                error = parsed["error"]
                body = json.dumps({"error": error["message"] if isinstance(error, dict) else str(error)}).encode()
            except (ValueError, KeyError, TypeError):
                pass  # not our error body: passed on as it is
            head = start["message"]
            headers = [(k, v) for k, v in head.get("headers", []) if k.lower() != b"content-length"]
            headers.append((b"content-length", str(len(body)).encode()))
            await send({**head, "headers": headers})
            await send({"type": "http.response.body", "body": body})

        await self.app(scope, receive, rewriting_send)
