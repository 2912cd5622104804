"""Coefficient sets of the served weights: versions and ACTIVE in the artifact store, loaded sets in memory.

Files live in :class:`service.stores.artifacts.ArtifactStore` (layout, ACTIVE, atomic writes). Loaded coefficient
sets are fused with the model's LayerNorm linearisation (one matrix over the raw per-head features) and kept in a
byte-bounded LRU (``coefficient_cache_bytes``); concurrent first requests for one set share one load (single
flight) and at most ``coefficient_load_concurrency`` sets load at once. All of it is blocking (file I/O): callers
run it on the io pool.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from residual import Basis, CoefficientSet, FusedAdapter, LinearisedLN, fuse, resolve
from residual.backbone import Backbone
from service.errors import InvalidRequest, NotFound
from service.metrics import ModelMetrics
from service.singleflight import SingleFlight
from service.stores.artifacts import ID_PATTERN, VERSION_PATTERN, ArtifactStore
from service.stores.bases import BasisStore
from service.stores.ownership import WeightsOwner, no_owner, other_model

__all__ = ["CoefficientCache", "CoefficientStore", "LoadedCoefficients"]

logger = logging.getLogger(__name__)

_LISTED_NAMES = 10


@dataclass
class LoadedCoefficients:
    ref: str  # "name@version"
    coefficients: CoefficientSet
    fused: FusedAdapter
    basis: Basis  # shared with the store's bases (not counted in nbytes); explanations need it
    basis_ref: dict[str, Any] | None = None  # id, name, source of the basis the set was fitted on (None: no basis)

    @property
    def nbytes(self) -> int:
        tensors = [self.fused.weight, self.fused.e, self.fused.alpha, self.fused.beta, self.coefficients.lambdas]
        if self.coefficients.linear_weight is not None:
            tensors.append(self.coefficients.linear_weight)
        return sum(t.numel() * t.element_size() for t in tensors)


class CoefficientCache:
    """Byte-bounded LRU of loaded coefficient sets; single-flight, bounded-concurrency loading."""

    def __init__(self, max_bytes: int, concurrency: int, metrics: ModelMetrics) -> None:
        self.max_bytes = max_bytes
        self.metrics = metrics
        self._entries: OrderedDict[str, LoadedCoefficients] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self._flight: SingleFlight[str, LoadedCoefficients] = SingleFlight()
        self._slots = threading.BoundedSemaphore(concurrency)

    @property
    def nbytes(self) -> int:
        return self._bytes

    def __contains__(self, ref: str) -> bool:
        return ref in self._entries

    def get_or_load(self, ref: str, load: Callable[[], LoadedCoefficients]) -> LoadedCoefficients:
        loaded, how = self._flight.get(ref, lambda: self._lookup(ref), lambda: self._load(ref, load))
        self.metrics.coefficient_cache_lookups.labels(result=how).inc()
        return loaded

    def _lookup(self, ref: str) -> LoadedCoefficients | None:
        with self._lock:
            hit = self._entries.get(ref)
            if hit is not None:
                self._entries.move_to_end(ref)
            return hit

    def _load(self, ref: str, load: Callable[[], LoadedCoefficients]) -> LoadedCoefficients:
        with self._slots:  # at most `concurrency` sets load at once
            loaded = load()
        with self._lock:
            self._entries[ref] = loaded
            self._bytes += loaded.nbytes
            while self._bytes > self.max_bytes and len(self._entries) > 1:  # the newest set always stays
                _, old = self._entries.popitem(last=False)
                self._bytes -= old.nbytes
                self.metrics.coefficient_cache_evictions.inc()
            self.metrics.coefficient_cache_bytes.set(self._bytes)
            self.metrics.coefficient_cache_sets.set(len(self._entries))
        return loaded


class CoefficientStore:
    """The coefficient sets of one served model: listing, versions, and loading ``name`` / ``name@version``."""

    def __init__(self, artifacts: ArtifactStore, backbone: Backbone, ln: LinearisedLN, bases: BasisStore,
                 cache: CoefficientCache, metrics: ModelMetrics, model: str | None = None,
                 owner: WeightsOwner = no_owner) -> None:
        self.artifacts, self.backbone, self.ln, self.bases = artifacts, backbone, ln, bases
        self.model = model or backbone.name  # the served model's name
        self.owner = owner
        self.cache = cache
        self.metrics = metrics

    # ---- listing ----------------------------------------------------------------------------------------------
    def names(self) -> list[str]:
        return self.artifacts.names()

    def _mine(self, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """The versions of this model's weights (unreadable files too: they may be anyone's)."""
        return [r for r in rows if "error" in r or r["meta"].get("weights_id") == self.backbone.weights_id]

    def active_names(self) -> list[str]:
        """Names whose active version belongs to this model."""
        out = []
        for name in self.artifacts.names():
            active = self.artifacts.active(name)
            if active is not None and any(r["version"] == active for r in self._mine(self.artifacts.versions(name))):
                out.append(name)
        return out

    def summaries(self) -> dict[str, Any]:
        out = []
        for name in self.artifacts.names():
            rows = self._mine(self.artifacts.versions(name))
            if rows:
                out.append({"name": name, "active": self.artifacts.active(name),
                            "versions": [r["version"] for r in rows]})
        return {"model": self.model, "coefficient_sets": out}

    def versions(self, name: str) -> dict[str, Any]:
        """The versions of ``name`` (oldest first) with their metadata; 404 (listing the known names) when none,
        409 when they all belong to another model."""
        every = self.artifacts.versions(name)
        rows = self._mine(every)
        if not rows:
            if every:
                raise other_model(f"coefficient set {name!r}", every[-1]["meta"].get("weights_id", "?"), self.owner,
                                  self.model, self.backbone.weights_id)
            raise self.unknown(name)
        active = self.artifacts.active(name)
        out = []
        for row in rows:
            if "error" in row:
                out.append({"version": row["version"], "active": row["version"] == active, "error": row["error"]})
                continue
            meta = row["meta"]
            rep = meta.get("report", {})
            out.append({"version": row["version"], "active": row["version"] == active,
                        "variant": meta.get("variant"), "created_at": meta.get("created_at"),
                        "n_parameters": meta.get("n_parameters"), "label_set": meta.get("label_set"),
                        "report": {k: v for k, v in rep.items() if k != "history"}})
        return {"model": self.model, "name": name, "active": active, "versions": out}

    def unknown(self, name: str) -> NotFound:
        """404 for an unknown name that says which names exist (or how many, and where to list them)."""
        known = self.active_names()
        if not known:
            listing = "there are none yet (POST /fit-alignment creates one)"
        elif len(known) <= _LISTED_NAMES:
            listing = "known: " + ", ".join(known)
        else:
            listing = f"{len(known)} sets exist; GET /coefficients lists them"
        return NotFound(f"unknown coefficient set {name!r}; {listing}")

    # ---- loading ----------------------------------------------------------------------------------------------
    def resolve(self, ref: str) -> LoadedCoefficients:
        """``name`` (its active version) or ``name@version`` -> loaded, validated and fused (blocking: file I/O)."""
        name, _, version = ref.partition("@")
        if not ID_PATTERN.fullmatch(name) or (version and not VERSION_PATTERN.fullmatch(version)):
            raise InvalidRequest(f"coefficients {ref!r} must be NAME or NAME@VERSION "
                                 "(NAME: lowercase letters, digits, '-' and '_', at most 64)")
        if not version:
            active = self.artifacts.active(name)
            if active is None:
                raise self.unknown(name)
            version = active
        full_ref = f"{name}@{version}"
        return self.cache.get_or_load(full_ref, lambda: self._load(name, version))

    def _basis_for(self, basis_hash: str) -> tuple[Basis, dict[str, Any]]:
        info = self.bases.by_hash(basis_hash)  # a fresh scan: a worker may have written it a moment ago
        if info is None:
            raise NotFound(f"the basis {basis_hash} of this coefficient set is not available")
        return self.bases.load(info), info.ref()

    def any_basis(self) -> Basis | None:
        """Some basis of the serving model (coarse/linear sets only need its geometry)."""
        infos = self.bases.infos()
        return self.bases.load(infos[0]) if infos else None

    def _load(self, name: str, version: str) -> LoadedCoefficients:
        full_ref = f"{name}@{version}"
        path = self.artifacts.coefficient_path(name, version)
        if not path.is_file():
            raise NotFound(f"unknown coefficient set version {full_ref!r} (GET /coefficients/{name} lists them)")
        cs = CoefficientSet.load(path)
        if cs.weights_id != self.backbone.weights_id:
            raise other_model(f"coefficient set {full_ref}", cs.weights_id, self.owner, self.model,
                              self.backbone.weights_id)
        basis, ref = self._basis_for(cs.basis_hash) if cs.basis_hash else (self.any_basis(), None)
        if basis is None:
            raise NotFound("no basis of the serving model is available")
        fused = fuse(resolve(cs, basis), self.ln)
        self.metrics.coefficient_sets_loaded.inc()
        logger.info("loaded coefficient set %s (%s, %d parameters)", full_ref, cs.variant, cs.n_parameters)
        return LoadedCoefficients(full_ref, cs, fused, basis, ref)
