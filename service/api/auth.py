"""API keys, checked before any byte of the body is read.

Each route declares its scope with a dependency marker: ``ApiKey`` (classification and read routes: the API key or
the admin key) or ``AdminKey`` (routes that enqueue work or store data: the admin key only); routes without one are
open (health, metrics, the playground). :class:`Authenticate` is an ASGI middleware that finds the route of a
request from its method and path, checks the ``Authorization: Bearer <key>`` header against the route's scope, and
answers 401/403 at once, before the app (and so FastAPI's body parsing) runs: a refused request costs O(1) whatever
its body, and a refused request that announced a body closes its connection instead of having the rest read.
The markers run the same check again as dependencies (cheap, and it keeps a route safe if it is ever mounted
without the middleware).

A scope whose key is not configured is open (the development default that ``/readyz`` reports as ``auth: open``).
"""

from __future__ import annotations

import hmac
import json
from typing import Literal

from fastapi import Depends, Request
from pydantic import SecretStr
from starlette.routing import BaseRoute, Match
from starlette.types import ASGIApp, Receive, Scope, Send

from service.errors import Forbidden, ServiceError, Unauthorized, error_body
from service.settings import Settings

__all__ = ["AdminKey", "ApiKey", "Authenticate", "KeyScope", "check_key", "route_scope"]

KeyScope = Literal["open", "api", "admin"]
_CHALLENGE = {"WWW-Authenticate": "Bearer"}


def _matches(token: str, key: SecretStr | None) -> bool:
    return key is not None and hmac.compare_digest(token.encode(), key.get_secret_value().encode())


def check_key(authorization: str | None, scope: KeyScope, s: Settings) -> ServiceError | None:
    """The error to answer for this ``Authorization`` header on a route of ``scope``, or None when it may pass."""
    if scope == "open":
        return None
    required = s.admin_api_key if scope == "admin" else s.api_key
    if required is None:
        return None
    if not authorization or not authorization.strip():
        return Unauthorized("missing 'Authorization: Bearer <key>' header", headers=_CHALLENGE)
    scheme, _, token = authorization.strip().partition(" ")
    if scheme.lower() != "bearer":
        shown = scheme if len(scheme) <= 20 and scheme.isprintable() else scheme[:20].encode("unicode_escape").decode()
        return Unauthorized(f"the Authorization header must use the Bearer scheme ('Authorization: Bearer <key>'), "
                            f"not {shown!r}", headers=_CHALLENGE)
    token = token.strip()
    if not token:
        return Unauthorized("the Authorization header has no key after 'Bearer'", headers=_CHALLENGE)
    if _matches(token, required) or (scope == "api" and _matches(token, s.admin_api_key)):
        return None
    if scope == "admin" and _matches(token, s.api_key):
        return Forbidden("the classification key may not use admin routes; use the admin key")
    return Unauthorized("invalid API key", headers=_CHALLENGE)


async def api_key(request: Request) -> None:
    problem = check_key(request.headers.get("authorization"), "api", request.app.state.runtime.settings)
    if problem is not None:
        raise problem


async def admin_key(request: Request) -> None:
    problem = check_key(request.headers.get("authorization"), "admin", request.app.state.runtime.settings)
    if problem is not None:
        raise problem


ApiKey = Depends(api_key)
AdminKey = Depends(admin_key)


def route_scope(route: BaseRoute) -> KeyScope:
    """The scope a route declares with its ``dependencies`` (``ApiKey`` / ``AdminKey``); open otherwise."""
    calls = {getattr(d, "dependency", None) for d in getattr(route, "dependencies", ())}
    if admin_key in calls:
        return "admin"
    if api_key in calls:
        return "api"
    return "open"


class Authenticate:
    """ASGI middleware: refuse a request whose key does not fit its route's scope before the app reads its body."""

    def __init__(self, app: ASGIApp, routes: list[BaseRoute], settings: Settings) -> None:
        self.app = app
        self.routes = routes
        self.settings = settings

    def scope_of(self, scope: Scope) -> KeyScope:
        for route in self.routes:
            match, _ = route.matches(scope)
            if match == Match.FULL:
                return route_scope(route)
        return "open"  # 404 / 405: answered by the router without reading the body

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or (self.settings.api_key is None and self.settings.admin_api_key is None):
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers", []))
        raw = headers.get(b"authorization")
        problem = check_key(raw.decode("latin-1") if raw is not None else None, self.scope_of(scope), self.settings)
        if problem is None:
            await self.app(scope, receive, send)
            return
        body = json.dumps(error_body(problem.type, problem.message)).encode()
        out = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        out += [(k.lower().encode(), v.encode()) for k, v in (problem.headers or {}).items()]
        announced = headers.get(b"content-length", b"0") not in (b"", b"0") or b"transfer-encoding" in headers
        if announced:  # the body is never read: close rather than parse the rest of it on this connection
            out.append((b"connection", b"close"))
        await send({"type": "http.response.start", "status": problem.status, "headers": out})
        await send({"type": "http.response.body", "body": body})
