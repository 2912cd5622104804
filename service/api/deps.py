"""Dependencies shared by the routers: the app state, label-set validation, API-key checks."""

from __future__ import annotations

import asyncio
import hmac
import logging
import unicodedata
from dataclasses import dataclass
from typing import Annotated, Any

import redis
from fastapi import Depends, Request
from pydantic import BaseModel

from residual.tiny import tasks
from service.artifacts import ArtifactStore
from service.batcher import Batcher
from service.cache import RedisState, TextCache
from service.datasets import ArchiveLimits, DatasetStore
from service.errors import (
    BackendUnavailable,
    Forbidden,
    InvalidRequest,
    NotReady,
    ServiceError,
    ShuttingDown,
    Unauthorized,
)
from service.heads import HeadService
from service.metrics import Metrics
from service.model_store import DEFAULT_TEMPLATES, ModelStore
from service.pipeline import ImagePipeline
from service.pools import ModelOwner, Pool
from service.schemas import LabelSet
from service.settings import Settings

logger = logging.getLogger(__name__)

__all__ = ["AdminKey", "ApiKey", "Runtime", "RuntimeDep", "clean_text", "dataset_store", "label_set_from",
           "validate_label_set",
           "world_and_label_set"]


@dataclass
class Runtime:
    """Everything the lifespan builds; ``store`` is None until the model has loaded."""

    settings: Settings
    metrics: Metrics
    redis: RedisState
    jobs_redis: redis.Redis
    owner: ModelOwner  # the one thread that runs every forward of the model
    io: Pool  # short blocking work: files, Redis, decoding, the fused matmul
    analysis: Pool  # long head analyses (basis build, spectra), kept apart so they never starve io
    decode: Pool  # image decoding and preprocessing, one thread per core
    artifacts: ArtifactStore
    store: ModelStore | None = None
    images: ImagePipeline | None = None
    text: TextCache | None = None
    batcher: Batcher | None = None
    heads: HeadService | None = None
    load_error: str | None = None
    draining: bool = False
    loop: asyncio.AbstractEventLoop | None = None  # the server's event loop, once the lifespan runs

    def fail_in_flight(self) -> None:
        """Shutdown deadline (on the event loop): fail queued and long work with 503 instead of abandoning it.

        Queued batches fail at once; chunked work (a reference basis, head analyses) stops at its next chunk; the
        forward running now finishes. Requests then answer 503 ``backend_unavailable`` before uvicorn's graceful
        timeout would cut their connections.
        """
        logger.warning("shutdown deadline reached: failing in-flight work")
        if self.batcher is not None:
            self.batcher.fail_pending(BackendUnavailable("the service is shutting down"))
        self.owner.stop()
        self.analysis.stop()
        self.decode.stop()

    def problem(self) -> ServiceError | None:
        """Why this replica cannot serve now, or None. ``/readyz`` and every route use exactly this predicate."""
        if self.draining:
            return ShuttingDown("the service is shutting down; retry on another replica", headers={"Retry-After": "5"})
        if (self.store is None or self.batcher is None or self.text is None or self.heads is None
                or self.images is None):
            return NotReady("the model is still loading" if self.load_error is None else
                            f"the model failed to load: {self.load_error}", headers={"Retry-After": "5"})
        if not self.batcher.healthy:
            return NotReady("the batcher is restarting", headers={"Retry-After": "1"})
        if not (self.owner.alive and self.io.alive and self.analysis.alive and self.decode.alive):
            return NotReady("a worker thread pool is down", headers={"Retry-After": "5"})
        return None


def get_runtime(request: Request) -> Runtime:
    runtime: Runtime = request.app.state.runtime
    return runtime


async def ready_runtime(request: Request) -> Runtime:
    runtime = get_runtime(request)
    problem = runtime.problem()
    if problem is not None:
        raise problem
    return runtime


RuntimeDep = Annotated[Runtime, Depends(ready_runtime)]


def _bearer(request: Request) -> str | None:
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


def _matches(token: str, key: object) -> bool:
    secret = getattr(key, "get_secret_value", None)
    return secret is not None and hmac.compare_digest(token.encode(), str(secret()).encode())


def _check(request: Request, admin: bool) -> None:
    """Read and classify routes accept the API key or the admin key; routes that enqueue work or store data
    (``AdminKey``) only the admin key.

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


async def api_key(request: Request) -> None:
    _check(request, admin=False)


async def admin_key(request: Request) -> None:
    _check(request, admin=True)


ApiKey = Depends(api_key)
AdminKey = Depends(admin_key)


def clean_text(text: str, what: str, limit: int) -> str:
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
    classes = [clean_text(c, f"class {i}", s.max_prompt_chars) for i, c in enumerate(classes)]
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
        clean_text(t, f"template {i}", s.max_prompt_chars)
        if t.count("{}") != 1:
            raise InvalidRequest(f"template {i} ({t!r}) must contain '{{}}' exactly once")
    return classes, templates


async def label_set_from(label_set: LabelSet | None, label_set_id: str | None, rt: Runtime,
                         default: tuple[list[str], list[str]] | None = None) -> tuple[list[str], list[str]]:
    """Classes and templates from an inline label set, a registered id, or ``default`` (422 when none)."""
    assert rt.store is not None
    if label_set is not None and label_set_id is not None:
        raise InvalidRequest("give label_set or label_set_id, not both")
    if label_set is not None:
        return validate_label_set(label_set.classes, label_set.templates, rt.settings)
    if label_set_id is not None:
        return await rt.io.run(rt.store.get_label_set, label_set_id)
    if default is not None:
        return default
    raise InvalidRequest("give label_set or label_set_id (only world tasks bring their own)")


async def world_and_label_set(dataset: object, sizes: BaseModel | None, default_sizes: type[BaseModel],
                              label_set: LabelSet | None, label_set_id: str | None, rt: Runtime, purpose: str
                              ) -> tuple[dict[str, Any] | None, list[str], list[str]]:
    """(world spec for 'world:<task>' datasets or None, classes, templates), validated (422).

    A world task brings its own label set when none is given; a given one must have as many classes.
    """
    world: dict[str, Any] | None = None
    if isinstance(dataset, str) and dataset.startswith("world:"):
        task = dataset.split(":", 1)[1]
        if task not in tasks.TASKS:
            raise InvalidRequest(f"unknown world task {task!r}; choose from {sorted(tasks.TASKS)}")
        world = {"task": task, **(sizes or default_sizes()).model_dump()}
    elif sizes is not None:
        raise InvalidRequest("world_sizes applies to 'world:<task>' datasets only")
    own = None
    if world is not None:
        t = tasks.TASKS[world["task"]]
        own = (list(t.classes), list(t.templates))
    classes, templates = await label_set_from(label_set, label_set_id, rt, own)
    if world is not None and own is not None and len(classes) != len(own[0]):
        raise InvalidRequest(f"world task {world['task']!r} has {len(own[0])} classes; the label set has "
                             f"{len(classes)}")
    if len(classes) < 2:
        raise InvalidRequest(f"{purpose} needs at least two classes")
    return world, classes, templates


def dataset_store(rt: Runtime) -> DatasetStore:
    s = rt.settings
    return DatasetStore(rt.artifacts.datasets_dir, s.max_image_pixels, s.max_dataset_images,
                        ArchiveLimits(s.max_archive_bytes, s.max_archive_member_bytes, s.max_archive_members))
