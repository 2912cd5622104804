"""The head-spectrum API (paper-spec section 4): which heads of the serving model specialise in what.

- ``GET /heads``: one row per unit (emb, MLPs, heads): cumulative EVR (first 32), k at 0.9 / 0.99, participation
  ratio, TwoNN intrinsic dimension; computed once per reference basis and cached;
- ``GET /heads/{layer}/{head}``: that head's full spectrum and text descriptions of the head and of its top
  principal components (SOMP over the shipped text dictionary, or TextSpan);
- ``POST /heads/alignment`` (admin key: it may enqueue a job and store a dataset): per-head supervised and U|T
  scores for a label set on images, with the top-k head ablation curve; over ``heads_sync_max_images`` images it
  becomes a job (202 + status URL), read with ``GET /heads/alignment/{job_id}`` (admin key, head-alignment jobs
  only);
- pictures: ``GET /heads/spectrum.png``, ``GET /heads/{layer}/{head}/spectrum.png``, ``POST /heads/alignment.png``,
  ``GET /heads/alignment/{job_id}.png``.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from fastapi import APIRouter, Query
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field, field_validator

from residual.plots import ablation_png, evr_curves_png, head_heatmap_png
from service import queue
from service.deps import AdminKey, ApiKey, Runtime, RuntimeDep, dataset_store, world_and_label_set
from service.errors import Conflict, InvalidRequest
from service.heads import heads_matrix
from service.images import decode_base64, decode_image
from service.model_store import label_set_id
from service.schemas import HeadJobAccepted, InlineDataset, JobInfo, LabelSet, Report

router = APIRouter(tags=["heads"])

SPECTRUM_VALUES = ("k_90", "k_99", "participation_ratio", "twonn", "evr_1")
_BASIS_DOC = "a basis id or name (GET /bases); default: the default basis"
_NO_BASIS = {409: {"description": "no basis for the served weights (build one with POST /bases), or a basis of "
                                  "other weights"}, 404: {"description": "unknown basis"}}
_PNG = {200: {"content": {"image/png": {}}, "description": "a PNG picture"}}


class AlignmentSizes(BaseModel):
    model_config = ConfigDict(extra="forbid")
    score: int = Field(500, ge=10, le=20_000, description="val-split images the heads are scored on")
    eval: int = Field(1000, ge=10, le=20_000, description="test-split images of the ablation curve")


class AlignmentRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [
        {"dataset": "world:colour"},
        {"label_set": {"classes": ["cat", "dog"]}, "dataset": "ds-0123456789abcdef0123", "fractions": [0.05, 0.1]}]})

    label_set: LabelSet | None = None
    label_set_id: str | None = None
    dataset: InlineDataset | str = Field(..., description="inline images, a dataset id, or 'world:<task>'")
    world_sizes: AlignmentSizes | None = None
    fractions: list[float] | None = Field(None, min_length=1, max_length=10,
                                          description="fractions of heads kept; default: the reference's top-k "
                                                      "points k in {1, max(2, 1%), 5%, 10%, 25%, 50%, 75%} of the "
                                                      "heads (floors)")
    seeds: int = Field(10, ge=1, le=50, description="random head sets per fraction")
    ablation: Literal["mean", "zero"] = Field("mean", description="what an ablated unit becomes")
    top: int = Field(5, ge=1, le=100, description="top heads listed per score")
    basis: str | None = Field(None, description="the basis whose per-head spectrum (k_90, evr_1) the report puts "
                                                "next to the scores: an id or name; default: the default basis")

    @field_validator("fractions")
    @classmethod
    def _fractions(cls, v: list[float] | None) -> list[float] | None:
        if v is not None and any(not 0 < f <= 1 for f in v):
            raise ValueError("every fraction must be in (0, 1]")
        return v


# ---- spectra ------------------------------------------------------------------------------------------------------


@router.get("/heads", response_model=Report, dependencies=[ApiKey], responses=_NO_BASIS,
            summary="Spectra and intrinsic dimension of every unit")
async def list_heads(rt: RuntimeDep, basis: str | None = Query(None, description=_BASIS_DOC)) -> dict[str, Any]:
    """One row per unit in paper order (emb, MLP of each layer, then each head by layer and head).

    Fields: cumulative explained-variance ratio of the first 32 components (``evr``), ``k_90`` and ``k_99`` (the
    number of components that explain more than 90 / 99 % of the variance), ``participation_ratio``
    ((sum of eigenvalues)^2 / sum of squares), ``evr_1`` and the TwoNN intrinsic dimension (``twonn``) on
    ``twonn_samples`` images of the basis's own source. ``basis`` names the basis (id, name, source). The first
    call per basis computes, later calls are served from memory. 409 when the served weights have no basis yet.
    """
    assert rt.heads is not None
    return await rt.heads.spectra(basis)


@router.get("/heads/spectrum.png", dependencies=[ApiKey], responses={**_PNG, **_NO_BASIS}, response_class=Response,
            summary="Layer x head heatmap of a spectral quantity")
async def spectrum_png(rt: RuntimeDep, value: Literal["k_90", "k_99", "participation_ratio", "twonn", "evr_1"] =
                       Query("k_90", description="the per-head quantity to draw"),
                       basis: str | None = Query(None, description=_BASIS_DOC)) -> Response:
    assert rt.heads is not None
    spectra = await rt.heads.spectra(basis)
    g = spectra["geometry"]
    matrix = heads_matrix(spectra, value, g["layers"], g["heads"])
    fmt = "{:.0f}" if value.startswith("k_") else "{:.2f}"
    png = await rt.analysis.run(head_heatmap_png, matrix, f"{spectra['model']}: {value} per head", value, (), fmt)
    return Response(png, media_type="image/png")


# ---- alignment ----------------------------------------------------------------------------------------------------


async def _prepare(body: AlignmentRequest, rt: RuntimeDep) -> tuple[dict[str, Any], Any, int]:
    """Validate; returns (spec, inline (pixels, labels) or None, number of images)."""
    assert rt.store is not None
    s = rt.settings
    spec: dict[str, Any] = {"weights_id": rt.store.backbone.weights_id,
                            "params": {"fractions": body.fractions, "seeds": body.seeds, "ablation": body.ablation,
                                       "top": body.top}}
    world, classes, templates = await world_and_label_set(body.dataset, body.world_sizes, AlignmentSizes,
                                                          body.label_set, body.label_set_id, rt, "head alignment")
    world_task = world["task"] if world else None
    if world:
        spec["world"] = world
    spec |= {"classes": classes, "templates": templates,
             "label_set_id": label_set_id(rt.store.backbone.weights_id, classes, templates)}
    inline = None
    if world_task is not None:
        n = spec["world"]["score"] + spec["world"]["eval"]
    elif isinstance(body.dataset, InlineDataset):
        n = len(body.dataset.images)
        if n != len(body.dataset.labels):
            raise InvalidRequest(f"{n} images but {len(body.dataset.labels)} labels")
        if n > s.max_inline_images:
            raise InvalidRequest(f"{n} inline images; the limit is {s.max_inline_images} (upload larger sets with "
                                 "POST /datasets)")
        unknown = sorted(set(body.dataset.labels) - set(classes))
        if unknown:
            raise InvalidRequest(f"labels that are not classes of the label set: {unknown}")
        inline_ds = body.dataset
        blobs = await rt.io.run(lambda: [decode_base64(b, i) for i, b in enumerate(inline_ds.images)])
        labels = [classes.index(lab) for lab in inline_ds.labels]
        if n > s.heads_sync_max_images:  # the worker reads it from the dataset store
            ds = await rt.io.run(dataset_store(rt).from_inline, blobs, list(inline_ds.labels))
            spec |= {"dataset_id": ds.dataset_id, "class_map": {c: classes.index(c) for c in ds.classes}}
        else:
            pixels = await rt.io.run(_decode, blobs, rt)
            inline = (pixels, torch.tensor(labels))
    else:
        ds = await rt.io.run(dataset_store(rt).get, body.dataset)
        unknown = sorted(set(ds.classes) - set(classes))
        if unknown:
            raise InvalidRequest(f"classes in the data that are not in the label set: {unknown}")
        spec |= {"dataset_id": ds.dataset_id, "class_map": {c: classes.index(c) for c in ds.classes}}
        n = len(ds.files)
    info = await rt.io.run(rt.store.bases.resolve, body.basis)  # 404 / 409 now, not in a job
    spec["basis"] = info.basis_id if info is not None else "reference"  # None: the world basis, not built yet
    return spec, inline, n


def _decode(blobs: list[bytes], rt: Runtime) -> torch.Tensor:
    assert rt.store is not None
    pre = rt.store.backbone.preprocess
    return torch.stack([pre(decode_image(b, rt.settings.max_image_pixels, i)) for i, b in enumerate(blobs)])


async def _class_embeddings(rt: Runtime, spec: dict[str, Any]) -> torch.Tensor:
    assert rt.text is not None
    return await rt.io.run(rt.text.class_embeddings, spec["label_set_id"], spec["classes"], spec["templates"])


async def _run_or_enqueue(body: AlignmentRequest, rt: Runtime) -> tuple[dict[str, Any] | None, JSONResponse | None]:
    assert rt.heads is not None
    spec, inline, n = await _prepare(body, rt)
    if n > rt.settings.heads_sync_max_images:
        s = rt.settings
        job = await rt.io.run(queue.enqueue, rt.jobs_redis, queue.HEADS, spec,
                              f"heads:{spec.get('dataset_id') or body.dataset}", s.job_timeout_s, s.job_result_ttl_s)
        url = f"/heads/alignment/{job.id}"
        accepted = HeadJobAccepted(job_id=job.id, status_url=url, images=n,
                                   reason=f"{n} images exceed heads_sync_max_images ({s.heads_sync_max_images})")
        return None, JSONResponse(accepted.model_dump(), status_code=202, headers={"Location": url})
    class_emb = await _class_embeddings(rt, spec)
    return await rt.heads.alignment(spec, class_emb, inline), None


_ALIGN_ERRORS: dict[int | str, dict[str, Any]] = {
    202: {"description": "too many images to answer directly: a job was queued (see status_url)"},
    404: {"description": "unknown dataset, label set or basis"},
    409: {"description": "no basis for the served weights (build one with POST /bases)"},
    413: {"description": "request or image too large"},
    415: {"description": "undecodable image"}, 422: {"description": "invalid request"},
    503: {"description": "not ready, or the job queue is unavailable"}}


@router.post("/heads/alignment", response_model=Report, dependencies=[AdminKey], responses=_ALIGN_ERRORS,
             summary="Per-head alignment with a label set, and the top-k head ablation curve")
async def alignment(body: AlignmentRequest, rt: RuntimeDep) -> Any:
    """For every head: ``supervised`` (zero-shot accuracy of the head's contribution alone) and
    ``text_correlation`` (the paper's U|T score: mean correlation, inside the span of the class embeddings,
    between the head and the sum of all heads), with ranks (1 = best). ``ablation``: accuracy keeping only the
    top ``k`` heads by each score, every other unit replaced by its mean (or zero), against random heads (mean
    and std over ``seeds``) and all units. World tasks score on their val split and evaluate on their test split;
    other data are split into stratified halves. Each head also carries the basis's ``k_90`` and ``evr_1``, and
    ``basis`` names the basis.
    """
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
             response_class=Response, summary="Alignment as a picture: score heatmap or ablation curve")
async def alignment_png(body: AlignmentRequest, rt: RuntimeDep,
                        score: Literal["text_correlation", "supervised"] = Query("text_correlation"),
                        picture: Literal["heatmap", "ablation"] = Query("heatmap")) -> Response:
    """The same computation as ``POST /heads/alignment``; a job (202) when the data are too large to answer now,
    whose picture is then at ``GET /heads/alignment/{job_id}.png``."""
    report, accepted = await _run_or_enqueue(body, rt)
    if accepted is not None:
        return accepted
    assert report is not None
    g = rt.store.backbone.geometry if rt.store else None
    assert g is not None
    png = await rt.analysis.run(_alignment_picture, report, score, picture, g.layers, g.heads)
    return Response(png, media_type="image/png")


def _job_report(rt: Runtime, job_id: str) -> dict[str, Any]:
    return queue.redis_call(lambda: queue.describe(queue.fetch(rt.jobs_redis, job_id, queue.HEADS)))


@router.get("/heads/alignment/{job_id}.png", dependencies=[AdminKey], response_class=Response,
            responses={**_PNG, 404: {"description": "unknown job"}, 409: {"description": "job not finished"}},
            summary="Picture of a finished alignment job")
async def alignment_job_png(job_id: str, rt: RuntimeDep,
                            score: Literal["text_correlation", "supervised"] = Query("text_correlation"),
                            picture: Literal["heatmap", "ablation"] = Query("heatmap")) -> Response:
    info = await rt.io.run(_job_report, rt, job_id)
    if info["status"] != "succeeded" or "heads" not in info:
        raise Conflict(f"job {job_id} is {info['status']}, not a finished head alignment")
    assert rt.store is not None
    g = rt.store.backbone.geometry
    png = await rt.analysis.run(_alignment_picture, info, score, picture, g.layers, g.heads)
    return Response(png, media_type="image/png")


@router.get("/heads/alignment/{job_id}", response_model=JobInfo, dependencies=[AdminKey],
            responses={404: {"description": "unknown job"}}, summary="Status, progress and result of an alignment job")
async def alignment_job(job_id: str, rt: RuntimeDep) -> dict[str, Any]:
    """Status as for fit jobs; when ``succeeded`` the body also holds the full alignment report."""
    return await rt.io.run(_job_report, rt, job_id)


# ---- one head (declared last: /heads/{layer}/{head} would otherwise shadow /heads/alignment/{job_id}) ----


@router.get("/heads/{layer}/{head}", response_model=Report, dependencies=[ApiKey],
            responses={**_NO_BASIS, 404: {"description": "no such head or basis"}},
            summary="One head: full spectrum and text descriptions")
async def head_detail(layer: int, head: int, rt: RuntimeDep,
                      method: Literal["somp", "textspan"] = Query("somp", description="description algorithm"),
                      atoms: int = Query(10, ge=1, le=50, description="texts describing the head"),
                      components: int = Query(5, ge=0, le=32, description="principal components described"),
                      component_atoms: int = Query(5, ge=1, le=20, description="texts per component"),
                      basis: str | None = Query(None, description=_BASIS_DOC)) -> dict[str, Any]:
    """Eigenvalues and cumulative EVR of all components; the head's outputs on the reference sample described by
    ``atoms`` dictionary texts (weights: RMS coefficient for SOMP, explained variance for TextSpan); each of the
    top ``components`` principal components described by OMP (signed weights: a component's sign is arbitrary).
    The head description needs images of the basis's source; for a basis built elsewhere it is null and
    ``description_note`` says why.
    """
    assert rt.heads is not None
    return await rt.heads.head_detail(layer, head, atoms, components, component_atoms, method, basis)


@router.get("/heads/{layer}/{head}/spectrum.png", dependencies=[ApiKey], responses={**_PNG, **_NO_BASIS},
            response_class=Response, summary="Explained-variance curve of one head (and its layer's MLP)")
async def head_spectrum_png(layer: int, head: int, rt: RuntimeDep,
                            n: int = Query(32, ge=2, le=4096, description="components drawn"),
                            basis_ref: str | None = Query(None, alias="basis", description=_BASIS_DOC)) -> Response:
    assert rt.heads is not None
    idx = rt.heads.head_index(layer, head)
    _, basis = await rt.analysis.run(rt.heads.basis, basis_ref)
    g = rt.heads.bb.geometry
    curves = {}
    for name, unit in ((f"head {layer}.{head}", 1 + g.layers + idx), (f"mlp {layer}", 1 + layer)):
        eig = basis.eigenvalues[unit]
        curves[name] = (eig.cumsum(0) / eig.sum().clamp_min(1e-30))[:n].tolist()
    png = await rt.analysis.run(evr_curves_png, curves, f"layer {layer}, head {head}: explained variance")
    return Response(png, media_type="image/png")
