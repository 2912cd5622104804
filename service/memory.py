"""Process memory after large, short-lived buffers (decoded images): give freed memory back to the OS.

glibc serves a large allocation with ``mmap`` only until such a block is freed; then it raises its mmap threshold
(up to 32 MiB) and later buffers of that size come from the heap, where freeing them leaves the heap grown: after a
burst of 40-megapixel decodes the process stayed at 9.7 GB. :func:`configure` pins the threshold (buffers of 1 MiB
and more are always mapped, so freeing one returns it at once), and :func:`trim` asks glibc to release what the
heaps keep free (``malloc_trim``), rate-limited, after large decodes. Both do nothing where glibc is absent.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import threading
import time

__all__ = ["configure", "trim"]

logger = logging.getLogger(__name__)

_M_MMAP_THRESHOLD = -3  # mallopt parameter numbers of glibc's malloc.h
_MMAP_THRESHOLD_BYTES = 1 << 20
_lock = threading.Lock()
_last_trim = 0.0
_libc: ctypes.CDLL | None = None
_loaded = False


def _glibc() -> ctypes.CDLL | None:
    global _libc, _loaded
    if not _loaded:
        _loaded = True
        name = ctypes.util.find_library("c")
        try:
            lib = ctypes.CDLL(name or "libc.so.6")
            if hasattr(lib, "malloc_trim") and hasattr(lib, "mallopt"):
                _libc = lib
        except OSError:
            _libc = None
    return _libc


def configure() -> bool:
    """Pin glibc's mmap threshold at 1 MiB (large buffers are returned to the OS when freed). True if applied."""
    lib = _glibc()
    if lib is None:
        return False
    ok = bool(lib.mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_BYTES))
    if not ok:
        logger.warning("mallopt(M_MMAP_THRESHOLD) refused; freed image buffers may stay in the heap")
    return ok


def trim(min_interval_s: float = 1.0) -> bool:
    """``malloc_trim(0)``: return free heap memory to the OS, at most once per ``min_interval_s``. True if run."""
    global _last_trim
    lib = _glibc()
    if lib is None:
        return False
    with _lock:
        now = time.monotonic()
        if now - _last_trim < min_interval_s:
            return False
        _last_trim = now
    lib.malloc_trim(0)
    return True
