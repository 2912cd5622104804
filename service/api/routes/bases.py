"""Bases: per-unit PCA of the served model on a reference image set, first-class resources.

- ``POST /bases`` (admin key): build one on the worker from an uploaded dataset, a world task's train split or
  the world's reference mixture; 202 with the status URL (streaming PCA, progress in images);
- ``GET /bases``: the bases of the served weights, newest first, and which one is the default (and why);
- ``GET /bases/{basis_id}``: one basis (an id, or a name: the newest with that name) with per-unit k at 0.9/0.99;
- ``GET /bases/{a}/compare/{b}`` (and ``.png``): how alike two bases of one model are, unit by unit (the paper's
  Experiment 2: the normalised spectral cosine of each unit's components, weighted by their eigenvalues);
- ``GET /bases/jobs/{job_id}`` / ``DELETE`` (admin key): a build's status, progress, result; cancellation.

Every response built on a basis (``/heads``, ``/heads/alignment``, fits) names it (``basis``: id, name, source).
"""

from __future__ import annotations

import statistics
from typing import Any

from fastapi import APIRouter, Path, Query
from fastapi.responses import Response

from residual import Basis, basis_similarity
from residual.plots import head_heatmap_png
from service import sources
from service.api.auth import AdminKey, ApiKey
from service.api.body import JsonBody
from service.api.deps import ModelQuery, ReadyDep
from service.api.job_routes import add_job_routes
from service.api.schemas import BASIS_REF, BasisComparison, BasisDetail, BasisList, BasisRequest, JobAccepted
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


_A = Path(..., pattern=BASIS_REF, description="a basis id or name")
_B = Path(..., pattern=BASIS_REF, description="another basis of the same model, by id or name")
_TAU = Query(0.9, gt=0, lt=1, description="components kept per unit: k at this explained variance")
_COMPARE_ERRORS: dict[int | str, dict[str, Any]] = {
    404: {"description": "unknown basis or model"},
    409: {"description": "a basis of another model (bases of different weights have different units)"}}


def _compare(rt: ReadyDep, a: str, b: str, tau: float) -> tuple[dict[str, Any], Basis]:
    """Blocking: both bases resolved (404 / 409) and compared unit by unit."""
    info_a, info_b = rt.bases.find(a), rt.bases.find(b)
    basis_a, basis_b = rt.bases.load(info_a), rt.bases.load(info_b)
    sims = basis_similarity(basis_a, basis_b, tau).tolist()
    units = [{"unit": u.name, "similarity": round(min(1.0, v), 6)} for u, v in zip(basis_a.table, sims, strict=True)]
    g = basis_a.geometry
    heads = sorted((row for row in units[g.head_units]), key=lambda r: r["similarity"])
    values = [r["similarity"] for r in heads]
    summary = {"heads_mean": round(statistics.fmean(values), 6), "heads_median": round(statistics.median(values), 6),
               "heads_min": values[0], "heads_max": values[-1],
               "mlps_mean": round(statistics.fmean(r["similarity"] for r in units[g.mlp_units]), 6),
               "least_similar_heads": [r["unit"] for r in heads[:5]]}
    return {"model": rt.model.name, "a": info_a.ref(), "b": info_b.ref(), "tau": tau, "summary": summary,
            "units": units}, basis_a


@router.get("/bases/{a}/compare/{b}.png", dependencies=[ApiKey], response_class=Response,
            responses={200: {"content": {"image/png": {}}, "description": "a PNG picture"}, **_COMPARE_ERRORS},
            summary="Layer x head heatmap of how alike two bases are")
async def compare_bases_png(rt: ReadyDep, a: str = _A, b: str = _B, tau: float = _TAU,
                            model: str | None = ModelQuery) -> Response:
    rt = await rt.use(model)
    report, basis = await rt.analysis.run(_compare, rt, a, b, tau)
    g = basis.geometry
    matrix = [[report["units"][g.head_unit(layer, head)]["similarity"] for head in range(g.heads)]
              for layer in range(g.layers)]
    title = f"{report['a']['name'] or report['a']['basis_id']} vs {report['b']['name'] or report['b']['basis_id']}"
    png = await rt.analysis.run(head_heatmap_png, matrix, title, "spectral cosine")
    return Response(png, media_type="image/png")


@router.get("/bases/{a}/compare/{b}", response_model=BasisComparison, dependencies=[ApiKey],
            responses=_COMPARE_ERRORS, summary="How alike two bases of one model are, unit by unit")
async def compare_bases(rt: ReadyDep, a: str = _A, b: str = _B, tau: float = _TAU,
                        model: str | None = ModelQuery) -> dict[str, Any]:
    """The paper's Experiment 2 on your data: for each unit, the components of each basis up to k at ``tau``,
    weighted by their eigenvalues, matched greedily by |cosine|; 1 when the unit sees the same subspace with the
    same spectrum in both (a basis against itself gives 1 everywhere), lower where the images of one basis make the
    head attend to something else. Symmetric in ``a`` and ``b``."""
    rt = await rt.use(model)
    report, _ = await rt.analysis.run(_compare, rt, a, b, tau)
    return report


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
        return {**info.public(), "served_model": rt.model.name, "units": basis_units(bases.load(info))}

    return await rt.io.run(build)
