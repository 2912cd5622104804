"""Health (unauthenticated): /livez is always cheap; /readyz answers with exactly the predicate the routes use."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from service.api.deps import get_runtime
from service.api.schemas import Alive, Ready
from service.errors import error_body
from service.jobs.queue import accepts_writes, queue_policy_warning

router = APIRouter(tags=["health"])


@router.get("/livez", response_model=Alive, summary="Liveness: the process answers (no dependency checked)")
async def livez() -> Alive:
    return Alive(status="alive")


@router.get("/readyz", response_model=Ready, summary="Readiness: 200 when the routes would serve",
            responses={503: {"description": "loading, failed to load, batcher restarting, or shutting down"}})
async def readyz(request: Request) -> Response:
    """503 exactly when the routes answer 503 (``Runtime.problem``): the default model not loaded, its batcher dead
    and restarting, a thread pool down, or SIGTERM received. ``models`` lists every served model and its state: a
    model other than the default that is still loading, failed, or waits for its first use (memory budget) is
    reported there, and the replica is ready all the same. A Redis that is down, or a job queue that refuses writes
    (a full Redis), is ``degraded`` (200): classification goes on, jobs answer 503 until it recovers."""
    rt = get_runtime(request)
    problem = rt.problem()
    if problem is not None:
        return JSONResponse(error_body(problem.type, problem.message), status_code=problem.status,
                            headers=problem.headers)
    ready = rt.ready
    assert ready is not None  # problem() is None only once it is set
    redis_up = await rt.io.run(rt.redis.ping)
    queue_ok = await rt.io.run(accepts_writes, rt.jobs_redis)
    policy, warning = await rt.io.run(queue_policy_warning, rt.jobs_redis)
    s = rt.settings
    queue = "up" if queue_ok else ("refusing writes" if queue_ok is False else "down")
    warnings = [warning] if warning else []
    if queue_ok is False:
        warnings.append("the job queue's Redis refuses writes (out of memory): fits, bases and large head "
                        "alignments answer 503 until memory is freed")
    body = Ready(status="ready" if redis_up and queue == "up" else "degraded", model=ready.model.name,
                 weights_id=ready.model.weights_id, device=str(ready.model.backbone.device),
                 redis="up" if redis_up else "down", queue=queue,
                 auth="open" if s.api_key is None and s.admin_api_key is None else "enabled",
                 queue_maxmemory_policy=policy, warnings=warnings, models=rt.models.status())
    return JSONResponse(body.model_dump())


@router.get("/metrics", summary="Prometheus metrics (unauthenticated; restrict at the network level)",
            response_class=Response, responses={200: {"content": {CONTENT_TYPE_LATEST: {}}}})
async def metrics(request: Request) -> Response:
    rt = get_runtime(request)
    # the job counts read the queue's Redis at scrape time: off the event loop
    text = await rt.io.run(generate_latest, rt.metrics.registry)
    return Response(text, media_type=CONTENT_TYPE_LATEST)
