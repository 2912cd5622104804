"""Cross-request dynamic batching in front of the backbone, supervised.

Requests put their preprocessed pixels in a bounded queue (counted in images; full -> 429). One loop takes
everything waiting, waits at most ``max_wait_s`` (counted from the first queued request) for more while the batch
is below ``max_batch`` images, and runs ONE backbone forward on the model owner (the single thread that runs every
forward of the model); each request gets its slice of the raw per-head features and embeddings back.

Failure semantics:

- anything that fails while a batch is assembled, run or split (a forward error, mismatched pixels, a bug) fails
  exactly that batch's requests (503) and the loop goes on;
- if the loop itself dies, :attr:`Batcher.healthy` turns false (readiness answers 503 through the same predicate as
  the routes), the waiting requests fail, and a supervisor restarts the loop after ``restart_delay_s``;
- ``stop()`` fails every waiting and in-flight request, so no caller waits forever.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from residual.decomposition import RawFeatures
from service import tracing
from service.engine.pools import ModelOwner
from service.errors import BackendUnavailable, Overloaded, PayloadTooLarge
from service.metrics import ModelMetrics

__all__ = ["Batcher"]

logger = logging.getLogger(__name__)

ForwardFn = Callable[[torch.Tensor], tuple[RawFeatures, torch.Tensor]]
Result = tuple[RawFeatures, torch.Tensor]


@dataclass(eq=False)  # identity: `item in pending` must never compare tensors
class _Item:
    pixels: torch.Tensor  # (k, 3, S, S)
    future: asyncio.Future[Result]
    traffic: bool = True  # a client's images (drift statistics), not an analysis's reference images
    enqueued: float = field(default_factory=time.monotonic)
    trace: Any = None  # the submitting request's span context (tracing on), parent of its wait and forward spans
    enqueued_ns: int = 0  # wall clock, for the span of its wait (tracing on)


class Batcher:
    def __init__(self, forward: ForwardFn, owner: ModelOwner, max_batch: int, max_wait_s: float, max_queue: int,
                 enabled: bool, metrics: ModelMetrics, restart_delay_s: float = 1.0,
                 observe: Callable[[RawFeatures], None] | None = None) -> None:
        self.forward = forward
        self.observe = observe  # sees the raw features of the traffic of each batch (drift); must not block
        self.owner = owner
        self.max_batch = max_batch
        self.max_wait_s = max_wait_s if enabled else 0.0
        self.max_queue = max_queue
        self.enabled = enabled
        self.metrics = metrics
        self.restart_delay_s = restart_delay_s
        self._pending: list[_Item] = []
        self._running: list[_Item] = []
        self._queued_images = 0
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        self.restarts = 0

    # ---- lifecycle --------------------------------------------------------------------------------------------
    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._loop(), name="batcher")
        self._task.add_done_callback(self._on_loop_exit)

    @property
    def healthy(self) -> bool:
        """The loop runs and the model owner takes work."""
        return self._task is not None and not self._task.done() and self.owner.alive and not self._stopping

    def _on_loop_exit(self, task: asyncio.Task[None]) -> None:
        if self._stopping:
            return
        reason = "cancelled" if task.cancelled() else repr(task.exception())
        logger.error("the batcher loop died (%s); failing its requests and restarting in %.1fs", reason,
                     self.restart_delay_s)
        self._fail_all(BackendUnavailable("the batcher restarted; retry"))
        self.metrics.batcher_restarts.inc()
        self.restarts += 1
        asyncio.get_running_loop().call_later(self.restart_delay_s, self._restart)

    def _restart(self) -> None:
        if not self._stopping:
            self.start()

    async def stop(self) -> None:
        self._stopping = True
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self._fail_all(BackendUnavailable("the service is shutting down"))

    def fail_pending(self, exc: BackendUnavailable) -> None:
        """Fail every waiting and running request now (the shutdown deadline); the loop goes on."""
        self._fail_all(exc)

    def _fail_all(self, exc: BackendUnavailable) -> None:
        for item in [*self._running, *self._pending]:
            if not item.future.done():
                item.future.set_exception(exc)
        self._running = []
        self._pending = []
        self._queued_images = 0
        self.metrics.queue_depth.set(0)

    # ---- requests ---------------------------------------------------------------------------------------------
    async def submit(self, pixels: torch.Tensor, traffic: bool = True) -> Result:
        """(k, 3, S, S) -> (raw features of the k images, (k, d) embeddings). ``traffic``: a client's images, seen
        by the drift statistics (analyses that run reference images through the batcher pass False)."""
        if not self.healthy:
            raise BackendUnavailable("the batcher is not running (restarting or shutting down); retry",
                                     headers={"Retry-After": "1"})
        k = int(pixels.shape[0])
        if k > self.max_queue:  # would never fit: retrying cannot help, so no 429
            raise PayloadTooLarge(f"{k} images exceed the backbone queue ({self.max_queue} images); send fewer")
        if self._queued_images + k > self.max_queue:
            self.metrics.rejected.labels(reason="queue_full").inc()
            raise Overloaded(f"{self._queued_images} images are waiting for the backbone (limit {self.max_queue}); "
                             "retry shortly", headers={"Retry-After": "1"})
        item = _Item(pixels, asyncio.get_running_loop().create_future(), traffic, trace=tracing.current())
        if item.trace is not None:
            item.enqueued_ns = time.time_ns()
        self._pending.append(item)
        self._queued_images += k
        self.metrics.queue_depth.set(self._queued_images)
        self._wakeup.set()
        try:
            return await item.future
        finally:
            if item in self._pending:  # gave up before its batch started
                self._pending.remove(item)
                self._queued_images -= k
                self.metrics.queue_depth.set(self._queued_images)

    def _take(self) -> list[_Item]:
        batch: list[_Item] = []
        size = 0
        while self._pending:
            item = self._pending[0]
            k = int(item.pixels.shape[0])
            if batch and (size + k > self.max_batch or not self.enabled):
                break
            self._pending.pop(0)
            self._queued_images -= k
            if item.future.done():  # cancelled while waiting
                continue
            batch.append(item)
            size += k
        self.metrics.queue_depth.set(self._queued_images)
        return batch

    async def _fill(self) -> None:
        """Wait for more requests until the batch is full or max_wait_s has passed since the first one queued."""
        if self.max_wait_s <= 0 or not self._pending:
            return
        deadline = self._pending[0].enqueued + self.max_wait_s
        while sum(int(i.pixels.shape[0]) for i in self._pending) < self.max_batch:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            self._wakeup.clear()
            try:
                await asyncio.wait_for(self._wakeup.wait(), remaining)
            except TimeoutError:
                return

    async def _loop(self) -> None:
        while True:
            if not self._pending:
                self._wakeup.clear()
                await self._wakeup.wait()
            await self._fill()
            batch = self._take()
            if not batch:
                continue
            self._running = batch
            try:
                await self._run(batch)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - any failure of this batch fails this batch only
                self.metrics.backbone_errors.inc()
                n = sum(int(i.pixels.shape[0]) for i in batch)
                logger.exception("backbone forward failed for a batch of %d images", n)
                if isinstance(exc, torch.cuda.OutOfMemoryError) and torch.cuda.is_available():
                    torch.cuda.empty_cache()
                for item in batch:
                    if not item.future.done():
                        item.future.set_exception(BackendUnavailable(f"the backbone failed on this batch: "
                                                                     f"{type(exc).__name__}; retry"))
            finally:
                self._running = []

    @staticmethod
    def _trace(batch: list[_Item], traced: list[_Item], started_ns: int, ended_ns: int, n: int) -> None:
        """Each traced request gets its wait and the forward it shared, linked to the other requests of the batch."""
        for item in traced:
            k = int(item.pixels.shape[0])
            tracing.record("batcher wait", item.enqueued_ns, started_ns, item.trace, {"residual.images": k})
            tracing.record("backbone forward", started_ns, ended_ns, item.trace,
                           {"residual.batch_size": n, "residual.batch_requests": len(batch), "residual.images": k},
                           links=[other.trace for other in traced if other is not item])

    async def _run(self, batch: list[_Item]) -> None:
        pixels = torch.cat([i.pixels for i in batch])  # k_i x (k_i, 3, S, S) -> (n, 3, S, S)
        self.metrics.batch_size.observe(pixels.shape[0])
        started = time.perf_counter()
        traced = [i for i in batch if i.trace is not None]
        started_ns = time.time_ns() if traced else 0
        raw, emb = await self.owner.run(self.forward, pixels)
        self.metrics.forward_seconds.observe(time.perf_counter() - started)
        if traced:
            self._trace(batch, traced, started_ns, time.time_ns(), int(pixels.shape[0]))
        offset = 0
        seen: list[int] = []
        for item in batch:
            k = int(item.pixels.shape[0])
            if not item.future.done():
                item.future.set_result((raw.select(slice(offset, offset + k)), emb[offset : offset + k]))
            if item.traffic:
                seen.extend(range(offset, offset + k))
            offset += k
        if self.observe is not None and seen:
            index = torch.tensor(seen, device=raw.emb.device)
            self.observe(raw if len(seen) == offset else raw.select(index))
