"""Training datasets (admin key): ``POST /datasets`` (tar or zip in ImageFolder layout), ``GET /datasets/{id}``."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request

from service.deps import AdminKey, RuntimeDep, dataset_store
from service.schemas import DatasetInfo

router = APIRouter(tags=["datasets"])


@router.post("/datasets", status_code=201, response_model=DatasetInfo, dependencies=[AdminKey],
             summary="Upload a tar or zip archive in ImageFolder layout (<class>/<image>)",
             responses={413: {"description": "body, member count or inflated size over the limits"},
                        415: {"description": "not an archive"}, 422: {"description": "bad archive or images"}},
             openapi_extra={"requestBody": {"content": {
                 "application/x-tar": {"schema": {"type": "string", "format": "binary"}},
                 "application/zip": {"schema": {"type": "string", "format": "binary"}}}, "required": True}})
async def upload_dataset(request: Request, rt: RuntimeDep) -> dict[str, Any]:
    """Limits (settings): the body (``max_request_bytes``), the number of members (``max_archive_members``), the
    inflated bytes of one member (``max_archive_member_bytes``) and of all (``max_archive_bytes``), checked while
    the archive is read, before anything larger is inflated. The id is a content hash (uploading twice is
    idempotent)."""
    data = await request.body()
    d = await rt.io.run(dataset_store(rt).from_archive, data)
    return {"dataset_id": d.dataset_id, "classes": d.classes, "counts": d.counts}


@router.get("/datasets/{dataset_id}", response_model=DatasetInfo, dependencies=[AdminKey],
            summary="Classes and counts of a dataset", responses={404: {"description": "unknown dataset"}})
async def get_dataset(dataset_id: str, rt: RuntimeDep) -> dict[str, Any]:
    d = await rt.io.run(dataset_store(rt).get, dataset_id)
    return {"dataset_id": d.dataset_id, "classes": d.classes, "counts": d.counts}
