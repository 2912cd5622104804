"""Cross-request dynamic batching in front of the backbone.

Requests put their preprocessed pixels in a bounded queue (counted in images; full -> 429). One loop takes
everything waiting, waits at most ``max_wait_s`` for more while the batch is below ``max_batch`` images, and
runs ONE backbone forward in a worker thread; each request gets its slice of the raw per-head features and
embeddings back. A failing forward fails only the requests of that batch; a request that gave up (timeout)
before its batch started is dropped without running.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

from residual.decomposition import RawFeatures
from service.errors import BackendUnavailable, Overloaded
from service.metrics import Metrics

__all__ = ["Batcher"]

logger = logging.getLogger(__name__)

ForwardFn = Callable[[torch.Tensor], tuple[RawFeatures, torch.Tensor]]


@dataclass(eq=False)  # identity: `item in pending` must never compare tensors
class _Item:
    pixels: torch.Tensor  # (k, 3, S, S)
    future: asyncio.Future[tuple[RawFeatures, torch.Tensor]]
    enqueued: float = field(default_factory=time.monotonic)


class Batcher:
    def __init__(self, forward: ForwardFn, max_batch: int, max_wait_s: float, max_queue: int, enabled: bool,
                 metrics: Metrics) -> None:
        self.forward = forward
        self.max_batch = max_batch
        self.max_wait_s = max_wait_s if enabled else 0.0
        self.max_queue = max_queue
        self.enabled = enabled
        self.metrics = metrics
        self._pending: list[_Item] = []
        self._queued_images = 0
        self._wakeup = asyncio.Event()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="backbone")
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._loop())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        for item in self._pending:
            if not item.future.done():
                item.future.set_exception(BackendUnavailable("the service is shutting down"))
        self._executor.shutdown(wait=False, cancel_futures=True)

    async def submit(self, pixels: torch.Tensor) -> tuple[RawFeatures, torch.Tensor]:
        """(k, 3, S, S) -> (raw features of the k images, (k, d) embeddings)."""
        k = int(pixels.shape[0])
        if self._queued_images + k > self.max_queue:
            self.metrics.rejected.labels(reason="queue_full").inc()
            raise Overloaded(f"{self._queued_images} images are waiting for the backbone (limit {self.max_queue}); "
                             "retry shortly", headers={"Retry-After": "1"})
        item = _Item(pixels, asyncio.get_running_loop().create_future())
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

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not self._pending:
                self._wakeup.clear()
                await self._wakeup.wait()
            if self.max_wait_s > 0:
                deadline = self._pending[0].enqueued + self.max_wait_s if self._pending else loop.time()
                while sum(int(i.pixels.shape[0]) for i in self._pending) < self.max_batch:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        break
                    self._wakeup.clear()
                    try:
                        await asyncio.wait_for(self._wakeup.wait(), remaining)
                    except TimeoutError:
                        break
            batch = self._take()
            if not batch:
                continue
            pixels = torch.cat([i.pixels for i in batch])
            self.metrics.batch_size.observe(pixels.shape[0])
            started = time.perf_counter()
            try:
                raw, emb = await loop.run_in_executor(self._executor, self.forward, pixels)
            except Exception as exc:  # noqa: BLE001 - any backbone failure fails this batch only
                self.metrics.backbone_errors.inc()
                logger.exception("backbone forward failed for a batch of %d images", pixels.shape[0])
                if isinstance(exc, torch.cuda.OutOfMemoryError) and torch.cuda.is_available():
                    torch.cuda.empty_cache()
                for item in batch:
                    if not item.future.done():
                        item.future.set_exception(BackendUnavailable(f"the backbone failed on this batch: "
                                                                     f"{type(exc).__name__}; retry"))
                continue
            self.metrics.forward_seconds.observe(time.perf_counter() - started)
            offset = 0
            for item in batch:
                k = int(item.pixels.shape[0])
                if not item.future.done():
                    item.future.set_result((raw.select(slice(offset, offset + k)), emb[offset : offset + k]))
                offset += k
