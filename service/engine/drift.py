"""Per-unit drift of one model's live traffic (``residual.drift``), kept by each replica and summed in Redis.

The batcher hands the raw features of every batch's client images (``/classify``, image ``/v1/embeddings``) to
:meth:`DriftMonitor.observe`, which only queues them: a daemon thread projects them on the units and adds them to
the statistics of every tracked reference, so no request waits for it and no extra forward runs. (It keeps the
process's priority: a thread at a lower one would be preempted while it holds the GIL and stall the others.) It
counts every
``1 / RESIDUAL_DRIFT_SAMPLE``-th traffic image (a quarter by default: the statistics of a few hundred images already
tell drift from noise, and the cost stays under 1 % of the process's CPU). When it falls behind, batches are
skipped and counted (``residual_drift_skipped_images_total``): the statistics then cover a sample of the traffic.

References: the model's default basis (its own data: mean 0, variance lambda), and each coefficient set asked for
(``GET /drift?coefficients=`` or a ``/classify`` with that set): in the basis it was fitted on, against the
statistics of its training images when the fit stored them, else against that basis's own data. Each reference
keeps two windows: everything since it was tracked, and the last ``RESIDUAL_DRIFT_WINDOW`` images.

Across replicas: every ``flush_s`` seconds (and before a ``GET /drift`` answers) the thread writes this replica's
sums of each reference to Redis (raw float64 bytes with a shape header, a TTL, no pickle); the answer adds the
sums of every replica that wrote within the TTL (six flushes, at least 30 s: a stopped replica's traffic leaves
the answer then). With Redis down, the answer holds this replica's own figures and
says so. ``RESIDUAL_DRIFT=off`` builds no monitor: no queue, no thread, no cost.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time
import uuid
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import redis
import torch

from residual import Basis, LinearisedLN, RawFeatures
from residual.decomposition import project_units
from residual.drift import DriftReference, DriftStats, deployment_score, drift_scores
from residual.io import load_tensors
from service.engine.text_cache import RedisState
from service.stores.artifacts import ArtifactStore
from service.stores.coefficients import LoadedCoefficients

__all__ = ["DriftMonitor", "Tracked", "coefficients_reference"]

logger = logging.getLogger(__name__)

_PENDING_BATCHES = 64  # batches queued for the drift thread before new ones are skipped
_GATHER = 64  # images counted together
_SETTLE = object()  # "count what is gathered now"
_MAX_REFERENCES = 8


@dataclass
class Tracked:
    """One reference and this replica's statistics against it."""

    key: str  # "basis" or "coefficients:<name>@<version>"
    reference: DriftReference
    basis_ref: dict[str, Any]
    against: str  # "basis" (the basis's own data) or "training data" (the set's fit)
    since: float = field(default_factory=time.time)
    total: DriftStats = field(init=False)
    recent: deque[DriftStats] = field(default_factory=deque)
    recent_sum: DriftStats = field(init=False)

    def __post_init__(self) -> None:
        self.total = DriftStats.zeros(*self.reference.shape)
        self.recent_sum = DriftStats.zeros(*self.reference.shape)

    def add(self, batch: DriftStats, window: int) -> None:
        self.total = self.total + batch
        self.recent.append(batch)
        self.recent_sum = self.recent_sum + batch
        while self.recent and self.recent_sum.n - self.recent[0].n >= window:  # keep the last `window` images
            self.recent_sum = self.recent_sum - self.recent.popleft()


class DriftMonitor:
    def __init__(self, model: str, weights_id: str, ln: LinearisedLN, default: Callable[[], tuple[dict[str, Any],
                 Basis] | None], redis_state: RedisState, window: int, flush_s: float, sample: float,
                 on_scores: Callable[[list[str], torch.Tensor, float], None], on_skip: Callable[[int], None],
                 on_cpu: Callable[[float], None] = lambda s: None) -> None:
        self.model, self.weights_id, self.ln = model, weights_id, ln
        self._default = default  # the model's default basis now (None: there is none yet)
        self.redis = redis_state
        self.window, self.flush_s = window, flush_s
        self.stride = max(1, round(1 / sample))
        self._seen = 0
        # a replica's sums outlive it by this long (every replica rewrites its own every flush_s, idle or not)
        self.ttl_s = max(30, round(6 * flush_s))
        self._on_scores, self._on_skip, self._on_cpu = on_scores, on_skip, on_cpu
        self.replica = uuid.uuid4().hex[:12]
        self._queue: queue.Queue[RawFeatures | None] = queue.Queue(maxsize=_PENDING_BATCHES)
        self._tracked: OrderedDict[str, Tracked] = OrderedDict()
        self._lock = threading.Lock()
        self._last_flush = 0.0
        self._stopped = threading.Event()
        self._pending = 0  # batches queued or being counted
        self._settled = threading.Condition()
        self._unit_names: list[str] = []
        self._thread = threading.Thread(target=self._work, name=f"drift-{model}", daemon=True)
        self._thread.start()

    # ---- the request path: never blocks ---------------------------------------------------------------------
    def observe(self, raw: RawFeatures) -> None:
        if self.stride > 1:  # every stride-th traffic image, counted across batches
            first = (-self._seen) % self.stride
            self._seen += len(raw)
            if first >= len(raw):
                return
            raw = raw.select(slice(first, None, self.stride))
        try:
            with self._settled:
                self._queue.put_nowait(raw)
                self._pending += 1
        except queue.Full:
            self._on_skip(len(raw))

    def settle(self, timeout_s: float = 5.0) -> None:
        """Blocking: wait (at most ``timeout_s``) until every batch observed so far is counted."""
        with contextlib.suppress(queue.Full):
            self._queue.put(_SETTLE, timeout=timeout_s)  # count what is gathered now, however few images
        with self._settled:
            self._settled.wait_for(lambda: self._pending == 0, timeout_s)

    def stop(self) -> None:
        self._stopped.set()
        with contextlib.suppress(queue.Full):
            self._queue.put_nowait(None)

    # ---- references ---------------------------------------------------------------------------------------------
    def track(self, key: str, make: Callable[[], Tracked]) -> Tracked:
        """The tracked reference ``key``, made (blocking: file reads) and tracked from now on if it is new."""
        with self._lock:
            hit = self._tracked.get(key)
            if hit is not None:
                self._tracked.move_to_end(key)
                return hit
        made = make()
        with self._lock:
            hit = self._tracked.setdefault(key, made)
            while len(self._tracked) > _MAX_REFERENCES:
                oldest = next(iter(self._tracked))
                if oldest == "basis":
                    self._tracked.move_to_end(oldest)
                    oldest = next(iter(self._tracked))
                self._tracked.pop(oldest)
            return hit

    def is_tracked(self, key: str) -> bool:
        return key in self._tracked

    def track_default(self) -> Tracked | None:
        found = self._default()
        if found is None:
            return None
        ref, basis = found
        key = f"basis:{basis.hash}"
        with self._lock:
            current = self._tracked.get("basis")
            if current is not None and current.reference.basis_hash == basis.hash:
                return current
        tracked = Tracked(key, DriftReference.from_basis(basis), ref, "basis")
        with self._lock:
            self._tracked["basis"] = tracked  # a new default basis starts new statistics
        self._unit_names = [u.name for u in basis.table]
        return tracked

    # ---- the drift thread -----------------------------------------------------------------------------------------
    def _work(self) -> None:
        """Gather observed batches and count them together (at least ``_GATHER`` images, or at each tick or
        settle): a few torch calls per gathered batch, not per forward."""
        gathered: list[RawFeatures] = []
        images = 0
        while True:
            try:
                item = self._queue.get(timeout=self.flush_s)
            except queue.Empty:
                item = _SETTLE  # a tick: count what is gathered, flush
            if item is None or self._stopped.is_set():
                return
            if isinstance(item, RawFeatures):
                gathered.append(item)
                images += len(item)
                if images < _GATHER:
                    continue
            started = time.thread_time()
            done = len(gathered)
            try:
                if gathered:
                    self._add(RawFeatures.cat(gathered) if len(gathered) > 1 else gathered[0])
                if time.monotonic() - self._last_flush >= self.flush_s:
                    self.flush()
            except Exception:  # noqa: BLE001 - drift must never take serving down
                logger.exception("drift statistics of model %s: %d images were not counted", self.model, images)
            finally:
                gathered, images = [], 0
                self._on_cpu(time.thread_time() - started)
                with self._settled:
                    self._pending -= done
                    self._settled.notify_all()

    def _add(self, raw: RawFeatures) -> None:
        if "basis" not in self._tracked:
            self.track_default()
        with self._lock:
            tracked = list(self._tracked.values())
        if not tracked:
            return
        with torch.no_grad():
            units = project_units(raw, self.ln).float().cpu()  # (n, U, d)
        for t in tracked:
            batch = DriftStats.zeros(*t.reference.shape)
            batch.add(units, t.reference)
            with self._lock:
                t.add(batch, self.window)

    def flush(self) -> None:
        """Write this replica's sums of every reference to Redis; update the gauges of the default reference."""
        self._last_flush = time.monotonic()
        with self._lock:
            tracked = list(self._tracked.values())
        for t in tracked:
            if t.key.startswith("basis:") and self._unit_names:
                scores = drift_scores(t.recent_sum, t.reference)["score"]
                self._on_scores(self._unit_names, scores, deployment_score(scores))
            key = self._key(t)
            with self._lock:
                total, recent = t.total.to_bytes(), t.recent_sum.to_bytes()

            def write(client: redis.Redis, key: str = key, total: bytes = total, recent: bytes = recent) -> None:
                pipe = client.pipeline()
                pipe.hset(f"{key}:{self.replica}", mapping={"all": total, "recent": recent})
                pipe.expire(f"{key}:{self.replica}", self.ttl_s)
                pipe.sadd(f"{key}:replicas", self.replica)
                pipe.expire(f"{key}:replicas", self.ttl_s)
                pipe.execute()

            if self.redis.writable():  # the cache's high-water mark holds for drift sums too
                self.redis.call(write)

    def _key(self, t: Tracked) -> str:
        return f"residual:drift:{self.weights_id}:{t.key}:{t.reference.basis_hash}"

    def deployment(self, t: Tracked, window: str) -> tuple[DriftStats, int, str | None]:
        """(the sums of every replica, how many replicas, a note) for ``window`` ("recent" or "all")."""
        key = self._key(t)
        own = t.recent_sum if window == "recent" else t.total

        def read(client: redis.Redis) -> list[bytes | None]:
            replicas = [r.decode() for r in client.smembers(f"{key}:replicas")]
            pipe = client.pipeline()
            for r in replicas:
                pipe.hget(f"{key}:{r}", window)
            return [v for v in pipe.execute() if v is not None]

        found = self.redis.call(read)
        if not isinstance(found, list):
            return own, 1, "Redis is unavailable: this replica's own traffic only"
        total = DriftStats.zeros(*t.reference.shape)
        count = 0
        for blob in found:
            try:
                total = total + DriftStats.from_bytes(blob)
                count += 1
            except ValueError:
                continue
        if count == 0:  # nothing written yet (the first flush is a moment away)
            return own, 1, None
        return total, count, None


def coefficients_reference(loaded: LoadedCoefficients, artifacts: ArtifactStore) -> Tracked:
    """Blocking (a file read): the reference of a coefficient set: its training statistics when its fit stored
    them (``<version>.drift``), else the own data of the basis it was fitted on."""
    name, version = loaded.ref.split("@", 1)
    path = artifacts.drift_reference_path(name, version)
    basis = loaded.basis
    ref_info = loaded.basis_ref or {"basis_id": None, "name": "", "source": {}, "n_images": basis.n_samples}
    if path.is_file():
        t, meta = load_tensors(path)
        if meta.get("basis_hash") == basis.hash:
            reference = DriftReference(basis.hash, t["k"], t["components"], t["mean"], t["ref_mean"], t["ref_var"],
                                       t["ref_outside"])
            return Tracked(f"coefficients:{loaded.ref}", reference, ref_info, "training data")
    return Tracked(f"coefficients:{loaded.ref}", DriftReference.from_basis(basis), ref_info, "basis")
