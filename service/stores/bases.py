"""Bases in the artifact store: listing, lookup by id or name, and the default basis of the served weights.

A basis is any ``residual.basis/1`` safetensors file under ``bases/`` (see
:class:`service.stores.artifacts.ArtifactStore`).
``POST /bases`` writes ``bases/<id>.safetensors``; a basis built offline (``residual spectrum --images DIR --out
FILE``) can be dropped into that folder under any file name. A basis id is ``b-`` and the 16 hex digits of the
content hash, so the same basis has the same id wherever it was built; names are human labels and need not be
unique (a name resolves to the newest basis with that name).

The default basis (``reference`` in requests, or no ``basis`` at all) follows ``RESIDUAL_REFERENCE_BASIS``:

- an id or a name: that basis; 409 while it does not exist for the served weights;
- ``world``: the synthetic world's reference set, built on first use and cached. Only the operator opts in to it:
  it is the right reference distribution for the embedded model alone;
- unset: the basis that ships with the weights (``residual-tiny``), else the newest basis in the store for the
  served weights, else none: every route built on a basis answers 409 and says how to build one (``POST /bases``).

Listing reads safetensors headers and each file's eigenvalues only (cached by path, size and mtime); loaded bases
are kept in a small LRU.
"""

from __future__ import annotations

import json
import logging
import re
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from safetensors import SafetensorError, safe_open

from residual import Basis
from residual.backbone import EMBEDDED_MODELS, Backbone, shipped_basis_path
from residual.basis import FORMAT
from residual.errors import ResidualError
from residual.heads import unit_spectra
from residual.spectral import explained_variance, k_at
from service.errors import Conflict, InvalidRequest, NotFound
from service.stores.artifacts import ArtifactStore
from service.stores.ownership import WeightsOwner, no_owner, other_model

__all__ = ["BASIS_ID", "WORLD", "BasisInfo", "BasisStore", "basis_id", "basis_units", "check_basis_name",
           "no_basis_message"]

logger = logging.getLogger(__name__)

BASIS_ID = re.compile(r"^b-[0-9a-f]{16}$")
WORLD = "world"
_LOADED_MAX = 4


def basis_id(content_hash: str) -> str:
    """``sha256:<16 hex>`` -> ``b-<16 hex>``."""
    return "b-" + content_hash.split(":", 1)[1]


def no_basis_message(bb: Backbone) -> str:
    return (f"no basis exists for the served weights ({bb.name}, {bb.weights_id}). Build one from images of the "
            "model's own domain: upload them with POST /datasets, then POST /bases {\"name\": \"...\", \"dataset\": "
            "\"<dataset id>\"} (or drop a file written by `residual spectrum --images DIR --out FILE` into the "
            "artifact store's bases/ folder). The synthetic world (RESIDUAL_REFERENCE_BASIS=world) suits the "
            "embedded model only.")


@dataclass(frozen=True)
class BasisInfo:
    basis_id: str
    name: str
    model: str
    weights_id: str
    hash: str
    source: dict[str, Any]
    n_images: int
    created_at: str  # ISO 8601, the file's modification time
    shipped: bool  # ships with the package (read-only)
    k_90: dict[str, float]  # over the heads: mean, median, min, max of k at 0.9 explained variance
    path: Path = field(repr=False)
    warnings: tuple[str, ...] = ()  # e.g. built from too few images for the components it keeps

    def public(self) -> dict[str, Any]:
        return {"basis_id": self.basis_id, "name": self.name, "model": self.model, "weights_id": self.weights_id,
                "hash": self.hash, "source": self.source, "n_images": self.n_images, "created_at": self.created_at,
                "shipped": self.shipped, "k_90": self.k_90, "warnings": list(self.warnings)}

    def ref(self) -> dict[str, Any]:
        """What a response built on this basis says of it."""
        return {"basis_id": self.basis_id, "name": self.name, "source": self.source, "n_images": self.n_images}


def _read_info(path: Path, shipped: bool) -> BasisInfo | None:
    """Header and eigenvalues only; None for files that are not bases (logged)."""
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads((f.metadata() or {}).get("residual", "{}"))
            if meta.get("format") != FORMAT:
                logger.warning("skipping %s: not a basis file (format %r)", path, meta.get("format"))
                return None
            eig = f.get_tensor("eigenvalues").double()  # (U, d)
    except (SafetensorError, OSError, ValueError, KeyError) as exc:
        logger.warning("skipping basis %s: %s", path, exc)
        return None
    g = meta["geometry"]
    heads = eig[1 + g["layers"] :]  # (L*H, d): the file's geometry is a dict here, not a Geometry
    evr = explained_variance(heads)  # (L*H, d)
    k = k_at(evr, 0.9).double()  # (L*H,)
    content_hash = meta.get("hash") or ""
    if not content_hash:  # an old file without a recorded hash: load it once to compute it
        try:
            content_hash = Basis.load(path).hash
        except ResidualError as exc:
            logger.warning("skipping basis %s: %s", path, exc)
            return None
    stat = path.stat()
    source = meta.get("source") or {}
    return BasisInfo(
        basis_id=basis_id(content_hash), name=meta.get("name") or (f"{meta['model']}-reference" if shipped
                                                   else path.name.removesuffix(".safetensors")),
        model=meta["model"], weights_id=meta["weights_id"], hash=content_hash, source=source,
        n_images=int(meta.get("n_samples", 0)),
        created_at=datetime.fromtimestamp(stat.st_mtime, UTC).isoformat(timespec="seconds"), shipped=shipped,
        k_90={"mean": round(float(k.mean()), 3), "median": float(k.median()), "min": float(k.min()),
              "max": float(k.max())},
        path=path, warnings=_warnings(int(meta.get("n_samples", 0)), int(g["out_dim"])))


MIN_IMAGES_PER_COMPONENT = 10


def _warnings(n_images: int, components: int) -> tuple[str, ...]:
    """A basis keeps up to ``components`` (the output width) components per unit; with fewer than
    MIN_IMAGES_PER_COMPONENT images for each, its trailing eigenvalues (and every k, TwoNN and fit built on them) are
    noise."""
    advised = MIN_IMAGES_PER_COMPONENT * components
    if n_images >= advised:
        return ()
    return (f"built from {n_images} images, under {MIN_IMAGES_PER_COMPONENT} per component it keeps (up to "
            f"{components} per unit): its spectra and the fits built on it are unreliable; build it from "
            f"{advised} images or more",)


class BasisStore:
    """The bases of one artifact store, seen from one served model (``bb``)."""

    def __init__(self, artifacts: ArtifactStore, bb: Backbone, default_ref: str | None = None,
                 model: str | None = None, owner: WeightsOwner = no_owner) -> None:
        self.artifacts, self.bb = artifacts, bb
        self.model = model or bb.name  # the served model's name
        self.owner = owner
        self.default_ref = default_ref or None
        self._infos: dict[Path, tuple[tuple[int, int], BasisInfo | None]] = {}
        self._loaded: OrderedDict[str, Basis] = OrderedDict()
        self._lock = threading.Lock()

    @property
    def world_opt_in(self) -> bool:
        return self.default_ref == WORLD

    # ---- listing ------------------------------------------------------------------------------------------------
    def infos(self, all_weights: bool = False) -> list[BasisInfo]:
        """Newest first; only the served weights' bases unless ``all_weights``. Blocking (file headers)."""
        paths = [(p, False) for p in self.artifacts.bases_dir.glob("*.safetensors")]
        if self.bb.name in EMBEDDED_MODELS and shipped_basis_path(self.bb.name).is_file():
            paths.append((shipped_basis_path(self.bb.name), True))
        seen: dict[str, BasisInfo] = {}
        with self._lock:
            for path, is_shipped in paths:
                try:
                    st = path.stat()
                except FileNotFoundError:  # replaced or removed by another pod meanwhile
                    continue
                key = (st.st_size, st.st_mtime_ns)
                cached = self._infos.get(path)
                if cached is None or cached[0] != key:
                    cached = (key, _read_info(path, is_shipped))
                    self._infos[path] = cached
                info = cached[1]
                if info is None or (not all_weights and info.weights_id != self.bb.weights_id):
                    continue
                if info.basis_id not in seen or info.shipped:  # one row per basis; the shipped copy wins
                    seen[info.basis_id] = info
        return sorted(seen.values(), key=lambda i: (i.created_at, i.basis_id), reverse=True)

    def find(self, ref: str) -> BasisInfo:
        """A basis by id or name (the newest with that name); 404 unknown, 409 fitted on other weights."""
        if not ref or len(ref) > 128:
            raise InvalidRequest("a basis is named by its id (b-<16 hex>) or its name")
        everything = self.infos(all_weights=True)
        match = [i for i in everything if i.basis_id == ref] if BASIS_ID.fullmatch(ref) else \
            [i for i in everything if i.name == ref]
        mine = [i for i in match if i.weights_id == self.bb.weights_id]
        if mine:
            return mine[0]
        if match:
            raise other_model(f"basis {ref!r}", match[0].weights_id, self.owner, self.model, self.bb.weights_id)
        raise NotFound(f"unknown basis {ref!r} (GET /bases lists them)")

    def by_hash(self, content_hash: str) -> BasisInfo | None:
        return next((i for i in self.infos() if i.hash == content_hash), None)

    # ---- the default ----------------------------------------------------------------------------------------------
    def default(self) -> BasisInfo | None:
        """The default basis as it stands now; None when there is none (or when it is the world, not built yet)."""
        if self.default_ref == WORLD:
            world = [i for i in self.infos() if i.source.get("kind") == WORLD]
            return world[0] if world else None
        if self.default_ref:
            try:
                return self.find(self.default_ref)
            except NotFound as exc:
                raise Conflict(f"RESIDUAL_REFERENCE_BASIS names {self.default_ref!r}, which is not a basis of the "
                               f"served weights ({self.bb.weights_id}) yet. {no_basis_message(self.bb)}") from exc
        mine = self.infos()
        shipped = [i for i in mine if i.shipped]
        return shipped[0] if shipped else (mine[0] if mine else None)

    def resolve(self, ref: str | None) -> BasisInfo | None:
        """``None`` / ``"reference"``: the default; else an id or a name. None means: build the world basis (the
        operator opted in and it is not built yet). 409 when there is no basis and no opt-in."""
        if ref is not None and ref != "reference":
            return self.find(ref)
        info = self.default()
        if info is None and not self.world_opt_in:
            raise Conflict(no_basis_message(self.bb))
        return info

    def default_description(self) -> dict[str, Any]:
        """For GET /bases: which basis a request without ``basis`` gets, and why."""
        try:
            info = self.default()
        except (NotFound, Conflict) as exc:
            return {"basis_id": None, "rule": f"RESIDUAL_REFERENCE_BASIS={self.default_ref}", "problem": str(exc)}
        if self.default_ref == WORLD:
            rule = "RESIDUAL_REFERENCE_BASIS=world (the synthetic world; built on first use)"
        elif self.default_ref:
            rule = f"RESIDUAL_REFERENCE_BASIS={self.default_ref}"
        elif info is not None and info.shipped:
            rule = "the basis shipped with the weights"
        else:
            rule = "the newest basis of the served weights"
        out: dict[str, Any] = {"basis_id": info.basis_id if info else None, "rule": rule}
        if info is None and not self.world_opt_in:
            out["problem"] = no_basis_message(self.bb)
        return out

    # ---- loading and saving ---------------------------------------------------------------------------------------
    def load(self, info: BasisInfo) -> Basis:
        """The basis itself (LRU of a few; blocking)."""
        with self._lock:
            hit = self._loaded.get(info.basis_id)
            if hit is not None:
                self._loaded.move_to_end(info.basis_id)
                return hit
        basis = Basis.load(info.path)
        if basis.weights_id != self.bb.weights_id:
            raise other_model(f"basis {info.basis_id}", basis.weights_id, self.owner, self.model, self.bb.weights_id)
        with self._lock:
            self._loaded[info.basis_id] = basis
            while len(self._loaded) > _LOADED_MAX:
                self._loaded.popitem(last=False)
        return basis

    def world(self, build: Callable[[], Basis]) -> BasisInfo:
        """The world basis (operator opt-in), built at most once per volume: the build holds a lock shared by every
        process and pod, and whoever waited finds the first one's file instead of building another."""
        with self.artifacts.lock(self.artifacts.bases_dir / ".world.lock"):
            info = self.default()
            if info is None:
                info = self.save(build())
        return info

    def save(self, basis: Basis) -> BasisInfo:
        """Publish ``basis`` as ``bases/<id>.safetensors`` (atomic; the same basis twice is one file)."""
        path = self.artifacts.basis_path(basis_id(basis.hash))
        basis.save(path)
        info = _read_info(path, shipped=False)
        assert info is not None
        return info

    def info_of(self, basis: Basis) -> BasisInfo | None:
        """The stored entry of an in-memory basis (None if it was never saved here)."""
        bid = basis_id(basis.hash)
        return next((i for i in self.infos() if i.basis_id == bid), None)


def basis_units(basis: Basis) -> list[dict[str, Any]]:
    """Per-unit k at 0.9 / 0.99 and the first EVR, for GET /bases/{id}."""
    return [{"unit": u.name, "k_90": r.k_90, "k_99": r.k_99, "evr_1": round(r.evr_1, 6)}
            for u, r in zip(basis.table, unit_spectra(basis, n_evr=1), strict=True)]


def check_basis_name(name: str) -> str:
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}", name):
        raise InvalidRequest(f"basis name {name!r} must be 1-64 letters, digits, '.', '_' or '-' (starting with a "
                             "letter or digit)")
    if BASIS_ID.fullmatch(name):
        raise InvalidRequest(f"basis name {name!r} looks like a basis id; choose another")
    if name in ("reference", "fit-on-train", WORLD):
        raise InvalidRequest(f"basis name {name!r} is reserved")
    return name
