"""The FastAPI app, assembled: ``create_app(settings)``. ``residual-serve`` (``service.api.server``) runs it.

Lifecycle: the process answers ``/livez`` at once; the model loads on the model owner (the one thread that runs
every forward) and runs one warm-up forward (text and image); ``/readyz`` is 503 until then, 200 after, and 503
again while the batcher restarts or once SIGTERM arrives. On SIGTERM the replica stops admitting work (503
``shutting_down``), lets in-flight requests finish for at most ``shutdown_timeout_s``, fails what is left, and
exits. One uvicorn worker per process (metrics live in the process); scale with replicas.

Middlewares, outermost first: tracing (only when on), request metrics, the Open Inference Protocol's error body
(``/v2``), authentication (before any body byte is read), the body limit.
"""

from __future__ import annotations

import asyncio
import copy
import gc
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import redis
from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from fastapi.staticfiles import StaticFiles
from fastapi_offline import FastAPIOffline
from starlette.routing import BaseRoute, Mount

from service import memory, tracing
from service.api import body as json_bodies
from service.api.auth import Authenticate, route_scope
from service.api.deps import Ready, Runtime
from service.api.errors import install
from service.api.middleware import BodyLimit, ProtocolErrors, RequestMetrics, Tracing
from service.api.routes import (
    bases,
    classify,
    coefficients,
    datasets,
    drift,
    embeddings,
    fits,
    heads,
    health,
    inference,
    label_sets,
    playground,
)
from service.api.schemas import (
    DATASET_REF,
    IMAGE_OR_URL,
    ErrorBody,
    HeadJobAccepted,
    InlineDataset,
    V2Error,
    V2InferRequest,
)
from service.engine.pipeline import decode_threads
from service.engine.pools import Pool
from service.engine.registry import ModelRegistry
from service.engine.text_cache import RedisState
from service.errors import ServiceError
from service.fetch import ImageFetcher
from service.jobs import queue
from service.metrics import JobsCollector, Metrics
from service.settings import MODEL_NAME, Settings, get_settings
from service.stores.artifacts import ArtifactStore

__all__ = ["create_app"]

logger = logging.getLogger(__name__)


def _sweep(rt: Runtime) -> None:
    """Blocking: temporary folders a crash or a full disk left behind (older than an hour: never another pod's)."""
    removed = rt.datasets().sweep()
    if removed:
        logger.info("removed %d stale temporary dataset folders", removed)


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()
    metrics = Metrics()
    redis_state = RedisState(settings.redis_url, settings.redis_timeout_s, settings.redis_retry_s, metrics,
                             settings.cache_high_water)
    artifacts = ArtifactStore(settings.artifact_dir)
    analysis, decode = Pool(2, "analysis"), Pool(decode_threads(settings.decode_threads), "decode")
    io = Pool(settings.io_threads, "io")
    resolver = Pool(4, "resolve")  # the name lookups of images by URL
    urls = ImageFetcher(settings.image_url_allowlist, settings.max_request_bytes, settings.image_url_connect_timeout_s,
                        settings.image_url_timeout_s, settings.image_url_max_concurrency, resolver.run)
    runtime = Runtime(settings=settings, metrics=metrics, redis=redis_state,
                      jobs_redis=redis.Redis.from_url(settings.jobs_redis_url, socket_timeout=1.0,
                                                      socket_connect_timeout=1.0),
                      models=ModelRegistry(settings, metrics, redis_state, artifacts, decode, analysis),
                      io=io, analysis=analysis, decode=decode, artifacts=artifacts, urls=urls)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        runtime.loop = asyncio.get_running_loop()
        memory.configure()

        def default_ready() -> None:
            """The default model is loaded: the routes serve from now on (the other models go on loading)."""
            # the start-up heap (torch, open_clip, the default model, the schemas) never becomes garbage: move it out
            # of the collector's reach, so later full collections scan only what requests allocate and stay short (a
            # long collection in any thread holds the GIL and stalls the event loop). Models loaded later stay
            # collectable: an unloaded model's memory must come back.
            gc.freeze()
            engine = runtime.models.default_engine()
            if engine is None or runtime.draining:
                return
            runtime.ready = Ready(settings=settings, metrics=metrics, io=runtime.io, analysis=runtime.analysis,
                                  artifacts=runtime.artifacts, datasets=runtime.datasets(),
                                  jobs_redis=runtime.jobs_redis, redis=runtime.redis, models=runtime.models,
                                  urls=runtime.urls, engine=engine)
            logger.info("serving %s; auth %s", ", ".join(runtime.models.names),
                        "open (no API keys configured)" if settings.api_key is None and settings.admin_api_key is None
                        else "enabled")

        async def start() -> None:
            await runtime.io.run(_sweep, runtime)
            _, warning = await runtime.io.run(queue.queue_policy_warning, runtime.jobs_redis)
            if warning:
                logger.warning("%s", warning)
            try:
                await runtime.models.start(default_ready)
            except ServiceError:  # the default model failed to load: /readyz and every route say why
                gc.freeze()

        starter = asyncio.create_task(start())
        try:
            yield
        finally:
            runtime.draining = True
            starter.cancel()
            await runtime.models.stop()
            await runtime.urls.aclose()
            resolver.stop()
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
    routers = (health, classify, label_sets, fits, datasets, coefficients, embeddings, heads, bases, drift, inference,
               playground)
    for module in routers:
        app.include_router(module.router)
    static = Mount("/playground", StaticFiles(directory=playground.STATIC_DIR), name="playground")
    app.router.routes.append(static)
    # every route of ours, flat (the routers are included without prefixes): authentication finds a request's scope
    # in it, metrics label static files by their mount, the schema documents 401/403 from it
    routes: list[BaseRoute] = [r for module in routers for r in module.router.routes] + [static]
    app.state.routes = routes

    app.add_middleware(BodyLimit, limit=settings.max_request_bytes)
    app.add_middleware(Authenticate, routes=routes, settings=settings)
    app.add_middleware(ProtocolErrors)
    app.add_middleware(RequestMetrics, metrics=metrics, routes=routes)
    if tracing.enabled():  # nothing in the request path at all when tracing is off
        app.add_middleware(Tracing, routes=routes)

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = _openapi(app, settings, routes)
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    return app


# ---- the published contract ----------------------------------------------------------------------------------------

_ERROR_DOCS = {
    "401": "missing or invalid API key (WWW-Authenticate: Bearer)",
    "403": "the classification key on an admin route",
    "405": "method not allowed (Allow lists the methods)",
    "422": "invalid request: the message names each field and what is wrong (a body that is not JSON included)",
    "503": "not ready (loading, batcher restarting) or shutting down; Retry-After",
}


def _openapi(app: FastAPI, settings: Settings, routes: list[BaseRoute]) -> dict[str, Any]:
    """FastAPI's schema, plus: the JSON bodies routes parse themselves, the limits from settings, and every error
    answer documented with the one error body."""
    schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    for model in (*json_bodies.MODELS.values(), ErrorBody, HeadJobAccepted, InlineDataset, V2Error, V2InferRequest):
        extra = model.model_json_schema(ref_template="#/components/schemas/{model}")
        components.update(extra.pop("$defs", {}))
        components[model.__name__] = extra
    components.pop("HTTPValidationError", None)
    components.pop("ValidationError", None)
    _limits(components, settings)
    _model_names(schema, [m.name for m in settings.model_specs()])
    error = {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorBody"}}}
    v2_error = {"application/json": {"schema": {"$ref": "#/components/schemas/V2Error"}}}  # the protocol's body
    scopes = {(getattr(route, "path_format", ""), m): route_scope(route) for route in routes
              for m in getattr(route, "methods", None) or ()}
    for path, ops in schema.get("paths", {}).items():
        for method, op in ops.items():
            responses = op.setdefault("responses", {})
            scope = scopes.get((path, method.upper()), "open")
            if scope != "open":
                responses.setdefault("401", {"description": _ERROR_DOCS["401"]})
            if scope == "admin":
                responses.setdefault("403", {"description": _ERROR_DOCS["403"]})
            if op.get("parameters") or op.get("requestBody"):
                responses.setdefault("422", {"description": _ERROR_DOCS["422"]})
            if op.get("requestBody"):
                responses.setdefault("413", {"description": "the body exceeds RESIDUAL_MAX_REQUEST_BYTES"})
                responses.setdefault("415", {"description": "a content type this route does not take"})
            if path not in ("/livez", "/metrics", "/", "/redoc", "/v2", "/v2/health/live", "/v2/health/ready"):
                responses.setdefault("503", {"description": _ERROR_DOCS["503"]})
            responses.setdefault("405", {"description": _ERROR_DOCS["405"]})
            body = v2_error if path.startswith("/v2") else error
            for code, answer in responses.items():
                if code[0] in "45" and code != "405":
                    answer["content"] = copy.deepcopy(body)
                elif code == "405":
                    answer["content"] = copy.deepcopy(body)
                    answer["headers"] = {"Allow": {"schema": {"type": "string"},
                                                   "description": "the methods this path takes"}}
    return schema


def _model_names(schema: dict[str, Any], names: list[str]) -> None:
    """Every ``model`` field, form field and ``?model=`` of the schema lists the served models (``enum``)."""

    def visit(node: Any) -> None:
        if isinstance(node, dict):
            model = node.get("properties", {}).get("model")
            if isinstance(model, dict) and model.get("pattern") == MODEL_NAME:
                model["enum"] = [*names, None] if any(v.get("type") == "null" for v in model.get("anyOf", [])) \
                    else list(names)
            if node.get("name") == "model" and node.get("in") == "query":
                node["schema"]["enum"] = list(names)  # a query parameter is absent or a string, never null
            for value in node.values():
                visit(value)
        elif isinstance(node, list):
            for value in node:
                visit(value)

    visit(schema)


def _limits(components: dict[str, Any], s: Settings) -> None:
    """Write the limits that come from settings into the published schemas."""

    def prop(model: str, field: str) -> dict[str, Any]:
        node = components.get(model, {}).get("properties", {}).get(field, {})
        return node.get("anyOf", [node])[0] if "anyOf" in node and node["anyOf"][0].get("type") == "array" else node

    for model in ("LabelSet",):
        classes = prop(model, "classes")
        classes.update({"maxItems": s.max_classes})
        classes.setdefault("items", {}).update({"maxLength": s.max_prompt_chars, "minLength": 1})
        templates = components.get(model, {}).get("properties", {}).get("templates", {})
        for variant in templates.get("anyOf", []):
            if variant.get("type") == "array":
                variant.update({"maxItems": s.max_templates})
                variant.setdefault("items", {}).update({"maxLength": s.max_prompt_chars, "pattern": r"\{\}"})
    for model in ("FitRequest", "AlignmentRequest"):  # the string branch of `dataset`: a dataset id or a world task
        for variant in components.get(model, {}).get("properties", {}).get("dataset", {}).get("anyOf", []):
            if variant.get("type") == "string":
                variant["pattern"] = DATASET_REF
    images = prop("ClassifyRequest", "images")
    images.update({"maxItems": s.max_images, "minItems": 1})
    if s.image_url_allowlist:  # URLs are images here only where the operator turned them on
        images.setdefault("items", {})["pattern"] = IMAGE_OR_URL
    inline = components.get("InlineDataset", {}).get("properties", {})
    for field in ("images", "labels"):
        if field in inline:
            inline[field]["maxItems"] = s.max_inline_images
