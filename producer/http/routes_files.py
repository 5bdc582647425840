"""``/v1/files``: OpenAI's Files API over ragq's file store (:mod:`common.files`).

Uploads arrive as multipart (Starlette spools them to a temporary file past 1 MB) and
are copied into the store in 1 MB chunks; downloads stream from disk. The routes do
file I/O in the threadpool, never on the event loop.
"""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, File, Form, HTTPException, Query, UploadFile
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import StreamingResponse

from common.files import UPLOAD_PURPOSES, FileStore, FileTooLarge, StoredFile
from producer.http.bodies import invalid
from producer.http.context import Context
from producer.http.schemas import BODY_RESPONSES, problem
from producer.http.schemas_openai import FileDeleted, FileId, FileList, FileObject, page

FILE_NOT_FOUND = {404: problem("No such file (expired, deleted or never uploaded).")}


def files_router(ctx: Context) -> APIRouter:
    store = ctx.files
    router = APIRouter(tags=["batch"])

    @router.post("/files", response_model=FileObject, responses={**BODY_RESPONSES},
                 max_body_size=ctx.settings.file_max_bytes + 64 * 1024)
    async def upload(file: Annotated[UploadFile, File(description="JSONL: one request per line.")],
                     purpose: Annotated[str, Form(description="`batch`.")]) -> FileObject:
        """Upload a batch input file (at most `RAGQ_FILE_MAX_BYTES`; 413 past it); it expires after `RAGQ_FILE_TTL_S`."""
        if purpose not in UPLOAD_PURPOSES:
            raise invalid(["body", "purpose"], f"purpose must be one of {list(UPLOAD_PURPOSES)}, not {purpose!r}")
        try:
            stored = await run_in_threadpool(store.save, file.file, filename=file.filename or "", purpose=purpose)
        except FileTooLarge as exc:
            raise HTTPException(413, str(exc)) from None
        finally:
            await file.close()
        return FileObject(**stored.to_dict())

    @router.get("/files", response_model=FileList)
    def list_files(
        after: Annotated[str | None, Query(max_length=128, description="The last id of the previous page.")] = None,
        limit: Annotated[int, Query(ge=1, le=10000)] = 10000,
        order: Literal["asc", "desc"] = "desc",
        purpose: Annotated[str | None, Query(max_length=64)] = None,
    ) -> FileList:
        """Files by creation time (newest first unless `order=asc`)."""
        files, more = store.list(after=after, limit=limit, order=order, purpose=purpose)
        return FileList(**page([FileObject(**f.to_dict()) for f in files], more))

    @router.get("/files/{file_id}", response_model=FileObject, responses=FILE_NOT_FOUND)
    def get_file(file_id: FileId) -> FileObject:
        return FileObject(**existing_file(store, file_id).to_dict())

    @router.get("/files/{file_id}/content", response_class=StreamingResponse,
                responses={200: {"description": "The file's bytes.",
                                 "content": {"application/octet-stream": {"schema": {"type": "string"}}}},
                           **FILE_NOT_FOUND})
    def file_content(file_id: FileId) -> StreamingResponse:
        """The file's content, streamed from disk."""
        meta = existing_file(store, file_id)
        chunks = store.iter_bytes(file_id)
        if chunks is None:
            raise HTTPException(404, f"file {file_id} not found")
        return StreamingResponse(chunks, media_type="application/octet-stream",
                                 headers={"Content-Length": str(meta.bytes)})

    @router.delete("/files/{file_id}", response_model=FileDeleted, responses=FILE_NOT_FOUND)
    def delete_file(file_id: FileId) -> FileDeleted:
        if not store.delete(file_id):
            raise HTTPException(404, f"file {file_id} not found (expired, deleted or never uploaded)")
        return FileDeleted(id=file_id, deleted=True)

    return router


def existing_file(store: FileStore, file_id: str) -> StoredFile:
    meta = store.get(file_id)
    if meta is None:
        raise HTTPException(404, f"file {file_id} not found (expired, deleted or never uploaded)")
    return meta
