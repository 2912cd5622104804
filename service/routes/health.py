"""Health (unauthenticated): /livez is always cheap; /readyz is 503 until the model has loaded."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from service.cache import queue_policy_warning
from service.deps import get_runtime
from service.errors import error_body
from service.schemas import Ready

router = APIRouter(tags=["health"])


@router.get("/livez", summary="Liveness: the process answers (no dependency checked)")
async def livez() -> dict[str, str]:
    return {"status": "alive"}


@router.get("/readyz", response_model=Ready, summary="Readiness: 200 once the model is loaded and warmed up",
            responses={503: {"description": "still loading (or failed to load)"}})
async def readyz(request: Request) -> Response:
    rt = get_runtime(request)
    if rt.store is None:
        msg = "the model is still loading" if rt.load_error is None else f"the model failed to load: {rt.load_error}"
        return JSONResponse(error_body("not_ready", msg), status_code=503, headers={"Retry-After": "5"})
    redis_up = await asyncio.to_thread(rt.redis.ping)
    policy, warning = await asyncio.to_thread(queue_policy_warning, rt.jobs_redis)
    s = rt.settings
    body = Ready(status="ready" if redis_up else "degraded", model=rt.store.backbone.name,
                 weights_id=rt.store.backbone.weights_id, device=str(rt.store.backbone.device),
                 redis="up" if redis_up else "down",
                 auth="open" if s.api_key is None and s.admin_api_key is None else "enabled",
                 queue_maxmemory_policy=policy, warnings=[warning] if warning else [])
    return JSONResponse(body.model_dump())


@router.get("/metrics", summary="Prometheus metrics (unauthenticated; restrict at the network level)")
async def metrics(request: Request) -> Response:
    return Response(generate_latest(get_runtime(request).metrics.registry), media_type=CONTENT_TYPE_LATEST)
