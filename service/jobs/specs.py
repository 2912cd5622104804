"""Typed job payloads: what the API enqueues and the worker runs, one model per kind of job.

The route builds the spec (everything validated at submission), RQ carries ``spec.model_dump(mode="json")`` with its
JSON serializer, and the worker parses it back with :func:`parse` (a payload that is not a valid spec fails the job
at once, never halfway). Fit hyperparameter defaults come from the library's :class:`residual.FitConfig`, written
once.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter

from residual import FitConfig
from service.sources import DatasetSource, MixtureSource, WorldTaskSource
from service.validation import Integer

__all__ = ["BASIS", "FIT", "HEADS", "KINDS", "AlignmentParams", "BasisJob", "FitHyperparameters", "FitJob",
           "HeadAlignmentJob", "JobSpec", "TraceContext", "parse"]

FIT, HEADS, BASIS = "fit-alignment", "head-alignment", "basis"
KINDS = (FIT, HEADS, BASIS)

_DEFAULTS = FitConfig()
MAX_SEED = 2**32 - 1


class FitHyperparameters(BaseModel):
    """Hyperparameters of a fit; each default is the library's (``residual.FitConfig``)."""

    model_config = ConfigDict(extra="forbid", strict=True)
    epochs: Integer = Field(_DEFAULTS.max_epochs, ge=1, le=200, description="at most this many epochs")
    patience: Integer = Field(_DEFAULTS.patience, ge=1, le=200, description="early stopping on validation accuracy")
    lr: float | None = Field(_DEFAULTS.lr, gt=0, le=10, description="default 0.8 (lambdas) or 1e-3 (linear)")
    batch_size: Integer = Field(_DEFAULTS.batch_size, ge=1, le=4096)
    evr_threshold: float = Field(_DEFAULTS.evr_threshold, gt=0, lt=1, description="fine: components kept per head")
    seed: Integer = Field(_DEFAULTS.seed, ge=0, le=MAX_SEED)
    val_fraction: float = Field(_DEFAULTS.val_fraction, gt=0, lt=1, description="validation share of the data "
                                                                                "(uploaded datasets)")

    def config(self, variant: str) -> FitConfig:
        return FitConfig(variant=variant, lr=self.lr, batch_size=self.batch_size, max_epochs=self.epochs,
                         patience=self.patience, evr_threshold=self.evr_threshold, seed=self.seed,
                         val_fraction=self.val_fraction)


class TraceContext(BaseModel):
    """W3C trace context of the request that enqueued the job (empty when tracing is off)."""

    model_config = ConfigDict(extra="forbid")
    traceparent: str | None = None
    tracestate: str | None = None


class _Job(BaseModel):
    model_config = ConfigDict(extra="forbid")
    weights_id: str = Field(..., description="the served weights the job must run with")
    model: str | None = Field(None, description="the served model (RESIDUAL_MODELS) the job runs with; None: the "
                                                "default (jobs enqueued before models had names)")
    trace: TraceContext = Field(default_factory=TraceContext)


class FitJob(_Job):
    kind: Literal["fit-alignment"] = FIT
    name: str
    variant: Literal["coarse", "fine", "full", "linear", "auto"]
    basis: str = Field(..., description="'fit-on-train', a basis id, or 'reference' (the world basis, built on first "
                                        "use: the operator opted in)")
    hyperparameters: FitHyperparameters = Field(default_factory=FitHyperparameters)
    activate: bool = True
    classes: list[str]
    templates: list[str]
    source: Annotated[WorldTaskSource | DatasetSource, Field(discriminator="kind")]


class BasisJob(_Job):
    kind: Literal["basis"] = BASIS
    name: str
    source: Annotated[WorldTaskSource | MixtureSource | DatasetSource, Field(discriminator="kind")]
    max_images: int = Field(..., ge=2)


class AlignmentParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    fractions: list[float] | None = None
    seeds: int = 10
    ablation: Literal["mean", "zero"] = "mean"
    top: int = 5


class HeadAlignmentJob(_Job):
    kind: Literal["head-alignment"] = HEADS
    classes: list[str]
    templates: list[str]
    label_set_id: str
    source: Annotated[WorldTaskSource | DatasetSource, Field(discriminator="kind")]
    basis: str = Field(..., description="a basis id, or 'reference' (the world basis, not built yet)")
    params: AlignmentParams = Field(default_factory=AlignmentParams)


JobSpec = Annotated[FitJob | BasisJob | HeadAlignmentJob, Field(discriminator="kind")]
_ADAPTER: TypeAdapter[FitJob | BasisJob | HeadAlignmentJob] = TypeAdapter(JobSpec)


def parse(payload: object) -> FitJob | BasisJob | HeadAlignmentJob:
    """A job payload as RQ hands it to the worker -> its typed spec (ValidationError when it is none)."""
    return _ADAPTER.validate_python(payload)
