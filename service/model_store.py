"""The serving model: backbone, LayerNorm linearisation, label sets and coefficient sets.

Artifact layout under ``RESIDUAL_ARTIFACT_DIR``::

    label_sets/<label_set_id>.json                  {"classes": [...], "templates": [...]}
    coefficients/<name>/<version>.safetensors       coefficient sets (residual.CoefficientSet)
    coefficients/<name>/ACTIVE                      the version served for plain ``name``
    bases/*.safetensors                             extra bases (the embedded model's ships with it)
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from residual import (
    Basis,
    CoefficientSet,
    FusedAdapter,
    LinearisedLN,
    ResidualError,
    fuse,
    load_backbone,
    resolve,
)
from residual.backbone import Backbone
from residual.tiny.reference import shipped_basis_path
from service.errors import InvalidRequest, NotFound
from service.settings import Settings

__all__ = ["DEFAULT_TEMPLATES", "ID_PATTERN", "LoadedCoefficients", "ModelStore", "label_set_id"]

logger = logging.getLogger(__name__)

DEFAULT_TEMPLATES = ["a photo of a {}.", "a picture of a {}.", "an image of a {}.", "a {}."]
ID_PATTERN = re.compile(r"^[a-z0-9][a-z0-9_-]{0,63}$")
_VERSION = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


def label_set_id(weights_id: str, classes: list[str], templates: list[str]) -> str:
    """Content hash of the model weights id, the classes and the templates."""
    blob = json.dumps([weights_id, classes, templates], ensure_ascii=False, separators=(",", ":"))
    return "ls-" + hashlib.sha256(blob.encode()).hexdigest()[:20]


@dataclass
class LoadedCoefficients:
    ref: str  # "name@version"
    coefficients: CoefficientSet
    fused: FusedAdapter


class ModelStore:
    def __init__(self, settings: Settings, on_coefficients_loaded: Callable[[], None] | None = None) -> None:
        self.settings = settings
        self._on_loaded = on_coefficients_loaded
        device = None if settings.device == "auto" else settings.device
        self.backbone: Backbone = load_backbone(settings.model_name, settings.model_weights, device=device,
                                                precision=settings.precision)
        self.ln = LinearisedLN(self.backbone)
        self.artifacts = Path(settings.artifact_dir)
        self._coefficients: dict[str, LoadedCoefficients] = {}
        self._bases: dict[str, Basis] | None = None
        self._lock = threading.Lock()
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
        path = self.artifacts / "label_sets" / f"{ident}.json"
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp")
            tmp.write_text(json.dumps({"classes": classes, "templates": templates}))
            tmp.replace(path)
        return ident

    def get_label_set(self, ident: str) -> tuple[list[str], list[str]]:
        if not re.fullmatch(r"ls-[0-9a-f]{20}", ident):
            raise InvalidRequest(f"label_set_id {ident!r} is not a label-set id (ls- followed by 20 hex digits)")
        path = self.artifacts / "label_sets" / f"{ident}.json"
        if not path.is_file():
            raise NotFound(f"unknown label set {ident}")
        data = json.loads(path.read_text())
        return list(data["classes"]), list(data["templates"])

    # ---- coefficient sets ---------------------------------------------------------------------------------------
    def _load_bases(self, refresh: bool = False) -> dict[str, Basis]:
        with self._lock:
            if self._bases is None or refresh:
                bases: dict[str, Basis] = {}
                paths = list((self.artifacts / "bases").glob("*.safetensors"))
                if self.backbone.name == "residual-tiny" and shipped_basis_path().is_file():
                    paths.append(shipped_basis_path())
                for p in paths:
                    try:
                        b = Basis.load(p)
                    except ResidualError as exc:
                        logger.warning("skipping basis %s: %s", p, exc)
                        continue
                    if b.weights_id == self.backbone.weights_id:
                        bases[b.hash] = b
                self._bases = bases
            return self._bases

    def _basis_for(self, basis_hash: str) -> Basis:
        basis = self._load_bases().get(basis_hash)
        if basis is None:  # a worker may have written a new basis ("fit-on-train") since the last scan
            basis = self._load_bases(refresh=True).get(basis_hash)
        if basis is None:
            raise NotFound(f"the basis {basis_hash} of this coefficient set is not available")
        return basis

    def any_basis(self) -> Basis | None:
        """Some basis of the serving model (coarse/linear sets only need its geometry)."""
        return next(iter(self._load_bases().values()), None)

    def resolve_coefficients(self, ref: str) -> LoadedCoefficients:
        """``name`` (its active version) or ``name@version`` -> loaded, validated and fused."""
        name, _, version = ref.partition("@")
        if not ID_PATTERN.fullmatch(name) or (version and not _VERSION.fullmatch(version)):
            raise InvalidRequest(f"coefficients {ref!r} must be NAME or NAME@VERSION "
                                 "(NAME: lowercase letters, digits, '-' and '_', at most 64)")
        folder = self.artifacts / "coefficients" / name
        if not version:
            active = folder / "ACTIVE"
            if not active.is_file():
                raise NotFound(f"unknown coefficient set {name!r}")
            version = active.read_text().strip()
        full_ref = f"{name}@{version}"
        with self._lock:
            hit = self._coefficients.get(full_ref)
        if hit is not None:
            return hit
        path = folder / f"{version}.safetensors"
        if not path.is_file():
            raise NotFound(f"unknown coefficient set version {full_ref!r}")
        cs = CoefficientSet.load(path)
        if cs.weights_id != self.backbone.weights_id:
            raise InvalidRequest(f"coefficient set {full_ref} was fitted on other model weights ({cs.weights_id})")
        basis = self._basis_for(cs.basis_hash) if cs.basis_hash else self.any_basis()
        if basis is None:
            raise NotFound("no basis of the serving model is available")
        fused = fuse(resolve(cs, basis), self.ln)
        loaded = LoadedCoefficients(full_ref, cs, fused)
        with self._lock:
            self._coefficients[full_ref] = loaded
        if self._on_loaded is not None:
            self._on_loaded()
        logger.info("loaded coefficient set %s (%s, %d parameters)", full_ref, cs.variant, cs.n_parameters)
        return loaded
