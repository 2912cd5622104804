"""Text-embedding cache: class matrices in process (LRU, bounded in bytes) and in Redis, prompt embeddings in Redis.

Entries are raw little-endian float32 bytes behind a one-line header naming dtype and shape
(``float32 128\\n`` or ``float32 10x128\\n``); never pickle. Keys carry the model weights id, so two models
never share entries. Redis failures never fail a request: the cache marks Redis down for ``retry_s``,
computes directly, and tries Redis again afterwards (self-healing without a restart).

The cache never fills a Redis it shares with the job queue: when the server has a ``maxmemory``, writes stop once
its used memory passes ``high_water`` of it (read from ``INFO memory`` at most once per second), and reads go on.
Prompts are encoded ``TEXT_CHUNK`` at a time, each chunk one job of the model owner, so the image batches of other
requests interleave with a large label set instead of waiting for all of it.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable

import numpy as np
import redis
import torch

from residual.classifier import fill_templates, prompt_embeddings_to_classes
from service.metrics import Metrics, ModelMetrics
from service.singleflight import SingleFlight

__all__ = ["TEXT_CHUNK", "RedisState", "TextCache", "decode_array", "encode_array"]

logger = logging.getLogger(__name__)

TEXT_CHUNK = 64
"""Prompts per text-encoder call (one model-owner job each)."""


def encode_array(t: torch.Tensor) -> bytes:
    arr = t.detach().to("cpu", torch.float32).contiguous().numpy().astype("<f4", copy=False)
    return f"float32 {'x'.join(str(s) for s in arr.shape)}\n".encode() + arr.tobytes()


def decode_array(blob: bytes) -> torch.Tensor:
    head, sep, body = blob.partition(b"\n")
    parts = head.decode("ascii", "replace").split(" ")
    if not sep or len(parts) != 2 or parts[0] != "float32":
        raise ValueError("not a cached float32 array")
    shape = tuple(int(s) for s in parts[1].split("x"))
    if int(np.prod(shape)) * 4 != len(body):
        raise ValueError("cached array size does not match its header")
    return torch.from_numpy(np.frombuffer(body, dtype="<f4").reshape(shape).copy())


class RedisState:
    """A Redis client that backs off after a failure, reports up/down, and knows when writes should stop."""

    def __init__(self, url: str, timeout_s: float, retry_s: float, metrics: Metrics, high_water: float = 0.8) -> None:
        self.client = redis.Redis.from_url(url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s)
        self.retry_s = retry_s
        self.metrics = metrics
        self.high_water = high_water
        self._down_until = 0.0
        self._lock = threading.Lock()
        self._memory_checked = 0.0
        self._full = False
        self.up = False

    def writable(self) -> bool:
        """False while the server's used memory is over ``high_water`` of its ``maxmemory`` (checked at most once
        per second; a server without maxmemory is always writable)."""
        now = time.monotonic()
        if now - self._memory_checked >= 1.0:
            self._memory_checked = now
            info = self.call(lambda c: c.info("memory"))
            if isinstance(info, dict):
                limit = int(info.get("maxmemory", 0) or 0)
                used = int(info.get("used_memory", 0) or 0)
                full = limit > 0 and used >= self.high_water * limit
                if full and not self._full:
                    logger.warning("redis memory %d of %d bytes: the text cache stops writing until it drops below "
                                   "%.0f%%", used, limit, 100 * self.high_water)
                self._full = full
                self.metrics.text_cache_writes_paused.set(1 if full else 0)
        return not self._full

    def call(self, fn: Callable[[redis.Redis], object]) -> object | None:
        """Run ``fn(client)``; None when Redis is (or just went) down."""
        if time.monotonic() < self._down_until:
            return None
        try:
            result = fn(self.client)
        except (redis.RedisError, OSError) as exc:
            with self._lock:
                self._down_until = time.monotonic() + self.retry_s
                self.up = False
            self.metrics.redis_up.set(0)
            self.metrics.redis_errors.inc()
            logger.warning("redis unavailable (%s); retrying in %.1fs", type(exc).__name__, self.retry_s)
            return None
        self.up = True
        self.metrics.redis_up.set(1)
        return result

    def ping(self) -> bool:
        self._down_until = 0.0  # an explicit health check always tries
        return bool(self.call(lambda c: c.ping()))


class TextCache:
    def __init__(self, weights_id: str, encode: Callable[[list[str]], torch.Tensor], state: RedisState,
                 ttl_s: int, lru_size: int, metrics: ModelMetrics, lru_bytes: int = 256 * 1024 * 1024) -> None:
        self.weights_id = weights_id
        self.encode = encode  # prompts -> (n, d) raw text embeddings; called with at most TEXT_CHUNK prompts
        self.redis = state
        self.ttl_s = ttl_s
        self.lru_size = lru_size
        self.lru_bytes = lru_bytes
        self.metrics = metrics
        self._lru: OrderedDict[str, torch.Tensor] = OrderedDict()
        self._lru_nbytes = 0
        self._flight: SingleFlight[str, torch.Tensor] = SingleFlight()
        self._lock = threading.Lock()

    def _key(self, kind: str, ident: str) -> str:
        return f"residual:{kind}:{self.weights_id}:{ident}"

    @staticmethod
    def _digest(text: str) -> str:
        return hashlib.sha256(text.encode()).hexdigest()[:32]

    def class_embeddings(self, label_set_id: str, classes: list[str], templates: list[str]) -> torch.Tensor:
        """(C, d) unit-norm class embeddings; zero text-encoder forwards for a label set seen before.

        Single flight: concurrent callers for one label set share one lookup and at most one encoding. The
        encoder itself runs on the model owner (one forward at a time), which bounds encoding concurrency.
        """
        emb, how = self._flight.get(label_set_id, lambda: self._memory(label_set_id),
                                    lambda: self._lookup_or_encode(label_set_id, classes, templates))
        if how == "hit":
            self.metrics.text_cache_lookups.labels(tier="memory").inc()
        elif how == "shared":
            self.metrics.text_encodes_shared.inc()
        return emb

    def _memory(self, label_set_id: str) -> torch.Tensor | None:
        with self._lock:
            hit = self._lru.get(label_set_id)
            if hit is not None:
                self._lru.move_to_end(label_set_id)
            return hit

    def _lookup_or_encode(self, label_set_id: str, classes: list[str], templates: list[str]) -> torch.Tensor:
        mkey = self._key("classes", label_set_id)
        blob = self.redis.call(lambda c: c.get(mkey))
        if isinstance(blob, bytes):
            try:
                emb = decode_array(blob)
                if emb.shape[0] == len(classes):
                    self.metrics.text_cache_lookups.labels(tier="redis").inc()
                    self._remember(label_set_id, emb)
                    return emb
            except ValueError:
                logger.warning("dropping a malformed cache entry %s", mkey)
        self.metrics.text_cache_lookups.labels(tier="miss").inc()
        prompts = fill_templates(classes, templates)
        prompt_emb = self.prompt_embeddings(prompts)
        emb = prompt_embeddings_to_classes(prompt_emb, len(classes), len(templates))
        if self.redis.writable():
            self.redis.call(lambda c: c.set(mkey, encode_array(emb), ex=self.ttl_s))
        self._remember(label_set_id, emb)
        return emb

    def prompt_embeddings(self, prompts: list[str]) -> torch.Tensor:
        """(n,) prompts -> (n, d) raw text embeddings, each cached in Redis (only the missing ones are encoded)."""
        keys = [self._key("prompt", self._digest(p)) for p in prompts]
        cached = self.redis.call(lambda c: c.mget(keys))
        found: list[torch.Tensor | None] = [None] * len(prompts)
        if isinstance(cached, list):
            for i, blob in enumerate(cached):
                if isinstance(blob, bytes):
                    try:
                        found[i] = decode_array(blob)
                    except ValueError:
                        found[i] = None
        missing = [i for i, f in enumerate(found) if f is None]
        if missing:
            todo = [prompts[i] for i in missing]
            parts = []
            for a in range(0, len(todo), TEXT_CHUNK):  # one owner job per chunk: image batches run in between
                chunk = todo[a : a + TEXT_CHUNK]
                parts.append(self.encode(chunk).float().cpu())
                self.metrics.text_encoder_prompts.inc(len(chunk))
            fresh = torch.cat(parts)
            for j, i in enumerate(missing):
                found[i] = fresh[j]

            def write(c: redis.Redis) -> None:
                pipe = c.pipeline(transaction=False)
                for j, i in enumerate(missing):
                    pipe.set(keys[i], encode_array(fresh[j]), ex=self.ttl_s)
                pipe.execute()

            if self.redis.writable():
                self.redis.call(write)
        return torch.stack([f for f in found if f is not None])

    @property
    def nbytes(self) -> int:
        return self._lru_nbytes

    def _remember(self, label_set_id: str, emb: torch.Tensor) -> None:
        size = emb.numel() * emb.element_size()
        with self._lock:
            old = self._lru.pop(label_set_id, None)
            if old is not None:
                self._lru_nbytes -= old.numel() * old.element_size()
            self._lru[label_set_id] = emb
            self._lru_nbytes += size
            while len(self._lru) > 1 and (len(self._lru) > self.lru_size or self._lru_nbytes > self.lru_bytes):
                _, gone = self._lru.popitem(last=False)
                self._lru_nbytes -= gone.numel() * gone.element_size()
            self.metrics.text_cache_bytes.set(self._lru_nbytes)
