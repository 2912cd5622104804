"""The job queue (RQ over Redis, JSON serializer only): enqueueing, reading and describing jobs.

Blocking (synchronous redis-py): callers run these functions on the io pool, never on the event loop. Three kinds of
job share the queue: ``fit-alignment`` (``service.worker.run_fit``), ``head-alignment``
(``service.worker.run_head_alignment``) and ``basis`` (``service.worker.run_basis``); each status route reads
only its own kind, so a key that may read one kind can never read another through it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import redis
from rq import Queue
from rq.exceptions import NoSuchJobError
from rq.job import Job, JobStatus
from rq.registry import CanceledJobRegistry, FailedJobRegistry, FinishedJobRegistry, StartedJobRegistry
from rq.serializers import JSONSerializer

from service.errors import BackendUnavailable, InvalidRequest, NotFound
from service.worker import QUEUE_NAME, cancel_key

__all__ = ["BASIS", "FIT", "HEADS", "cancel", "describe", "enqueue", "fetch", "list_jobs", "redis_call"]

FIT, HEADS, BASIS = "fit-alignment", "head-alignment", "basis"
_FUNCTIONS = {FIT: "service.worker.run_fit", HEADS: "service.worker.run_head_alignment",
              BASIS: "service.worker.run_basis"}

T = TypeVar("T")

_STATUS = {JobStatus.QUEUED: "queued", JobStatus.DEFERRED: "queued", JobStatus.SCHEDULED: "queued",
           JobStatus.STARTED: "running", JobStatus.FINISHED: "succeeded", JobStatus.FAILED: "failed",
           JobStatus.STOPPED: "cancelled", JobStatus.CANCELED: "cancelled"}


def redis_call(fn: Callable[[], T]) -> T:
    """Run a queue operation; 503 with Retry-After when the queue's Redis does not answer."""
    try:
        return fn()
    except (redis.RedisError, OSError) as exc:
        raise BackendUnavailable("the job queue (Redis) is unavailable; retry shortly",
                                 headers={"Retry-After": "5"}) from exc


def _queue(conn: redis.Redis) -> Queue:
    return Queue(QUEUE_NAME, connection=conn, serializer=JSONSerializer)


def enqueue(conn: redis.Redis, kind: str, spec: dict[str, Any], name: str, timeout_s: int, ttl_s: int) -> Job:
    return redis_call(lambda: _queue(conn).enqueue(
        _FUNCTIONS[kind], spec, job_timeout=timeout_s, result_ttl=ttl_s, failure_ttl=ttl_s,
        meta={"name": name, "kind": kind, "progress": {"phase": "queued"}}))


def describe(job: Job) -> dict[str, Any]:
    status = _STATUS.get(job.get_status(refresh=False), "queued")
    if status == "failed" and job.connection.exists(cancel_key(job.id)):
        status = "cancelled"
    out: dict[str, Any] = {"job_id": job.id, "kind": job.meta.get("kind", FIT), "name": job.meta.get("name"),
                           "status": status, "progress": job.meta.get("progress", {}),
                           "enqueued_at": job.enqueued_at.isoformat() if job.enqueued_at else None,
                           "ended_at": job.ended_at.isoformat() if job.ended_at else None}
    if status == "succeeded":
        out |= dict(job.return_value() or {})  # fits: coefficients and report; head analyses: the report
    elif status == "failed":
        info = (job.latest_result().exc_string if job.latest_result() else None) or job.exc_info or ""
        lines = [ln for ln in str(info).strip().splitlines() if ln.strip()]
        out["error"] = lines[-1] if lines else "the job failed (worker lost or killed)"
    return out


def fetch(conn: redis.Redis, job_id: str, kind: str) -> Job:
    """The job ``job_id`` of ``kind``; 404 for unknown ids and for jobs of the other kind."""
    if not job_id or not all(c.isalnum() or c == "-" for c in job_id) or len(job_id) > 64:
        raise InvalidRequest("job ids are letters, digits and '-'")
    StartedJobRegistry(QUEUE_NAME, connection=conn, serializer=JSONSerializer).cleanup()  # abandoned jobs
    try:
        job = Job.fetch(job_id, connection=conn, serializer=JSONSerializer)
    except NoSuchJobError as exc:
        raise NotFound(f"unknown job {job_id}") from exc
    if job.meta.get("kind", FIT) != kind:
        raise NotFound(f"unknown {kind} job {job_id}")
    return job


def cancel(conn: redis.Redis, job_id: str, kind: str, flag_ttl_s: int) -> dict[str, Any]:
    job = fetch(conn, job_id, kind)
    status = job.get_status()
    if status in _STATUS and _STATUS[status] in ("succeeded", "failed", "cancelled"):
        return describe(job)
    # the flag first: a worker that dequeued the job a moment ago (its status still 'queued') sees it when the job
    # starts and between batches, so the cancellation is never lost to that race
    conn.set(cancel_key(job.id), 1, ex=flag_ttl_s)
    if status in (JobStatus.QUEUED, JobStatus.DEFERRED, JobStatus.SCHEDULED):
        job.cancel()
    return describe(Job.fetch(job_id, connection=conn, serializer=JSONSerializer))


def list_jobs(conn: redis.Redis, offset: int, limit: int) -> dict[str, Any]:
    kw: dict[str, Any] = {"connection": conn, "serializer": JSONSerializer}
    ids = list(_queue(conn).get_job_ids())
    for reg in (StartedJobRegistry, FinishedJobRegistry, FailedJobRegistry, CanceledJobRegistry):
        ids += reg(QUEUE_NAME, **kw).get_job_ids()
    jobs = [j for j in Job.fetch_many(list(dict.fromkeys(ids)), **kw) if j is not None]
    jobs.sort(key=lambda j: j.enqueued_at or j.created_at, reverse=True)
    return {"total": len(jobs), "offset": offset, "limit": limit,
            "jobs": [describe(j) for j in jobs[offset : offset + limit]]}


def counts(conn: redis.Redis) -> dict[str, int] | None:
    """Jobs by status for the metrics collector; None when Redis does not answer."""
    kw: dict[str, Any] = {"connection": conn, "serializer": JSONSerializer}
    try:
        return {"queued": _queue(conn).count,
                "running": StartedJobRegistry(QUEUE_NAME, **kw).count,
                "succeeded": FinishedJobRegistry(QUEUE_NAME, **kw).count,
                "failed": FailedJobRegistry(QUEUE_NAME, **kw).count,
                "cancelled": CanceledJobRegistry(QUEUE_NAME, **kw).count}
    except (redis.RedisError, OSError):
        return None
