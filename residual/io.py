"""The one way tensors enter and leave the library: safetensors files with JSON metadata in the header.

No pickle: ``load_tensors`` refuses anything that is not a safetensors file.
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from residual.errors import ArtifactError, NonFiniteCoefficientsError

__all__ = ["atomic_write", "load_tensors", "save_tensors", "tensors_hash"]

_META_KEY = "residual"


def tensors_hash(tensors: dict[str, torch.Tensor]) -> str:
    """Content hash of named tensors (names, dtypes, shapes, bytes): ``sha256:<16 hex>``."""
    h = hashlib.sha256()
    for name, t in sorted(tensors.items()):
        t = t.detach().to("cpu").contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return "sha256:" + h.hexdigest()[:16]


def atomic_write(path: str | os.PathLike[str], write: bytes | Callable[[Path], None]) -> Path:
    """Publish a file atomically, safe for many processes and pods sharing one volume.

    The content goes to a temporary file in the same folder with a random (uuid4) name, never a pid (every
    container is pid 1) nor a fixed name, is fsynced, then renamed over ``path``, and the folder is fsynced. A
    reader sees the old file or the new one, never a partial one; two writers of the same path never touch each
    other's temporary file (the last rename wins). ``write`` is the bytes, or a function that writes the given
    temporary path.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        if isinstance(write, bytes):
            with open(tmp, "wb") as f:
                f.write(write)
        else:
            write(tmp)
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    try:
        dfd = os.open(path.parent, os.O_RDONLY)
    except OSError:  # some filesystems refuse to open folders; the rename is still atomic
        return path
    try:
        os.fsync(dfd)
    except OSError:
        pass
    finally:
        os.close(dfd)
    return path


def save_tensors(path: str | os.PathLike[str], tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    """Write atomically (:func:`atomic_write`: uuid temporary file, fsync, rename)."""
    clean = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    atomic_write(path, lambda tmp: save_file(clean, str(tmp),
                                             metadata={_META_KEY: json.dumps(meta, sort_keys=True)}))


def load_tensors(path: str | os.PathLike[str], check_finite: bool = True) -> tuple[dict[str, torch.Tensor],
                                                                                    dict[str, Any]]:
    """Read a file written by :func:`save_tensors`; raise :class:`ArtifactError` on anything else."""
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ArtifactError(f"{path}: only .safetensors files are accepted (no pickle)")
    try:
        with safe_open(str(path), framework="pt") as f:
            raw_meta = (f.metadata() or {}).get(_META_KEY)
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open has no __iter__
    except (SafetensorError, OSError, ValueError) as exc:
        raise ArtifactError(f"{path}: not a readable safetensors file ({exc})") from exc
    if raw_meta is None:
        raise ArtifactError(f"{path}: no '{_META_KEY}' metadata in the safetensors header")
    try:
        meta = json.loads(raw_meta)
    except json.JSONDecodeError as exc:
        raise ArtifactError(f"{path}: metadata is not JSON ({exc})") from exc
    if check_finite:
        for name, t in tensors.items():
            if t.is_floating_point() and not torch.isfinite(t).all():
                raise NonFiniteCoefficientsError(f"{path}: tensor {name!r} holds NaN or Inf values")
    return tensors, meta
