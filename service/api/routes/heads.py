"""The head-spectrum API: which heads of the serving model specialise in what (docs/method.md, head analyses).

- ``GET /heads``: one row per unit (emb, MLPs, heads): cumulative EVR (first 32), k at 0.9 / 0.99, participation
  ratio, TwoNN intrinsic dimension; computed once per basis and cached;
- ``GET /heads/{layer}/{head}``: that head's full spectrum and text descriptions of the head and of its top
  principal components (SOMP over the shipped text dictionary, or TextSpan);
- ``POST /heads/alignment`` (admin key: it may enqueue a job and store a dataset): per-head supervised and U|T
  scores for a label set on images, with the top-k head ablation curve; over ``heads_sync_max_images`` images it
  becomes a job (202 + status URL), read with ``GET /heads/alignment/{job_id}`` (admin key, head-alignment jobs
  only) and cancelled with ``DELETE``;
- pictures: ``GET /heads/spectrum.png``, ``GET /heads/{layer}/{head}/spectrum.png``, ``POST /heads/alignment.png``,
  ``GET /heads/alignment/{job_id}.png``.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from fastapi import APIRouter, Path, Query
from fastapi.responses import JSONResponse, Response

from residual.plots import ablation_png, evr_curves_png, head_heatmap_png
from residual.spectral import explained_variance
from service import sources
from service.analysis import heads_matrix
from service.api.auth import AdminKey, ApiKey
from service.api.body import JsonBody
from service.api.deps import ModelQuery, Ready, ReadyDep, source_and_label_set
from service.api.job_routes import JOB_ID_PARAM, add_job_routes, job_status
from service.api.schemas import (
    BASIS_REF,
    AlignmentReport,
    AlignmentRequest,
    AlignmentSizes,
    HeadDetail,
    HeadJobAccepted,
    HeadSpectra,
    InlineDataset,
)
from service.errors import Conflict, InvalidRequest
from service.images import decode_base64
from service.jobs import queue
from service.jobs.specs import HEADS, AlignmentParams, HeadAlignmentJob

router = APIRouter(tags=["heads"])

_BODY = JsonBody(AlignmentRequest)
SPECTRUM_VALUES = ("k_90", "k_99", "participation_ratio", "twonn", "evr_1")
_BASIS = Query(None, pattern=BASIS_REF, description="a basis id or name (GET /bases); default: the default basis")
_NO_BASIS: dict[int | str, dict[str, Any]] = {
    409: {"description": "no basis for the model (build one with POST /bases), or a basis of another model"},
    404: {"description": "unknown basis or model"}}
_PNG: dict[int | str, dict[str, Any]] = {200: {"content": {"image/png": {}}, "description": "a PNG picture"}}
_LAYER = Path(..., ge=0, le=1023, description="layer index (0-based; 404 past the model's last layer)")
_HEAD = Path(..., ge=0, le=1023, description="head index within the layer (0-based; 404 past the last head)")


# ---- spectra ------------------------------------------------------------------------------------------------------


@router.get("/heads", response_model=HeadSpectra, dependencies=[ApiKey], responses=_NO_BASIS,
            summary="Spectra and intrinsic dimension of every unit")
async def list_heads(rt: ReadyDep, basis: str | None = _BASIS, model: str | None = ModelQuery) -> dict[str, Any]:
    """One row per unit in paper order (emb, MLP of each layer, then each head by layer and head).

    Fields: cumulative explained-variance ratio of the first 32 components (``evr``), ``k_90`` and ``k_99`` (the
    number of components that explain more than 90 / 99 % of the variance), ``participation_ratio``
    ((sum of eigenvalues)^2 / sum of squares), ``evr_1`` and the TwoNN intrinsic dimension (``twonn``) on
    ``twonn_samples`` images of the basis's own source. ``basis`` names the basis (id, name, source). The first
    call per basis computes, later calls are served from memory. 409 when the model has no basis yet.
    """
    rt = await rt.use(model)
    return await rt.heads.spectra(basis)


@router.get("/heads/spectrum.png", dependencies=[ApiKey], responses={**_PNG, **_NO_BASIS}, response_class=Response,
            summary="Layer x head heatmap of a spectral quantity")
async def spectrum_png(rt: ReadyDep, value: Literal["k_90", "k_99", "participation_ratio", "twonn", "evr_1"] =
                       Query("k_90", description="the per-head quantity to draw"),
                       basis: str | None = _BASIS, model: str | None = ModelQuery) -> Response:
    rt = await rt.use(model)
    spectra = await rt.heads.spectra(basis)
    g = spectra["geometry"]
    matrix = heads_matrix(spectra, value, g["layers"], g["heads"])
    fmt = "{:.0f}" if value.startswith("k_") else "{:.2f}"
    png = await rt.analysis.run(head_heatmap_png, matrix, f"{spectra['model']}: {value} per head", value, (), fmt)
    return Response(png, media_type="image/png")


# ---- alignment ----------------------------------------------------------------------------------------------------


async def _run_or_enqueue(body: AlignmentRequest, rt: Ready) -> tuple[dict[str, Any] | None, JSONResponse | None]:
    """Validate; answer directly, or enqueue a job when the data exceed ``heads_sync_max_images``."""
    s = rt.settings
    params = AlignmentParams(fractions=body.fractions, seeds=body.seeds, ablation=body.ablation, top=body.top)
    inline_pixels: tuple[torch.Tensor, torch.Tensor] | None = None
    source: sources.WorldTaskSource | sources.DatasetSource | None
    if isinstance(body.dataset, InlineDataset):
        inline_ds = body.dataset
        n = len(inline_ds.images)
        if n != len(inline_ds.labels):
            raise InvalidRequest(f"{n} images but {len(inline_ds.labels)} labels")
        if n > s.max_inline_images:
            raise InvalidRequest(f"{n} inline images; the limit is {s.max_inline_images} (upload larger sets with "
                                 "POST /datasets)")
        source, classes, templates = await source_and_label_set(inline_ds, None, body.label_set, body.label_set_id,
                                                                rt, "head alignment")
        unknown = sorted(set(inline_ds.labels) - set(classes))
        if unknown:
            raise InvalidRequest(f"labels that are not classes of the label set: {unknown[:10]}")
    else:
        sizes = body.world_sizes.model_dump() if body.world_sizes is not None else None
        source, classes, templates = await source_and_label_set(body.dataset, sizes, body.label_set,
                                                                body.label_set_id, rt, "head alignment")
        if isinstance(source, sources.WorldTaskSource):
            sizes_used = body.world_sizes or AlignmentSizes()
            n = sizes_used.score + sizes_used.eval
        else:
            assert source is not None
            n = len((await rt.io.run(rt.datasets.get, source.dataset_id)).files)
    info = await rt.io.run(rt.bases.resolve, body.basis)  # 404 / 409 now, not in a job
    basis_ref = info.basis_id if info is not None else "reference"  # None: the world basis, not built yet
    ls_id = rt.label_sets.id_of(classes, templates)
    if isinstance(body.dataset, InlineDataset):
        labels = list(body.dataset.labels)
        images = body.dataset.images
        blobs = await rt.io.run(lambda: [decode_base64(b, i, "dataset.images") for i, b in enumerate(images)])
        if n > s.heads_sync_max_images:  # the worker reads it from the dataset store
            ds = await rt.io.run(rt.datasets.from_inline, blobs, labels)
            source = sources.DatasetSource(dataset_id=ds.dataset_id,
                                           class_map={c: classes.index(c) for c in ds.classes})
        else:
            await rt.io.run(rt.datasets.check_inline, blobs, labels)
            inline_pixels = (await rt.images(blobs), torch.tensor([classes.index(lab) for lab in labels]))
    if n > s.heads_sync_max_images:
        assert source is not None
        spec = HeadAlignmentJob(classes=classes, templates=templates, label_set_id=ls_id, source=source,
                                basis=basis_ref, params=params, weights_id=rt.model.weights_id, model=rt.model.name)
        job = await rt.io.run(queue.enqueue, rt.jobs_redis, spec, f"heads:{sources.source_name(source)}",
                              s.job_timeout_s, s.job_result_ttl_s)
        url = f"/heads/alignment/{job.id}"
        accepted = HeadJobAccepted(model=rt.model.name, job_id=job.id, status_url=url, images=n,
                                   reason=f"{n} images exceed heads_sync_max_images ({s.heads_sync_max_images})")
        return None, JSONResponse(accepted.model_dump(), status_code=202, headers={"Location": url})
    class_emb = await rt.io.run(rt.text.class_embeddings, ls_id, classes, templates)
    report = await rt.heads.alignment(source, class_emb, classes, ls_id, params.model_dump(), basis_ref, inline_pixels)
    return report, None


_ALIGN_ERRORS: dict[int | str, dict[str, Any]] = {
    202: {"description": "too many images to answer directly: a job was queued (see status_url)",
          "content": {"application/json": {"schema": {"$ref": "#/components/schemas/HeadJobAccepted"}}}},
    404: {"description": "unknown model, dataset, label set or basis"},
    409: {"description": "no basis for the model (build one with POST /bases), or a label set or basis of another "
                         "model"},
    413: {"description": "request, image or label set too large"},
    415: {"description": "not application/json, or an undecodable image"}, 422: {"description": "invalid request"},
    503: {"description": "not ready, or the job queue is unavailable"},
    507: {"description": "the artifact volume is full (a large inline dataset is stored for the job)"}}


@router.post("/heads/alignment", response_model=AlignmentReport, dependencies=[AdminKey], responses=_ALIGN_ERRORS,
             openapi_extra=_BODY.openapi,
             summary="Per-head alignment with a label set, and the top-k head ablation curve")
async def alignment(rt: ReadyDep, body: AlignmentRequest = _BODY.depends) -> Any:
    """For every head: ``supervised`` (zero-shot accuracy of the head's contribution alone) and
    ``text_correlation`` (the paper's U|T score: mean correlation, inside the span of the class embeddings,
    between the head and the sum of all heads), with ranks (1 = best). ``ablation``: accuracy keeping only the
    top ``k`` heads by each score, every other unit replaced by its mean (or zero), against random heads (mean
    and std over ``seeds``) and all units; by default at the reference's points k in {1, max(2, 1%), 5%, 10%, 25%,
    50%, 75%} of the heads. World tasks score on their val split and evaluate on their test split; other data are
    split into stratified halves. Each head also carries the basis's ``k_90`` and ``evr_1``, and ``basis`` names
    the basis.
    """
    rt = await rt.use(body.model)
    report, accepted = await _run_or_enqueue(body, rt)
    return accepted if accepted is not None else report


def _alignment_picture(report: dict[str, Any], score: str, picture: str, layers: int, heads: int) -> bytes:
    if picture == "ablation":
        return ablation_png(report["ablation"], f"{report['dataset']}: top-k head ablation",
                            ["text_correlation", "supervised"])
    matrix = heads_matrix(report, score, layers, heads)
    marked = [(h["layer"], h["head"]) for h in report["top_heads"][score]]
    return head_heatmap_png(matrix, f"{report['dataset']}: {score} per head (top {len(marked)} framed)", score,
                            marked)


@router.post("/heads/alignment.png", dependencies=[AdminKey], responses={**_PNG, **_ALIGN_ERRORS},
             response_class=Response, openapi_extra=_BODY.openapi,
             summary="Alignment as a picture: score heatmap or ablation curve")
async def alignment_png(rt: ReadyDep, body: AlignmentRequest = _BODY.depends,
                        score: Literal["text_correlation", "supervised"] = Query("text_correlation"),
                        picture: Literal["heatmap", "ablation"] = Query("heatmap")) -> Response:
    """The same computation as ``POST /heads/alignment``; a job (202) when the data are too large to answer now,
    whose picture is then at ``GET /heads/alignment/{job_id}.png``."""
    rt = await rt.use(body.model)
    report, accepted = await _run_or_enqueue(body, rt)
    if accepted is not None:
        return accepted
    assert report is not None
    g = rt.model.backbone.geometry
    png = await rt.analysis.run(_alignment_picture, report, score, picture, g.layers, g.heads)
    return Response(png, media_type="image/png")


@router.get("/heads/alignment/{job_id:job}.png", dependencies=[AdminKey], response_class=Response,
            responses={**_PNG, 404: {"description": "unknown job"}, 409: {"description": "job not finished"}},
            summary="Picture of a finished alignment job")
async def alignment_job_png(rt: ReadyDep, job_id: str = JOB_ID_PARAM,
                            score: Literal["text_correlation", "supervised"] = Query("text_correlation"),
                            picture: Literal["heatmap", "ablation"] = Query("heatmap")) -> Response:
    info = await rt.io.run(job_status, rt, job_id, HEADS)
    if info["status"] != "succeeded" or "heads" not in info:
        raise Conflict(f"job {job_id} is {info['status']}, not a finished head alignment")
    layers, heads = max(h["layer"] for h in info["heads"]) + 1, max(h["head"] for h in info["heads"]) + 1
    png = await rt.analysis.run(_alignment_picture, info, score, picture, layers, heads)  # the job's model's shape
    return Response(png, media_type="image/png")


add_job_routes(router, "/heads/alignment", HEADS, "head alignment",
               "Status as for fit jobs; when ``succeeded`` the body also holds the full alignment report.")


# ---- one head (declared last: /heads/{layer}/{head} would otherwise shadow /heads/alignment/{job_id}) ----


@router.get("/heads/{layer}/{head}", response_model=HeadDetail, dependencies=[ApiKey],
            responses={**_NO_BASIS, 404: {"description": "no such head or basis"}},
            summary="One head: full spectrum and text descriptions")
async def head_detail(rt: ReadyDep, layer: int = _LAYER, head: int = _HEAD,
                      method: Literal["somp", "textspan"] = Query("somp", description="description algorithm"),
                      atoms: int = Query(10, ge=1, le=50, description="texts describing the head"),
                      components: int = Query(5, ge=0, le=32, description="principal components described"),
                      component_atoms: int = Query(5, ge=1, le=20, description="texts per component"),
                      basis: str | None = _BASIS, model: str | None = ModelQuery) -> dict[str, Any]:
    """Eigenvalues and cumulative EVR of all components; the head's outputs on the reference sample described by
    ``atoms`` dictionary texts (weights: RMS coefficient for SOMP, explained variance for TextSpan); each of the
    top ``components`` principal components described by OMP (signed weights: a component's sign is arbitrary).
    The head description needs images of the basis's source; for a basis built elsewhere it is null and
    ``description_note`` says why.
    """
    rt = await rt.use(model)
    return await rt.heads.head_detail(layer, head, atoms, components, component_atoms, method, basis)


@router.get("/heads/{layer}/{head}/spectrum.png", dependencies=[ApiKey], responses={**_PNG, **_NO_BASIS},
            response_class=Response, summary="Explained-variance curve of one head (and its layer's MLP)")
async def head_spectrum_png(rt: ReadyDep, layer: int = _LAYER, head: int = _HEAD,
                            n: int = Query(32, ge=2, le=4096, description="components drawn"),
                            basis_ref: str | None = Query(None, alias="basis", pattern=BASIS_REF,
                                                          description="a basis id or name (GET /bases)"),
                            model: str | None = ModelQuery) -> Response:
    rt = await rt.use(model)
    rt.heads.head_index(layer, head)  # 404 for a head the model does not have
    _, basis = await rt.analysis.run(rt.heads.basis, basis_ref)
    g = rt.model.backbone.geometry
    curves = {}
    for name, unit in ((f"head {layer}.{head}", g.head_unit(layer, head)), (f"mlp {layer}", g.mlp_unit(layer))):
        curves[name] = explained_variance(basis.eigenvalues[unit])[:n].tolist()
    png = await rt.analysis.run(evr_curves_png, curves, f"layer {layer}, head {head}: explained variance")
    return Response(png, media_type="image/png")
