"""What every job shares: the settings, the RQ job it runs as, the artifact store, the backbone (checked against the
spec's weights), progress, cancellation, the basis a job names, and the durable record of its result.

:func:`job` wraps each kind's body: it parses the typed spec, counts the outcome (``residual_jobs_total{kind,
outcome}``), and records a success in the artifact store before RQ stores it in Redis, so a job whose coefficient
set was written and activated never reads ``failed`` because Redis refused the result or the worker died just
after (``service.jobs.queue.describe`` prefers the record).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any, TypeVar

import redis
from rq import get_current_job

from residual import Backbone, Basis, FitCancelledError, load_backbone
from service.jobs.metrics import JOB_SECONDS, JOBS
from service.jobs.queue import cancel_key
from service.jobs.specs import BasisJob, FitJob, HeadAlignmentJob, parse
from service.settings import Settings, get_settings
from service.sources import world_reference_basis
from service.stores.artifacts import ArtifactStore
from service.stores.bases import BasisInfo, BasisStore

__all__ = ["JobContext", "job"]

logger = logging.getLogger(__name__)

S = TypeVar("S", FitJob, BasisJob, HeadAlignmentJob)

_BACKBONES: dict[str, Backbone] = {}
_KEEP_BACKBONES = 2


def _backbone(s: Settings) -> Backbone:
    key = f"{s.model_name}|{s.model_weights}|{s.device}|{s.precision}"
    if key not in _BACKBONES:
        while len(_BACKBONES) >= _KEEP_BACKBONES:
            _BACKBONES.pop(next(iter(_BACKBONES)))
        device = None if s.device == "auto" else s.device
        _BACKBONES[key] = load_backbone(s.model_name, s.model_weights, device=device, precision=s.precision)
    return _BACKBONES[key]


def preload(s: Settings | None = None) -> Backbone:
    """Load the configured backbone before taking jobs (the worker's start)."""
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
        bb = _backbone(self.settings)
        if bb.weights_id != self.spec.weights_id:
            raise RuntimeError(f"this worker serves model weights {bb.weights_id}; the job asks for "
                               f"{self.spec.weights_id}")
        return bb

    def bases(self, bb: Backbone) -> BasisStore:
        return BasisStore(self.artifacts, bb, self.settings.reference_basis)

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
        try:
            spec = parse(payload)
            if not isinstance(spec, spec_type):
                raise TypeError(f"a {spec.kind} job was sent to the {spec_type.__name__} runner")
            ctx = JobContext(spec)
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
