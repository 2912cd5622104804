"""The job queue (RQ over Redis, JSON serializer only): enqueueing typed specs, reading and describing jobs.

Blocking (synchronous redis-py): callers run these functions on the io pool, never on the event loop. Three kinds of
job share the queue (``service.jobs.specs``): ``fit-alignment`` (``service.jobs.fit.run``), ``head-alignment``
(``service.jobs.alignment.run``) and ``basis`` (``service.jobs.basis.run``); each status route reads only its own
kind, so a key that may read one kind can never read another through it. The API imports this module and the specs,
never the modules that run jobs.

Statuses: ``queued``, ``running``, ``cancelling`` (a cancel was accepted, the job has not stopped yet: it never reads
``running`` again), ``succeeded``, ``failed``, ``cancelled``. A job whose result the worker recorded in the artifact
store reads ``succeeded`` with that result even when Redis lost it or marked the job abandoned.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import redis
from pydantic import BaseModel
from rq import Queue, Worker
from rq.exceptions import NoSuchJobError
from rq.job import Job, JobStatus
from rq.registry import CanceledJobRegistry, FailedJobRegistry, FinishedJobRegistry, StartedJobRegistry
from rq.serializers import JSONSerializer

from service import tracing
from service.errors import BackendUnavailable, InvalidRequest, NotFound
from service.jobs.specs import BASIS, FIT, HEADS

__all__ = ["BASIS", "FIT", "HEADS", "JOB_ID", "QUEUE_NAME", "accepts_writes", "cancel", "cancel_key", "counts",
           "describe", "enqueue", "fetch", "list_jobs", "queue_policy_warning", "redis_call"]

QUEUE_NAME = "residual-fit"
JOB_ID = r"^[A-Za-z0-9-]{1,64}$"
"""What a job id looks like (RQ's uuid4 ids); anything else is refused with 422 before Redis is asked."""

_FUNCTIONS = {FIT: "service.jobs.fit.run", HEADS: "service.jobs.alignment.run", BASIS: "service.jobs.basis.run"}

T = TypeVar("T")

_STATUS = {JobStatus.QUEUED: "queued", JobStatus.DEFERRED: "queued", JobStatus.SCHEDULED: "queued",
           JobStatus.STARTED: "running", JobStatus.FINISHED: "succeeded", JobStatus.FAILED: "failed",
           JobStatus.STOPPED: "cancelled", JobStatus.CANCELED: "cancelled"}

ResultLookup = Callable[[str], dict[str, Any] | None]


def cancel_key(job_id: str) -> str:
    return f"residual:cancel:{job_id}"


def redis_call(fn: Callable[[], T]) -> T:
    """Run a queue operation; 503 with Retry-After when the queue's Redis does not answer or refuses writes."""
    try:
        return fn()
    except redis.exceptions.OutOfMemoryError as exc:
        raise BackendUnavailable("the job queue (Redis) is out of memory and refuses new work; retry later",
                                 headers={"Retry-After": "30"}) from exc
    except (redis.RedisError, OSError) as exc:
        raise BackendUnavailable("the job queue (Redis) is unavailable; retry shortly",
                                 headers={"Retry-After": "5"}) from exc


def _queue(conn: redis.Redis) -> Queue:
    return Queue(QUEUE_NAME, connection=conn, serializer=JSONSerializer)


def enqueue(conn: redis.Redis, spec: BaseModel, name: str, timeout_s: int, ttl_s: int) -> Job:
    """Enqueue a typed job spec (``service.jobs.specs``) as JSON; 503 when the queue is unavailable."""
    kind = str(spec.kind)  # type: ignore[attr-defined]
    payload = spec.model_dump(mode="json")
    carrier = tracing.inject()  # the worker continues this request's trace (empty when tracing is off)
    if carrier:
        payload["trace"] = {"traceparent": carrier.get("traceparent"), "tracestate": carrier.get("tracestate")}
    return redis_call(lambda: _queue(conn).enqueue(
        _FUNCTIONS[kind], payload, job_timeout=timeout_s, result_ttl=ttl_s, failure_ttl=ttl_s,
        meta={"name": name, "kind": kind, "model": payload.get("model"), "progress": {"phase": "queued"}}))


def describe(job: Job, results: ResultLookup | None = None) -> dict[str, Any]:
    """The public view of a job; ``results``: the artifact store's record of succeeded jobs, preferred when present."""
    status = _STATUS.get(job.get_status(refresh=False), "queued")
    flagged = status in ("queued", "running", "failed") and bool(job.connection.exists(cancel_key(job.id)))
    recorded = results(job.id) if results is not None and status != "succeeded" else None
    if recorded is not None:
        status = "succeeded"
    elif flagged:
        status = {"running": "cancelling", "queued": "cancelling", "failed": "cancelled"}[status]
    out: dict[str, Any] = {"job_id": job.id, "kind": job.meta.get("kind", FIT), "name": job.meta.get("name"),
                           "model": job.meta.get("model"), "status": status, "progress": job.meta.get("progress", {}),
                           "enqueued_at": job.enqueued_at.isoformat() if job.enqueued_at else None,
                           "ended_at": job.ended_at.isoformat() if job.ended_at else None}
    if status == "succeeded":
        out |= dict(recorded if recorded is not None else (job.return_value() or {}))
    elif status == "failed":
        info = (job.latest_result().exc_string if job.latest_result() else None) or job.exc_info or ""
        lines = [ln for ln in str(info).strip().splitlines() if ln.strip()]
        out["error"] = lines[-1] if lines else "the job failed (worker lost or killed)"
    return out


def fetch(conn: redis.Redis, job_id: str, kind: str) -> Job:
    """The job ``job_id`` of ``kind``; 404 for unknown ids and for jobs of the other kind."""
    if not job_id or len(job_id) > 64 or not all(c.isascii() and (c.isalnum() or c == "-") for c in job_id):
        raise InvalidRequest("job ids are 1 to 64 ASCII letters, digits and '-'")
    StartedJobRegistry(QUEUE_NAME, connection=conn, serializer=JSONSerializer).cleanup()  # abandoned jobs
    try:
        job = Job.fetch(job_id, connection=conn, serializer=JSONSerializer)
    except NoSuchJobError as exc:
        raise NotFound(f"unknown job {job_id}") from exc
    if job.meta.get("kind", FIT) != kind:
        raise NotFound(f"unknown {kind} job {job_id}")
    return job


def cancel(conn: redis.Redis, job_id: str, kind: str, flag_ttl_s: int, results: ResultLookup | None = None
           ) -> dict[str, Any]:
    """Cancel a queued job now, or ask a running one to stop at its next batch or chunk (it reads ``cancelling``
    until it does). The flag lives as long as the job's record (``flag_ttl_s``: the result TTL)."""
    job = fetch(conn, job_id, kind)
    status = job.get_status()
    if status in _STATUS and _STATUS[status] in ("succeeded", "failed", "cancelled"):
        return describe(job, results)
    # the flag first: a worker that dequeued the job a moment ago (its status still 'queued') sees it when the job
    # starts and between batches, so the cancellation is never lost to that race
    conn.set(cancel_key(job.id), 1, ex=flag_ttl_s)
    if status in (JobStatus.QUEUED, JobStatus.DEFERRED, JobStatus.SCHEDULED):
        job.cancel()
    return describe(Job.fetch(job_id, connection=conn, serializer=JSONSerializer), results)


def list_jobs(conn: redis.Redis, offset: int, limit: int, results: ResultLookup | None = None) -> dict[str, Any]:
    kw: dict[str, Any] = {"connection": conn, "serializer": JSONSerializer}
    ids = list(_queue(conn).get_job_ids())
    for reg in (StartedJobRegistry, FinishedJobRegistry, FailedJobRegistry, CanceledJobRegistry):
        ids += reg(QUEUE_NAME, **kw).get_job_ids()
    jobs = [j for j in Job.fetch_many(list(dict.fromkeys(ids)), **kw) if j is not None]
    jobs.sort(key=lambda j: j.enqueued_at or j.created_at, reverse=True)
    return {"total": len(jobs), "offset": offset, "limit": limit,
            "jobs": [describe(j, results) for j in jobs[offset : offset + limit]]}


def counts(conn: redis.Redis) -> dict[str, int] | None:
    """Jobs by status, and the workers taking jobs, for the metrics collector; None when Redis does not answer."""
    kw: dict[str, Any] = {"connection": conn, "serializer": JSONSerializer}
    try:
        queue = _queue(conn)
        return {"queued": queue.count, "workers": Worker.count(connection=conn, queue=queue),
                "running": StartedJobRegistry(QUEUE_NAME, **kw).count,
                "succeeded": FinishedJobRegistry(QUEUE_NAME, **kw).count,
                "failed": FailedJobRegistry(QUEUE_NAME, **kw).count,
                "cancelled": CanceledJobRegistry(QUEUE_NAME, **kw).count}
    except (redis.RedisError, OSError):
        return None


def accepts_writes(conn: redis.Redis) -> bool | None:
    """Whether the queue's Redis takes a write now (None: it does not answer; False: it refuses, e.g. OOM)."""
    try:
        conn.set("residual:probe:write", b"1", ex=30)
        return True
    except redis.exceptions.OutOfMemoryError:
        return False
    except redis.ResponseError:
        return False
    except (redis.RedisError, OSError):
        return None


def queue_policy_warning(conn: redis.Redis) -> tuple[str | None, str | None]:
    """(maxmemory-policy of the job-queue Redis, a warning when it may evict jobs).

    The queue must never lose a job to eviction: anything but ``noeviction`` is reported. ``unknown`` when the
    server refuses CONFIG (managed Redis, ACLs) and None when it does not answer.
    """
    try:
        policy = str(conn.config_get("maxmemory-policy").get("maxmemory-policy", "unknown"))
    except redis.ResponseError:
        return "unknown", None
    except (redis.RedisError, OSError):
        return None, None
    if policy != "noeviction":
        return policy, (f"the job-queue Redis uses maxmemory-policy {policy!r}: queued jobs and results can be "
                        "evicted under memory pressure; use 'noeviction' (see deploy/README.md)")
    return policy, None
