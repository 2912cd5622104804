"""Bases: per-unit PCA of the served model on a reference image set, first-class resources.

- ``POST /bases`` (admin key): build one on the worker from an uploaded dataset, a world task's train split or
  the world's reference mixture; 202 with the status URL (streaming PCA, progress in images);
- ``GET /bases``: the bases of the served weights, newest first, and which one is the default (and why);
- ``GET /bases/{basis_id}``: one basis (an id, or a name: the newest with that name) with per-unit k at 0.9/0.99;
- ``GET /bases/jobs/{job_id}`` / ``DELETE`` (admin key): a build's status, progress, result; cancellation.

Every response built on a basis (``/heads``, ``/heads/alignment``, fits) names it (``basis``: id, name, source).
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Path, Query

from service import sources
from service.api.auth import AdminKey, ApiKey
from service.api.body import JsonBody
from service.api.deps import ModelQuery, ReadyDep
from service.api.job_routes import add_job_routes
from service.api.schemas import BASIS_REF, BasisDetail, BasisList, BasisRequest, JobAccepted
from service.jobs import queue
from service.jobs.specs import BASIS, BasisJob
from service.stores.bases import basis_units, check_basis_name

router = APIRouter(tags=["bases"])

_BODY = JsonBody(BasisRequest)

_SUBMIT_ERRORS: dict[int | str, dict[str, Any]] = {
    404: {"description": "unknown dataset or model"}, 413: {"description": "the body over its limit"},
    415: {"description": "the body is not application/json"}, 422: {"description": "invalid request"},
    503: {"description": "the job queue is unavailable or refuses writes"}}


@router.post("/bases", status_code=202, response_model=JobAccepted, dependencies=[AdminKey],
             openapi_extra=_BODY.openapi, responses=_SUBMIT_ERRORS,
             summary="Build a basis (per-unit PCA) from your images on the worker")
async def create_basis(rt: ReadyDep, body: BasisRequest = _BODY.depends) -> JobAccepted:
    """The paper fits its bases on images of the model's own domain (ImageNet-train for CLIP): upload yours with
    ``POST /datasets`` and pass the dataset id. The worker decodes and extracts 256 images at a time into a
    streaming PCA and publishes ``bases/<id>.safetensors``; the job's result holds the new basis. With no
    ``RESIDUAL_REFERENCE_BASIS`` set, the newest basis of the served weights becomes the default. A basis from
    fewer than 10 images per component it keeps carries a warning in its listing."""
    check_basis_name(body.name)
    rt = await rt.use(body.model)
    source = sources.parse_source(body.dataset, mixture=True)
    if isinstance(source, sources.DatasetSource):
        await rt.io.run(rt.datasets.get, source.dataset_id)  # 404 now, not in the job
    spec = BasisJob(name=body.name, source=source, max_images=body.max_images, weights_id=rt.model.weights_id,
                    model=rt.model.name)
    s = rt.settings
    job = await rt.io.run(queue.enqueue, rt.jobs_redis, spec, body.name, s.job_timeout_s, s.job_result_ttl_s)
    return JobAccepted(model=rt.model.name, job_id=job.id, status_url=f"/bases/jobs/{job.id}")


@router.get("/bases", response_model=BasisList, dependencies=[ApiKey], summary="Bases of a model's weights",
            responses={404: {"description": "unknown model"}})
async def list_bases(rt: ReadyDep, all_weights: bool = Query(False, description="also list bases of other "
                                                                                "model weights in the store"),
                     model: str | None = ModelQuery) -> dict[str, Any]:
    rt = await rt.use(model)
    bases = rt.bases

    def build() -> dict[str, Any]:
        return {"model": rt.model.name, "weights_id": rt.model.weights_id, "default": bases.default_description(),
                "bases": [i.public() for i in bases.infos(all_weights=all_weights)]}

    return await rt.io.run(build)


add_job_routes(router, "/bases/jobs", BASIS, "basis build",
               "``progress``: phase, fraction, images done and total. When ``succeeded`` the body holds ``basis``.")


@router.get("/bases/{basis}", response_model=BasisDetail, dependencies=[ApiKey],
            responses={404: {"description": "unknown basis or model"},
                       409: {"description": "a basis of another model (the message names it)"}},
            summary="One basis, with per-unit k at 0.9 / 0.99")
async def get_basis(rt: ReadyDep, basis: str = Path(..., pattern=BASIS_REF, description="an id (b-<16 hex>) or a "
                                                                                        "name (the newest with it)"),
                    model: str | None = ModelQuery) -> dict[str, Any]:
    rt = await rt.use(model)
    bases = rt.bases

    def build() -> dict[str, Any]:
        info = bases.find(basis)
        return {**info.public(), "units": basis_units(bases.load(info))}

    return await rt.io.run(build)
