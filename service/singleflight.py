"""Single flight: concurrent callers for one key share one computation (the text cache, the coefficient cache)."""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import Generic, TypeVar

__all__ = ["SingleFlight"]

T = TypeVar("T")
K = TypeVar("K")


class SingleFlight(Generic[K, T]):
    """Concurrent callers for one key share one computation (the first computes, the others wait for it)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._inflight: dict[K, Future[T]] = {}

    def get(self, key: K, lookup: Callable[[], T | None], compute: Callable[[], T]) -> tuple[T, str]:
        """(value, how): ``lookup()`` under the lock ("hit"), else wait for a computation in flight ("shared"),
        else ``compute()`` here ("miss"). ``compute`` must make ``lookup`` succeed before it returns, so a caller
        arriving right after it ends finds the value instead of computing it again."""
        with self._lock:
            hit = lookup()
            if hit is not None:
                return hit, "hit"
            fut = self._inflight.get(key)
            leader = fut is None
            if fut is None:
                fut = self._inflight[key] = Future()
        if not leader:
            return fut.result(), "shared"
        try:
            value = compute()
        except BaseException as exc:
            with self._lock:
                del self._inflight[key]
            fut.set_exception(exc)
            raise
        with self._lock:
            del self._inflight[key]
        fut.set_result(value)
        return value, "miss"
