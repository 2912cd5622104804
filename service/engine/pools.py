"""Where blocking work runs: bounded pools of daemon threads, and the one owner of the model.

- :class:`Pool` runs blocking calls (file and Redis I/O, image decoding, the fused matmul) off the event loop on a
  fixed number of threads. Its threads are daemons and it never uses asyncio's default executor, so a shutdown is
  never held up by work that outlived its request (``asyncio.run`` joins the default executor forever on 3.11).
- :class:`ModelOwner` is a :class:`Pool` of one thread: every forward of the serving model (classify batches,
  text encoding, basis building, head analyses, the warm-up) runs there, one at a time, in submission order. Long
  work (a basis over thousands of images) is submitted in chunks, so classify batches interleave with it.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future, InvalidStateError
from typing import Any, TypeVar

from service import tracing
from service.errors import BackendUnavailable

__all__ = ["ModelOwner", "Pool"]

logger = logging.getLogger(__name__)

T = TypeVar("T")
_STOP = object()


class Pool:
    """``threads`` daemon threads taking calls in FIFO order."""

    def __init__(self, threads: int, name: str) -> None:
        if threads < 1:
            raise ValueError("a pool needs at least one thread")
        self.name = name
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._stopped = threading.Event()
        self._local = threading.local()
        self._busy = 0
        self._running: set[Future[Any]] = set()
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._work, name=f"{name}-{i}", daemon=True) for i in range(threads)]
        for t in self._threads:
            t.start()

    # ---- submission -------------------------------------------------------------------------------------------
    def submit(self, fn: Callable[..., T], *args: Any) -> Future[T]:
        """Queue ``fn(*args)``; the future fails with BackendUnavailable once the pool is stopped."""
        fut: Future[T] = Future()
        if self._stopped.is_set():
            fut.set_exception(BackendUnavailable(f"the {self.name} pool is shut down (the service is stopping)"))
            return fut
        self._queue.put((fn, args, fut))
        return fut

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """Await ``fn(*args)`` run on the pool (the event loop never blocks on it). With tracing on, the call runs in
        a copy of the caller's context, so its spans are children of the caller's."""
        if tracing.enabled():
            return await asyncio.wrap_future(self.submit(contextvars.copy_context().run, fn, *args))
        return await asyncio.wrap_future(self.submit(fn, *args))

    def call(self, fn: Callable[..., T], *args: Any) -> T:
        """Run ``fn(*args)`` on the pool from another thread and wait; inline when already on one of its threads."""
        if self.owns_current_thread():
            return fn(*args)
        return self.submit(fn, *args).result()

    def owns_current_thread(self) -> bool:
        return bool(getattr(self._local, "mine", False))

    # ---- state ------------------------------------------------------------------------------------------------
    @property
    def alive(self) -> bool:
        return not self._stopped.is_set() and all(t.is_alive() for t in self._threads)

    @property
    def stopping(self) -> bool:
        return self._stopped.is_set()

    @property
    def busy(self) -> int:
        return self._busy

    def stop(self, fail_running: bool = False) -> None:
        """Refuse new work and fail what is queued. Running calls finish on their daemon threads; with
        ``fail_running`` their callers are answered at once (BackendUnavailable) instead of waiting for them: the
        shutdown deadline must not wait for a long chunk on a loaded machine."""
        self._stopped.set()
        if fail_running:
            with self._lock:
                running = list(self._running)
            for fut in running:
                with contextlib.suppress(InvalidStateError):  # it may have finished a moment ago
                    fut.set_exception(BackendUnavailable("the service is shutting down"))
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            # a queued call whose caller gave up (its future cancelled) needs nothing; the others fail now
            if item is not _STOP and item[2].set_running_or_notify_cancel():
                item[2].set_exception(BackendUnavailable("the service is shutting down"))
        for _ in self._threads:
            self._queue.put(_STOP)

    def _work(self) -> None:
        self._local.mine = True
        while True:
            item = self._queue.get()
            if item is _STOP:
                return
            fn, args, fut = item
            if not fut.set_running_or_notify_cancel():
                continue
            with self._lock:
                self._busy += 1
                self._running.add(fut)
            try:
                result = fn(*args)
            except BaseException as exc:  # noqa: BLE001 - handed to the caller
                with contextlib.suppress(InvalidStateError):  # already failed by stop(fail_running=True)
                    fut.set_exception(exc)
            else:
                with contextlib.suppress(InvalidStateError):
                    fut.set_result(result)
            finally:
                with self._lock:
                    self._busy -= 1
                    self._running.discard(fut)


class ModelOwner(Pool):
    """The single thread that runs every forward of one served model."""

    def __init__(self, model: str = "model") -> None:
        super().__init__(1, f"model-{model}")

    def check_running(self) -> None:
        """For long chunked work: stop between chunks once the service is shutting down."""
        if self.stopping:
            raise BackendUnavailable("the service is shutting down")
