"""One factory for the status and cancel routes of each kind of job (fits, bases, head alignments).

``add_job_routes(router, "/fit-alignment", FIT, "fit")`` adds ``GET /fit-alignment/{job_id}`` and
``DELETE /fit-alignment/{job_id}`` (admin key): each reads only jobs of its own kind (404 for the others), answers
422 for an id that cannot be a job id (never asking Redis), and 503 when the queue's Redis does not answer.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Path

from service.api.auth import AdminKey
from service.api.convertors import register_segment
from service.api.deps import Ready, ReadyDep
from service.api.schemas import JOB_ID, JobInfo
from service.jobs import queue

__all__ = ["JOB_ID_PARAM", "add_job_routes", "job_status"]

JOB_ID_PARAM = Path(..., pattern=JOB_ID, description="the job id returned when the job was accepted")


# ``{job_id:job}``: one path segment that does not end in ``.png``, so ``/heads/alignment/<id>.png`` is never taken
# for a job id by the status route (a DELETE there is a 405, not a 422); a trailing '/' is redirected
register_segment("job", r"[^/]+(?<!\.png)")

_ERRORS: dict[int | str, dict[str, Any]] = {404: {"description": "unknown job (or a job of another kind)"},
                                            503: {"description": "the job queue (Redis) is unavailable"}}


def job_status(rt: Ready, job_id: str, kind: str) -> dict[str, Any]:
    """Blocking (io pool): the public view of a job of ``kind``."""
    return queue.redis_call(lambda: queue.describe(queue.fetch(rt.jobs_redis, job_id, kind), rt.job_result))


def add_job_routes(router: APIRouter, path: str, kind: str, noun: str, status_doc: str = "") -> None:
    """``GET {path}/{job_id}`` (status, progress, result) and ``DELETE {path}/{job_id}`` (cancel)."""

    async def status(rt: ReadyDep, job_id: str = JOB_ID_PARAM) -> dict[str, Any]:
        return await rt.io.run(job_status, rt, job_id, kind)

    async def cancel(rt: ReadyDep, job_id: str = JOB_ID_PARAM) -> dict[str, Any]:
        """A queued job is cancelled at once; a running one reads ``cancelling`` until it stops at its next batch
        or chunk, then ``cancelled``. A finished job is returned unchanged."""
        return await rt.io.run(lambda: queue.redis_call(lambda: queue.cancel(
            rt.jobs_redis, job_id, kind, rt.settings.job_result_ttl_s, rt.job_result)))

    status.__doc__ = status_doc or f"Status, progress and, once it succeeded, the result of a {noun} job."
    router.add_api_route(f"{path}/{{job_id:job}}", status, methods=["GET"], response_model=JobInfo,
                         dependencies=[AdminKey], responses=_ERRORS, summary=f"Status and result of a {noun} job",
                         name=f"{kind}-status")
    router.add_api_route(f"{path}/{{job_id:job}}", cancel, methods=["DELETE"], response_model=JobInfo,
                         dependencies=[AdminKey], responses=_ERRORS, summary=f"Cancel a {noun} job",
                         name=f"{kind}-cancel")
