"""The coefficient-set registry: list sets and versions (API key), activate a version or roll back (admin key).

Replicas learn of new versions without a restart: the active version of a name is read from the shared artifact
store (``coefficients/<name>/ACTIVE``) when a request names it, and each ``name@version`` is loaded once into a
byte-bounded cache, so a request naming ``name@version`` always gets exactly that version.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Path

from service.api.auth import AdminKey, ApiKey
from service.api.body import JsonBody
from service.api.deps import ModelQuery, ReadyDep
from service.api.schemas import NAME, Activate, CoefficientSets, CoefficientVersions

router = APIRouter(tags=["coefficients"])

_BODY = JsonBody(Activate)
_NAME = Path(..., pattern=NAME, description="a coefficient set's name")


@router.get("/coefficients", response_model=CoefficientSets, dependencies=[ApiKey],
            responses={404: {"description": "unknown model"}},
            summary="Coefficient sets of a model and their active versions")
async def list_coefficients(rt: ReadyDep, model: str | None = ModelQuery) -> dict[str, Any]:
    rt = await rt.use(model)
    return await rt.io.run(rt.coefficients.summaries)


@router.get("/coefficients/{name}", response_model=CoefficientVersions, dependencies=[ApiKey],
            summary="Versions, label set, fit reports",
            responses={404: {"description": "unknown coefficient set or model"},
                       409: {"description": "the set belongs to another model (the message names it)"}})
async def coefficient_versions(rt: ReadyDep, name: str = _NAME, model: str | None = ModelQuery) -> dict[str, Any]:
    """An unreadable version file is listed with ``error`` (and cannot be activated) instead of failing the list."""
    rt = await rt.use(model)
    return await rt.io.run(rt.coefficients.versions, name)


@router.post("/coefficients/{name}/activate", response_model=CoefficientVersions, dependencies=[AdminKey],
             openapi_extra=_BODY.openapi, summary="Serve this version for plain `name` (rollback = activate an older "
                                                  "version)",
             responses={404: {"description": "unknown name, version or model"},
                        409: {"description": "the version belongs to another model (the message names it)"},
                        415: {"description": "the body is not application/json"},
                        422: {"description": "no version given, or the version cannot be loaded"},
                        507: {"description": "the artifact volume is full"}})
async def activate(rt: ReadyDep, name: str = _NAME, body: Activate = _BODY.depends,
                   model: str | None = ModelQuery) -> dict[str, Any]:
    rt = await rt.use(model)
    await rt.io.run(rt.coefficients.resolve, f"{name}@{body.version}")  # validate (and load) first
    await rt.io.run(rt.artifacts.activate, name, body.version)
    return await rt.io.run(rt.coefficients.versions, name)
