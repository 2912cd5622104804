"""Dependencies shared by the routers: the app state, label-set validation, API-key checks."""

from __future__ import annotations

import hmac
import unicodedata
from dataclasses import dataclass
from typing import Annotated

import redis
from fastapi import Depends, Request

from service.batcher import Batcher
from service.cache import RedisState, TextCache
from service.errors import InvalidRequest, NotReady, ServiceError
from service.heads import HeadService
from service.metrics import Metrics
from service.model_store import DEFAULT_TEMPLATES, ModelStore
from service.schemas import LabelSet
from service.settings import Settings

__all__ = ["AdminKey", "ApiKey", "Runtime", "RuntimeDep", "label_set_from", "validate_label_set"]


@dataclass
class Runtime:
    """Everything the lifespan builds; ``store`` is None until the model has loaded."""

    settings: Settings
    metrics: Metrics
    redis: RedisState
    jobs_redis: redis.Redis
    store: ModelStore | None = None
    text: TextCache | None = None
    batcher: Batcher | None = None
    heads: HeadService | None = None
    load_error: str | None = None


def get_runtime(request: Request) -> Runtime:
    runtime: Runtime = request.app.state.runtime
    return runtime


def ready_runtime(request: Request) -> Runtime:
    runtime = get_runtime(request)
    if runtime.store is None or runtime.batcher is None or runtime.text is None or runtime.heads is None:
        raise NotReady("the model is still loading" if runtime.load_error is None else
                       f"the model failed to load: {runtime.load_error}", headers={"Retry-After": "5"})
    return runtime


RuntimeDep = Annotated[Runtime, Depends(ready_runtime)]


class Unauthorized(ServiceError):
    status, type = 401, "unauthorized"


class Forbidden(ServiceError):
    status, type = 403, "forbidden"


def _bearer(request: Request) -> str | None:
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


def _matches(token: str, key: object) -> bool:
    secret = getattr(key, "get_secret_value", None)
    return secret is not None and hmac.compare_digest(token.encode(), str(secret()).encode())


def _check(request: Request, admin: bool) -> None:
    """Classification routes accept the API key or the admin key; admin routes only the admin key.

    A route whose key is not configured is open (the development default that /readyz reports).
    """
    s: Settings = get_runtime(request).settings
    required = s.admin_api_key if admin else s.api_key
    if required is None:
        return
    token = _bearer(request)
    if token is None:
        raise Unauthorized("missing 'Authorization: Bearer <key>' header", headers={"WWW-Authenticate": "Bearer"})
    if _matches(token, required) or (not admin and _matches(token, s.admin_api_key)):
        return
    if admin and _matches(token, s.api_key):
        raise Forbidden("the classification key may not use admin routes")
    raise Unauthorized("invalid API key", headers={"WWW-Authenticate": "Bearer"})


def api_key(request: Request) -> None:
    _check(request, admin=False)


def admin_key(request: Request) -> None:
    _check(request, admin=True)


ApiKey = Depends(api_key)
AdminKey = Depends(admin_key)


def _clean_text(text: str, what: str, limit: int) -> str:
    if not text.strip():
        raise InvalidRequest(f"{what} is empty")
    if len(text) > limit:
        raise InvalidRequest(f"{what} has {len(text)} characters; the limit is {limit}")
    if any(unicodedata.category(ch) in ("Cc", "Cs") for ch in text):
        raise InvalidRequest(f"{what} contains control characters")
    return text


def validate_label_set(classes: list[str], templates: list[str] | None, s: Settings) -> tuple[list[str], list[str]]:
    if not classes:
        raise InvalidRequest("label_set.classes is empty; give at least one class")
    if len(classes) > s.max_classes:
        raise InvalidRequest(f"label_set has {len(classes)} classes; the limit is {s.max_classes}")
    classes = [_clean_text(c, f"class {i}", s.max_prompt_chars) for i, c in enumerate(classes)]
    seen: set[str] = set()
    dups = sorted({c for c in classes if c in seen or seen.add(c)})  # type: ignore[func-returns-value]
    if dups:
        raise InvalidRequest(f"duplicate classes: {dups}")
    templates = list(templates) if templates is not None else list(DEFAULT_TEMPLATES)
    if not templates:
        raise InvalidRequest("label_set.templates is empty; omit it for the default templates")
    if len(templates) > s.max_templates:
        raise InvalidRequest(f"label_set has {len(templates)} templates; the limit is {s.max_templates}")
    for i, t in enumerate(templates):
        _clean_text(t, f"template {i}", s.max_prompt_chars)
        if t.count("{}") != 1:
            raise InvalidRequest(f"template {i} ({t!r}) must contain '{{}}' exactly once")
    return classes, templates


def label_set_from(label_set: LabelSet | None, label_set_id: str | None, rt: Runtime,
                   default: tuple[list[str], list[str]] | None = None) -> tuple[list[str], list[str]]:
    """Classes and templates from an inline label set, a registered id, or ``default`` (422 when none)."""
    assert rt.store is not None
    if label_set is not None and label_set_id is not None:
        raise InvalidRequest("give label_set or label_set_id, not both")
    if label_set is not None:
        return validate_label_set(label_set.classes, label_set.templates, rt.settings)
    if label_set_id is not None:
        return rt.store.get_label_set(label_set_id)
    if default is not None:
        return default
    raise InvalidRequest("give label_set or label_set_id (only world tasks bring their own)")
