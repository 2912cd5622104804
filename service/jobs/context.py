"""What every job shares: the settings, the RQ job it runs as, the artifact store, the backbone (checked against the
spec's weights), progress, cancellation, the basis a job names, and the durable record of its result.

:func:`job` wraps each kind's body: it parses the typed spec, counts the outcome (``residual_jobs_total{kind,
outcome}``), and records a success in the artifact store before RQ stores it in Redis, so a job whose coefficient
set was written and activated never reads ``failed`` because Redis refused the result or the worker died just
after (``service.jobs.queue.describe`` prefers the record).
"""

from __future__ import annotations

import gc
import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any, TypeVar

import redis
from rq import get_current_job

from residual import Backbone, Basis, FitCancelledError, load_backbone
from service import tracing
from service.jobs.metrics import JOB_SECONDS, JOBS
from service.jobs.queue import cancel_key
from service.jobs.specs import BasisJob, FitJob, HeadAlignmentJob, parse
from service.settings import ModelSpec, Settings, get_settings
from service.sources import world_reference_basis
from service.stores.artifacts import ArtifactStore
from service.stores.bases import BasisInfo, BasisStore

__all__ = ["JobContext", "job"]

logger = logging.getLogger(__name__)

S = TypeVar("S", FitJob, BasisJob, HeadAlignmentJob)

_BACKBONES: OrderedDict[ModelSpec, Backbone] = OrderedDict()  # the last few models jobs used (LRU)


def _spec(s: Settings, model: str | None) -> ModelSpec:
    specs = s.model_specs()
    if model is None:
        return specs[0]
    spec = next((m for m in specs if m.name == model), None)
    if spec is None:
        raise RuntimeError(f"this worker does not serve model {model!r}; its RESIDUAL_MODELS are "
                           f"{', '.join(m.name for m in specs)} (give the worker the API's RESIDUAL_MODELS)")
    return spec


def _backbone(s: Settings, model: str | None = None) -> Backbone:
    """The backbone of a served model, loaded on first use; the worker keeps ``worker_models`` of them."""
    spec = _spec(s, model)
    if spec in _BACKBONES:
        _BACKBONES.move_to_end(spec)
        return _BACKBONES[spec]
    while len(_BACKBONES) >= s.worker_models:
        _BACKBONES.popitem(last=False)
        gc.collect()
    device = None if spec.device == "auto" else spec.device
    _BACKBONES[spec] = load_backbone(spec.architecture, spec.weights, device=device, precision=spec.precision)
    return _BACKBONES[spec]


def preload(s: Settings | None = None) -> Backbone:
    """Load the default model before taking jobs (the worker's start); the others load when a job names them."""
    return _backbone(s or get_settings())


class JobContext:
    def __init__(self, spec: FitJob | BasisJob | HeadAlignmentJob) -> None:
        self.spec = spec
        self.settings = get_settings()
        self.rq_job = get_current_job()
        self.conn: redis.Redis | None = self.rq_job.connection if self.rq_job is not None else None
        self.job_id: str | None = self.rq_job.id if self.rq_job is not None else None
        self.artifacts = ArtifactStore(self.settings.artifact_dir)

    def backbone(self) -> Backbone:
        bb = _backbone(self.settings, self.spec.model)
        if bb.weights_id != self.spec.weights_id:
            raise RuntimeError(f"this worker's model {self.spec.model or 'default'} has weights {bb.weights_id}; the "
                               f"job asks for {self.spec.weights_id} (do the API and the worker have the same "
                               "RESIDUAL_MODELS?)")
        return bb

    def bases(self, bb: Backbone) -> BasisStore:
        """The bases of the job's model (RESIDUAL_REFERENCE_BASIS names a basis of the default model only)."""
        default = self.spec.model is None or self.spec.model == self.settings.model_specs()[0].name
        return BasisStore(self.artifacts, bb, self.settings.reference_basis if default else None,
                          self.spec.model)

    def progress(self, **fields: Any) -> None:
        """Best effort: a Redis outage must not fail the job (its result is recorded all the same)."""
        job = self.rq_job
        if job is None:
            return
        try:
            job.get_meta(refresh=True)
            job.meta.setdefault("progress", {}).update(fields)
            job.save_meta()
        except (redis.RedisError, OSError) as exc:
            logger.warning("progress of job %s not saved (%s); the job goes on", job.id, type(exc).__name__)

    def cancelled(self) -> bool:
        """Whether DELETE asked to cancel this job (False while Redis is away: no request can have arrived)."""
        if self.conn is None or self.job_id is None:
            return False
        try:
            return bool(self.conn.exists(cancel_key(self.job_id)))
        except (redis.RedisError, OSError):
            return False

    def check_cancelled(self, what: str) -> None:
        if self.cancelled():
            raise FitCancelledError(f"cancelled {what}")

    def resolve_basis(self, bb: Backbone, ref: str | None) -> tuple[BasisInfo, Basis]:
        """A basis by id or name, or the default (``reference``); the world basis is built here only when the
        operator opted in (RESIDUAL_REFERENCE_BASIS=world) and it does not exist yet."""
        bases = self.bases(bb)
        info = bases.resolve(ref)
        if info is None:  # one build per volume: an API replica may be building it right now
            info = bases.world(lambda: world_reference_basis(bb, self.settings.reference_basis_images))
        return info, bases.load(info)


def job(body: Callable[[JobContext, S], dict[str, Any]], spec_type: type[S]) -> Callable[[dict[str, Any]], Any]:
    """The RQ entry point of one kind of job: parse, run, count, record."""

    def run(payload: dict[str, Any]) -> dict[str, Any]:
        started = time.perf_counter()
        kind = str(payload.get("kind", "?")) if isinstance(payload, dict) else "?"
        trace = payload.get("trace") if isinstance(payload, dict) else None
        try:
            # the job continues the trace of the request that enqueued it (its W3C context is in the payload)
            with tracing.span(f"job {kind}", context=tracing.extract(trace if isinstance(trace, dict) else None),
                              kind="consumer") as span:
                spec = parse(payload)
                if not isinstance(spec, spec_type):
                    raise TypeError(f"a {spec.kind} job was sent to the {spec_type.__name__} runner")
                ctx = JobContext(spec)
                if span is not None:
                    span.set_attributes({"residual.job_id": ctx.job_id or "", "residual.model": spec.model or ""})
                if ctx.cancelled():
                    raise FitCancelledError("cancelled before it started")
                result = body(ctx, spec)
                if ctx.job_id is not None:
                    ctx.artifacts.write_job_result(ctx.job_id, result)
        except FitCancelledError:
            JOBS.labels(kind=kind, outcome="cancelled").inc()
            raise
        except Exception:
            JOBS.labels(kind=kind, outcome="failed").inc()
            raise
        JOBS.labels(kind=kind, outcome="succeeded").inc()
        JOB_SECONDS.labels(kind=kind).observe(time.perf_counter() - started)
        return result

    run.__name__ = f"run_{spec_type.__name__}"
    return run
