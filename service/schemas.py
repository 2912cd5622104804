"""Request and response models of the HTTP API (with the examples shown in /docs)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

__all__ = ["ClassifyRequest", "ClassifyResponse", "ImageResult", "LabelSet", "LabelSetCreated", "LabelSetOut",
           "Prediction", "Ready"]

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


class Prediction(BaseModel):
    label: str
    score: float = Field(..., description="softmax probability under exp(logit_scale) * cosine")


class ImageResult(BaseModel):
    top: list[Prediction]


class ClassifyResponse(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [{
        "model": "residual-tiny", "weights_id": "sha256:0123456789abcdef", "coefficients": None,
        "label_set_id": "ls-0123456789abcdef0123",
        "results": [{"top": [{"label": "red", "score": 0.97}, {"label": "blue", "score": 0.02}]}]}]})

    model: str
    weights_id: str
    coefficients: str | None = Field(..., description="name@version used, or null for zero-shot")
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
