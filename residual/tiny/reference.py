"""The reference basis of the embedded model: per-unit PCA on a documented set of world images.

Reference set: ``REFERENCE_SIZE`` images drawn from the training distribution of the world (``sample_scene``
with no attribute pinned: 60 % single objects, 20 % digits, 20 % multi-object scenes), scene seed
``REFERENCE_SEED``, pixel-noise seed ``REFERENCE_SEED``. The basis of the shipped weights ships next to them
(``residual/weights/residual-tiny.basis.safetensors``); for other weights it is built on first use (about a
minute on 2 CPU cores) and cached under ``cache_dir``.

    python -m residual.tiny.reference            # rebuild the shipped basis
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch

from residual.backbone import EMBEDDED_MODELS, Backbone, load_backbone, shipped_basis_path
from residual.basis import Basis, fit_basis
from residual.tiny import world

__all__ = ["REFERENCE_SEED", "REFERENCE_SIZE", "reference_basis", "reference_batches", "reference_images",
           "reference_source", "shipped_basis_path"]

logger = logging.getLogger(__name__)

REFERENCE_SIZE = 10_000
REFERENCE_SEED = 20_241_101
_CHUNK = 500


def reference_source(n: int = REFERENCE_SIZE) -> dict[str, object]:
    return {"kind": "world", "distribution": "sample_scene (training mixture)", "n": n, "seed": REFERENCE_SEED}


def reference_batches(bb: Backbone, n: int = REFERENCE_SIZE) -> Iterator[torch.Tensor]:
    """The first ``n`` images of the reference set as pixel batches of the model's input size."""
    rng = np.random.default_rng(REFERENCE_SEED)
    for i in range(0, n, _CHUNK):
        scenes = [world.sample_scene(rng) for _ in range(min(_CHUNK, n - i))]
        images = world.render_batch(scenes, side=world.NATIVE_SIDE, seed=REFERENCE_SEED + i)
        yield bb.pixels_from_arrays(images)  # rendered at the world's size, resized as one batch


def reference_images(n: int, side: int = 48) -> np.ndarray:
    """The first ``n`` images of the reference set, (n, side, side, 3) uint8 (same scenes and noise as the basis).

    Head analyses (TwoNN, text descriptions) use them as their sample of the reference distribution.
    """
    rng = np.random.default_rng(REFERENCE_SEED)
    chunks = []
    for i in range(0, n, _CHUNK):
        scenes = [world.sample_scene(rng) for _ in range(min(_CHUNK, REFERENCE_SIZE - i))]
        chunks.append(world.render_batch(scenes[: n - i], side=side, seed=REFERENCE_SEED + i))
    return np.concatenate(chunks)[:n]


def reference_basis(bb: Backbone, cache_dir: str | os.PathLike[str] | None = None,
                    units: Callable[[torch.Tensor], torch.Tensor] | None = None, n: int = REFERENCE_SIZE) -> Basis:
    """The shipped basis when it belongs to ``bb``'s weights, else a cached or freshly built one.

    ``units``: how a pixel batch becomes (n, U, d) units while building (see :func:`residual.basis.fit_basis`);
    ``n``: images of the reference set a freshly built basis uses (the first ``n``; the default is the full set).
    """
    candidates = [shipped_basis_path()] if bb.name in EMBEDDED_MODELS else []
    suffix = "" if n == REFERENCE_SIZE else f"-n{n}"
    cache = (Path(cache_dir) / f"{bb.name}-{bb.weights_id.replace(':', '_')}{suffix}.basis.safetensors"
             if cache_dir else None)
    if cache is not None:
        candidates.append(cache)
    for path in candidates:
        if path.is_file():
            basis = Basis.load(path)
            if basis.weights_id == bb.weights_id:
                return basis
    logger.info("building the reference basis of %s (%d world images)", bb.name, n)
    name = "world-reference" if n == REFERENCE_SIZE else f"world-reference-{n}"
    basis = fit_basis(bb, reference_batches(bb, n), source=reference_source(n), units=units, name=name)
    if cache is not None:
        basis.save(cache)
    return basis


def main() -> int:
    logging.basicConfig(level=logging.INFO)
    bb = load_backbone("residual-tiny", device="cpu")
    basis = fit_basis(bb, reference_batches(bb), source=reference_source(), name="world-reference")
    h = basis.save(shipped_basis_path())
    logger.info("wrote %s (%s)", shipped_basis_path(), h)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
