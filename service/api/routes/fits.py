"""Alignment fit jobs (admin key): ``POST /fit-alignment``, its status, cancellation and the job list.

``POST /fit-alignment`` validates everything that can be seen at submission (422/404/409), stores inline data as a
dataset only once all of that passed (a refused fit leaves nothing on disk), and enqueues a typed JSON job
(``service.jobs.specs.FitJob``; 202 with the status URL). The worker records the name's active version when the
job starts; when the fit ends it activates the result only if ``activate`` is true and the active version is still
that one (a rollback made during the fit wins; the job says ``activated: false`` and why).
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Query

from residual import DEFAULT_TEMPLATES
from service.api.auth import AdminKey
from service.api.body import JsonBody
from service.api.deps import ReadyDep, label_set_from, source_and_label_set
from service.api.job_routes import add_job_routes
from service.api.schemas import FitRequest, InlineDataset, JobAccepted, JobList
from service.errors import InvalidRequest
from service.images import decode_base64
from service.jobs import queue
from service.jobs.specs import FIT, FitJob
from service.sources import DatasetSource
from service.stores.artifacts import check_name

router = APIRouter(tags=["alignment"])

_BODY = JsonBody(FitRequest)

_SUBMIT_ERRORS: dict[int | str, dict[str, Any]] = {
    404: {"description": "unknown model, dataset, label set or basis"},
    409: {"description": "no basis for the model (build one with POST /bases), or a basis or label set of another "
                         "model"},
    413: {"description": "the body, an image, or the label set's prompts over their limits"},
    415: {"description": "the body is not application/json, or an image is undecodable"},
    422: {"description": "invalid request"},
    503: {"description": "the job queue is unavailable or refuses writes"},
    507: {"description": "the artifact volume is full (inline datasets are stored)"}}


def _inline(rt: ReadyDep, inline: InlineDataset) -> list[bytes]:
    """Blocking: decode and validate an inline dataset without storing it."""
    s = rt.settings
    if len(inline.images) > s.max_inline_images:
        raise InvalidRequest(f"{len(inline.images)} inline images; the limit is {s.max_inline_images} (upload larger "
                             "sets with POST /datasets)")
    blobs = [decode_base64(b, i, "dataset.images") for i, b in enumerate(inline.images)]
    rt.datasets.check_inline(blobs, list(inline.labels))
    return blobs


@router.post("/fit-alignment", status_code=202, response_model=JobAccepted, dependencies=[AdminKey],
             openapi_extra=_BODY.openapi, responses=_SUBMIT_ERRORS,
             summary="Fit a coefficient set on labelled images (runs on the worker)")
async def submit_fit(rt: ReadyDep, body: FitRequest = _BODY.depends) -> JobAccepted:
    """Without a label set, a world task brings its own and an uploaded dataset its class folders with the default
    templates. ``variant`` chooses what is learned (see its description); the finished job names the ``basis``."""
    s = rt.settings
    check_name(body.name)
    rt = await rt.use(body.model)
    blobs = await rt.io.run(_inline, rt, body.dataset) if isinstance(body.dataset, InlineDataset) else None
    inline_labels = sorted(set(body.dataset.labels)) if isinstance(body.dataset, InlineDataset) else None
    if blobs is not None:  # inline data: the label set comes with the request, checked against its labels
        source, classes, templates = None, *(await _inline_label_set(rt, body, inline_labels or []))
    else:
        sizes = body.world_sizes.model_dump() if body.world_sizes is not None else None
        source, classes, templates = await source_and_label_set(body.dataset, sizes, body.label_set,
                                                                body.label_set_id, rt, "fitting")
    basis = body.basis
    if basis != "fit-on-train":  # 404 / 409 now rather than a failed job (after every identifier is checked)
        info = await rt.io.run(rt.bases.resolve, basis)
        basis = info.basis_id if info is not None else "reference"  # None: the world basis, not built yet
    created = None
    if blobs is not None:  # stored last, once nothing else can refuse the request
        assert isinstance(body.dataset, InlineDataset)
        labels = list(body.dataset.labels)
        existed = await rt.io.run(rt.datasets.exists, rt.datasets.id_of(list(zip(labels, blobs, strict=True))))
        ds = await rt.io.run(rt.datasets.from_inline, blobs, labels)
        created = None if existed else ds.dataset_id
        source = DatasetSource(dataset_id=ds.dataset_id, class_map={c: classes.index(c) for c in ds.classes})
    assert source is not None
    spec = FitJob(name=body.name, variant=body.variant, basis=basis, hyperparameters=body.hyperparameters,
                  activate=body.activate, classes=classes, templates=templates, source=source,
                  weights_id=rt.model.weights_id, model=rt.model.name)
    try:
        job = await rt.io.run(queue.enqueue, rt.jobs_redis, spec, body.name, s.job_timeout_s, s.job_result_ttl_s)
    except BaseException:
        if created is not None:  # refused: the inline dataset this request stored goes too
            await rt.io.run(rt.datasets.remove, created)
        raise
    return JobAccepted(model=rt.model.name, job_id=job.id, status_url=f"/fit-alignment/{job.id}")


async def _inline_label_set(rt: ReadyDep, body: FitRequest, labels: list[str]) -> tuple[list[str], list[str]]:
    """The label set of an inline dataset: the given one (every label among its classes, every class with images),
    or the labels themselves with the default templates."""
    classes, templates = await label_set_from(body.label_set, body.label_set_id, rt, (labels, list(DEFAULT_TEMPLATES)))
    if len(classes) < 2:
        raise InvalidRequest("fitting needs at least two classes")
    unknown = sorted(set(labels) - set(classes))
    if unknown:
        raise InvalidRequest(f"classes in the data that are not in the label set: {unknown[:10]}")
    empty = [c for c in classes if c not in labels]
    if empty:
        raise InvalidRequest(f"classes of the label set without images: {empty[:10]}")
    return classes, templates


add_job_routes(router, "/fit-alignment", FIT, "fit",
               "A succeeded fit carries ``coefficients`` (name@version), ``activated`` (and ``activation`` saying why "
               "not when false), ``written`` (false, with ``identical_to``, when an identical version existed), the "
               "``basis`` it used and the fit ``report``.")


@router.get("/fit-alignment", response_model=JobList, dependencies=[AdminKey],
            responses={503: {"description": "the job queue is unavailable"}},
            summary="List jobs (fits, bases and head alignments), newest first, with paging")
async def list_jobs(rt: ReadyDep, offset: int = Query(0, ge=0, le=1_000_000),
                    limit: int = Query(20, ge=1, le=200)) -> dict[str, Any]:
    return await rt.io.run(lambda: queue.redis_call(lambda: queue.list_jobs(rt.jobs_redis, offset, limit,
                                                                            rt.job_result)))
