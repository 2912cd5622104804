"""The artifact store: one volume shared by every API replica and worker (ReadWriteMany in Kubernetes).

It owns the layout and the ACTIVE pointers; no other module builds these paths::

    label_sets/<label_set_id>.json                  {"classes": [...], "templates": [...]}
    coefficients/<name>/<version>.safetensors       coefficient sets (residual.CoefficientSet)
    coefficients/<name>/drift/<version>.safetensors the version's training statistics (drift against its data)
    coefficients/<name>/ACTIVE                      the version served for plain ``name``
    coefficients/<name>/.lock                       flock taken while ACTIVE is compared and set
    bases/<basis id>.safetensors                    bases written here (any other *.safetensors is read too: a
                                                    basis built elsewhere; the embedded model's ships with the
                                                    package)
    bases/.world.lock                               held while the world basis is built (one build per volume)
    datasets/<dataset_id>/                          uploaded datasets (service.stores.datasets)
    features/<key>-<weights>.safetensors            cached raw features of a dataset (worker)
    jobs/<job_id>.json                              the result of a succeeded job (outlives Redis refusing it)

Every file is published with :func:`residual.io.atomic_write` (uuid temporary name, fsync, rename), so readers
in other pods see the old or the new file, never a part, and two writers never share a temporary file.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from safetensors import SafetensorError, safe_open

from residual.io import atomic_write
from service.errors import InvalidRequest, NotFound

__all__ = ["ANY", "ID_PATTERN", "VERSION_PATTERN", "ArtifactStore", "check_name"]

logger = logging.getLogger(__name__)

ID_PATTERN = re.compile(r"^[a-z0-9][a-z0-9_-]{0,63}$")
VERSION_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_LABEL_SET = re.compile(r"^ls-[0-9a-f]{20}$")
_JOB_ID = re.compile(r"^[A-Za-z0-9-]{1,64}$")


class _Any:
    def __repr__(self) -> str:
        return "ANY"


ANY: Any = _Any()
"""``expected`` value of :meth:`ArtifactStore.activate` that means: whatever is active now."""


class ArtifactStore:
    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)

    # ---- layout -----------------------------------------------------------------------------------------------
    @property
    def bases_dir(self) -> Path:
        return self.root / "bases"

    @property
    def datasets_dir(self) -> Path:
        return self.root / "datasets"

    def features_path(self, key: str, weights_id: str) -> Path:
        return self.root / "features" / f"{key}-{weights_id.replace(':', '_')}.safetensors"

    def coefficient_dir(self, name: str) -> Path:
        check_name(name)
        return self.root / "coefficients" / name

    def drift_reference_path(self, name: str, version: str) -> Path:
        """The per-unit statistics of a version's training images (``residual.drift.DriftReference``), written by
        its fit: ``coefficients/<name>/drift/<version>.safetensors`` (a subfolder: never listed as a version)."""
        return self.coefficient_dir(name) / "drift" / self.coefficient_path(name, version).name

    def coefficient_path(self, name: str, version: str) -> Path:
        if not VERSION_PATTERN.fullmatch(version):
            raise InvalidRequest(f"version {version!r} must match {VERSION_PATTERN.pattern}")
        return self.coefficient_dir(name) / f"{version}.safetensors"

    # ---- job results --------------------------------------------------------------------------------------------
    def write_job_result(self, job_id: str, result: dict[str, Any]) -> None:
        """Best effort (a full volume is logged, not raised: the job's own work is done)."""
        if not _JOB_ID.fullmatch(job_id):
            return
        try:
            atomic_write(self.root / "jobs" / f"{job_id}.json", json.dumps(result).encode())
        except OSError as exc:
            logger.warning("result of job %s not recorded in the artifact store: %s", job_id, exc)

    def job_result(self, job_id: str) -> dict[str, Any] | None:
        if not _JOB_ID.fullmatch(job_id):
            return None
        try:
            data = json.loads((self.root / "jobs" / f"{job_id}.json").read_text())
        except (FileNotFoundError, ValueError):
            return None
        return data if isinstance(data, dict) else None

    # ---- label sets -------------------------------------------------------------------------------------------
    def write_label_set(self, ident: str, classes: list[str], templates: list[str]) -> None:
        path = self.root / "label_sets" / f"{ident}.json"
        if not path.is_file():  # content-addressed: an existing file already holds exactly this
            atomic_write(path, json.dumps({"classes": classes, "templates": templates}).encode())

    def read_label_set(self, ident: str) -> tuple[list[str], list[str]]:
        if not _LABEL_SET.fullmatch(ident):
            raise InvalidRequest(f"label_set_id {ident!r} is not a label-set id (ls- followed by 20 hex digits)")
        path = self.root / "label_sets" / f"{ident}.json"
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError as exc:
            raise NotFound(f"unknown label set {ident}") from exc
        return list(data["classes"]), list(data["templates"])

    # ---- coefficient sets -------------------------------------------------------------------------------------
    def names(self) -> list[str]:
        root = self.root / "coefficients"
        if not root.is_dir():
            return []
        return sorted(p.name for p in root.iterdir() if p.is_dir() and ID_PATTERN.fullmatch(p.name))

    def versions(self, name: str) -> list[dict[str, Any]]:
        """Versions, oldest first, with the metadata of each file; an unreadable file is listed with ``error``."""
        folder = self.coefficient_dir(name)
        files = sorted(folder.glob("*.safetensors"), key=_mtime) if folder.is_dir() else []
        out = []
        for f in files:
            if not VERSION_PATTERN.fullmatch(f.stem):
                continue
            try:
                with safe_open(str(f), framework="pt") as fh:
                    meta = json.loads((fh.metadata() or {}).get("residual", "{}"))
            except (SafetensorError, OSError, ValueError) as exc:
                out.append({"version": f.stem, "error": f"unreadable coefficient file: {type(exc).__name__}"})
                continue
            out.append({"version": f.stem, "meta": meta})
        return out

    def version_meta(self, name: str, version: str) -> dict[str, Any] | None:
        """The metadata of one version (None when it is missing or unreadable)."""
        try:
            with safe_open(str(self.coefficient_path(name, version)), framework="pt") as fh:
                meta = json.loads((fh.metadata() or {}).get("residual", "{}"))
        except (SafetensorError, OSError, ValueError, InvalidRequest):
            return None
        return meta if isinstance(meta, dict) else None

    def active(self, name: str) -> str | None:
        try:
            return (self.coefficient_dir(name) / "ACTIVE").read_text().strip() or None
        except FileNotFoundError:
            return None

    @contextlib.contextmanager
    def _locked(self, name: str) -> Iterator[None]:
        with self.lock(self.coefficient_dir(name) / ".lock"):
            yield

    @staticmethod
    @contextlib.contextmanager
    def lock(path: Path) -> Iterator[None]:
        """An exclusive lock shared by every process and pod on the volume (flock of ``path``)."""
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a+b") as fh:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh.fileno(), fcntl.LOCK_UN)

    def basis_path(self, basis_id: str) -> Path:
        """Where ``POST /bases`` and the service write a basis: ``bases/<id>.safetensors``."""
        return self.bases_dir / f"{basis_id}.safetensors"

    def activate(self, name: str, version: str, expected: str | None = ANY) -> bool:
        """Make ``version`` the active one; with ``expected``, only if the active version is still that one.

        Compare and set under an exclusive lock of the name, so two pods activating at once never interleave a
        read and a write. Returns whether ACTIVE now names ``version`` because of this call.
        """
        if not self.coefficient_path(name, version).is_file():
            raise NotFound(f"coefficient set {name!r} has no version {version!r}")
        with self._locked(name):
            if expected is not ANY and self.active(name) != expected:
                return False
            atomic_write(self.coefficient_dir(name) / "ACTIVE", version.encode())
            return True


def check_name(name: str) -> str:
    if not ID_PATTERN.fullmatch(name):
        raise InvalidRequest(f"name {name!r} must match {ID_PATTERN.pattern}")
    return name


def _mtime(p: Path) -> float:
    try:
        return p.stat().st_mtime
    except FileNotFoundError:
        return 0.0
