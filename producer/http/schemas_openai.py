"""Response models of the OpenAI-shaped Batch API routes (``/v1/files``, ``/v1/batches``).

Field names and status values are OpenAI's (``openai.types.FileObject``, ``Batch``), so
the official client parses them unchanged; ragq's additions are extra fields it ignores.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import Path
from pydantic import BaseModel, Field

FileId = Annotated[str, Path(pattern=r"^[A-Za-z0-9_.-]{1,128}$", description="A file id from `POST /v1/files`.")]
BatchId = Annotated[str, Path(pattern=r"^[A-Za-z0-9_.-]{1,128}$", description="A batch id from `POST /v1/batches`.")]
BatchStatus = Literal["validating", "failed", "in_progress", "finalizing", "completed", "expired", "cancelling",
                      "cancelled"]
#: The endpoints a batch may run (each line's ``url`` must be the batch's).
BATCH_ENDPOINTS = ("/v1/chat/completions",)


class FileObject(BaseModel):
    id: str
    object: Literal["file"] = "file"
    bytes: int
    created_at: int
    filename: str
    purpose: str
    status: Literal["uploaded", "processed", "error"] = "processed"
    expires_at: int | None = None
    status_details: str | None = None


class FileList(BaseModel):
    object: Literal["list"] = "list"
    data: list[FileObject]
    first_id: str | None = None
    last_id: str | None = None
    has_more: bool = False


class FileDeleted(BaseModel):
    id: str
    object: Literal["file"] = "file"
    deleted: bool


class BatchCreate(BaseModel):
    input_file_id: Annotated[str, Field(min_length=1, max_length=128)]
    endpoint: Literal["/v1/chat/completions", "/v1/embeddings"] = Field(
        description="`/v1/chat/completions`: each line's last user message is answered from the retrieved documents; "
                    "`/v1/embeddings`: each line's inputs are embedded by the workers' model.")
    completion_window: Literal["24h"] = "24h"
    metadata: dict[Annotated[str, Field(max_length=64)], Annotated[str, Field(max_length=512)]] | None = Field(
        None, max_length=16, description="Up to 16 string pairs. ragq reads `top_k` (an integer) and `filter` "
                                         "(a JSON object) here as defaults for every line.")
    webhook_url: Annotated[str | None, Field(max_length=2048, description=(
        "ragq: announce the batch's end (`batch.completed`, ...) here instead of at RAGQ_WEBHOOK_URL."))] = None


class RequestCounts(BaseModel):
    total: int
    completed: int
    failed: int


class BatchError(BaseModel):
    code: str | None = None
    message: str | None = None
    param: str | None = None
    line: int | None = None


class BatchErrors(BaseModel):
    object: Literal["list"] = "list"
    data: list[BatchError]


class Batch(BaseModel):
    id: str
    object: Literal["batch"] = "batch"
    endpoint: str
    errors: BatchErrors | None = None
    input_file_id: str
    completion_window: str
    status: BatchStatus
    output_file_id: str | None = None
    error_file_id: str | None = None
    created_at: int
    in_progress_at: int | None = None
    expires_at: int | None = None
    finalizing_at: int | None = None
    completed_at: int | None = None
    failed_at: int | None = None
    expired_at: int | None = None
    cancelling_at: int | None = None
    cancelled_at: int | None = None
    request_counts: RequestCounts
    metadata: dict[str, str] | None = None
    job_id: str = Field(description="ragq: the question job underneath (`GET /v1/jobs/{id}`, `ragq status`).")


class BatchList(BaseModel):
    object: Literal["list"] = "list"
    data: list[Batch]
    first_id: str | None = None
    last_id: str | None = None
    has_more: bool = False


def page(items: list[Any], has_more: bool) -> dict[str, Any]:
    """The fields of an OpenAI cursor page around ``items`` (objects with an ``id``)."""
    return {"data": items, "first_id": items[0].id if items else None,
            "last_id": items[-1].id if items else None, "has_more": has_more}
