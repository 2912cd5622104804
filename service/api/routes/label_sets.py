"""The label-set registry: ``POST /label-sets`` (admin key), ``GET /label-sets/{id}`` (API key).

A label set's id is the content hash of the served weights id, its classes and its templates, so registering is
idempotent and every replica computes the same id (``service.stores.label_sets``).
"""

from __future__ import annotations

from fastapi import APIRouter, Path

from service.api.auth import AdminKey, ApiKey
from service.api.body import JsonBody
from service.api.deps import ModelQuery, ReadyDep, validate_label_set
from service.api.schemas import LABEL_SET_ID, LabelSetCreated, LabelSetOut, LabelSetRequest

router = APIRouter(tags=["label sets"])

_BODY = JsonBody(LabelSetRequest)


@router.post("/label-sets", response_model=LabelSetCreated, status_code=201, dependencies=[AdminKey],
             openapi_extra=_BODY.openapi, summary="Register a label set",
             responses={404: {"description": "unknown model"},
                        413: {"description": "classes x templates over the prompt limit, or the body over its limit"},
                        415: {"description": "the body is not application/json"},
                        422: {"description": "invalid label set"},
                        507: {"description": "the artifact volume is full"}})
async def create_label_set(rt: ReadyDep, label_set: LabelSetRequest = _BODY.depends) -> LabelSetCreated:
    """The id is a content hash of the model's weights id, the classes and the templates (idempotent): the label
    set belongs to that model."""
    rt = await rt.use(label_set.model)
    classes, templates = validate_label_set(label_set.classes, label_set.templates, rt.settings)
    return LabelSetCreated(model=rt.model.name,
                           label_set_id=await rt.io.run(rt.label_sets.register, classes, templates))


@router.get("/label-sets/{label_set_id}", response_model=LabelSetOut, dependencies=[ApiKey],
            responses={404: {"description": "unknown label set or model"},
                       409: {"description": "the label set belongs to another model (the message names it)"}},
            summary="Read a registered label set")
async def get_label_set(rt: ReadyDep, label_set_id: str = Path(..., pattern=LABEL_SET_ID),
                        model: str | None = ModelQuery) -> LabelSetOut:
    rt = await rt.use(model)
    classes, templates = await rt.io.run(rt.label_sets.get, label_set_id)
    return LabelSetOut(model=rt.model.name, label_set_id=label_set_id, classes=classes, templates=templates)
