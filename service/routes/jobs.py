"""Alignment jobs, datasets and the coefficient registry.

- ``POST /fit-alignment`` validates everything that can be seen at submission (422), stores inline data as a
  dataset, and enqueues a JSON job on RQ (answers 202 with the status URL);
- ``GET /fit-alignment/{job_id}``, ``DELETE /fit-alignment/{job_id}``, ``GET /fit-alignment`` (paged);
- ``POST /datasets`` (tar or zip in ImageFolder layout), ``GET /datasets/{dataset_id}``;
- ``GET /coefficients``, ``GET /coefficients/{name}``, ``POST /coefficients/{name}/activate``.

Replicas learn of new versions without a restart: the active version of a name is read from the shared artifact
store (``coefficients/<name>/ACTIVE``) when a request names it, and each ``name@version`` is loaded once and
kept, so a request naming ``name@version`` always gets exactly that version.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any, Literal

import redis
from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field
from rq import Queue
from rq.exceptions import NoSuchJobError
from rq.job import Job, JobStatus
from rq.registry import CanceledJobRegistry, FailedJobRegistry, FinishedJobRegistry, StartedJobRegistry
from rq.serializers import JSONSerializer

from residual import VARIANTS
from residual.tiny import tasks
from service.datasets import DatasetStore
from service.deps import AdminKey, ApiKey, Runtime, RuntimeDep, label_set_from
from service.errors import BackendUnavailable, InvalidRequest, NotFound
from service.images import decode_base64
from service.model_store import ID_PATTERN
from service.schemas import LabelSet
from service.worker import QUEUE_NAME, cancel_key

router = APIRouter(tags=["alignment"])


class InlineDataset(BaseModel):
    model_config = ConfigDict(extra="forbid")
    images: list[str] = Field(..., description="base64 images or data URIs")
    labels: list[str] = Field(..., description="class name of each image")


class Hyperparameters(BaseModel):
    model_config = ConfigDict(extra="forbid")
    epochs: int = Field(30, ge=1, le=200)
    patience: int = Field(5, ge=1, le=200, description="early stopping on validation accuracy")
    lr: float | None = Field(None, gt=0, le=10, description="default 0.8 (lambdas) or 1e-3 (linear)")
    batch_size: int = Field(64, ge=1, le=4096)
    evr_threshold: float = Field(0.9, gt=0, lt=1)
    seed: int = Field(0, ge=0)
    val_fraction: float = Field(0.2, gt=0, lt=1)


class WorldSizes(BaseModel):
    model_config = ConfigDict(extra="forbid")
    train: int = Field(2000, ge=10, le=50_000)
    val: int = Field(500, ge=10, le=20_000)
    test: int = Field(1000, ge=10, le=20_000)


class FitRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [
        {"name": "position", "dataset": "world:position", "variant": "full"},
        {"name": "my-labels", "label_set": {"classes": ["cat", "dog"]}, "dataset": "ds-0123456789abcdef0123"}]})

    name: str = Field(..., description="coefficient set to create or to add a version to")
    label_set: LabelSet | None = None
    label_set_id: str | None = None
    dataset: InlineDataset | str = Field(..., description="inline images, a dataset id, or 'world:<task>'")
    world_sizes: WorldSizes | None = None
    variant: Literal["full", "fine", "coarse", "linear"] = "full"
    hyperparameters: Hyperparameters = Field(default_factory=Hyperparameters)  # type: ignore[arg-type]
    basis: Literal["reference", "fit-on-train"] = "reference"


class JobAccepted(BaseModel):
    job_id: str
    status_url: str


def world_and_label_set(dataset: object, sizes: BaseModel | None, default_sizes: type[BaseModel],
                        label_set: LabelSet | None, label_set_id: str | None, rt: Runtime, purpose: str
                        ) -> tuple[dict[str, Any] | None, list[str], list[str]]:
    """(world spec for 'world:<task>' datasets or None, classes, templates), validated (422).

    A world task brings its own label set when none is given; a given one must have as many classes.
    """
    world: dict[str, Any] | None = None
    if isinstance(dataset, str) and dataset.startswith("world:"):
        task = dataset.split(":", 1)[1]
        if task not in tasks.TASKS:
            raise InvalidRequest(f"unknown world task {task!r}; choose from {sorted(tasks.TASKS)}")
        world = {"task": task, **(sizes or default_sizes()).model_dump()}
    elif sizes is not None:
        raise InvalidRequest("world_sizes applies to 'world:<task>' datasets only")
    own = None
    if world is not None:
        t = tasks.TASKS[world["task"]]
        own = (list(t.classes), list(t.templates))
    classes, templates = label_set_from(label_set, label_set_id, rt, own)
    if own is not None and len(classes) != len(own[0]):
        raise InvalidRequest(f"world task {world['task']!r} has {len(own[0])} classes; the label set has "
                             f"{len(classes)}")
    if len(classes) < 2:
        raise InvalidRequest(f"{purpose} needs at least two classes")
    return world, classes, templates


def _queue(rt: Runtime) -> Queue:
    return Queue(QUEUE_NAME, connection=rt.jobs_redis, serializer=JSONSerializer)


def _redis_call(fn: Any) -> Any:
    try:
        return fn()
    except (redis.RedisError, OSError) as exc:
        raise BackendUnavailable("the job queue (Redis) is unavailable; retry shortly",
                                 headers={"Retry-After": "5"}) from exc


def _datasets(rt: Runtime) -> DatasetStore:
    return DatasetStore(Path(rt.settings.artifact_dir), rt.settings.max_image_pixels, rt.settings.max_dataset_images)


@router.post("/fit-alignment", status_code=202, response_model=JobAccepted, dependencies=[AdminKey],
             summary="Fit a coefficient set on labelled images (runs on the worker)",
             responses={404: {"description": "unknown dataset or label set"}, 422: {"description": "invalid"},
                        503: {"description": "the job queue is unavailable"}})
async def submit_fit(body: FitRequest, rt: RuntimeDep) -> JobAccepted:
    assert rt.store is not None
    s = rt.settings
    if not ID_PATTERN.fullmatch(body.name):
        raise InvalidRequest(f"name {body.name!r} must match {ID_PATTERN.pattern}")
    if body.variant not in VARIANTS:
        raise InvalidRequest(f"unknown variant {body.variant!r}")
    spec: dict[str, Any] = {"name": body.name, "variant": body.variant, "basis": body.basis,
                            "hyper": body.hyperparameters.model_dump(), "weights_id": rt.store.backbone.weights_id}
    world, classes, templates = world_and_label_set(body.dataset, body.world_sizes, WorldSizes, body.label_set,
                                                    body.label_set_id, rt, "fitting")
    world_task = world["task"] if world else None
    if world:
        spec["world"] = world
    if world_task is None:
        store = _datasets(rt)
        if isinstance(body.dataset, InlineDataset):
            if len(body.dataset.images) > s.max_inline_images:
                raise InvalidRequest(f"{len(body.dataset.images)} inline images; the limit is {s.max_inline_images}"
                                     " (upload larger sets with POST /datasets)")
            blobs = [decode_base64(b, i) for i, b in enumerate(body.dataset.images)]
            labels = list(body.dataset.labels)
            dataset = await asyncio.to_thread(store.from_inline, blobs, labels)
        else:
            dataset = store.get(body.dataset)
        unknown = sorted(set(dataset.classes) - set(classes))
        if unknown:
            raise InvalidRequest(f"classes in the data that are not in the label set: {unknown}")
        empty = [c for c in classes if dataset.counts.get(c, 0) == 0]
        if empty:
            raise InvalidRequest(f"classes of the label set without images: {empty}")
        spec |= {"dataset_id": dataset.dataset_id, "class_map": {c: classes.index(c) for c in dataset.classes}}
    spec |= {"classes": classes, "templates": templates}
    job = _redis_call(lambda: _queue(rt).enqueue(
        "service.worker.run_fit", spec, job_timeout=s.job_timeout_s, result_ttl=s.job_result_ttl_s,
        failure_ttl=s.job_result_ttl_s, meta={"name": body.name, "progress": {"phase": "queued"}}))
    return JobAccepted(job_id=job.id, status_url=f"/fit-alignment/{job.id}")


_STATUS = {JobStatus.QUEUED: "queued", JobStatus.DEFERRED: "queued", JobStatus.SCHEDULED: "queued",
           JobStatus.STARTED: "running", JobStatus.FINISHED: "succeeded", JobStatus.FAILED: "failed",
           JobStatus.STOPPED: "cancelled", JobStatus.CANCELED: "cancelled"}


def _describe(job: Job) -> dict[str, Any]:
    status = _STATUS.get(job.get_status(refresh=False), "queued")
    if status == "failed" and job.connection.exists(cancel_key(job.id)):
        status = "cancelled"
    out: dict[str, Any] = {"job_id": job.id, "kind": job.meta.get("kind", "fit-alignment"),
                           "name": job.meta.get("name"), "status": status,
                           "progress": job.meta.get("progress", {}),
                           "enqueued_at": job.enqueued_at.isoformat() if job.enqueued_at else None,
                           "ended_at": job.ended_at.isoformat() if job.ended_at else None}
    if status == "succeeded":
        out |= dict(job.return_value() or {})  # fits: coefficients and report; head analyses: the report
    elif status == "failed":
        info = (job.latest_result().exc_string if job.latest_result() else None) or job.exc_info or ""
        lines = [ln for ln in str(info).strip().splitlines() if ln.strip()]
        out["error"] = lines[-1] if lines else "the job failed (worker lost or killed)"
    return out


def _fetch(rt: Runtime, job_id: str) -> Job:
    if not all(c.isalnum() or c == "-" for c in job_id) or len(job_id) > 64:
        raise InvalidRequest("job ids are letters, digits and '-'")
    StartedJobRegistry(QUEUE_NAME, connection=rt.jobs_redis, serializer=JSONSerializer).cleanup()  # abandoned jobs
    try:
        return Job.fetch(job_id, connection=rt.jobs_redis, serializer=JSONSerializer)
    except NoSuchJobError as exc:
        raise NotFound(f"unknown job {job_id}") from exc


@router.get("/fit-alignment/{job_id}", dependencies=[AdminKey], summary="Status, progress and result of a job",
            responses={404: {"description": "unknown job"}})
async def job_status(job_id: str, rt: RuntimeDep) -> dict[str, Any]:
    return _redis_call(lambda: _describe(_fetch(rt, job_id)))


@router.delete("/fit-alignment/{job_id}", dependencies=[AdminKey], summary="Cancel a queued or running job",
               responses={404: {"description": "unknown job"}})
async def cancel_job(job_id: str, rt: RuntimeDep) -> dict[str, Any]:
    def cancel() -> dict[str, Any]:
        job = _fetch(rt, job_id)
        status = job.get_status()
        if status in (JobStatus.QUEUED, JobStatus.DEFERRED, JobStatus.SCHEDULED):
            job.cancel()
        elif status == JobStatus.STARTED:
            rt.jobs_redis.set(cancel_key(job.id), 1, ex=rt.settings.job_timeout_s)
        return _describe(Job.fetch(job_id, connection=rt.jobs_redis, serializer=JSONSerializer))

    return _redis_call(cancel)


@router.get("/fit-alignment", dependencies=[AdminKey], summary="List jobs, newest first, with paging")
async def list_jobs(rt: RuntimeDep, offset: int = Query(0, ge=0), limit: int = Query(20, ge=1, le=200)
                    ) -> dict[str, Any]:
    def collect() -> dict[str, Any]:
        kw = {"connection": rt.jobs_redis, "serializer": JSONSerializer}
        q = _queue(rt)
        ids = list(q.get_job_ids())
        for reg in (StartedJobRegistry, FinishedJobRegistry, FailedJobRegistry, CanceledJobRegistry):
            ids += reg(QUEUE_NAME, **kw).get_job_ids()
        jobs = [j for j in Job.fetch_many(list(dict.fromkeys(ids)), **kw) if j is not None]
        jobs.sort(key=lambda j: j.enqueued_at or j.created_at, reverse=True)
        return {"total": len(jobs), "offset": offset, "limit": limit,
                "jobs": [_describe(j) for j in jobs[offset : offset + limit]]}

    return _redis_call(collect)


@router.post("/datasets", status_code=201, dependencies=[AdminKey],
             summary="Upload a tar or zip archive in ImageFolder layout (<class>/<image>)",
             responses={422: {"description": "bad archive or images"}, 415: {"description": "not an archive"}},
             openapi_extra={"requestBody": {"content": {"application/x-tar": {"schema": {"type": "string",
                                                                                        "format": "binary"}},
                                                        "application/zip": {"schema": {"type": "string",
                                                                                       "format": "binary"}}},
                                            "required": True}})
async def upload_dataset(request: Request, rt: RuntimeDep) -> JSONResponse:
    data = await request.body()
    dataset = await asyncio.to_thread(_datasets(rt).from_archive, data)
    return JSONResponse({"dataset_id": dataset.dataset_id, "classes": dataset.classes, "counts": dataset.counts},
                        status_code=201)


@router.get("/datasets/{dataset_id}", dependencies=[AdminKey], summary="Classes and counts of a dataset")
async def get_dataset(dataset_id: str, rt: RuntimeDep) -> dict[str, Any]:
    d = _datasets(rt).get(dataset_id)
    return {"dataset_id": d.dataset_id, "classes": d.classes, "counts": d.counts}


def _versions(rt: Runtime, name: str) -> dict[str, Any]:
    if not ID_PATTERN.fullmatch(name):
        raise InvalidRequest(f"name {name!r} must match {ID_PATTERN.pattern}")
    folder = Path(rt.settings.artifact_dir) / "coefficients" / name
    files = sorted(folder.glob("*.safetensors"), key=lambda p: p.stat().st_mtime) if folder.is_dir() else []
    if not files:
        raise NotFound(f"unknown coefficient set {name!r}")
    active = (folder / "ACTIVE").read_text().strip() if (folder / "ACTIVE").is_file() else None
    versions = []
    for f in files:
        from safetensors import safe_open

        with safe_open(str(f), framework="pt") as fh:
            meta = json.loads((fh.metadata() or {}).get("residual", "{}"))
        rep = meta.get("report", {})
        versions.append({"version": f.stem, "active": f.stem == active, "variant": meta.get("variant"),
                         "created_at": meta.get("created_at"), "n_parameters": meta.get("n_parameters"),
                         "label_set": meta.get("label_set"),
                         "report": {k: v for k, v in rep.items() if k != "history"}})
    return {"name": name, "active": active, "versions": versions}


@router.get("/coefficients", dependencies=[ApiKey], summary="Coefficient sets and their active versions")
async def list_coefficients(rt: RuntimeDep) -> dict[str, Any]:
    root = Path(rt.settings.artifact_dir) / "coefficients"
    names = sorted(p.name for p in root.iterdir() if p.is_dir() and ID_PATTERN.fullmatch(p.name)) if root.is_dir() \
        else []
    out = []
    for n in names:
        try:
            v = _versions(rt, n)
        except NotFound:
            continue
        out.append({"name": n, "active": v["active"], "versions": [x["version"] for x in v["versions"]]})
    return {"coefficient_sets": out}


@router.get("/coefficients/{name}", dependencies=[ApiKey], summary="Versions, label set, fit reports",
            responses={404: {"description": "unknown coefficient set"}})
async def coefficient_versions(name: str, rt: RuntimeDep) -> dict[str, Any]:
    return _versions(rt, name)


class Activate(BaseModel):
    model_config = ConfigDict(extra="forbid")
    version: str


@router.post("/coefficients/{name}/activate", dependencies=[AdminKey],
             summary="Serve this version for plain `name` (rollback = activate an older version)",
             responses={404: {"description": "unknown name or version"}})
async def activate(name: str, body: Activate, rt: RuntimeDep) -> dict[str, Any]:
    info = _versions(rt, name)
    if body.version not in {v["version"] for v in info["versions"]}:
        raise NotFound(f"coefficient set {name!r} has no version {body.version!r}")
    assert rt.store is not None
    await asyncio.to_thread(rt.store.resolve_coefficients, f"{name}@{body.version}")  # validate before switching
    folder = Path(rt.settings.artifact_dir) / "coefficients" / name
    tmp = folder / ".ACTIVE.api.tmp"
    tmp.write_text(body.version)
    tmp.replace(folder / "ACTIVE")
    return _versions(rt, name)
