"""Training datasets (admin key): ``POST /datasets`` (a tar or zip in ImageFolder layout, raw or as a multipart
file), ``GET /datasets/{id}``."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Path, Request

from service.api.auth import AdminKey
from service.api.body import read_form
from service.api.deps import ReadyDep
from service.api.schemas import DATASET_ID, DatasetInfo
from service.errors import InvalidRequest, UnsupportedMedia

router = APIRouter(tags=["datasets"])

ARCHIVE_TYPES = ("application/x-tar", "application/tar", "application/zip", "application/x-zip-compressed",
                 "application/gzip", "application/x-gzip", "application/octet-stream")
_CURL = ("curl --data-binary @pets.tar -H 'content-type: application/x-tar' <server>/datasets   "
         "(or a multipart upload: curl -F file=@pets.tar <server>/datasets)")


async def _archive_bytes(request: Request) -> bytes:
    """The archive: the raw body (a tar or zip content type), or the one file part of a multipart upload."""
    ctype = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if ctype == "multipart/form-data":
        async with read_form(request, 8, 8, what="a multipart upload holds exactly one file part (any name, e.g. "
                             "-F file=@pets.tar)") as form:
            files = [(k, v) for k, v in form.multi_items() if not isinstance(v, str)]
            others = [k for k, v in form.multi_items() if isinstance(v, str)]
            if others or len(files) != 1:
                raise InvalidRequest("a multipart upload holds exactly one file part (any name, e.g. -F file=@pets.tar)"
                                     f"; got {len(files)} files and fields {others[:5]}")
            return await files[0][1].read()
    if ctype not in ARCHIVE_TYPES:
        shown = ", ".join(ARCHIVE_TYPES[:3])
        raise UnsupportedMedia(f"send the archive as the raw body with an archive content type ({shown}) or as a "
                               f"multipart file: {_CURL}")
    return await request.body()


@router.post("/datasets", status_code=201, response_model=DatasetInfo, dependencies=[AdminKey],
             summary="Upload a tar or zip archive in ImageFolder layout (<class>/<image>)",
             responses={413: {"description": "body, member count or inflated size over the limits"},
                        415: {"description": "not an archive"}, 422: {"description": "bad archive, names or images"},
                        507: {"description": "the artifact volume is full (nothing is kept)"}},
             openapi_extra={"requestBody": {"required": True, "content": {
                 **{t: {"schema": {"type": "string", "format": "binary"}} for t in ARCHIVE_TYPES},
                 "multipart/form-data": {"schema": {"type": "object", "required": ["file"], "properties": {
                     "file": {"type": "string", "format": "binary"}}, "additionalProperties": False}}}}})
async def upload_dataset(request: Request, rt: ReadyDep) -> dict[str, Any]:
    """Limits (settings): the body (``max_request_bytes``), the number of members (``max_archive_members``), the
    inflated bytes of one member (``max_archive_member_bytes``) and of all (``max_archive_bytes``), checked while
    the archive is read, before anything larger is inflated. Class folder names are checked like label-set classes
    (UTF-8, no control characters, at most ``max_prompt_chars``). The id is a content hash (uploading twice is
    idempotent)."""
    data = await _archive_bytes(request)
    d = await rt.io.run(rt.datasets.from_archive, data)
    return {"dataset_id": d.dataset_id, "classes": d.classes, "counts": d.counts}


@router.get("/datasets/{dataset_id}", response_model=DatasetInfo, dependencies=[AdminKey],
            summary="Classes and counts of a dataset", responses={404: {"description": "unknown dataset"}})
async def get_dataset(rt: ReadyDep, dataset_id: str = Path(..., pattern=DATASET_ID)) -> dict[str, Any]:
    d = await rt.io.run(rt.datasets.get, dataset_id)
    return {"dataset_id": d.dataset_id, "classes": d.classes, "counts": d.counts}
