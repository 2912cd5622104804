"""Health (unauthenticated): /livez is always cheap; /readyz answers with exactly the predicate the routes use."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from service.cache import queue_policy_warning
from service.deps import get_runtime
from service.errors import error_body
from service.schemas import Alive, Ready

router = APIRouter(tags=["health"])


@router.get("/livez", response_model=Alive, summary="Liveness: the process answers (no dependency checked)")
async def livez() -> Alive:
    return Alive(status="alive")


@router.get("/readyz", response_model=Ready, summary="Readiness: 200 when the routes would serve",
            responses={503: {"description": "loading, failed to load, batcher restarting, or shutting down"}})
async def readyz(request: Request) -> Response:
    """503 exactly when the routes answer 503 (``Runtime.problem``): model not loaded, batcher dead and
    restarting, a thread pool down, or SIGTERM received. Redis down is ``degraded`` (200): classification goes on."""
    rt = get_runtime(request)
    problem = rt.problem()
    if problem is not None:
        return JSONResponse(error_body(problem.type, problem.message), status_code=problem.status,
                            headers=problem.headers)
    assert rt.store is not None
    redis_up = await rt.io.run(rt.redis.ping)
    policy, warning = await rt.io.run(queue_policy_warning, rt.jobs_redis)
    s = rt.settings
    body = Ready(status="ready" if redis_up else "degraded", model=rt.store.backbone.name,
                 weights_id=rt.store.backbone.weights_id, device=str(rt.store.backbone.device),
                 redis="up" if redis_up else "down",
                 auth="open" if s.api_key is None and s.admin_api_key is None else "enabled",
                 queue_maxmemory_policy=policy, warnings=[warning] if warning else [])
    return JSONResponse(body.model_dump())


@router.get("/metrics", summary="Prometheus metrics (unauthenticated; restrict at the network level)",
            response_class=Response, responses={200: {"content": {CONTENT_TYPE_LATEST: {}}}})
async def metrics(request: Request) -> Response:
    rt = get_runtime(request)
    # the job counts read the queue's Redis at scrape time: off the event loop
    text = await rt.io.run(generate_latest, rt.metrics.registry)
    return Response(text, media_type=CONTENT_TYPE_LATEST)
