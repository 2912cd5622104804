"""What routes depend on: the process runtime, its ready view, and the validation of label sets and sources.

:class:`Runtime` is what the lifespan builds for one API process (settings, pools, Redis clients, the artifact
store, the served models) plus, once the default model has loaded, a :class:`Ready` view whose fields are never
None: routes declare ``rt: ReadyDep`` and use ``rt.model``, ``rt.batcher``, ... without checks. The view is bound to
the default model; ``rt = await rt.use(body.model)`` binds it to the model a request names (404 for an unknown
one, loading it when it is not resident) and holds a lease on that model until the request ends, so it is never
unloaded under a request. ``Runtime.problem`` is the one predicate ``/readyz`` and every route answer 503 with.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, replace
from typing import Annotated, Any

import redis
from fastapi import Depends, Query, Request

from residual import DEFAULT_TEMPLATES
from service import sources
from service.api.schemas import InlineDataset, LabelSet
from service.engine.batcher import Batcher
from service.engine.heads import HeadService
from service.engine.model import ServingModel
from service.engine.pipeline import ImagePipeline
from service.engine.pools import ModelOwner, Pool
from service.engine.registry import ModelRegistry
from service.engine.serving import Engine
from service.engine.text_cache import RedisState, TextCache
from service.errors import BackendUnavailable, InvalidRequest, NotReady, PayloadTooLarge, ServiceError, ShuttingDown
from service.fetch import ImageFetcher
from service.metrics import Metrics
from service.settings import MODEL_NAME, Settings
from service.stores.artifacts import ArtifactStore
from service.stores.bases import BasisStore
from service.stores.coefficients import CoefficientStore
from service.stores.datasets import ArchiveLimits, DatasetStore
from service.stores.label_sets import LabelSetStore
from service.validation import clean_text

logger = logging.getLogger(__name__)

__all__ = ["ModelQuery", "Ready", "ReadyDep", "Runtime", "get_runtime", "label_set_from", "source_and_label_set",
           "validate_label_set"]


@dataclass(frozen=True)
class Ready:
    """A loaded API process, bound to one served model (``engine``): every field is set."""

    settings: Settings
    metrics: Metrics
    io: Pool  # short blocking work: files, Redis, decoding, JSON bodies, the fused matmul, responses
    analysis: Pool  # long head analyses and pictures, kept apart so they never starve io
    artifacts: ArtifactStore
    datasets: DatasetStore
    jobs_redis: redis.Redis
    redis: RedisState
    models: ModelRegistry
    urls: ImageFetcher  # images by URL (off unless RESIDUAL_IMAGE_URL_ALLOWLIST lists hosts)
    engine: Engine
    leases: list[Engine] = field(default_factory=list)  # engines this request acquired (released at its end)

    async def use(self, model: str | None) -> Ready:
        """This view bound to ``model`` (None: the default model): 404 unknown, 503 while it cannot serve; it is
        loaded first when it is not resident, and leased until the request ends."""
        name = model if model is not None else self.models.default
        if name == self.engine.model.name:
            return self
        engine = await self.models.acquire(name)
        self.leases.append(engine)
        return replace(self, engine=engine)

    @property
    def owner(self) -> ModelOwner:
        """The one thread that runs every forward of this model."""
        return self.engine.owner

    @property
    def model(self) -> ServingModel:
        return self.engine.model

    @property
    def text(self) -> TextCache:
        return self.engine.text

    @property
    def images(self) -> ImagePipeline:
        return self.engine.images

    @property
    def batcher(self) -> Batcher:
        return self.engine.batcher

    @property
    def heads(self) -> HeadService:
        return self.engine.heads

    @property
    def bases(self) -> BasisStore:
        return self.engine.bases

    @property
    def coefficients(self) -> CoefficientStore:
        return self.engine.coefficients

    @property
    def label_sets(self) -> LabelSetStore:
        return self.engine.label_sets

    def job_result(self, job_id: str) -> dict[str, Any] | None:
        return self.artifacts.job_result(job_id)


@dataclass
class Runtime:
    """Everything the lifespan builds; ``ready`` is None until the model has loaded."""

    settings: Settings
    metrics: Metrics
    redis: RedisState
    jobs_redis: redis.Redis
    models: ModelRegistry
    io: Pool
    analysis: Pool
    decode: Pool  # image decoding and preprocessing, one thread per core
    artifacts: ArtifactStore
    urls: ImageFetcher
    ready: Ready | None = None
    draining: bool = False
    loop: asyncio.AbstractEventLoop | None = None  # the server's event loop, once the lifespan runs

    def datasets(self) -> DatasetStore:
        s = self.settings
        return DatasetStore(self.artifacts.datasets_dir, s.max_image_pixels, s.max_dataset_images,
                            ArchiveLimits(s.max_archive_bytes, s.max_archive_member_bytes, s.max_archive_members),
                            s.max_prompt_chars)

    def begin_drain(self, sig: int) -> None:
        """First SIGTERM/SIGINT (from the server's signal handler): refuse new work with 503 ``shutting_down`` and
        fail what is still in flight at the drain deadline, before uvicorn stops waiting for it."""
        if self.draining:
            return
        grace = self.settings.shutdown_timeout_s
        logger.info("signal %d: draining (no new work; in-flight work gets %.0fs)", sig, grace)
        self.draining = True
        if self.loop is not None:
            self.loop.call_soon_threadsafe(self.loop.call_later, max(0.0, grace - 1.0), self.fail_in_flight)

    def fail_in_flight(self) -> None:
        """Shutdown deadline (on the event loop): fail queued and long work with 503 instead of abandoning it.

        Queued batches fail at once; chunked work (a reference basis, head analyses) stops at its next chunk; the
        forward running now finishes. Requests then answer 503 ``backend_unavailable`` before uvicorn's graceful
        timeout would cut their connections.
        """
        logger.warning("shutdown deadline reached: failing in-flight work")
        # queued batches of every model, and running calls too: a request waiting on a long chunk (a basis, an
        # encoding) is answered now, not when the chunk ends on a loaded machine (after uvicorn would have cut it)
        self.models.fail_in_flight(BackendUnavailable("the service is shutting down"))
        self.analysis.stop(fail_running=True)
        self.decode.stop(fail_running=True)

    def problem(self) -> ServiceError | None:
        """Why this replica cannot serve now, or None. ``/readyz`` and every route use exactly this predicate."""
        if self.draining:
            return ShuttingDown("the service is shutting down; retry on another replica", headers={"Retry-After": "5"})
        problem = self.models.problem()  # the default model: loading, failed, its batcher restarting
        if problem is not None:
            return problem
        if self.ready is None:
            return NotReady("the service is starting", headers={"Retry-After": "5"})
        if not (self.io.alive and self.analysis.alive and self.decode.alive):
            return NotReady("a worker thread pool is down", headers={"Retry-After": "5"})
        return None


def get_runtime(request: Request) -> Runtime:
    runtime: Runtime = request.app.state.runtime
    return runtime


async def ready_runtime(request: Request) -> AsyncIterator[Ready]:
    """The process's ready view for one request, bound to the default model; the models the request went on to
    use (:meth:`Ready.use`) are released when it ends."""
    runtime = get_runtime(request)
    problem = runtime.problem()
    if problem is not None:
        raise problem
    assert runtime.ready is not None  # problem() is None only when it is set
    view = replace(runtime.ready, leases=[])
    try:
        yield view
    finally:
        for engine in view.leases:
            runtime.models.release(engine)


ReadyDep = Annotated[Ready, Depends(ready_runtime)]

ModelQuery: Any = Query(None, pattern=MODEL_NAME, description="the served model (GET /v1/models lists them); "
                                                             "default: the first of RESIDUAL_MODELS")
"""``?model=`` of the read routes."""


# ---- label sets -----------------------------------------------------------------------------------------------------


def validate_label_set(classes: list[str], templates: list[str] | None, s: Settings) -> tuple[list[str], list[str]]:
    """Classes and templates (default: ``residual.DEFAULT_TEMPLATES``) checked against the limits: 422, or 413 when
    classes x templates exceeds ``max_prompts``."""
    if not classes:
        raise InvalidRequest("label_set.classes is empty; give at least one class")
    if len(classes) > s.max_classes:
        raise InvalidRequest(f"label_set has {len(classes)} classes; the limit is {s.max_classes}")
    classes = [clean_text(c, f"class {i}", s.max_prompt_chars) for i, c in enumerate(classes)]
    seen: set[str] = set()
    dups = sorted({c for c in classes if c in seen or seen.add(c)})  # type: ignore[func-returns-value]
    if dups:
        raise InvalidRequest(f"duplicate classes: {dups[:10]}")
    templates = list(templates) if templates is not None else list(DEFAULT_TEMPLATES)
    if not templates:
        raise InvalidRequest("label_set.templates is empty; omit it for the default templates")
    if len(templates) > s.max_templates:
        raise InvalidRequest(f"label_set has {len(templates)} templates; the limit is {s.max_templates}")
    for i, t in enumerate(templates):
        clean_text(t, f"template {i}", s.max_prompt_chars)
        rest = t.replace("{}", "", 1)
        if t.count("{}") != 1 or "{" in rest or "}" in rest:
            raise InvalidRequest(f"template {i} ({t[:80]!r}) must contain '{{}}' exactly once and no other braces")
    prompts = len(classes) * len(templates)
    if prompts > s.max_prompts:
        raise PayloadTooLarge(f"the label set has {len(classes)} classes x {len(templates)} templates = {prompts} "
                              f"prompts; the limit per label set is {s.max_prompts} (RESIDUAL_MAX_PROMPTS)")
    return classes, templates


async def label_set_from(label_set: LabelSet | None, label_set_id: str | None, rt: Ready,
                         default: tuple[list[str], list[str]] | None = None) -> tuple[list[str], list[str]]:
    """Classes and templates from an inline label set, a registered id, or ``default`` (422 when none)."""
    if label_set is not None and label_set_id is not None:
        raise InvalidRequest("give label_set or label_set_id, not both")
    if label_set is not None:
        return validate_label_set(label_set.classes, label_set.templates, rt.settings)
    if label_set_id is not None:
        return await rt.io.run(rt.label_sets.get, label_set_id)
    if default is not None:
        return default
    raise InvalidRequest("give label_set or label_set_id (world tasks and uploaded datasets bring their own)")


async def source_and_label_set(dataset: InlineDataset | str, sizes: dict[str, int] | None, label_set: LabelSet | None,
                               label_set_id: str | None, rt: Ready, purpose: str
                               ) -> tuple[sources.WorldTaskSource | sources.DatasetSource | None, list[str],
                                          list[str]]:
    """(the source of a fit or alignment, or None for inline data, classes, templates), validated (422/404).

    Without a label set, a world task brings its own, and an uploaded dataset its class folders with the default
    templates. A given label set must have as many classes as the world task; an uploaded dataset's classes must
    all be in it, and it must have images of each.
    """
    src = sources.parse_source(dataset) if isinstance(dataset, str) else None
    if isinstance(src, sources.MixtureSource):  # parse_source without mixture=True never returns it
        raise InvalidRequest("world:mixture is for bases only")
    if sizes is not None and not isinstance(src, sources.WorldTaskSource):
        raise InvalidRequest("world_sizes applies to 'world:<task>' datasets only")
    default = None
    counts: dict[str, int] | None = None
    if isinstance(src, sources.WorldTaskSource):
        src = src.model_copy(update={"sizes": dict(sizes or {})})
        default = sources.task_label_set(src.task)
    elif isinstance(src, sources.DatasetSource):
        ds = await rt.io.run(rt.datasets.get, src.dataset_id)
        default = (list(ds.classes), list(DEFAULT_TEMPLATES))
        counts = ds.counts
    classes, templates = await label_set_from(label_set, label_set_id, rt, default)
    if isinstance(src, sources.WorldTaskSource) and default is not None and len(classes) != len(default[0]):
        raise InvalidRequest(f"world task {src.task!r} has {len(default[0])} classes; the label set has "
                             f"{len(classes)}")
    if len(classes) < 2:
        raise InvalidRequest(f"{purpose} needs at least two classes")
    if isinstance(src, sources.DatasetSource) and counts is not None:
        unknown = sorted(set(counts) - set(classes))
        if unknown:
            raise InvalidRequest(f"classes in the data that are not in the label set: {unknown[:10]}")
        empty = [c for c in classes if counts.get(c, 0) == 0]
        if empty:
            raise InvalidRequest(f"classes of the label set without images: {empty[:10]}")
        src = src.model_copy(update={"class_map": {c: classes.index(c) for c in counts}})
    return src, classes, templates
