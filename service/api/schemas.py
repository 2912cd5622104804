"""Every request and response model of the HTTP API, in one place (with the examples shown in /docs).

Identifiers are documented with the exact pattern the service enforces (``pattern`` in the schema). Where a field's
check lives in code, because its error message says more than a pattern can (dataset ids next to world tasks, names,
basis references), the pattern is in the schema all the same, so an outside tool sees the rule. Limits that come
from settings (``max_images``, ``max_classes``, ...) are written into the served schema by ``service.api.app``.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from residual import VARIANT_INFO
from service.jobs.specs import FitHyperparameters
from service.settings import MODEL_NAME
from service.sources import world_task_names
from service.validation import INTEGRAL, Integer

__all__ = ["BASIS_REF", "COEFFICIENT_REF", "DATASET_REF", "JOB_ID", "LABEL_SET_ID", "MODEL_NAME", "NAME", "VERSION",
           "Activate", "AlignmentReport", "AlignmentRequest", "AlignmentSizes", "Alive", "BasisComparison",
           "BasisDetail", "BasisList", "BasisOut", "BasisRef", "BasisRequest", "BasisUnit", "ClassifyRequest",
           "ClassifyResponse", "CoefficientSetSummary", "CoefficientSets", "CoefficientVersion",
           "CoefficientVersions", "Contribution", "DatasetInfo", "DefaultBasis", "DiagnoseRequest", "DriftReport",
           "EmbeddingItem", "EmbeddingsRequest", "EmbeddingsResponse", "ErrorBody", "FitRequest", "HeadDetail",
           "HeadJobAccepted", "HeadSpectra", "ImageResult", "InlineDataset", "JobAccepted", "JobInfo", "JobList",
           "LabelSet", "LabelSetCreated", "LabelSetDiagnosis", "LabelSetOut", "LabelSetRequest", "ModelCard",
           "ModelList", "ModelState", "Prediction", "Ready", "SimilaritySummary", "UnitDrift", "UnitSimilarity",
           "UnitSpectrum", "Usage", "WorldSizes"]

_PNG_1PX = ("iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAIAAACQd1PeAAAADElEQVR4nGP4z8AAAAMBAQDJ/pLvAAAAAElFTkSuQmCC")

# ---- identifiers: the patterns the service enforces ---------------------------------------------------------------
NAME = r"^[a-z0-9][a-z0-9_-]{0,63}$"
VERSION = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"
COEFFICIENT_REF = r"^[a-z0-9][a-z0-9_-]{0,63}(@[A-Za-z0-9][A-Za-z0-9_.-]{0,63})?$"
LABEL_SET_ID = r"^ls-[0-9a-f]{20}$"
DATASET_ID = r"^ds-[0-9a-f]{20}$"
JOB_ID = r"^[A-Za-z0-9-]{1,64}$"
BASIS_NAME = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"
BASIS_REF = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"
_TASKS = "|".join(world_task_names())
DATASET_REF = rf"^(ds-[0-9a-f]{{20}}|world:({_TASKS}))$"
BASIS_SOURCE = rf"^(ds-[0-9a-f]{{20}}|world:({_TASKS}|mixture))$"


_CTRL = "\\x00-\\x1f\\x7f-\\x9f\\u202a-\\u202e\\u2066-\\u2069"  # control and bidirectional-override characters
TEXT = f"^[^{_CTRL}]*[^\\s{_CTRL}][^{_CTRL}]*$"
"""A class name or any text from a client: no control or bidirectional characters, not only whitespace."""
TEMPLATE = f"^[^{{}}{_CTRL}]*\\{{\\}}[^{{}}{_CTRL}]*$"
"""A prompt template: '{}' exactly once, no other braces, no control or bidirectional characters."""
IMAGE = r"^(data:[A-Za-z0-9/+.-]*(;[A-Za-z0-9=.-]+)*;base64,)?[A-Za-z0-9+/=\s]*[A-Za-z0-9+/][A-Za-z0-9+/=\s]*$"
"""An image as base64 or a base64 data URI (whitespace inside is ignored)."""
IMAGE_OR_URL = rf"(?:^https?://\S+$)|(?:{IMAGE})"
"""An image as base64, a data URI, or an http(s) URL: the published pattern where RESIDUAL_IMAGE_URL_ALLOWLIST is set
(``service.api.app`` writes it into the schema; without an allowlist a URL is refused, and the schema says so)."""


def _pattern(pattern: str) -> dict[str, Any]:
    """Schema-only pattern: documented for outside tools, checked in code with a message that says what to send."""
    return {"pattern": pattern}


def _model_field() -> Any:
    return Field(None, description="the served model to use (GET /v1/models lists them); default: the first of "
                                   "RESIDUAL_MODELS", json_schema_extra=_pattern(MODEL_NAME))


class ErrorBody(BaseModel):
    """Every error answer: ``{"error": {"type", "message"}}``."""

    class Detail(BaseModel):
        type: str = Field(..., description="stable machine-readable kind (invalid_request, not_found, ...)")
        message: str = Field(..., description="what went wrong and what to do, for a person")

    error: Detail


# ---- label sets, classification -----------------------------------------------------------------------------------


class LabelSet(BaseModel):
    """Classes and prompt templates; each template holds one ``{}`` where the class name goes."""

    model_config = ConfigDict(extra="forbid", strict=True, json_schema_extra={
        "examples": [{"classes": ["circle", "square", "triangle"], "templates": ["a photo of a {}."]}]})

    classes: list[str] = Field(..., description="class names, unique, in the order scores refer to",
                               json_schema_extra={"minItems": 1, "uniqueItems": True,
                                                  "items": {"type": "string", "pattern": TEXT}})
    templates: list[str] | None = Field(None, description="prompt templates, each with '{}' exactly once and no other "
                                                          "braces; default: residual.DEFAULT_TEMPLATES",
                                        json_schema_extra={"minItems": 1, "items": {"type": "string",
                                                                                    "pattern": TEMPLATE}})


def _given(name: str) -> dict[str, Any]:
    """JSON schema: the field is present and not null (an explicit null means "not given")."""
    return {"required": [name], "properties": {name: {"not": {"type": "null"}}}}


ONE_LABEL_SET = {"not": {"allOf": [_given("label_set"), _given("label_set_id")]}}
"""label_set and label_set_id are alternatives: never both."""
SOME_LABEL_SET = {"anyOf": [_given("label_set"), _given("label_set_id"), _given("coefficients")]}
"""/classify: the label set is inline, by id, or the coefficient set's own."""
FORM_LABEL_SET = {"dependentSchemas": {"label_set": {"properties": {"label_set_id": False}}},
                  "anyOf": [{"required": [name]} for name in ("label_set", "label_set_id", "coefficients")]}
"""The same two rules for a multipart form, whose parts are there or not (a part is never null)."""


class ClassifyRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, json_schema_extra={"examples": [{
        "images": [f"data:image/png;base64,{_PNG_1PX}"],
        "label_set": {"classes": ["red", "green", "blue"], "templates": ["a photo of a {} object."]},
        "top_k": 2,
    }], **ONE_LABEL_SET, **SOME_LABEL_SET})

    model: str | None = _model_field()
    images: list[str] = Field(..., description="base64 strings or data URIs (PNG, JPEG, WebP, first GIF frame; "
                                               "line breaks inside are ignored), or http(s):// URLs where the "
                                               "deployment allows them (RESIDUAL_IMAGE_URL_ALLOWLIST; else 422)",
                              json_schema_extra={"minItems": 1, "items": {"type": "string", "pattern": IMAGE}})
    label_set: LabelSet | None = Field(None, description="inline label set")
    label_set_id: str | None = Field(None, description="id returned by POST /label-sets",
                                     json_schema_extra=_pattern(LABEL_SET_ID))
    coefficients: str | None = Field(None, description="coefficient set: NAME (active version) or NAME@VERSION",
                                     json_schema_extra=_pattern(COEFFICIENT_REF))
    top_k: Annotated[int, Field(ge=1, le=1000), INTEGRAL] | None = Field(
        None, description="labels per image (default from settings)")
    scores: Literal["softmax", "cosine"] = Field(
        "softmax", description="'softmax': probabilities over the label set; 'cosine': the raw cosine between image "
                               "and class (independent per label, for multi-label use)")
    explain: Annotated[int, Field(ge=1, le=100_000), INTEGRAL] | None = Field(
        None, description="k: each returned label also gets its logit (exp(logit_scale) * cos) "
                                            "and the k units (emb, L<l>.MLP, L<l>.H<h>) with the largest "
                                            "|contribution| to it; with k >= the number of units (all of them) they "
                                            "sum to the logit")


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


class LabelSetRequest(LabelSet):
    """A label set to register, for one served model (its id hashes that model's weights)."""

    model_config = ConfigDict(extra="forbid", strict=True, json_schema_extra={
        "examples": [{"classes": ["circle", "square", "triangle"], "templates": ["a photo of a {}."]}]})

    model: str | None = _model_field()


class LabelSetCreated(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [{"model": "residual-tiny",
                                                              "label_set_id": "ls-0123456789abcdef0123"}]})
    model: str = Field(..., description="the model the label set belongs to")
    label_set_id: str


class LabelSetOut(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [{
        "model": "residual-tiny", "label_set_id": "ls-0123456789abcdef0123", "classes": ["cat", "dog"],
        "templates": ["a photo of a {}."]}]})

    model: str
    label_set_id: str
    classes: list[str]
    templates: list[str]


class DiagnoseRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, json_schema_extra={"examples": [
        {"label_set": {"classes": ["cat", "dog", "kitten"]}},
        {"dataset": "world:colour"},
        {"label_set_id": "ls-0123456789abcdef0123", "dataset": "ds-0123456789abcdef0123"}], **ONE_LABEL_SET})

    label_set: LabelSet | None = None
    label_set_id: str | None = Field(None, json_schema_extra=_pattern(LABEL_SET_ID))
    dataset: str | None = Field(None, description="labelled images to measure zero-shot on: a dataset id or "
                                                  "'world:<task>' (its val split); without a label set, theirs",
                                json_schema_extra=_pattern(DATASET_REF))
    images: Integer = Field(500, ge=10, le=2000, description="world tasks: val images used")
    top: Integer = Field(10, ge=1, le=100, description="pairs and heads listed")
    model: str | None = _model_field()


class ClassPair(BaseModel):
    a: str
    b: str
    cosine: float = Field(..., description="cosine of the two classes' prompt-averaged text embeddings")


class HeadTextShare(BaseModel):
    unit: str
    layer: int
    head: int
    text_share: float = Field(..., description="share of the label set's text directions inside the head's "
                                               "subspace (k at 0.9), in [0, 1]")
    k_90: int


class ClassAccuracy(BaseModel):
    label: str
    images: int
    accuracy: float | None = Field(..., description="null when the data hold no image of the class")


class ConfusedPair(BaseModel):
    true: str
    predicted: str
    count: int
    share: float = Field(..., description="of the true class's images")


class DataDiagnosis(BaseModel):
    dataset: str
    images: int
    accuracy: float = Field(..., description="zero-shot accuracy on these images")
    per_class: list[ClassAccuracy]
    confusion: list[list[int]] = Field(..., description="rows: true class, columns: predicted, in label-set order")
    confused_pairs: list[ConfusedPair] = Field(..., description="the most confused (true, predicted) pairs")


class LabelSetDiagnosis(BaseModel):
    model: str
    label_set_id: str
    classes: list[str]
    pairs: list[ClassPair] = Field(..., description="the closest class pairs in text space, closest first: the "
                                                    "classes zero-shot will confuse most")
    basis: BasisRef | None = Field(..., description="the basis the head shares were measured in (null: none yet)")
    heads: list[HeadTextShare] | None = Field(..., description="the heads that carry the label set, highest "
                                                               "share first (null without a basis; see note)")
    note: str | None = None
    data: DataDiagnosis | None = Field(None, description="with a dataset: how zero-shot does on it")


class UnitDrift(BaseModel):
    unit: str = Field(..., description="'emb', 'L<layer>.MLP' or 'L<layer>.H<head>'")
    score: float = Field(..., description="sqrt(mean_shift^2 + max(0, energy_outside / reference share - 1)^2)")
    energy_outside: float = Field(..., description="share of the traffic's energy outside the unit's top-k subspace")
    mean_shift: float = Field(..., description="RMS displacement of the traffic's mean, in reference standard "
                                               "deviations, over the top-k components")
    description: list[str] | None = Field(None, description="the head's text description (the most drifted heads)")


class DriftReport(BaseModel):
    model: str
    basis: BasisRef | None = Field(..., description="the basis whose coordinates the statistics are in")
    against: Literal["basis", "training data"] = Field(
        ..., description="'basis': the basis's own data; 'training data': the coefficient set's training images")
    coefficients: str | None = Field(None, description="the coefficient set compared with (name@version)")
    window: Literal["recent", "all"]
    n_images: int = Field(..., description="traffic images the figures cover (every replica's)")
    replicas: int = Field(..., description="replicas whose statistics were added")
    since: float = Field(..., description="when this replica began tracking the reference (epoch seconds)")
    score: float = Field(..., description="the deployment's score: the mean of the top tenth of the unit scores")
    units: list[UnitDrift] = Field(..., description="every unit, most drifted first")
    note: str | None = None


# ---- health -----------------------------------------------------------------------------------------------------


class Alive(BaseModel):
    status: Literal["alive"] = Field(..., description="always 'alive'")


class ModelState(BaseModel):
    name: str
    architecture: str
    state: Literal["not loaded", "loading", "ready", "failed", "unloaded"] = Field(
        ..., description="'not loaded' / 'unloaded': loads on first use (memory budget); 'failed': the last load "
                         "failed (a request tries again)")
    resident: bool = Field(..., description="loaded in this process now")
    default: bool
    device: str
    weights_id: str | None = Field(..., description="known once the model has loaded")
    bytes: int | None = Field(..., description="parameters and buffers, measured at its first load")
    error: str | None = None


class Ready(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [{
        "status": "ready", "model": "residual-tiny", "weights_id": "sha256:0123456789abcdef", "device": "cpu",
        "redis": "up", "queue": "up", "auth": "open"}]})

    status: Literal["ready", "degraded"] = Field(..., description="'ready', or 'degraded' when a Redis is down or the "
                                                                  "queue refuses writes (still 200)")
    model: str = Field(..., description="the default model (ready: the replica is ready when it is)")
    weights_id: str
    device: str
    models: list[ModelState] = Field(default_factory=list, description="every served model and its state (a model "
                                                                       "still loading is reported, not fatal)")
    redis: Literal["up", "down"] = Field(..., description="the text cache's Redis")
    queue: Literal["up", "down", "refusing writes"] = Field(
        ..., description="the job queue's Redis: 'refusing writes' when it is full (jobs answer 503)")
    auth: Literal["open", "enabled"] = Field(..., description="'open' when no API key is configured (development)")
    queue_maxmemory_policy: str | None = Field(
        None, description="maxmemory-policy of the job-queue Redis ('unknown' when CONFIG is not allowed)")
    warnings: list[str] = Field(default_factory=list, description="configuration problems worth fixing")


# ---- jobs, datasets, coefficient sets ----------------------------------------------------------------------------


class InlineDataset(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    images: list[str] = Field(..., min_length=2, description="base64 images or data URIs",
                              json_schema_extra={"items": {"type": "string", "pattern": IMAGE}})
    labels: list[str] = Field(..., min_length=2, description="class name of each image (the same count)",
                              json_schema_extra={"items": {"type": "string", "pattern": TEXT}})


class WorldSizes(BaseModel):
    """Images per split of a ``world:<task>`` fit."""

    model_config = ConfigDict(extra="forbid", strict=True)
    train: Integer = Field(2000, ge=10, le=50_000)
    val: Integer = Field(500, ge=10, le=20_000)
    test: Integer = Field(1000, ge=10, le=20_000)


def _variant_doc() -> str:
    rows = [f"'{name}': {info.parameters}; {'needs a basis' if info.uses_basis else 'no basis'}; "
            f"{info.starting_point}" for name, info in VARIANT_INFO.items()]
    rows.append("'auto': fits coarse, fine, full and linear on the same features (extracted once) and keeps the best "
                "on validation, ties to fewer parameters; the report's 'variants' holds all four (lr: each "
                "variant's default unless given)")
    return "what is learned. " + " | ".join(rows)


class FitRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, json_schema_extra={"examples": [
        {"name": "position", "dataset": "world:position", "variant": "full"},
        {"name": "my-labels", "dataset": "ds-0123456789abcdef0123"},
        {"name": "my-labels", "label_set": {"classes": ["cat", "dog"]}, "dataset": "ds-0123456789abcdef0123"}],
        **ONE_LABEL_SET})

    name: str = Field(..., description="coefficient set to create or to add a version to",
                      json_schema_extra=_pattern(NAME))
    label_set: LabelSet | None = Field(None, description="default: a world task's own label set, or an uploaded "
                                                         "dataset's class folders with the default templates")
    label_set_id: str | None = Field(None, json_schema_extra=_pattern(LABEL_SET_ID))
    dataset: InlineDataset | str = Field(..., description="inline images, a dataset id (POST /datasets), or "
                                                          "'world:<task>' ")
    world_sizes: WorldSizes | None = None
    variant: Literal["full", "fine", "coarse", "linear", "auto"] = Field("full", description=_variant_doc())
    hyperparameters: FitHyperparameters = Field(default_factory=FitHyperparameters)  # type: ignore[arg-type]
    basis: str = Field("reference", description="'reference' (the default basis), 'fit-on-train' (a PCA of this "
                                                "dataset's training images), or a basis id or name (GET /bases)",
                       json_schema_extra=_pattern(BASIS_REF))
    activate: bool = Field(True, description="make the result the active version when the fit ends, unless the "
                                             "active version changed while the job ran (e.g. a rollback)")
    model: str | None = _model_field()


class JobAccepted(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [
        {"model": "residual-tiny", "job_id": "0f8e2a8c-4d7e-4b53-9d2a-3c5b0b8e9a11",
         "status_url": "/fit-alignment/0f8e2a8c-..."}]})
    model: str = Field(..., description="the model the job runs with")
    job_id: str
    status_url: str


class HeadJobAccepted(JobAccepted):
    images: int = Field(..., description="images the job will analyse")
    reason: str = Field(..., description="why the request became a job")


class JobInfo(BaseModel):
    """A job's status; a succeeded job also carries its result: fits ``coefficients``, ``activated``, ``activation``,
    ``written`` (and ``identical_to`` and ``message`` when an identical version existed), ``basis`` and ``report``;
    basis builds ``basis``; head alignments the whole alignment report."""

    model_config = ConfigDict(extra="allow", json_schema_extra={"examples": [{
        "job_id": "0f8e2a8c-4d7e-4b53-9d2a-3c5b0b8e9a11", "kind": "fit-alignment", "name": "position",
        "status": "running", "progress": {"phase": "fitting", "fraction": 0.4, "epoch": 12, "val_accuracy": 0.91},
        "enqueued_at": "2026-11-29T10:00:00", "ended_at": None}]})

    job_id: str
    kind: Literal["fit-alignment", "head-alignment", "basis"]
    name: str | None
    model: str | None = Field(None, description="the model the job runs with (null: jobs enqueued before models "
                                                "had names, which run with the default)")
    status: Literal["queued", "running", "cancelling", "succeeded", "failed", "cancelled"] = Field(
        ..., description="'cancelling': a cancel was accepted and the job stops at its next batch or chunk")
    progress: dict[str, Any] = Field(default_factory=dict, description="phase, fraction, epoch, val_accuracy, "
                                                                       "images, total...")
    enqueued_at: str | None
    ended_at: str | None
    error: str | None = Field(None, description="last line of the failure, when failed")
    coefficients: str | None = Field(None, description="fits: name@version")
    activated: bool | None = Field(None, description="fits: whether this job made it the active version")
    activation: str | None = Field(None, description="fits: why (not) activated")
    written: bool | None = Field(None, description="fits: false when an identical version already existed")
    identical_to: str | None = Field(None, description="fits: the existing identical version")
    message: str | None = None
    report: dict[str, Any] | None = Field(None, description="fits: the fit report (without the epoch history)")
    basis: dict[str, Any] | None = Field(None, description="the basis the job used or built")


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
    model: str = Field(..., description="the model whose versions these are")
    name: str
    active: str | None
    versions: list[CoefficientVersion]


class CoefficientSetSummary(BaseModel):
    name: str
    active: str | None
    versions: list[str]


class CoefficientSets(BaseModel):
    model: str = Field(..., description="the model whose coefficient sets these are")
    coefficient_sets: list[CoefficientSetSummary]


class Activate(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True,
                              json_schema_extra={"examples": [{"version": "v-0123456789ab"}]})
    version: str = Field(..., description="a version of this name (GET /coefficients/{name})",
                         json_schema_extra=_pattern(VERSION))


# ---- bases --------------------------------------------------------------------------------------------------------


class BasisRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, json_schema_extra={"examples": [
        {"name": "my-domain-10k", "dataset": "ds-0123456789abcdef0123"},
        {"name": "world-shape", "dataset": "world:shape", "max_images": 2000}]})

    name: str = Field(..., description="a label for the basis (1-64 letters, digits, '.', '_', '-'); need not be "
                                       "unique: a name resolves to the newest basis with it",
                      json_schema_extra=_pattern(BASIS_NAME))
    dataset: str = Field(..., description="an uploaded dataset id (labels are ignored), 'world:<task>' (that task's "
                                          "train split) or 'world:mixture' (the world's reference set)",
                         json_schema_extra=_pattern(BASIS_SOURCE))
    max_images: Integer = Field(10_000, ge=2, le=200_000, description="images used (a dataset larger than this is "
                                                                  "subsampled evenly over its files)")
    model: str | None = _model_field()


class BasisOut(BasisRef):
    model: str
    weights_id: str
    hash: str = Field(..., description="content hash (sha256 of the tensors)")
    created_at: str
    shipped: bool = Field(..., description="ships with the package")
    k_90: dict[str, float] = Field(..., description="over the heads: mean, median, min and max number of components "
                                                    "that explain 90 % of the variance")
    warnings: list[str] = Field(default_factory=list, description="e.g. too few images for the components it keeps")


class BasisUnit(BaseModel):
    unit: str = Field(..., description="'emb', 'L<layer>.MLP' or 'L<layer>.H<head>'")
    k_90: int
    k_99: int
    evr_1: float


class BasisDetail(BasisOut):
    served_model: str = Field(..., description="the served model this basis belongs to ('model' is the "
                                               "architecture it was built with)")
    units: list[BasisUnit] = Field(..., description="one row per unit, in the paper's order")


class DefaultBasis(BaseModel):
    basis_id: str | None = Field(..., description="what a request without 'basis' uses now (null: none yet)")
    rule: str = Field(..., description="why (RESIDUAL_REFERENCE_BASIS, the shipped basis, or the newest)")
    problem: str | None = Field(None, description="set when requests that need a basis would fail (409)")


class UnitSimilarity(BaseModel):
    unit: str = Field(..., description="'emb', 'L<layer>.MLP' or 'L<layer>.H<head>'")
    similarity: float = Field(..., description="normalised spectral cosine of the unit's two bases, in [0, 1]")


class SimilaritySummary(BaseModel):
    heads_mean: float
    heads_median: float
    heads_min: float
    heads_max: float
    mlps_mean: float
    least_similar_heads: list[str] = Field(..., description="the five heads whose bases differ most")


class BasisComparison(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [{
        "model": "residual-tiny", "a": {"basis_id": "b-0123456789abcdef", "name": "imagenet-10k",
                                        "source": {"kind": "dataset"}, "n_images": 10000},
        "b": {"basis_id": "b-fedcba9876543210", "name": "sketches", "source": {"kind": "dataset"}, "n_images": 2000},
        "tau": 0.9, "summary": {"heads_mean": 0.81, "heads_median": 0.85, "heads_min": 0.32, "heads_max": 0.99,
                                "mlps_mean": 0.9, "least_similar_heads": ["L5.H2"]},
        "units": [{"unit": "emb", "similarity": 1.0}]}]})

    model: str
    a: BasisRef
    b: BasisRef
    tau: float = Field(..., description="components kept per unit: k at this explained variance")
    summary: SimilaritySummary
    units: list[UnitSimilarity] = Field(..., description="one row per unit, in the paper's order")


class BasisList(BaseModel):
    model: str = Field(..., description="the model whose bases these are")
    weights_id: str = Field(..., description="its weights")
    default: DefaultBasis
    bases: list[BasisOut] = Field(..., description="newest first")


# ---- heads --------------------------------------------------------------------------------------------------------


class UnitSpectrum(BaseModel):
    unit: int = Field(..., description="index in the paper's order: emb 0, MLP l at 1 + l, head (l, h) at 1 + L + "
                                       "l*H + h")
    type: Literal["emb", "mlp", "head"]
    layer: int
    head: int
    evr: list[float] = Field(..., description="cumulative explained-variance ratio of the first components")
    k_90: int
    k_99: int
    participation_ratio: float
    evr_1: float
    twonn: float | None = Field(..., description="TwoNN intrinsic dimension on the basis's own images (null when "
                                                 "the server has none)")


class Geometry(BaseModel):
    layers: int
    heads: int
    head_dim: int
    out_dim: int


class HeadSpectra(BaseModel):
    """``GET /heads``: one row per unit."""

    model: str
    weights_id: str
    basis: BasisRef
    basis_hash: str
    basis_samples: int
    twonn_samples: int
    geometry: Geometry
    units: list[UnitSpectrum]
    twonn_note: str | None = None


class DescribedText(BaseModel):
    text: str
    weight: float


class HeadDescription(BaseModel):
    method: Literal["somp", "textspan"]
    samples: int
    dictionary_size: int
    texts: list[DescribedText]
    explained: list[float]


class ComponentDescription(BaseModel):
    component: int
    eigenvalue: float
    explained_variance_ratio: float
    texts: list[DescribedText]


class HeadDetail(BaseModel):
    """``GET /heads/{layer}/{head}``."""

    model: str
    layer: int
    head: int
    unit: int
    basis: BasisRef
    basis_hash: str
    summary: UnitSpectrum
    eigenvalues: list[float]
    evr: list[float]
    k_90: int
    k_99: int
    participation_ratio: float
    description: HeadDescription | None
    components: list[ComponentDescription]
    description_note: str | None = None


class AlignmentSizes(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    score: Integer = Field(500, ge=10, le=20_000, description="val-split images the heads are scored on")
    eval: Integer = Field(1000, ge=10, le=20_000, description="test-split images of the ablation curve")


class AlignmentRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, json_schema_extra={"examples": [
        {"dataset": "world:colour"},
        {"label_set": {"classes": ["cat", "dog"]}, "dataset": "ds-0123456789abcdef0123", "fractions": [0.05, 0.1]}],
        **ONE_LABEL_SET})

    label_set: LabelSet | None = None
    label_set_id: str | None = Field(None, json_schema_extra=_pattern(LABEL_SET_ID))
    dataset: InlineDataset | str = Field(..., description="inline images, a dataset id, or 'world:<task>'")
    world_sizes: AlignmentSizes | None = None
    fractions: list[Annotated[float, Field(gt=0, le=1)]] | None = Field(None, min_length=1, max_length=10,
                                          description="fractions of heads kept, each in (0, 1]; default: the "
                                                      "reference's top-k points k in {1, max(2, 1%), 5%, 10%, 25%, "
                                                      "50%, 75%} of the heads (floors)")
    seeds: Integer = Field(10, ge=1, le=50, description="random head sets per fraction")
    ablation: Literal["mean", "zero"] = Field("mean", description="what an ablated unit becomes")
    top: Integer = Field(5, ge=1, le=100, description="top heads listed per score")
    basis: str | None = Field(None, description="the basis whose per-head spectrum (k_90, evr_1) the report puts "
                                                "next to the scores: an id or name; default: the default basis",
                              json_schema_extra=_pattern(BASIS_REF))
    model: str | None = _model_field()


class HeadScore(BaseModel):
    layer: int
    head: int
    supervised: float
    text_correlation: float
    rank_supervised: int
    rank_text_correlation: int
    k_90: int
    evr_1: float


class TopHead(BaseModel):
    layer: int
    head: int
    score: float


class AlignmentReport(BaseModel):
    """``POST /heads/alignment`` (and a head-alignment job's result)."""

    model: str
    weights_id: str
    classes: list[str]
    label_set_id: str | None
    dataset: str
    basis: BasisRef
    heads: list[HeadScore]
    top_heads: dict[str, list[TopHead]] = Field(..., description="by score: text_correlation, supervised")
    ablation: dict[str, Any] = Field(..., description="fractions, k, points, ablation, one accuracy list per score, "
                                                      "random, random_std, all_units, heads_only")
    n_score: int
    n_eval: int
    split: str


# ---- OpenAI-shaped embeddings -------------------------------------------------------------------------------------


class EmbeddingsRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, json_schema_extra={"examples": [
        {"model": "residual-tiny", "input": ["a red circle", "a blue square"]},
        {"model": "residual-tiny:position", "input": ["data:image/png;base64,..."], "modality": "image",
         "encoding_format": "base64"}]})

    model: str | None = Field(None, min_length=1, max_length=200,
                              description="'<model>' or '<model>:<coefficient set>[@version]' (GET /v1/models); "
                                          "default: the default model")
    input: str | list[str] = Field(..., description="texts, or images as base64 / data URIs (or http(s):// URLs "
                                                    "where RESIDUAL_IMAGE_URL_ALLOWLIST allows them) with modality "
                                                    "'image'")
    modality: Literal["text", "image"] = "text"
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: Annotated[int, Field(ge=1), INTEGRAL] | None = Field(
        None, description="accepted only when equal to the model's dimension")
    user: str | None = Field(None, max_length=256, description="ignored (OpenAI compatibility)")


class EmbeddingItem(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str = Field(..., description="floats, or base64 of little-endian float32")


class Usage(BaseModel):
    prompt_tokens: int = Field(..., description="text tokens (without padding); images count 0")
    total_tokens: int


class EmbeddingsResponse(BaseModel):
    object: Literal["list"] = "list"
    data: list[EmbeddingItem]
    model: str
    usage: Usage


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "residual-serve"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


# ---- the Open Inference Protocol (KServe v2) ------------------------------------------------------------------------

V2Parameter = str | int | float | bool


class V2Error(BaseModel):
    """The protocol's error body (every ``/v2`` error answer)."""

    error: str = Field(..., description="what went wrong and what to do")


class V2ServerMetadata(BaseModel):
    name: str
    version: str
    extensions: list[str] = Field(..., description="'binary_tensor_data': the binary tensor extension")


class V2Health(BaseModel):
    live: bool | None = None
    ready: bool | None = None


class V2ModelReady(BaseModel):
    name: str
    ready: bool


class V2TensorMetadata(BaseModel):
    name: str
    datatype: str
    shape: list[int] = Field(..., description="-1: any size")


class V2ModelMetadata(BaseModel):
    name: str
    versions: list[str] = Field(..., description="the served weights' id")
    platform: str
    inputs: list[V2TensorMetadata]
    outputs: list[V2TensorMetadata]
    parameters: dict[str, V2Parameter] = Field(default_factory=dict)


class V2Tensor(BaseModel):
    """An input tensor: ``images`` (BYTES ``[n]``: encoded image files; base64 or http(s) URLs as JSON strings) or
    ``labels`` (BYTES ``[C]``: class names). With the binary extension, ``parameters.binary_data_size`` gives its
    bytes after the JSON header (each BYTES element: a 4-byte little-endian length, then the bytes)."""

    model_config = ConfigDict(extra="forbid")
    name: str = Field(..., min_length=1, max_length=64)
    shape: list[Annotated[int, Field(ge=0, le=1_000_000)]] = Field(..., min_length=1, max_length=4)
    datatype: str = Field(..., min_length=1, max_length=16)
    parameters: dict[str, V2Parameter] | None = None
    data: list[Any] | None = Field(None, description="the elements, row-major (nested lists are flattened)")


class V2RequestedOutput(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(..., min_length=1, max_length=64)
    parameters: dict[str, V2Parameter] | None = Field(None, description="'binary_data': true for binary data")


class V2InferRequest(BaseModel):
    """``POST /v2/models/{model}/infer``. Request ``parameters``: ``coefficients`` (``NAME`` or ``NAME@VERSION``),
    ``templates`` (one template, or a JSON list of templates, as a string), ``label_set_id``, ``scores``
    (``softmax`` or ``cosine``), ``binary_data_output`` (every output as binary data); ``priority`` and ``timeout``
    are accepted and ignored."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{
        "id": "42",
        "inputs": [{"name": "images", "shape": [1], "datatype": "BYTES", "data": [_PNG_1PX]},
                   {"name": "labels", "shape": [3], "datatype": "BYTES", "data": ["red", "green", "blue"]}],
        "parameters": {"templates": "a photo of a {} object."}}]})
    id: str | None = Field(None, max_length=256)
    parameters: dict[str, V2Parameter] | None = None
    inputs: list[V2Tensor] = Field(..., min_length=1, max_length=2)
    outputs: list[V2RequestedOutput] | None = Field(None, max_length=2)


class V2OutputTensor(BaseModel):
    name: str
    datatype: str
    shape: list[int]
    parameters: dict[str, V2Parameter] | None = None
    data: list[Any] | None = None


class V2InferResponse(BaseModel):
    model_name: str
    model_version: str
    id: str | None = None
    parameters: dict[str, V2Parameter] = Field(default_factory=dict)
    outputs: list[V2OutputTensor]
