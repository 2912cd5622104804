"""The serving model: backbone, LayerNorm linearisation, label sets and coefficient sets.

Files live in the :class:`service.artifacts.ArtifactStore` (layout, ACTIVE, atomic writes). Loaded coefficient
sets are kept in a byte-bounded LRU (``coefficient_cache_bytes``); concurrent first requests for one set share one
load (single flight) and at most ``coefficient_load_concurrency`` sets load at once.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from residual import (
    Basis,
    CoefficientSet,
    FusedAdapter,
    LinearisedLN,
    fuse,
    load_backbone,
    resolve,
)
from residual.backbone import Backbone
from service.artifacts import ID_PATTERN, VERSION_PATTERN, ArtifactStore
from service.bases import BasisStore
from service.errors import InvalidRequest, NotFound
from service.metrics import Metrics
from service.pools import SingleFlight
from service.settings import Settings

__all__ = ["DEFAULT_TEMPLATES", "ID_PATTERN", "CoefficientCache", "LoadedCoefficients", "ModelStore", "label_set_id"]

logger = logging.getLogger(__name__)

DEFAULT_TEMPLATES = ["a photo of a {}.", "a picture of a {}.", "an image of a {}.", "a {}."]


def label_set_id(weights_id: str, classes: list[str], templates: list[str]) -> str:
    """Content hash of the model weights id, the classes and the templates."""
    blob = json.dumps([weights_id, classes, templates], ensure_ascii=False, separators=(",", ":"))
    return "ls-" + hashlib.sha256(blob.encode()).hexdigest()[:20]


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

    def __init__(self, max_bytes: int, concurrency: int, metrics: Metrics) -> None:
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


class ModelStore:
    def __init__(self, settings: Settings, metrics: Metrics) -> None:
        self.settings = settings
        self.metrics = metrics
        device = None if settings.device == "auto" else settings.device
        self.backbone: Backbone = load_backbone(settings.model_name, settings.model_weights, device=device,
                                                precision=settings.precision)
        self.ln = LinearisedLN(self.backbone)
        self.artifacts = ArtifactStore(settings.artifact_dir)
        self.coefficients = CoefficientCache(settings.coefficient_cache_bytes, settings.coefficient_load_concurrency,
                                             metrics)
        self.bases = BasisStore(self.artifacts, self.backbone, settings.reference_basis)
        self.text_forwards = 0

    # ---- text -------------------------------------------------------------------------------------------------
    def encode_prompts(self, prompts: list[str]) -> torch.Tensor:
        """(n,) prompts -> (n, d) raw text embeddings (the text encoder; counted)."""
        self.text_forwards += 1
        out = []
        for i in range(0, len(prompts), 256):
            out.append(self.backbone.encode_text(self.backbone.tokenizer(prompts[i : i + 256])).float().cpu())
        return torch.cat(out)

    # ---- label sets ---------------------------------------------------------------------------------------------
    def register_label_set(self, classes: list[str], templates: list[str]) -> str:
        ident = label_set_id(self.backbone.weights_id, classes, templates)
        self.artifacts.write_label_set(ident, classes, templates)
        return ident

    def get_label_set(self, ident: str) -> tuple[list[str], list[str]]:
        return self.artifacts.read_label_set(ident)

    # ---- coefficient sets ---------------------------------------------------------------------------------------
    def _basis_for(self, basis_hash: str) -> tuple[Basis, dict[str, Any]]:
        info = self.bases.by_hash(basis_hash)  # a fresh scan: a worker may have written it a moment ago
        if info is None:
            raise NotFound(f"the basis {basis_hash} of this coefficient set is not available")
        return self.bases.load(info), info.ref()

    def any_basis(self) -> Basis | None:
        """Some basis of the serving model (coarse/linear sets only need its geometry)."""
        infos = self.bases.infos()
        return self.bases.load(infos[0]) if infos else None

    def resolve_coefficients(self, ref: str) -> LoadedCoefficients:
        """``name`` (its active version) or ``name@version`` -> loaded, validated and fused (blocking: file I/O)."""
        name, _, version = ref.partition("@")
        if not ID_PATTERN.fullmatch(name) or (version and not VERSION_PATTERN.fullmatch(version)):
            raise InvalidRequest(f"coefficients {ref!r} must be NAME or NAME@VERSION "
                                 "(NAME: lowercase letters, digits, '-' and '_', at most 64)")
        if not version:
            active = self.artifacts.active(name)
            if active is None:
                raise NotFound(f"unknown coefficient set {name!r}")
            version = active
        full_ref = f"{name}@{version}"
        return self.coefficients.get_or_load(full_ref, lambda: self._load(name, version))

    def _load(self, name: str, version: str) -> LoadedCoefficients:
        full_ref = f"{name}@{version}"
        path = self.artifacts.coefficient_path(name, version)
        if not path.is_file():
            raise NotFound(f"unknown coefficient set version {full_ref!r}")
        cs = CoefficientSet.load(path)
        if cs.weights_id != self.backbone.weights_id:
            raise InvalidRequest(f"coefficient set {full_ref} was fitted on other model weights ({cs.weights_id})")
        basis, ref = self._basis_for(cs.basis_hash) if cs.basis_hash else (self.any_basis(), None)
        if basis is None:
            raise NotFound("no basis of the serving model is available")
        fused = fuse(resolve(cs, basis), self.ln)
        self.metrics.coefficient_sets_loaded.inc()
        logger.info("loaded coefficient set %s (%s, %d parameters)", full_ref, cs.variant, cs.n_parameters)
        return LoadedCoefficients(full_ref, cs, fused, basis, ref)
