"""Request and response models of the HTTP API (with the examples shown in /docs)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

__all__ = ["Alive", "ClassifyRequest", "ClassifyResponse", "CoefficientSetSummary", "CoefficientSets", "Contribution",
           "CoefficientVersion", "CoefficientVersions", "DatasetInfo", "HeadJobAccepted", "ImageResult",
           "InlineDataset", "JobAccepted", "JobInfo", "JobList", "LabelSet", "LabelSetCreated", "LabelSetOut",
           "Prediction", "Ready", "Report"]

_PNG_1PX = ("iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAIAAACQd1PeAAAADElEQVR4nGP4z8AAAAMBAQDJ/pLvAAAAAElFTkSuQmCC")


class LabelSet(BaseModel):
    """Classes and prompt templates; each template holds one ``{}`` where the class name goes."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={
        "examples": [{"classes": ["circle", "square", "triangle"], "templates": ["a photo of a {}."]}]})

    classes: list[str] = Field(..., description="class names, unique, in the order scores refer to")
    templates: list[str] | None = Field(None, description="prompt templates with '{}'; default a CLIP set")


class ClassifyRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{
        "images": [f"data:image/png;base64,{_PNG_1PX}"],
        "label_set": {"classes": ["red", "green", "blue"], "templates": ["a photo of a {} object."]},
        "top_k": 2,
    }]})

    images: list[str] = Field(..., description="base64 strings or data URIs (PNG, JPEG, WebP, first GIF frame)")
    label_set: LabelSet | None = Field(None, description="inline label set")
    label_set_id: str | None = Field(None, description="id returned by POST /label-sets")
    coefficients: str | None = Field(None, description="coefficient set: NAME (active version) or NAME@VERSION")
    top_k: int | None = Field(None, ge=1, le=1000, description="labels per image (default from settings)")
    scores: Literal["softmax", "cosine"] = Field(
        "softmax", description="'softmax': probabilities over the label set; 'cosine': the raw cosine between image "
                               "and class (independent per label, for multi-label use)")
    explain: int | None = Field(
        None, ge=1, le=100_000, description="k: each returned label also gets its logit (exp(logit_scale) * cos) and "
                                            "the k units (emb, L<l>.MLP, L<l>.H<h>) with the largest |contribution| "
                                            "to it; with k >= the number of units they sum to the logit")


class Contribution(BaseModel):
    unit: str = Field(..., description="'emb', 'L<layer>.MLP' or 'L<layer>.H<head>'")
    logit: float = Field(..., description="this unit's exact share of the label's logit")


class Prediction(BaseModel):
    label: str
    score: float = Field(..., description="softmax probability under exp(logit_scale) * cosine, or the cosine")
    logit: float | None = Field(None, description="with explain: exp(logit_scale) * cos(image, class)")
    contributions: list[Contribution] | None = Field(
        None, description="with explain: the units with the largest |contribution| to this logit, largest first")


class ImageResult(BaseModel):
    top: list[Prediction]


class BasisRef(BaseModel):
    """The basis a response was computed on."""

    basis_id: str = Field(..., description="b-<16 hex>: derived from the content hash")
    name: str
    source: dict[str, Any] = Field(..., description="what the basis was fitted on: kind (dataset, world-task, world, "
                                                    "images), dataset or task, n")
    n_images: int


class ClassifyResponse(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [{
        "model": "residual-tiny", "weights_id": "sha256:0123456789abcdef", "coefficients": None,
        "label_set_id": "ls-0123456789abcdef0123",
        "results": [{"top": [{"label": "red", "score": 0.97}, {"label": "blue", "score": 0.02}]}]}]})

    model: str
    weights_id: str
    coefficients: str | None = Field(..., description="name@version used, or null for zero-shot")
    basis: BasisRef | None = Field(None, description="the basis the coefficient set was fitted on (null: zero-shot, "
                                                     "or a coarse/linear set, which uses none)")
    label_set_id: str
    results: list[ImageResult] = Field(..., description="one entry per input image, in input order")


class LabelSetCreated(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [{"label_set_id": "ls-0123456789abcdef0123"}]})
    label_set_id: str


class LabelSetOut(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [{
        "label_set_id": "ls-0123456789abcdef0123", "classes": ["cat", "dog"], "templates": ["a photo of a {}."]}]})

    label_set_id: str
    classes: list[str]
    templates: list[str]


class Ready(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [{
        "status": "ready", "model": "residual-tiny", "weights_id": "sha256:0123456789abcdef", "device": "cpu",
        "redis": "up", "auth": "open"}]})

    status: str = Field(..., description="'ready', or 'degraded' when Redis is down (still 200)")
    model: str
    weights_id: str
    device: str
    redis: str
    auth: str = Field(..., description="'open' when no API key is configured (development default)")
    queue_maxmemory_policy: str | None = Field(
        None, description="maxmemory-policy of the job-queue Redis ('unknown' when CONFIG is not allowed)")
    warnings: list[str] = Field(default_factory=list, description="configuration problems worth fixing")


# ---- jobs, datasets, coefficient sets ----------------------------------------------------------------------------


class InlineDataset(BaseModel):
    model_config = ConfigDict(extra="forbid")
    images: list[str] = Field(..., description="base64 images or data URIs")
    labels: list[str] = Field(..., description="class name of each image")


class JobAccepted(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [
        {"job_id": "0f8e2a8c-4d7e-4b53-9d2a-3c5b0b8e9a11", "status_url": "/fit-alignment/0f8e2a8c-..."}]})
    job_id: str
    status_url: str


class HeadJobAccepted(JobAccepted):
    images: int = Field(..., description="images the job will analyse")
    reason: str = Field(..., description="why the request became a job")


class JobInfo(BaseModel):
    """A job's status; a succeeded job also carries its result (fits: ``coefficients``, ``activated`` and
    ``report``; head alignments: the whole alignment report)."""

    model_config = ConfigDict(extra="allow", json_schema_extra={"examples": [{
        "job_id": "0f8e2a8c-4d7e-4b53-9d2a-3c5b0b8e9a11", "kind": "fit-alignment", "name": "position",
        "status": "running", "progress": {"phase": "fitting", "fraction": 0.4, "epoch": 12, "val_accuracy": 0.91},
        "enqueued_at": "2026-11-29T10:00:00", "ended_at": None}]})

    job_id: str
    kind: str = Field(..., description="'fit-alignment', 'head-alignment' or 'basis'")
    name: str | None
    status: str = Field(..., description="queued, running, succeeded, failed or cancelled")
    progress: dict[str, Any] = Field(default_factory=dict, description="phase, fraction, epoch, val_accuracy...")
    enqueued_at: str | None
    ended_at: str | None
    error: str | None = Field(None, description="last line of the failure, when failed")


class JobList(BaseModel):
    total: int
    offset: int
    limit: int
    jobs: list[JobInfo]


class DatasetInfo(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [
        {"dataset_id": "ds-0123456789abcdef0123", "classes": ["cat", "dog"], "counts": {"cat": 10, "dog": 12}}]})
    dataset_id: str
    classes: list[str]
    counts: dict[str, int]


class CoefficientVersion(BaseModel):
    version: str
    active: bool
    variant: str | None = None
    created_at: str | None = None
    n_parameters: int | None = None
    label_set: dict[str, Any] | None = None
    report: dict[str, Any] = Field(default_factory=dict, description="the fit report (without the epoch history)")
    error: str | None = Field(None, description="set when the file cannot be read; such a version cannot be served")


class CoefficientVersions(BaseModel):
    name: str
    active: str | None
    versions: list[CoefficientVersion]


class CoefficientSetSummary(BaseModel):
    name: str
    active: str | None
    versions: list[str]


class CoefficientSets(BaseModel):
    coefficient_sets: list[CoefficientSetSummary]


class Alive(BaseModel):
    status: str = Field(..., description="always 'alive'")


class Report(BaseModel):
    """A computed report (head spectra, head details, alignments); its fields are documented on each route."""

    model_config = ConfigDict(extra="allow")


class BasisOut(BasisRef):
    model: str
    weights_id: str
    hash: str = Field(..., description="content hash (sha256 of the tensors)")
    created_at: str
    shipped: bool = Field(..., description="ships with the package")
    k_90: dict[str, float] = Field(..., description="over the heads: mean, median, min and max number of components "
                                                    "that explain 90 % of the variance")


class BasisUnit(BaseModel):
    unit: str = Field(..., description="'emb', 'L<layer>.MLP' or 'L<layer>.H<head>'")
    k_90: int
    k_99: int
    evr_1: float


class BasisDetail(BasisOut):
    units: list[BasisUnit] = Field(..., description="one row per unit, in the paper's order")


class DefaultBasis(BaseModel):
    basis_id: str | None = Field(..., description="what a request without 'basis' uses now (null: none yet)")
    rule: str = Field(..., description="why (RESIDUAL_REFERENCE_BASIS, the shipped basis, or the newest)")
    problem: str | None = Field(None, description="set when requests that need a basis would fail (409)")


class BasisList(BaseModel):
    weights_id: str = Field(..., description="the served weights")
    default: DefaultBasis
    bases: list[BasisOut] = Field(..., description="newest first")
