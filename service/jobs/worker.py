"""The training worker: ``residual-worker`` runs RQ workers (JSON serializer only) that execute alignment fits.

Pipeline of one job (``run_fit``): decode the dataset and extract raw per-head features 256 images at a time,
once per (dataset, model weights), and cache them in the artifact store, fit with the library, write the
coefficient set atomically (uuid temporary file, fsync, rename) under
``coefficients/<name>/<version>.safetensors`` and, when the job asks for it, make it the active version, but only
if the name's active version is still the one recorded when the job started (compare and set under the name's
lock: a rollback made during the fit wins).
Progress goes to the job's meta (phase, fraction, epoch, validation accuracy); ``DELETE /fit-alignment/{id}``
sets a cancel flag that the fit polls between batches. ``run_basis`` builds a basis (``POST /bases``) and
``run_head_alignment`` scores heads for a large ``POST /heads/alignment``.
"""

from __future__ import annotations

import argparse
import json
import logging
import threading
import time
from collections.abc import Iterator
from typing import Any

import redis
import torch
from prometheus_client import start_http_server
from rq import Queue, SimpleWorker, get_current_job
from rq.serializers import JSONSerializer
from rq.worker import WorkerStatus

from residual import (
    Backbone,
    FitCancelledError,
    FitConfig,
    LinearisedLN,
    RawFeatures,
    class_embeddings,
    extract,
    extract_batched,
    fit,
    load_backbone,
)
from residual.basis import Basis, basis_from_units
from residual.decomposition import decompose, project_units
from residual.io import load_tensors, save_tensors
from residual.tiny import tasks
from residual.tiny.reference import REFERENCE_SIZE, reference_basis, reference_batches, reference_source
from service.artifacts import ArtifactStore
from service.bases import BasisInfo, BasisStore
from service.cache import queue_policy_warning
from service.datasets import decoded_chunks, spread
from service.heads import alignment_report, load_alignment_data
from service.settings import Settings, get_settings
from service.worker_metrics import FEATURE_CACHE, FIT_SECONDS, JOBS_DONE

__all__ = ["QUEUE_NAME", "cancel_key", "main", "run_basis", "run_fit", "run_head_alignment"]

logger = logging.getLogger(__name__)

QUEUE_NAME = "residual-fit"
_BACKBONES: dict[str, Backbone] = {}



def cancel_key(job_id: str) -> str:
    return f"residual:cancel:{job_id}"


def _backbone(s: Settings) -> Backbone:
    key = f"{s.model_name}|{s.model_weights}"
    if key not in _BACKBONES:
        device = None if s.device == "auto" else s.device
        _BACKBONES[key] = load_backbone(s.model_name, s.model_weights, device=device, precision=s.precision)
    return _BACKBONES[key]


def _progress(**fields: Any) -> None:
    """Best effort: a Redis outage must not fail the fit (the result is written once Redis is back)."""
    job = get_current_job()
    if job is None:
        return
    try:
        job.get_meta(refresh=True)
        job.meta.setdefault("progress", {}).update(fields)
        job.save_meta()
    except (redis.RedisError, OSError) as exc:
        logger.warning("progress of job %s not saved (%s); the fit goes on", job.id, type(exc).__name__)


def _features(bb: Backbone, s: Settings, spec: dict[str, Any]) -> dict[str, tuple[RawFeatures, torch.Tensor]]:
    """Raw features and labels per split ("train", and "val"/"test" for world tasks); cached on disk."""
    artifacts = ArtifactStore(s.artifact_dir)
    if spec.get("world"):
        w = spec["world"]
        key = f"world-{w['task']}-{w['train']}-{w['val']}-{w['test']}"
    else:
        key = spec["dataset_id"]
    cache = artifacts.features_path(key, bb.weights_id)
    if cache.is_file():
        tensors, meta = load_tensors(cache)
        _progress(phase="extracting features", fraction=1.0, feature_cache="hit")
        FEATURE_CACHE.labels(result="hit").inc()
        return {split: (RawFeatures(tensors[f"{split}.emb"], tensors[f"{split}.mlp"], tensors[f"{split}.heads"],
                                    tensors[f"{split}.pre_ln"]), tensors[f"{split}.labels"])
                for split in meta["splits"]}
    FEATURE_CACHE.labels(result="miss").inc()
    out: dict[str, tuple[RawFeatures, torch.Tensor]] = {}
    if spec.get("world"):
        # rendered at the world's own size 256 images at a time, resized to the model's input as one batch and
        # extracted right away: progress moves from the first chunk, memory holds one chunk of pixels
        w = spec["world"]
        total = sum(int(w[split]) for split in ("train", "val", "test"))
        done = 0
        _progress(phase="rendering", fraction=0.0, feature_cache="miss")
        for split in ("train", "val", "test"):
            labels, chunks = tasks.task_image_chunks(w["task"], split, n=w[split], chunk=256)
            parts = []
            for images in chunks:
                parts.append(extract_batched(bb, bb.pixels_from_arrays(images))[0].to("cpu"))
                done += len(images)
                _progress(phase="rendering", fraction=round(done / total, 3))
            out[split] = (RawFeatures.cat(parts), torch.from_numpy(labels))
        _progress(phase="extracting features", fraction=1.0)
    else:
        # decoded and extracted 256 images at a time: memory holds one chunk of pixels whatever the dataset's size
        folder = artifacts.datasets_dir / spec["dataset_id"]
        manifest = json.loads((folder / "manifest.json").read_text())
        files = manifest["files"]
        targets = [spec["class_map"][manifest["classes"][idx]] for _, idx in files]
        _progress(phase="extracting features", fraction=0.0, feature_cache="miss")
        parts, done = [], 0
        for pixels in decoded_chunks(bb.preprocess, folder, [rel for rel, _ in files]):
            parts.append(extract_batched(bb, pixels)[0].to("cpu"))
            done += int(pixels.shape[0])
            _progress(phase="extracting features", fraction=round(done / len(files), 3))
        out["train"] = (RawFeatures.cat(parts), torch.tensor(targets))
    tensors = {}
    for split, (raw, split_labels) in out.items():
        tensors |= {f"{split}.emb": raw.emb, f"{split}.mlp": raw.mlp, f"{split}.heads": raw.heads,
                    f"{split}.pre_ln": raw.pre_ln, f"{split}.labels": split_labels}
    save_tensors(cache, tensors, {"splits": list(out), "weights_id": bb.weights_id})
    return out


def run_fit(spec: dict[str, Any]) -> dict[str, Any]:
    """The RQ job: everything it needs is in ``spec`` (JSON); returns the report and the coefficient set ref."""
    started = time.perf_counter()
    try:
        result = _run_fit(spec)
    except FitCancelledError:
        JOBS_DONE.labels(status="cancelled").inc()
        raise
    except Exception:
        JOBS_DONE.labels(status="failed").inc()
        raise
    JOBS_DONE.labels(status="succeeded").inc()
    FIT_SECONDS.labels(variant=spec.get("variant", "?")).observe(time.perf_counter() - started)
    return result


def _run_fit(spec: dict[str, Any]) -> dict[str, Any]:
    s = get_settings()
    job = get_current_job()
    conn = job.connection if job is not None else None
    started = time.perf_counter()
    if job is not None and conn is not None and _flagged(conn, job.id):
        raise FitCancelledError("cancelled before it started")
    artifacts = ArtifactStore(s.artifact_dir)
    active_at_start = artifacts.active(spec["name"])  # activation later only if this is still the active version
    _progress(active_at_start=active_at_start)
    bb = _backbone(s)
    if bb.weights_id != spec["weights_id"]:
        raise RuntimeError(f"this worker serves model weights {bb.weights_id}; the job asks for {spec['weights_id']}")
    ln = LinearisedLN(bb)
    data = _features(bb, s, spec)
    extract_s = time.perf_counter() - started
    classes, templates = spec["classes"], spec["templates"]
    bases = BasisStore(artifacts, bb, s.reference_basis)
    if spec["basis"] == "fit-on-train":
        _progress(phase="fitting basis")
        basis = _basis_on(bb, data["train"][0], ln, spec)
        info = bases.save(basis)
    else:
        _progress(phase="reference basis")
        info, basis = _resolve_basis(bb, s, bases, spec["basis"])
    cls = class_embeddings(bb.encode_text, bb.tokenizer, classes, templates, device=bb.device)
    h = spec.get("hyper", {})
    cfg = FitConfig(variant=spec["variant"], lr=h.get("lr"), batch_size=h.get("batch_size", 64),
                    max_epochs=h.get("epochs", 30), patience=h.get("patience", 5),
                    evr_threshold=h.get("evr_threshold", 0.9), seed=h.get("seed", 0),
                    val_fraction=h.get("val_fraction", 0.2))

    def progress(p: dict[str, Any]) -> None:
        _progress(phase="fitting", fraction=round(p["epoch"] / p["max_epochs"], 3), epoch=p["epoch"],
                  val_accuracy=p["val_accuracy"], best_val_accuracy=p["best_val_accuracy"])

    def should_stop() -> bool:
        return conn is not None and job is not None and _flagged(conn, job.id)

    _progress(phase="fitting", fraction=0.0)
    result = fit(data["train"], cls, bb.logit_scale, basis, ln, classes, templates, cfg,
                 val=data.get("val"), test=data.get("test"), progress=progress, should_stop=should_stop)
    cs = result.coefficients
    cs.report = {**result.report, "feature_extraction_s": round(extract_s, 3),
                 "total_wall_time_s": round(time.perf_counter() - started, 3),
                 "dataset": spec.get("dataset_id") or f"world:{spec['world']['task']}",
                 "basis": info.ref(), "job_id": job.id if job else None}
    # the version is the identity of everything that changes the set's answers (lambdas, label set, variant,
    # basis, add_mean, weights): a refit that changes only the templates is a new version
    version = "v-" + cs.identity().split(":")[1][:12]
    path = artifacts.coefficient_path(spec["name"], version)
    written = not path.exists()
    if written:
        cs.save(path)  # atomic: uuid temporary file, fsync, rename
    activated, why = _activate(artifacts, spec, version, active_at_start)
    _progress(phase="done", fraction=1.0)
    report = {k: v for k, v in cs.report.items() if k != "history"}
    out = {"coefficients": f"{spec['name']}@{version}", "activated": activated, "activation": why,
           "basis": info.ref(), "written": written, "report": report}
    if not written:  # the stored file keeps the report of the job that wrote it
        out["identical_to"] = version
        out["message"] = (f"identical to {spec['name']}@{version}, which already exists (same lambdas, label set, "
                          "variant, basis and weights); nothing was written, and the stored version keeps the "
                          "report of the job that wrote it")
    return out


def _resolve_basis(bb: Backbone, s: Settings, bases: BasisStore, ref: str | None) -> tuple[BasisInfo, Basis]:
    """A basis by id or name, or the default (``reference``); the world basis is built here only when the
    operator opted in (RESIDUAL_REFERENCE_BASIS=world) and it does not exist yet. 404 / 409 as the API."""
    info = bases.resolve(ref)
    if info is None:
        built = reference_basis(bb, cache_dir=bases.artifacts.bases_dir, n=s.reference_basis_images)
        info = bases.info_of(built)
        assert info is not None
    return info, bases.load(info)


def _flagged(conn: redis.Redis, job_id: str) -> bool:
    """Whether DELETE asked to cancel this job (False while Redis is away: no request can have arrived)."""
    try:
        return bool(conn.exists(cancel_key(job_id)))
    except (redis.RedisError, OSError):
        return False


def run_head_alignment(spec: dict[str, Any]) -> dict[str, Any]:
    """The RQ job behind a large ``POST /heads/alignment``: head scores and the ablation curve (JSON report)."""
    s = get_settings()
    bb = _backbone(s)
    if bb.weights_id != spec["weights_id"]:
        raise RuntimeError(f"this worker serves model weights {bb.weights_id}; the job asks for {spec['weights_id']}")
    ln = LinearisedLN(bb)
    artifacts = ArtifactStore(s.artifact_dir)
    info, basis = _resolve_basis(bb, s, BasisStore(artifacts, bb, s.reference_basis), spec.get("basis"))
    _progress(phase="decoding", fraction=0.0)
    s_pix, s_lab, e_pix, e_lab, split = load_alignment_data(spec, bb, artifacts.datasets_dir)
    total = s_pix.shape[0] + (e_pix.shape[0] if e_pix is not None else 0)
    done = 0

    def units(pixels: torch.Tensor) -> torch.Tensor:
        nonlocal done
        parts = []
        for i in range(0, pixels.shape[0], 256):
            raw, _ = extract(bb, pixels[i : i + 256].to(bb.device))
            parts.append(project_units(raw, ln).float().cpu())
            done += min(256, pixels.shape[0] - i)
            _progress(phase="extracting features", fraction=round(done / total, 3))
        return torch.cat(parts)

    s_units = units(s_pix)
    e_units = units(e_pix) if e_pix is not None else None
    cls = class_embeddings(bb.encode_text, bb.tokenizer, spec["classes"], spec["templates"], device=bb.device)
    _progress(phase="scoring heads", fraction=1.0)
    report = alignment_report(s_units, s_lab, e_units, e_lab, cls.cpu(), bb, spec, split, basis, info.ref())
    JOBS_DONE.labels(status="succeeded").inc()
    _progress(phase="done", fraction=1.0)
    return report


def _basis_on(bb: Backbone, raw: RawFeatures, ln: LinearisedLN, spec: dict[str, Any]) -> Basis:
    """The per-unit PCA of the task's own training images, from the cached raw features."""
    batches = (project_units(raw.select(slice(i, i + 512)).to(ln.proj.device), ln) for i in range(0, len(raw), 512))
    if spec.get("world"):
        source: dict[str, Any] = {"kind": "world-task", "task": spec["world"]["task"], "split": "train"}
        name = f"fit-on-train-world-{spec['world']['task']}"
    else:
        source, name = {"kind": "dataset", "dataset": spec["dataset_id"]}, f"fit-on-train-{spec['dataset_id']}"
    return basis_from_units(bb, batches, source={**source, "fit_on_train": True, "n": len(raw)}, name=name)


def run_basis(spec: dict[str, Any]) -> dict[str, Any]:
    """The RQ job behind ``POST /bases``: a streaming per-unit PCA over a dataset, a world task's train split or
    the world's reference mixture, published as ``bases/<id>.safetensors``. Images are decoded (or rendered) and
    extracted 256 at a time, so memory holds one chunk and progress moves from the first one; a cancel flag is
    honoured between chunks."""
    s = get_settings()
    job = get_current_job()
    conn = job.connection if job is not None else None
    bb = _backbone(s)
    if bb.weights_id != spec["weights_id"]:
        raise RuntimeError(f"this worker serves model weights {bb.weights_id}; the job asks for {spec['weights_id']}")
    artifacts = ArtifactStore(s.artifact_dir)
    ln = LinearisedLN(bb)
    src = spec["source"]
    chunks, total, source = _basis_chunks(bb, artifacts, src, int(spec["max_images"]))
    _progress(phase="building basis", fraction=0.0, images=0, total=total)
    done = 0

    def unit_batches() -> Any:
        nonlocal done
        for pixels in chunks:
            if conn is not None and job is not None and _flagged(conn, job.id):
                raise FitCancelledError("cancelled while building the basis")
            yield decompose(bb, pixels, ln).units  # (n, U, d)
            done += int(pixels.shape[0])
            _progress(phase="building basis", fraction=round(done / total, 3), images=done, total=total)

    basis = basis_from_units(bb, unit_batches(), source=source, name=spec["name"])
    info = BasisStore(artifacts, bb, s.reference_basis).save(basis)
    JOBS_DONE.labels(status="succeeded").inc()
    _progress(phase="done", fraction=1.0, images=done, total=total)
    return {"basis": info.public()}


def _basis_chunks(bb: Backbone, artifacts: ArtifactStore, src: dict[str, Any], max_images: int
                  ) -> tuple[Iterator[torch.Tensor], int, dict[str, Any]]:
    """(pixel chunks (n, 3, S, S), number of images, the basis's source record) of a ``POST /bases`` source."""
    if src["kind"] == "world":
        n = min(max_images, REFERENCE_SIZE)
        return reference_batches(bb, n), n, reference_source(n)
    if src["kind"] == "world-task":
        labels, images = tasks.task_image_chunks(src["task"], "train", n=max_images, chunk=256)
        n = len(labels)
        return ((bb.pixels_from_arrays(c) for c in images), n,
                {"kind": "world-task", "task": src["task"], "split": "train", "n": n})
    folder = artifacts.datasets_dir / src["dataset"]
    files = json.loads((folder / "manifest.json").read_text())["files"]
    picks = spread(len(files), max_images)
    chunks = decoded_chunks(bb.preprocess, folder, [files[j][0] for j in picks])
    return chunks, len(picks), {"kind": "dataset", "dataset": src["dataset"], "n": len(picks)}


def _activate(artifacts: ArtifactStore, spec: dict[str, Any], version: str, expected: str | None) -> tuple[bool, str]:
    """Activate the fitted version if the job asks for it and nobody changed ACTIVE since the job started."""
    name = spec["name"]
    if not spec.get("activate", True):
        return False, "not requested (activate: false)"
    if artifacts.activate(name, version, expected=expected):
        return True, "activated"
    now = artifacts.active(name)
    logger.info("fit of %s: %s not activated; the active version changed from %s to %s during the job", name,
                version, expected, now)
    return False, f"the active version changed during the job (from {expected} to {now}); activate it explicitly"


class HeartbeatWorker(SimpleWorker):
    """RQ's SimpleWorker (jobs run in this process, the backbone stays loaded) with live heartbeats.

    A forked work horse would inherit torch's thread pools and hang. SimpleWorker alone sends one heartbeat per
    job, valid for the whole job timeout, so a worker killed mid-fit would leave its job "running" for up to an
    hour. Here a thread renews the heartbeat every ``job_monitoring_interval`` seconds with a short TTL, so a
    killed worker's job expires within ``HEARTBEAT_GRACE_S`` and RQ's registry cleanup marks it failed.
    """

    HEARTBEAT_GRACE_S = 30

    def get_heartbeat_ttl(self, job: Any, working_time: float = 0.0) -> int:
        return int(self.job_monitoring_interval + self.HEARTBEAT_GRACE_S)

    def execute_job(self, job: Any, queue: Any) -> None:
        execution = self.prepare_execution(job)
        stop = threading.Event()

        def beat() -> None:
            while not stop.wait(self.job_monitoring_interval):
                try:
                    self.maintain_heartbeats(job, execution)
                except Exception:  # noqa: BLE001 - a missed beat must not kill the fit
                    logger.warning("heartbeat failed for job %s", job.id, exc_info=True)

        thread = threading.Thread(target=beat, name="rq-heartbeat", daemon=True)
        thread.start()
        try:
            self.perform_job(job, queue, execution)
        finally:
            stop.set()
            thread.join()
        self.set_state(WorkerStatus.IDLE)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="residual-worker", description="Run an alignment worker (RQ, JSON jobs). "
                                "Settings come from RESIDUAL_* environment variables, as for the API.")
    p.add_argument("--burst", action="store_true", help="exit when the queue is empty")
    p.add_argument("--log-level", default="info")
    args = p.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s %(message)s")
    s = get_settings()
    conn = redis.Redis.from_url(s.jobs_redis_url)
    _, warning = queue_policy_warning(conn)
    if warning:
        logger.warning("%s", warning)
    if s.worker_metrics_port:
        try:
            start_http_server(s.worker_metrics_port, addr=s.worker_metrics_host)
        except OSError as exc:  # a busy port must not keep the worker from taking jobs
            logger.warning("worker metrics not served on port %d: %s", s.worker_metrics_port, exc)
    _backbone(s)  # load before taking jobs
    worker = HeartbeatWorker([Queue(QUEUE_NAME, connection=conn, serializer=JSONSerializer)], connection=conn,
                    serializer=JSONSerializer, job_monitoring_interval=5)
    worker.work(burst=args.burst, with_scheduler=False)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
