"""The coefficient-set registry: list sets and versions (API key), activate a version or roll back (admin key).

Replicas learn of new versions without a restart: the active version of a name is read from the shared artifact
store (``coefficients/<name>/ACTIVE``) when a request names it, and each ``name@version`` is loaded once into a
byte-bounded cache, so a request naming ``name@version`` always gets exactly that version.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from pydantic import BaseModel, ConfigDict

from service.artifacts import ArtifactStore
from service.deps import AdminKey, ApiKey, RuntimeDep
from service.errors import NotFound
from service.schemas import CoefficientSets, CoefficientVersions

router = APIRouter(tags=["coefficients"])


def versions(artifacts: ArtifactStore, name: str) -> dict[str, Any]:
    """Blocking: the versions of ``name`` (oldest first) with their metadata; 404 when there is none."""
    rows = artifacts.versions(name)
    if not rows:
        raise NotFound(f"unknown coefficient set {name!r}")
    active = artifacts.active(name)
    out = []
    for row in rows:
        if "error" in row:
            out.append({"version": row["version"], "active": row["version"] == active, "error": row["error"]})
            continue
        meta = row["meta"]
        rep = meta.get("report", {})
        out.append({"version": row["version"], "active": row["version"] == active, "variant": meta.get("variant"),
                    "created_at": meta.get("created_at"), "n_parameters": meta.get("n_parameters"),
                    "label_set": meta.get("label_set"), "report": {k: v for k, v in rep.items() if k != "history"}})
    return {"name": name, "active": active, "versions": out}


def _summaries(artifacts: ArtifactStore) -> dict[str, Any]:
    out = []
    for name in artifacts.names():
        rows = artifacts.versions(name)
        if rows:
            out.append({"name": name, "active": artifacts.active(name), "versions": [r["version"] for r in rows]})
    return {"coefficient_sets": out}


@router.get("/coefficients", response_model=CoefficientSets, dependencies=[ApiKey],
            summary="Coefficient sets and their active versions")
async def list_coefficients(rt: RuntimeDep) -> dict[str, Any]:
    return await rt.io.run(_summaries, rt.artifacts)


@router.get("/coefficients/{name}", response_model=CoefficientVersions, dependencies=[ApiKey],
            summary="Versions, label set, fit reports", responses={404: {"description": "unknown coefficient set"}})
async def coefficient_versions(name: str, rt: RuntimeDep) -> dict[str, Any]:
    """An unreadable version file is listed with ``error`` (and cannot be activated) instead of failing the list."""
    return await rt.io.run(versions, rt.artifacts, name)


class Activate(BaseModel):
    model_config = ConfigDict(extra="forbid")
    version: str


@router.post("/coefficients/{name}/activate", response_model=CoefficientVersions, dependencies=[AdminKey],
             summary="Serve this version for plain `name` (rollback = activate an older version)",
             responses={404: {"description": "unknown name or version"},
                        422: {"description": "the version cannot be loaded"}})
async def activate(name: str, body: Activate, rt: RuntimeDep) -> dict[str, Any]:
    assert rt.store is not None
    await rt.io.run(rt.store.resolve_coefficients, f"{name}@{body.version}")  # validate (and load) first
    await rt.io.run(rt.artifacts.activate, name, body.version)
    return await rt.io.run(versions, rt.artifacts, name)
