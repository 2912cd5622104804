"""The one way tensors enter and leave the library: safetensors files with JSON metadata in the header.

No pickle: ``load_tensors`` refuses anything that is not a safetensors file.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from residual.errors import ArtifactError, NonFiniteCoefficientsError

__all__ = ["load_tensors", "save_tensors", "tensors_hash"]

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


def save_tensors(path: str | os.PathLike[str], tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    """Write atomically (temporary file in the same folder, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    clean = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    save_file(clean, str(tmp), metadata={_META_KEY: json.dumps(meta, sort_keys=True)})
    os.replace(tmp, path)


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
