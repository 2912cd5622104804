"""Fit jobs (``POST /fit-alignment``): features once per (source, weights), the fit, a coefficient-set version.

1. Raw per-head features of every split, decoded (or rendered) and extracted ``sources.CHUNK`` images at a time,
   cached in the artifact store per (source, weights): a refit on the same data extracts nothing.
2. The basis: the one the spec names (``reference``: the default), or a PCA of the training split's own units
   (``fit-on-train``), published in the store.
3. The fit (library ``residual.fitting``), polling the cancel flag between batches and reporting progress per epoch;
   ``"variant": "auto"`` fits coarse, fine, full and linear on the same features and keeps the best on validation
   (ties: fewer parameters), with the table of all four in the report (``variants``).
4. The version: ``v-`` + 12 hex of :meth:`residual.CoefficientSet.identity` (lambdas, label set, variant, basis,
   add_mean, weights), written atomically unless an identical version exists (then the result says so and no
   report is attached to a file this job did not write), and activated only if the name's ACTIVE is still what it
   was when the job started (compare and set under the name's lock: a rollback made during the fit wins).
"""

from __future__ import annotations

import logging
import time
from typing import Any

import torch

from residual import Backbone, LinearisedLN, RawFeatures, class_embeddings, extract_batched, fit
from residual.basis import Basis, basis_from_units
from residual.decomposition import project_units
from residual.drift import DriftReference
from residual.fitting import FitResult
from residual.io import load_tensors, save_tensors
from service import sources, tracing
from service.jobs.context import JobContext, job
from service.jobs.metrics import FEATURE_CACHE, FIT_SECONDS
from service.jobs.specs import FitJob
from service.stores.artifacts import ArtifactStore

__all__ = ["run"]

logger = logging.getLogger(__name__)

Split = tuple[RawFeatures, torch.Tensor]
AUTO_VARIANTS = ("coarse", "fine", "full", "linear")
"""What ``"variant": "auto"`` fits, in this order, keeping the best on validation."""


def _features(ctx: JobContext, bb: Backbone, spec: FitJob) -> dict[str, Split]:
    """Raw features and labels per split ("train", and "val"/"test" for world tasks); cached on disk."""
    cache = ctx.artifacts.features_path(sources.feature_key(spec.source), bb.weights_id)
    if cache.is_file():
        tensors, meta = load_tensors(cache)
        ctx.progress(phase="extracting features", fraction=1.0, feature_cache="hit")
        FEATURE_CACHE.labels(result="hit").inc()
        return {split: (RawFeatures(tensors[f"{split}.emb"], tensors[f"{split}.mlp"], tensors[f"{split}.heads"],
                                    tensors[f"{split}.pre_ln"]), tensors[f"{split}.labels"])
                for split in meta["splits"]}
    FEATURE_CACHE.labels(result="miss").inc()
    splits = sources.split_chunks(spec.source, bb, ctx.artifacts.datasets_dir)
    total = sum(n for _, n, _ in splits.values())
    phase = "rendering" if isinstance(spec.source, sources.WorldTaskSource) else "extracting features"
    ctx.progress(phase=phase, fraction=0.0, feature_cache="miss")
    out: dict[str, Split] = {}
    done = 0
    for split, (labels, _, chunks) in splits.items():
        parts = []
        for pixels in chunks:  # one chunk of pixels in memory at a time; progress from the first chunk
            ctx.check_cancelled("while extracting features")
            parts.append(extract_batched(bb, pixels)[0].to("cpu"))
            done += int(pixels.shape[0])
            ctx.progress(phase=phase, fraction=round(done / max(1, total), 3))
        out[split] = (RawFeatures.cat(parts), labels)
    tensors = {}
    for split, (raw, split_labels) in out.items():
        tensors |= {f"{split}.emb": raw.emb, f"{split}.mlp": raw.mlp, f"{split}.heads": raw.heads,
                    f"{split}.pre_ln": raw.pre_ln, f"{split}.labels": split_labels}
    save_tensors(cache, tensors, {"splits": list(out), "weights_id": bb.weights_id})
    return out


def _basis_on(bb: Backbone, raw: RawFeatures, ln: LinearisedLN, spec: FitJob) -> Basis:
    """The per-unit PCA of the task's own training images, from the cached raw features."""
    batches = (project_units(raw.select(slice(i, i + 512)).to(ln.proj.device), ln) for i in range(0, len(raw), 512))
    src = spec.source
    if isinstance(src, sources.WorldTaskSource):
        source: dict[str, Any] = {"kind": "world-task", "task": src.task, "split": "train"}
        name = f"fit-on-train-world-{src.task}"
    else:
        source, name = {"kind": "dataset", "dataset": src.dataset_id}, f"fit-on-train-{src.dataset_id}"
    return basis_from_units(bb, batches, source={**source, "fit_on_train": True, "n": len(raw)}, name=name)


def _save_drift_reference(artifacts: ArtifactStore, name: str, version: str, basis: Basis, raw: RawFeatures,
                          ln: LinearisedLN) -> None:
    """The per-unit statistics of the training images in the set's basis: GET /drift?coefficients= compares live
    traffic with the data the set was fitted on (best effort: a failure here does not fail the fit)."""
    try:
        batches = (project_units(raw.select(slice(i, i + 512)).to(ln.proj.device), ln).float().cpu()
                   for i in range(0, len(raw), 512))
        reference = DriftReference.from_units(basis, batches)
        save_tensors(artifacts.drift_reference_path(name, version), reference.tensors(),
                     {"basis_hash": basis.hash, "n_images": len(raw)})
    except Exception:  # noqa: BLE001 - drift is an extra; the version itself is written
        logger.exception("drift statistics of %s@%s not written", name, version)


def _activate(artifacts: ArtifactStore, spec: FitJob, version: str, expected: str | None) -> tuple[bool, str]:
    """Activate the fitted version if the job asks for it and nobody changed ACTIVE since the job started."""
    if not spec.activate:
        return False, "not requested (activate: false)"
    if artifacts.activate(spec.name, version, expected=expected):
        return True, "activated"
    now = artifacts.active(spec.name)
    logger.info("fit of %s: %s not activated; the active version changed from %s to %s during the job", spec.name,
                version, expected, now)
    return False, f"the active version changed during the job (from {expected} to {now}); activate it explicitly"


def _run(ctx: JobContext, spec: FitJob) -> dict[str, Any]:
    started = time.perf_counter()
    artifacts = ctx.artifacts
    active_at_start = artifacts.active(spec.name)  # activation later only if this is still the active version
    ctx.progress(active_at_start=active_at_start)
    bb = ctx.backbone()
    ln = LinearisedLN(bb)
    with tracing.span("extract features", {"residual.source": sources.source_name(spec.source)}):
        data = _features(ctx, bb, spec)
    extract_s = time.perf_counter() - started
    if spec.basis == "fit-on-train":
        ctx.progress(phase="fitting basis")
        info = ctx.bases(bb).save(_basis_on(bb, data["train"][0], ln, spec))
        basis = ctx.bases(bb).load(info)
    else:
        ctx.progress(phase="reference basis")
        info, basis = ctx.resolve_basis(bb, spec.basis)
    cls = class_embeddings(bb.encode_text, bb.tokenizer, spec.classes, spec.templates, device=bb.device)
    variants = AUTO_VARIANTS if spec.variant == "auto" else (spec.variant,)
    results: list[FitResult] = []
    table: list[dict[str, Any]] = []
    for i, variant in enumerate(variants):  # "auto": the four on the same features, extracted once

        def progress(p: dict[str, Any], i: int = i, variant: str = variant) -> None:
            ctx.progress(phase="fitting", fraction=round((i + p["epoch"] / p["max_epochs"]) / len(variants), 3),
                         epoch=p["epoch"], val_accuracy=p["val_accuracy"], best_val_accuracy=p["best_val_accuracy"],
                         **({"variant": variant, "variants_done": i} if len(variants) > 1 else {}))

        ctx.progress(phase="fitting", fraction=round(i / len(variants), 3))
        fit_started = time.perf_counter()
        with tracing.span(f"fit {variant}", {"residual.variant": variant}) as span:
            results.append(fit(data["train"], cls, bb.logit_scale, basis, ln, spec.classes, spec.templates,
                               spec.hyperparameters.config(variant), val=data.get("val"), test=data.get("test"),
                               progress=progress, should_stop=ctx.cancelled))
            if span is not None:
                span.set_attributes({"residual.epochs": int(results[-1].report.get("epochs", 0) or 0),
                                     "residual.val_accuracy": float(results[-1].report["val_accuracy"])})
        rep = results[-1].report
        table.append({"variant": variant, "parameters": results[-1].coefficients.n_parameters,
                      "val_accuracy": rep["val_accuracy"], "test_accuracy": rep.get("test_accuracy"),
                      "seconds": round(time.perf_counter() - fit_started, 3)})
    # the best on validation; ties go to fewer parameters
    result = max(zip(results, table, strict=True), key=lambda rt: (rt[1]["val_accuracy"], -rt[1]["parameters"]))[0]
    cs = result.coefficients
    cs.report = {**result.report, "feature_extraction_s": round(extract_s, 3),
                 "total_wall_time_s": round(time.perf_counter() - started, 3),
                 "dataset": sources.source_name(spec.source), "basis": info.ref(), "job_id": ctx.job_id}
    if spec.variant == "auto":
        cs.report |= {"variants": table, "variant_choice": "auto: the best validation accuracy of coarse, fine, "
                                                          "full and linear on the same features; ties go to fewer "
                                                          "parameters"}
    # the version is the identity of everything that changes the set's answers (lambdas, label set, variant,
    # basis, add_mean, weights): a refit that changes only the templates is a new version
    version = "v-" + cs.identity().split(":")[1][:12]
    path = artifacts.coefficient_path(spec.name, version)
    written = not path.exists()
    if written:
        cs.save(path)  # atomic: uuid temporary file, fsync, rename
        _save_drift_reference(artifacts, spec.name, version, basis, data["train"][0], ln)
    activated, why = _activate(artifacts, spec, version, active_at_start)
    ctx.progress(phase="done", fraction=1.0)
    FIT_SECONDS.labels(variant=spec.variant).observe(time.perf_counter() - started)
    report = {k: v for k, v in cs.report.items() if k != "history"}
    out = {"coefficients": f"{spec.name}@{version}", "activated": activated, "activation": why,
           "basis": info.ref(), "written": written, "report": report}
    if not written:  # the stored file keeps the report of the job that wrote it
        out["identical_to"] = version
        out["message"] = (f"identical to {spec.name}@{version}, which already exists (same lambdas, label set, "
                          "variant, basis and weights); nothing was written, and the stored version keeps the "
                          "report of the job that wrote it")
    return out


run = job(_run, FitJob)
"""The RQ entry point (``service.jobs.fit.run``)."""
