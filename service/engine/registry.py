"""The served models of one API process: one engine per model, loaded at start while they fit the memory budget,
loaded on first use otherwise, and unloaded (least recently used, idle only) to make room.

- Each model gets its own :class:`~service.engine.pools.ModelOwner` thread and its own engine
  (``service.engine.serving``), so a slow, failing or loading model never holds up another's requests.
- ``RESIDUAL_MODEL_MEMORY_BYTES`` bounds the bytes of parameters and buffers resident per device. The default model
  (the first) always stays. A request for a model that is not resident loads it (one load however many requests
  wait for it), first unloading idle models, least recently used first; a model with requests in flight (a lease,
  held from the request's start to its end) is never unloaded. When only busy models could make room, the request
  answers 503 with Retry-After.
- Routes get a model's engine with :meth:`ModelRegistry.acquire` and give it back with :meth:`release`
  (``service.api.deps`` does both around each request).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from residual.backbone import EMBEDDED_MODELS, check_model
from service.engine import serving
from service.engine.pools import ModelOwner, Pool
from service.engine.text_cache import RedisState
from service.errors import NotFound, NotReady, ServiceError
from service.images import PixelBudget
from service.metrics import Metrics
from service.settings import ModelSpec, Settings
from service.stores.artifacts import ArtifactStore

__all__ = ["ModelRegistry", "Slot"]

logger = logging.getLogger(__name__)

State = Literal["not loaded", "loading", "ready", "failed", "unloaded"]


def _device_of(spec: ModelSpec) -> str:
    if spec.device != "auto":
        return spec.device
    return "cuda" if torch.cuda.is_available() else "cpu"


def _estimate(spec: ModelSpec) -> int | None:
    """Bytes a model will take before its first load: its checkpoint's size when it is a file."""
    path = spec.weights if spec.weights is not None else EMBEDDED_MODELS.get(spec.architecture)
    if path is None:
        return None
    try:
        return Path(path).stat().st_size
    except OSError:
        return None


@dataclass
class Slot:
    """One configured model and where it stands."""

    spec: ModelSpec
    device: str
    state: State = "not loaded"
    engine: serving.Engine | None = None
    error: str | None = None
    leases: int = 0
    last_used: float = 0.0
    nbytes: int | None = None  # measured at its first load
    weights_id: str | None = None  # known once it has loaded (kept across unloads)
    loading: asyncio.Task[serving.Engine] | None = field(default=None, repr=False)

    @property
    def name(self) -> str:
        return self.spec.name

    def public(self, default: bool) -> dict[str, Any]:
        return {"name": self.name, "architecture": self.spec.architecture, "state": self.state,
                "resident": self.state == "ready", "default": default, "device": self.device,
                "weights_id": self.weights_id, "bytes": self.nbytes, "error": self.error}


class ModelRegistry:
    def __init__(self, settings: Settings, metrics: Metrics, redis_state: RedisState, artifacts: ArtifactStore,
                 decode: Pool, analysis: Pool) -> None:
        self.settings, self.metrics, self.redis, self.artifacts = settings, metrics, redis_state, artifacts
        self.decode, self.analysis = decode, analysis
        self.budget = PixelBudget(settings.max_decoding_pixels, metrics.decoding_pixels.set)
        specs = settings.model_specs()
        for i, spec in enumerate(specs if settings.models is not None else ()):
            try:  # a bad entry of RESIDUAL_MODELS stops the start, named, before anything loads
                check_model(spec.architecture, spec.weights)
            except Exception as exc:  # noqa: BLE001 - UnsupportedModelError, WeightsError
                raise ValueError(f"RESIDUAL_MODELS[{i}] ({spec.name!r}): {exc}") from exc
        self.slots: dict[str, Slot] = {s.name: Slot(s, _device_of(s)) for s in specs}
        self.default = specs[0].name
        self._io = Pool(1, "model-loads")  # loads never take a request's io thread for long
        self._stopping = False

    # ---- who is who ---------------------------------------------------------------------------------------------
    @property
    def names(self) -> list[str]:
        return list(self.slots)

    def weights_owner(self, weights_id: str) -> str | None:
        """The served model with these weights (models never loaded yet are not known)."""
        return next((s.name for s in self.slots.values() if s.weights_id == weights_id), None)

    def known_weights(self) -> tuple[str, ...]:
        return tuple(s.weights_id for s in self.slots.values() if s.weights_id is not None)

    def slot(self, name: str | None) -> Slot:
        """The slot of ``name`` (None: the default); 404 listing the served names."""
        slot = self.slots.get(self.default if name is None else name)
        if slot is None:
            raise NotFound(f"unknown model {str(name)[:80]!r}; this deployment serves {', '.join(self.slots)} "
                           "(GET /v1/models)")
        return slot

    def default_engine(self) -> serving.Engine | None:
        return self.slots[self.default].engine

    def status(self) -> list[dict[str, Any]]:
        return [s.public(s.name == self.default) for s in self.slots.values()]

    # ---- start and stop -----------------------------------------------------------------------------------------
    async def start(self, on_default: Callable[[], None]) -> None:
        """Load the default model, then (``on_default`` between) the others while they fit the budget."""
        await self._load(self.slots[self.default])
        on_default()
        for slot in list(self.slots.values())[1:]:
            if self._stopping:
                return
            need = _estimate(slot.spec)
            if self._budget_left(slot.device) < (need or 0):
                logger.info("model %s loads on first use (the memory budget of %s is taken)", slot.name, slot.device)
                continue
            with contextlib.suppress(ServiceError):  # reported by /readyz; a request retries the load
                await self._load(slot)
            if slot.state == "ready" and self._budget_left(slot.device) < 0:
                logger.info("model %s is over the memory budget of %s: unloaded until first use", slot.name,
                            slot.device)
                await self._unload(slot)

    async def stop(self) -> None:
        self._stopping = True
        for slot in self.slots.values():
            if slot.loading is not None:
                slot.loading.cancel()
            if slot.engine is not None:
                await slot.engine.batcher.stop()
                slot.engine.owner.stop()
                if slot.engine.drift is not None:
                    slot.engine.drift.stop()
        self._io.stop()

    def fail_in_flight(self, exc: ServiceError) -> None:
        """The shutdown deadline: every model's queued batches fail now, and calls running on its owner too."""
        for slot in self.slots.values():
            if slot.engine is not None:
                slot.engine.batcher.fail_pending(exc)  # type: ignore[arg-type]
                slot.engine.owner.stop(fail_running=True)

    # ---- requests -----------------------------------------------------------------------------------------------
    def problem(self, name: str | None = None) -> ServiceError | None:
        """Why ``name`` (default: the default model) cannot serve now; None when it can or when it would load on
        use (not loaded yet, or unloaded)."""
        slot = self.slot(name)
        if slot.state == "failed" and name is None:
            return NotReady(f"the model {slot.name} failed to load: {slot.error}", headers={"Retry-After": "5"})
        if slot.state == "loading" or (name is None and slot.state == "not loaded"):
            return NotReady(f"the model {slot.name} is still loading", headers={"Retry-After": "5"})
        if slot.engine is not None:
            if not slot.engine.batcher.healthy:
                return NotReady(f"the batcher of model {slot.name} is restarting", headers={"Retry-After": "1"})
            if not slot.engine.owner.alive:
                return NotReady(f"the model thread of {slot.name} is down", headers={"Retry-After": "5"})
        return None

    async def acquire(self, name: str | None) -> serving.Engine:
        """The engine of ``name`` with a lease taken (loaded first if needed); give it back with :meth:`release`."""
        slot = self.slot(name)
        slot.leases += 1  # taken before any await: no unload can pick this model while it loads
        try:
            problem = self.problem(slot.name) if slot.state != "loading" else None
            if problem is not None:
                raise problem
            engine = slot.engine if slot.state == "ready" and slot.engine is not None else await self._load(slot)
        except BaseException:
            slot.leases -= 1
            raise
        slot.last_used = time.monotonic()
        return engine

    def release(self, engine: serving.Engine) -> None:
        slot = self.slots[engine.model.name]
        slot.leases = max(0, slot.leases - 1)
        slot.last_used = time.monotonic()

    # ---- loading and unloading ----------------------------------------------------------------------------------
    def _resident(self, device: str, besides: Slot | None = None) -> int:
        """Bytes of the models on ``device`` that are loaded or loading (``besides`` not counted)."""
        return sum((s.nbytes or _estimate(s.spec) or 0) if s.state == "loading" else (s.nbytes or 0)
                   for s in self.slots.values()
                   if s.state in ("ready", "loading") and s.device == device and s is not besides)

    def _budget_left(self, device: str, besides: Slot | None = None) -> int:
        limit = self.settings.model_memory_bytes
        return (limit - self._resident(device, besides)) if limit is not None else 2**62

    async def _load(self, slot: Slot) -> serving.Engine:
        """Load ``slot`` once however many requests ask (they share one task); 503 when it cannot."""
        if slot.loading is None:
            slot.loading = asyncio.get_running_loop().create_task(self._do_load(slot), name=f"load-{slot.name}")
        task = slot.loading
        try:
            return await asyncio.shield(task)
        finally:
            if task.done() and slot.loading is task:
                slot.loading = None

    async def _do_load(self, slot: Slot) -> serving.Engine:
        if slot.name != self.default:
            await self._make_room(slot)
        slot.state, slot.error = "loading", None
        owner = ModelOwner(slot.name)
        mm = self.metrics.for_model(slot.name)
        try:
            loaded = await owner.run(serving.load, slot.spec, self.settings, mm, owner, self.redis, self.artifacts,
                                     self.weights_owner, self.known_weights)
            engine = serving.start(loaded, self.settings, mm, owner, self.decode, self.analysis, self.artifacts,
                                   self.budget)
        except Exception as exc:
            owner.stop()
            slot.state, slot.error = "failed", f"{type(exc).__name__}: {exc}"
            logger.exception("model %s failed to load", slot.name)
            raise NotReady(f"the model {slot.name} failed to load: {slot.error}",
                           headers={"Retry-After": "5"}) from exc
        bb = loaded.model.backbone
        slot.engine, slot.state = engine, "ready"
        slot.nbytes, slot.weights_id = loaded.model.nbytes, bb.weights_id
        slot.last_used = time.monotonic()
        self.metrics.model_resident.labels(model=slot.name, device=slot.device).set(1)
        self.metrics.model_bytes.labels(model=slot.name).set(slot.nbytes)
        self.metrics.model_loads.labels(model=slot.name).inc()
        logger.info("model %s (%s, %s) ready on %s, %d MB", slot.name, bb.name, bb.weights_id, bb.device,
                    slot.nbytes // 2**20)
        if self._budget_left(slot.device) < 0:  # its estimate was low: make room now (idle models only)
            with contextlib.suppress(ServiceError):
                await self._make_room(slot, slot.nbytes)
        return engine

    async def _make_room(self, slot: Slot, need: int | None = None) -> None:
        """Unload idle models on ``slot``'s device, least recently used first, until ``need`` bytes fit."""
        if self.settings.model_memory_bytes is None:
            return
        need = need if need is not None else (slot.nbytes or _estimate(slot.spec) or 0)
        while self._budget_left(slot.device, besides=slot) < need:
            idle = [s for s in self.slots.values() if s.state == "ready" and s.device == slot.device
                    and s.name not in (self.default, slot.name) and s.leases == 0]
            if not idle:
                busy = [s.name for s in self.slots.values() if s.state == "ready" and s.device == slot.device
                        and s.name not in (self.default, slot.name)]
                if not busy:  # only the default model is left: a budget below two models still serves one
                    logger.warning("model %s does not fit RESIDUAL_MODEL_MEMORY_BYTES beside the default model; "
                                   "loading it anyway", slot.name)
                    return
                raise NotReady(f"model {slot.name} needs memory that models with requests in flight hold "
                               f"({', '.join(busy)}; RESIDUAL_MODEL_MEMORY_BYTES); retry",
                               headers={"Retry-After": "1"})
            await self._unload(min(idle, key=lambda s: s.last_used))

    async def _unload(self, slot: Slot) -> None:
        engine = slot.engine
        if engine is None:
            return
        slot.engine, slot.state = None, "unloaded"
        await engine.batcher.stop()
        engine.owner.stop()
        if engine.drift is not None:
            engine.drift.stop()
        del engine
        self.metrics.model_resident.labels(model=slot.name, device=slot.device).set(0)
        self.metrics.model_bytes.labels(model=slot.name).set(0)
        self.metrics.model_unloads.labels(model=slot.name).inc()
        await self._io.run(_collect, slot.device)
        logger.info("model %s unloaded (idle, to make room)", slot.name)


def _collect(device: str) -> None:
    gc.collect()
    if device == "cuda" and torch.cuda.is_available():
        torch.cuda.empty_cache()
