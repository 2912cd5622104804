"""Basis jobs (``POST /bases``): a streaming per-unit PCA over a dataset, a world task's train split or the world's
reference mixture, published as ``bases/<id>.safetensors``.

Images are decoded (or rendered) and extracted ``sources.CHUNK`` at a time, so memory holds one chunk and progress
moves from the first one (``images``, ``total``); a cancel flag is honoured between chunks and nothing is written.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch

from residual import LinearisedLN
from residual.basis import basis_from_units
from residual.decomposition import decompose
from service import sources, tracing
from service.jobs.context import JobContext, job
from service.jobs.specs import BasisJob

__all__ = ["run"]


def _run(ctx: JobContext, spec: BasisJob) -> dict[str, Any]:
    bb = ctx.backbone()
    ln = LinearisedLN(bb)
    chunks, total, source = sources.basis_chunks(spec.source, bb, ctx.artifacts.datasets_dir, spec.max_images)
    ctx.progress(phase="building basis", fraction=0.0, images=0, total=total)
    done = 0

    def unit_batches() -> Iterator[torch.Tensor]:
        nonlocal done
        for pixels in chunks:
            ctx.check_cancelled("while building the basis")
            yield decompose(bb, pixels, ln).units  # (n, U, d)
            done += int(pixels.shape[0])
            ctx.progress(phase="building basis", fraction=round(done / total, 3), images=done, total=total)

    with tracing.span("build basis", {"residual.images": total}):
        basis = basis_from_units(bb, unit_batches(), source=source, name=spec.name)
    info = ctx.bases(bb).save(basis)
    ctx.progress(phase="done", fraction=1.0, images=done, total=total)
    return {"basis": info.public()}


run = job(_run, BasisJob)
"""The RQ entry point (``service.jobs.basis.run``)."""
