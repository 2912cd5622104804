"""The FastAPI app: ``create_app(settings)``; ``residual-serve`` runs it under uvicorn.

Lifecycle: the process answers ``/livez`` at once; the model loads on the model owner (the one thread that runs
every forward) and runs one warm-up forward (text and image); ``/readyz`` is 503 until then, 200 after, and 503
again while the batcher restarts or once SIGTERM arrives. On SIGTERM the replica stops admitting work (503
``shutting_down``), lets in-flight requests finish for at most ``shutdown_timeout_s``, fails what is left, and
exits. One uvicorn worker per process (metrics live in the process); scale with replicas.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from types import FrameType

import redis
import torch
import uvicorn
from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from fastapi.staticfiles import StaticFiles
from fastapi_offline import FastAPIOffline
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from residual import RawFeatures, extract
from service import queue
from service.artifacts import ArtifactStore
from service.batcher import Batcher
from service.cache import RedisState, TextCache, queue_policy_warning
from service.deps import Runtime
from service.errors import error_body, install
from service.heads import HeadService
from service.metrics import JobsCollector, Metrics
from service.model_store import ModelStore, label_set_id
from service.pipeline import ImagePipeline, decode_threads
from service.pools import ModelOwner, Pool
from service.routes import bases, classify, coefficients, datasets, embeddings, heads, health, jobs, playground
from service.schemas import ClassifyRequest
from service.settings import Settings, get_settings

__all__ = ["create_app", "main"]

logger = logging.getLogger(__name__)


class BodyLimit:
    """ASGI middleware: 413 once a request body exceeds ``limit`` bytes, counted while it streams.

    Honest Content-Length is refused before reading; chunked or lying bodies are cut off as soon as the running
    count passes the limit.
    """

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers", [])).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            await _send_413(send, self.limit)
            return
        seen = 0
        started = False

        async def limited_receive() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise _TooLarge()
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except _TooLarge:
            if not started:
                await _send_413(send, self.limit)


class RequestMetrics:
    """ASGI middleware: request duration by route template and status (outermost, so 413s count too)."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = {"code": 500}

        async def tracking_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                status["code"] = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        finally:
            route = getattr(scope.get("route"), "path", "unmatched")
            self.metrics.request_seconds.labels(route=route, status=str(status["code"])).observe(
                time.perf_counter() - started)


class _TooLarge(Exception):
    pass


async def _send_413(send: Send, limit: int) -> None:
    import json

    body = json.dumps(error_body("payload_too_large", f"request body exceeds {limit} bytes")).encode()
    await send({"type": "http.response.start", "status": 413,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


def backbone_forward(store: ModelStore, pixels: torch.Tensor) -> tuple[RawFeatures, torch.Tensor]:
    """One batched forward: pinned host memory and bf16 autocast on CUDA, plain fp32 on the CPU."""
    bb = store.backbone
    if bb.device.type == "cuda":
        if pixels.device != bb.device:  # the pil pipeline hands over host memory: pinned, asynchronous copy
            pixels = pixels.pin_memory().to(bb.device, non_blocking=True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            return extract(bb, pixels)
    return extract(bb, pixels)


def _load(rt: Runtime) -> None:
    """Blocking, on the model owner: load the model, warm it up, and publish the store (readiness flips later)."""
    s = rt.settings
    try:
        store = ModelStore(s, rt.metrics)
        bb = store.backbone

        def encode(prompts: list[str]) -> torch.Tensor:  # every text forward runs on the model owner too
            return rt.owner.call(store.encode_prompts, prompts)

        text = TextCache(bb.weights_id, encode, rt.redis, s.text_cache_ttl_s, s.label_set_cache_size, rt.metrics)
        size = bb.geometry.image_size
        extract(bb, torch.zeros(1, 3, size, size))  # warm-up forward
        store.encode_prompts(["a photo."])
        store.text_forwards = 0
        rt.text = text
        rt.store = store
        _, warning = queue_policy_warning(rt.jobs_redis)
        if warning:
            logger.warning("%s", warning)
        logger.info("model %s (%s) ready on %s; auth %s", bb.name, bb.weights_id, bb.device,
                    "open (no API keys configured)" if s.api_key is None and s.admin_api_key is None else "enabled")
    except Exception as exc:  # noqa: BLE001 - reported by /readyz, logged with traceback
        logger.exception("model load failed")
        rt.load_error = f"{type(exc).__name__}: {exc}"


def _head_service(rt: Runtime, store: ModelStore) -> HeadService:
    s, text, batcher = rt.settings, rt.text, rt.batcher
    assert text is not None and batcher is not None
    weights = store.backbone.weights_id

    def dictionary_embeddings(texts: list[str]) -> torch.Tensor:  # cached in Redis like any label set
        return text.class_embeddings(label_set_id(weights, texts, ["{}"]), texts, ["{}"])

    chunk = min(s.batch_size_for(store.backbone.device.type), s.max_queue)  # a chunk must fit the queue
    return HeadService(store.backbone, store.ln, batcher.submit, rt.owner, rt.analysis, chunk,
                       s.heads_sample_images, rt.artifacts, store.bases, dictionary_embeddings, s.text_dictionary,
                       s.reference_basis_images, rt.metrics.reference_basis_images.inc)


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()
    metrics = Metrics()
    runtime = Runtime(settings=settings, metrics=metrics,
                      redis=RedisState(settings.redis_url, settings.redis_timeout_s, settings.redis_retry_s, metrics),
                      jobs_redis=redis.Redis.from_url(settings.jobs_redis_url, socket_timeout=1.0,
                                                      socket_connect_timeout=1.0),
                      owner=ModelOwner(), io=Pool(settings.io_threads, "io"), analysis=Pool(2, "analysis"),
                      decode=Pool(decode_threads(settings.decode_threads), "decode"),
                      artifacts=ArtifactStore(settings.artifact_dir))

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        runtime.loop = asyncio.get_running_loop()

        async def start() -> None:
            await runtime.owner.run(_load, runtime)
            # the start-up heap (torch, open_clip, the model, the schemas) never becomes garbage: move it out of the
            # collector's reach, so later full collections scan only what requests allocate and stay short (a long
            # collection in any thread holds the GIL and stalls the event loop)
            gc.freeze()
            if runtime.store is not None and not runtime.draining:
                store = runtime.store
                device = store.backbone.device.type
                runtime.images = ImagePipeline(store.backbone, runtime.decode, decode_threads(settings.decode_threads),
                                               settings.max_image_pixels, settings.image_pipeline)
                runtime.batcher = Batcher(lambda px: backbone_forward(store, px), runtime.owner,
                                          settings.batch_size_for(device), settings.max_wait_ms / 1000,
                                          settings.max_queue, settings.batching, metrics)
                runtime.batcher.start()
                runtime.heads = _head_service(runtime, store)

        starter = asyncio.create_task(start())
        try:
            yield
        finally:
            runtime.draining = True
            starter.cancel()
            if runtime.batcher is not None:
                await runtime.batcher.stop()
            runtime.owner.stop()
            runtime.io.stop()
            runtime.analysis.stop()
            runtime.decode.stop()
            runtime.redis.client.close()
            runtime.jobs_redis.close()

    metrics.registry.register(JobsCollector(lambda: queue.counts(runtime.jobs_redis)))

    # Swagger UI and ReDoc assets come from the fastapi-offline package: /docs and /redoc work without internet
    # (/redoc is served by routes/playground.py, which keeps ReDoc's logo from being fetched from a CDN)
    app = FastAPIOffline(title="ResiDual Serve", version="0.1.0", lifespan=lifespan, redoc_url=None,
                         swagger_ui_parameters={"validatorUrl": None},  # no call to validator.swagger.io
                         description="CLIP zero-shot classification aligned to your label set with ResiDual "
                                     "coefficient sets. Errors: `{\"error\": {\"type\", \"message\"}}`.")
    app.state.runtime = runtime
    install(app)
    app.include_router(health.router)
    app.include_router(classify.router)
    app.include_router(jobs.router)
    app.include_router(datasets.router)
    app.include_router(coefficients.router)
    app.include_router(embeddings.router)
    app.include_router(heads.router)
    app.include_router(bases.router)
    app.include_router(playground.router)
    app.mount("/playground", StaticFiles(directory=playground.STATIC_DIR), name="playground")

    app.add_middleware(BodyLimit, limit=settings.max_request_bytes)
    app.add_middleware(RequestMetrics, metrics=metrics)

    def openapi() -> dict[str, object]:
        """The default schema plus the models of bodies that routes parse themselves (JSON or multipart)."""
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, description=app.description,
                                 routes=app.routes)
            components = schema.setdefault("components", {}).setdefault("schemas", {})
            extra = ClassifyRequest.model_json_schema(ref_template="#/components/schemas/{model}")
            components.update(extra.pop("$defs", {}))
            components["ClassifyRequest"] = extra
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    return app


class _Server(uvicorn.Server):
    """uvicorn's server, plus: the first SIGTERM/SIGINT marks the runtime as draining, so readiness and every
    route answer 503 ``shutting_down`` while in-flight requests finish (at most ``shutdown_timeout_s``)."""

    def __init__(self, config: uvicorn.Config, runtime: Runtime) -> None:
        super().__init__(config)
        self.runtime = runtime

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        rt = self.runtime
        if not rt.draining:
            grace = rt.settings.shutdown_timeout_s
            logger.info("signal %d: draining (no new work; in-flight work gets %.0fs)", sig, grace)
            rt.draining = True
            if rt.loop is not None:  # fail what is still running a little before uvicorn stops waiting for it
                rt.loop.call_soon_threadsafe(rt.loop.call_later, max(0.0, grace - 1.0), rt.fail_in_flight)
        super().handle_exit(sig, frame)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="residual-serve", description="Run the ResiDual Serve HTTP API. "
                                "Every RESIDUAL_* environment variable is a setting (see README).")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--log-level", default="info")
    args = p.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s %(message)s")
    app = create_app()
    runtime: Runtime = app.state.runtime
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level, workers=1,
                            timeout_graceful_shutdown=max(1, round(runtime.settings.shutdown_timeout_s)))
    _Server(config, runtime).run()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
