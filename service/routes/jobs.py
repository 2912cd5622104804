"""Alignment fit jobs (admin key): ``POST /fit-alignment``, its status, cancellation and the job list.

``POST /fit-alignment`` validates everything that can be seen at submission (422), stores inline data as a
dataset, and enqueues a JSON job on RQ (202 with the status URL). The worker records the name's active version
when the job starts; when the fit ends it activates the result only if ``activate`` is true and the active version
is still that one (a rollback made during the fit wins; the job says ``activated: false`` and why).
"""

from __future__ import annotations

from typing import Any, Literal

from fastapi import APIRouter, Query
from pydantic import BaseModel, ConfigDict, Field

from residual import VARIANTS
from service import queue
from service.artifacts import check_name
from service.deps import AdminKey, Runtime, RuntimeDep, dataset_store, world_and_label_set
from service.errors import InvalidRequest
from service.images import decode_base64
from service.schemas import InlineDataset, JobAccepted, JobInfo, JobList, LabelSet

router = APIRouter(tags=["alignment"])


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
    basis: str = Field("reference", description="'reference' (the default basis), 'fit-on-train' (a PCA of this "
                                                "dataset's training images), or a basis id or name (GET /bases)")
    activate: bool = Field(True, description="make the result the active version when the fit ends, unless the "
                                             "active version changed while the job ran (e.g. a rollback)")


_SUBMIT_ERRORS: dict[int | str, dict[str, Any]] = {
    404: {"description": "unknown dataset, label set or basis"}, 422: {"description": "invalid request"},
    409: {"description": "no basis for the served weights (build one with POST /bases), or a basis of other weights"},
    503: {"description": "the job queue is unavailable"}}


@router.post("/fit-alignment", status_code=202, response_model=JobAccepted, dependencies=[AdminKey],
             summary="Fit a coefficient set on labelled images (runs on the worker)", responses=_SUBMIT_ERRORS)
async def submit_fit(body: FitRequest, rt: RuntimeDep) -> JobAccepted:
    assert rt.store is not None
    s = rt.settings
    check_name(body.name)
    if body.variant not in VARIANTS:
        raise InvalidRequest(f"unknown variant {body.variant!r}")
    spec: dict[str, Any] = {"name": body.name, "variant": body.variant, "basis": body.basis,
                            "hyper": body.hyperparameters.model_dump(), "weights_id": rt.store.backbone.weights_id,
                            "activate": body.activate}
    world, classes, templates = await world_and_label_set(body.dataset, body.world_sizes, WorldSizes, body.label_set,
                                                          body.label_set_id, rt, "fitting")
    if world:
        spec["world"] = world
    else:
        store = dataset_store(rt)
        if isinstance(body.dataset, InlineDataset):
            inline = body.dataset
            if len(inline.images) > s.max_inline_images:
                raise InvalidRequest(f"{len(inline.images)} inline images; the limit is {s.max_inline_images}"
                                     " (upload larger sets with POST /datasets)")

            def store_inline() -> Any:
                blobs = [decode_base64(b, i) for i, b in enumerate(inline.images)]
                return store.from_inline(blobs, list(inline.labels))

            dataset = await rt.io.run(store_inline)
        else:
            dataset = await rt.io.run(store.get, body.dataset)
        unknown = sorted(set(dataset.classes) - set(classes))
        if unknown:
            raise InvalidRequest(f"classes in the data that are not in the label set: {unknown}")
        empty = [c for c in classes if dataset.counts.get(c, 0) == 0]
        if empty:
            raise InvalidRequest(f"classes of the label set without images: {empty}")
        spec |= {"dataset_id": dataset.dataset_id, "class_map": {c: classes.index(c) for c in dataset.classes}}
    spec |= {"classes": classes, "templates": templates}
    if body.basis != "fit-on-train":  # 404 / 409 now rather than a failed job (after every identifier is checked)
        info = await rt.io.run(rt.store.bases.resolve, body.basis)
        spec["basis"] = info.basis_id if info is not None else "reference"  # None: the world basis, not built yet
    job = await rt.io.run(queue.enqueue, rt.jobs_redis, queue.FIT, spec, body.name, s.job_timeout_s,
                          s.job_result_ttl_s)
    return JobAccepted(job_id=job.id, status_url=f"/fit-alignment/{job.id}")


def _status(rt: Runtime, job_id: str) -> dict[str, Any]:
    return queue.redis_call(lambda: queue.describe(queue.fetch(rt.jobs_redis, job_id, queue.FIT)))


@router.get("/fit-alignment/{job_id}", response_model=JobInfo, dependencies=[AdminKey],
            summary="Status, progress and result of a fit job", responses={404: {"description": "unknown job"}})
async def job_status(job_id: str, rt: RuntimeDep) -> dict[str, Any]:
    """A succeeded fit carries ``coefficients`` (name@version), ``activated`` (and ``activation`` saying why
    not when false), the ``basis`` it used and the fit ``report``."""
    return await rt.io.run(_status, rt, job_id)


@router.delete("/fit-alignment/{job_id}", response_model=JobInfo, dependencies=[AdminKey],
               summary="Cancel a queued or running fit job", responses={404: {"description": "unknown job"}})
async def cancel_job(job_id: str, rt: RuntimeDep) -> dict[str, Any]:
    return await rt.io.run(lambda: queue.redis_call(
        lambda: queue.cancel(rt.jobs_redis, job_id, queue.FIT, rt.settings.job_timeout_s)))


@router.get("/fit-alignment", response_model=JobList, dependencies=[AdminKey],
            summary="List jobs (fits and head alignments), newest first, with paging")
async def list_jobs(rt: RuntimeDep, offset: int = Query(0, ge=0), limit: int = Query(20, ge=1, le=200)
                    ) -> dict[str, Any]:
    return await rt.io.run(lambda: queue.redis_call(lambda: queue.list_jobs(rt.jobs_redis, offset, limit)))
