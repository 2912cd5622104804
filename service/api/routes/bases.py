"""Bases (paper-spec 2.1): per-unit PCA of the served model on a reference image set, first-class resources.

- ``POST /bases`` (admin key): build one on the worker from an uploaded dataset, a world task's train split or
  the world's reference mixture; 202 with the status URL (streaming PCA, progress in images);
- ``GET /bases``: the bases of the served weights, newest first, and which one is the default (and why);
- ``GET /bases/{basis_id}``: one basis (an id, or a name: the newest with that name) with per-unit k at 0.9/0.99;
- ``GET /bases/jobs/{job_id}`` / ``DELETE`` (admin key): a build's status, progress, result; cancellation.

Every response built on a basis (``/heads``, ``/heads/alignment``, fits) names it (``basis``: id, name, source).
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Query
from pydantic import BaseModel, ConfigDict, Field

from residual.tiny import tasks
from service import queue
from service.bases import basis_units, check_basis_name
from service.deps import AdminKey, ApiKey, Runtime, RuntimeDep, dataset_store
from service.errors import InvalidRequest
from service.schemas import BasisDetail, BasisList, JobAccepted, JobInfo

router = APIRouter(tags=["bases"])


class BasisRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [
        {"name": "my-domain-10k", "dataset": "ds-0123456789abcdef0123"},
        {"name": "world-shape", "dataset": "world:shape", "max_images": 2000}]})

    name: str = Field(..., description="a label for the basis (1-64 letters, digits, '.', '_', '-'); need not be "
                                       "unique: a name resolves to the newest basis with it")
    dataset: str = Field(..., description="an uploaded dataset id (labels are ignored), 'world:<task>' (that task's "
                                          "train split) or 'world:mixture' (the world's reference set)")
    max_images: int = Field(10_000, ge=2, le=200_000, description="images used (a dataset larger than this is "
                                                                  "subsampled evenly over its files)")


_SUBMIT_ERRORS: dict[int | str, dict[str, Any]] = {
    404: {"description": "unknown dataset"}, 422: {"description": "invalid request"},
    503: {"description": "the job queue is unavailable"}}


@router.post("/bases", status_code=202, response_model=JobAccepted, dependencies=[AdminKey],
             summary="Build a basis (per-unit PCA) from your images on the worker", responses=_SUBMIT_ERRORS)
async def create_basis(body: BasisRequest, rt: RuntimeDep) -> JobAccepted:
    """The paper fits its bases on images of the model's own domain (ImageNet-train for CLIP): upload yours with
    ``POST /datasets`` and pass the dataset id. The worker decodes and extracts 256 images at a time into a
    streaming PCA and publishes ``bases/<id>.safetensors``; the job's result holds the new basis. With no
    ``RESIDUAL_REFERENCE_BASIS`` set, the newest basis of the served weights becomes the default."""
    assert rt.store is not None
    check_basis_name(body.name)
    source: dict[str, Any]
    if body.dataset.startswith("world:"):
        task = body.dataset.removeprefix("world:")
        if task == "mixture":
            source = {"kind": "world"}
        elif task in tasks.TASKS:
            source = {"kind": "world-task", "task": task}
        else:
            raise InvalidRequest(f"unknown world task {task!r}; choose from {sorted(tasks.TASKS)} or 'mixture'")
    else:
        ds = await rt.io.run(dataset_store(rt).get, body.dataset)
        source = {"kind": "dataset", "dataset": ds.dataset_id}
    spec = {"name": body.name, "source": source, "max_images": body.max_images,
            "weights_id": rt.store.backbone.weights_id}
    s = rt.settings
    job = await rt.io.run(queue.enqueue, rt.jobs_redis, queue.BASIS, spec, body.name, s.job_timeout_s,
                          s.job_result_ttl_s)
    return JobAccepted(job_id=job.id, status_url=f"/bases/jobs/{job.id}")


@router.get("/bases", response_model=BasisList, dependencies=[ApiKey], summary="Bases of the served weights")
async def list_bases(rt: RuntimeDep, all_weights: bool = Query(False, description="also list bases of other "
                                                                                 "model weights in the store")
                     ) -> dict[str, Any]:
    assert rt.store is not None
    bases = rt.store.bases

    def build() -> dict[str, Any]:
        return {"weights_id": rt.store.backbone.weights_id if rt.store else "", "default": bases.default_description(),
                "bases": [i.public() for i in bases.infos(all_weights=all_weights)]}

    return await rt.io.run(build)


def _job(rt: Runtime, job_id: str) -> dict[str, Any]:
    return queue.redis_call(lambda: queue.describe(queue.fetch(rt.jobs_redis, job_id, queue.BASIS)))


@router.get("/bases/jobs/{job_id}", response_model=JobInfo, dependencies=[AdminKey],
            responses={404: {"description": "unknown job"}}, summary="Status, progress and result of a basis build")
async def basis_job(job_id: str, rt: RuntimeDep) -> dict[str, Any]:
    """``progress``: phase, fraction, images done and total. When ``succeeded`` the body holds ``basis``."""
    return await rt.io.run(_job, rt, job_id)


@router.delete("/bases/jobs/{job_id}", response_model=JobInfo, dependencies=[AdminKey],
               responses={404: {"description": "unknown job"}}, summary="Cancel a basis build")
async def cancel_basis_job(job_id: str, rt: RuntimeDep) -> dict[str, Any]:
    return await rt.io.run(lambda: queue.redis_call(
        lambda: queue.cancel(rt.jobs_redis, job_id, queue.BASIS, rt.settings.job_timeout_s)))


@router.get("/bases/{basis}", response_model=BasisDetail, dependencies=[ApiKey],
            responses={404: {"description": "unknown basis"}, 409: {"description": "a basis of other model weights"}},
            summary="One basis, with per-unit k at 0.9 / 0.99")
async def get_basis(basis: str, rt: RuntimeDep) -> dict[str, Any]:
    """``basis``: an id (``b-<16 hex>``) or a name (the newest basis with that name)."""
    assert rt.store is not None
    bases = rt.store.bases

    def build() -> dict[str, Any]:
        info = bases.find(basis)
        return {**info.public(), "units": basis_units(bases.load(info))}

    return await rt.io.run(build)
