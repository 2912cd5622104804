"""Head-alignment jobs (a ``POST /heads/alignment`` over ``heads_sync_max_images`` images): head scores and the
top-k ablation curve on the worker, the same report the API answers directly for smaller requests."""

from __future__ import annotations

from typing import Any

import torch

from residual import LinearisedLN, class_embeddings, extract, project_units
from service import sources
from service.analysis import alignment_report
from service.jobs.context import JobContext, job
from service.jobs.specs import HeadAlignmentJob

__all__ = ["run"]


def _run(ctx: JobContext, spec: HeadAlignmentJob) -> dict[str, Any]:
    bb = ctx.backbone()
    ln = LinearisedLN(bb)
    info, basis = ctx.resolve_basis(bb, spec.basis)
    ctx.progress(phase="decoding", fraction=0.0)
    s_pix, s_lab, e_pix, e_lab, split = sources.alignment_data(spec.source, bb, ctx.artifacts.datasets_dir)
    total = s_pix.shape[0] + (e_pix.shape[0] if e_pix is not None else 0)
    done = 0

    def units(pixels: torch.Tensor) -> torch.Tensor:
        """(n, 3, S, S) -> (n, U, d), a chunk at a time."""
        nonlocal done
        parts = []
        for i in range(0, pixels.shape[0], sources.CHUNK):
            ctx.check_cancelled("while extracting features")
            raw, _ = extract(bb, pixels[i : i + sources.CHUNK].to(bb.device))
            parts.append(project_units(raw, ln).float().cpu())
            done += min(sources.CHUNK, pixels.shape[0] - i)
            ctx.progress(phase="extracting features", fraction=round(done / total, 3))
        return torch.cat(parts)

    s_units = units(s_pix)
    e_units = units(e_pix) if e_pix is not None else None
    cls = class_embeddings(bb.encode_text, bb.tokenizer, spec.classes, spec.templates, device=bb.device)
    ctx.progress(phase="scoring heads", fraction=1.0)
    report = alignment_report(s_units, s_lab, e_units, e_lab, cls.cpu(), bb, spec.classes, spec.label_set_id,
                              sources.source_name(spec.source), spec.params.model_dump(), split, basis, info.ref(),
                              spec.model)
    ctx.progress(phase="done", fraction=1.0)
    return report


run = job(_run, HeadAlignmentJob)
"""The RQ entry point (``service.jobs.alignment.run``)."""
