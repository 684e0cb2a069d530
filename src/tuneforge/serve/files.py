"""Files API: upload (multipart, streamed to disk), list, retrieve, content, delete."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, get_args

from fastapi import APIRouter, Query, Request
from fastapi.responses import FileResponse
from sqlalchemy import select
from sqlalchemy.orm import Session

from ..jobs.queue import FINAL
from ..settings import Settings
from ..store import blobs
from ..store.database import FileRow, JobRow, new_id
from ..store.keys import Principal
from .deps import DB, Caller, SettingsDep
from .errors import APIError, bad_request, conflict, not_found, unsupported
from .paging import check_limit, page
from .protocol import FileDeleted, FileList, FileObject, FilePurpose

MULTIPART_SLACK = 64 * 1024  # boundaries and form fields around the file itself


def file_object(row: FileRow) -> FileObject:
    return FileObject(id=row.id, bytes=row.bytes, created_at=int(row.created_at), filename=row.filename,
                      purpose=row.purpose, status=row.status)


def get_file(db: Session, caller: Principal, file_id: str) -> FileRow:
    row = db.scalar(select(FileRow).where(FileRow.id == file_id, FileRow.project == caller.project))
    if row is None:
        raise not_found("file", file_id, param="file_id")
    return row


def _keep_extension(path: Path, filename: str | None) -> Path:
    """The data readers tell formats apart by extension (.jsonl, .txt, .csv), so the stored blob keeps it."""
    ext = Path(filename or "").suffix.lower()
    if not (1 < len(ext) <= 10 and ext[1:].isalnum()):
        return path
    final = path.with_name(path.name + ext)
    path.rename(final)
    return final


def _refuse_unknown_fields(fields: dict[str, str]) -> None:
    """A form field other than file and purpose is refused by name, as a JSON body's unknown parameter
    is (protocol.Request): dropped, `expires_after` (the SDK sends `expires_after[seconds]`) would
    leave a file a user asked to have deleted kept for ever - nothing here deletes files by itself."""
    for name in sorted(set(fields) - {"file", "purpose"}):
        if name == "expires_after" or name.startswith("expires_after["):
            raise unsupported("expires_after (files that expire) is", "expires_after")
        raise bad_request(f"Unrecognized request argument supplied: {name}", param=name, code="unknown_parameter")


# --- handlers ---------------------------------------------------------------------------------------


async def create_file(request: Request, db: Session, caller: Principal, settings: Settings) -> FileObject:
    limit = settings.max_upload_bytes
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit + MULTIPART_SLACK:
        raise APIError(413, f"File is too large: the limit is {limit:,} bytes", param="file", code="file_too_large")
    file_id = new_id("file-")
    dest = blobs.blob_path(settings.files_dir, file_id)
    try:
        up = await blobs.receive_multipart(request.headers.get("content-type", ""), request.stream(), dest, limit)
    except blobs.UploadTooLarge as err:
        raise APIError(413, str(err), param="file", code="file_too_large") from err
    except blobs.BadUpload as err:
        raise bad_request(str(err), param="file") from err
    try:
        if up.path is None:
            raise bad_request("Missing required parameter: 'file'.", param="file", code="missing_required_parameter")
        _refuse_unknown_fields(up.fields)
        purpose = up.fields.get("purpose")
        if not purpose:
            raise bad_request("Missing required parameter: 'purpose'.", param="purpose",
                              code="missing_required_parameter")
        if purpose not in get_args(FilePurpose):
            raise bad_request(f"'{purpose}' is not one of {list(get_args(FilePurpose))} - 'purpose'",
                              param="purpose", code="invalid_value")
        dest = _keep_extension(dest, up.filename)
        row = FileRow(id=file_id, project=caller.project, filename=up.filename or file_id, purpose=purpose,
                      bytes=up.bytes, path=str(dest))
        db.add(row)
        db.commit()
    except Exception:
        blobs.delete_blob(dest)
        raise
    return file_object(row)


def store_file(db: Session, caller: Principal, settings: Settings, filename: str, content: bytes,
               purpose: str = "fine-tune") -> FileObject:
    """A file made by the server (not uploaded), stored and listed like an upload."""
    file_id = new_id("file-")
    dest = blobs.blob_path(settings.files_dir, file_id)
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_bytes(content)
    dest = _keep_extension(dest, filename)
    row = FileRow(id=file_id, project=caller.project, filename=filename, purpose=purpose, bytes=len(content),
                  path=str(dest))
    db.add(row)
    db.commit()
    return file_object(row)


def list_files(db: Session, caller: Principal, after: str | None, limit: int, order: str,
               purpose: str | None) -> FileList:
    check_limit(limit, 10000)
    stmt = select(FileRow).where(FileRow.project == caller.project)
    if purpose:
        stmt = stmt.where(FileRow.purpose == purpose)
    rows, more = page(db, stmt, FileRow, after, limit, order)
    return FileList.of([file_object(r) for r in rows], more)


def delete_file(db: Session, caller: Principal, file_id: str) -> FileDeleted:
    row = get_file(db, caller, file_id)
    in_use = db.scalar(select(JobRow.id).where(
        JobRow.project == caller.project, JobRow.status.not_in(FINAL),
        (JobRow.training_file == file_id) | (JobRow.validation_file == file_id),
    ))
    if in_use:
        raise conflict(f"File {file_id} is used by fine-tuning job {in_use}, which has not finished; "
                       "cancel the job or wait for it before deleting the file.", code="file_in_use")
    db.delete(row)
    db.commit()
    blobs.delete_blob(row.path)
    return FileDeleted(id=file_id)


# --- routes -----------------------------------------------------------------------------------------

router = APIRouter(prefix="/v1", tags=["files"])

_UPLOAD_BODY = {
    "requestBody": {
        "required": True,
        "content": {"multipart/form-data": {"schema": {
            "type": "object",
            "required": ["file", "purpose"],
            "properties": {
                "file": {"type": "string", "format": "binary"},
                "purpose": {"type": "string", "enum": list(get_args(FilePurpose))},
            },
        }}},
    }
}


@router.post("/files", response_model=FileObject, openapi_extra=_UPLOAD_BODY)
async def upload_route(request: Request, db: DB, caller: Caller, settings: SettingsDep):
    return await create_file(request, db, caller, settings)


@router.get("/files", response_model=FileList)
def list_route(db: DB, caller: Caller, after: str | None = None,
               limit: Annotated[int, Query()] = 10000, order: Annotated[str, Query(pattern="^(asc|desc)$")] = "desc",
               purpose: str | None = None):
    return list_files(db, caller, after, limit, order, purpose)


@router.get("/files/{file_id}", response_model=FileObject)
def retrieve_route(file_id: str, db: DB, caller: Caller):
    return file_object(get_file(db, caller, file_id))


@router.get("/files/{file_id}/content", response_class=FileResponse)
def content_route(file_id: str, db: DB, caller: Caller):
    row = get_file(db, caller, file_id)
    if not Path(row.path).is_file():  # (sending it was a 500: "The server had an error")
        raise APIError(404, f"The content of file {file_id} is no longer on this server's disk (moved or deleted): "
                            "ask the server's operator", param="file_id", code="file_content_missing")
    return FileResponse(row.path, media_type="application/octet-stream", filename=row.filename)


@router.delete("/files/{file_id}", response_model=FileDeleted)
def delete_route(file_id: str, db: DB, caller: Caller):
    return delete_file(db, caller, file_id)
