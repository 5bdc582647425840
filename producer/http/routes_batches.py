"""``/v1/batches``: OpenAI's Batch API over question jobs (:mod:`producer.batches`).

Sync routes, so FastAPI runs them in its threadpool: creating a batch streams its input
file into the queue, and reading a finished one may write its output files first.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, HTTPException, Query

from producer.batches import BatchFinished, Batches, BatchInvalid, BatchNotFound
from producer.http.bodies import invalid
from producer.http.context import Context
from producer.http.schemas import BODY_RESPONSES, STORE_RESPONSES, problem
from producer.http.schemas_openai import Batch, BatchCreate, BatchId, BatchList, page

BATCH_NOT_FOUND = {404: problem("No such batch (expired or never created).")}


def batches_router(ctx: Context) -> APIRouter:
    batches = Batches(ctx.client, ctx.files)
    router = APIRouter(tags=["batch"])

    @router.post("/batches", response_model=Batch, responses={**BODY_RESPONSES, **STORE_RESPONSES})
    def create_batch(body: BatchCreate) -> Batch:
        """Run every request line of an uploaded file (`purpose=batch`) as one question job.

        Each line is `{"custom_id", "method": "POST", "url": endpoint, "body"}`; a
        chat-completions body's last user message is the question, answered from the
        retrieved documents. Lines that fail validation go to the error file; the rest run.
        """
        try:
            return Batch(**batches.create(body.input_file_id, body.endpoint, body.completion_window, body.metadata,
                                         webhook_url=body.webhook_url))
        except BatchInvalid as exc:
            raise invalid(["body", exc.param], str(exc)) from None

    @router.get("/batches", response_model=BatchList, responses=STORE_RESPONSES)
    def list_batches(
        after: Annotated[str | None, Query(max_length=128, description="The last id of the previous page.")] = None,
        limit: Annotated[int, Query(ge=1, le=100)] = 20,
    ) -> BatchList:
        """Batches, newest first."""
        found, more = batches.list(after=after, limit=limit)
        return BatchList(**page([Batch(**b) for b in found], more))

    @router.get("/batches/{batch_id}", response_model=Batch, responses={**BATCH_NOT_FOUND, **STORE_RESPONSES})
    def get_batch(batch_id: BatchId) -> Batch:
        """The batch's status and counts; its output files once it has ended."""
        try:
            return Batch(**batches.get(batch_id))
        except BatchNotFound as exc:
            raise HTTPException(404, str(exc)) from None

    @router.post("/batches/{batch_id}/cancel", response_model=Batch,
                 responses={**BATCH_NOT_FOUND, 409: problem("The batch had already ended."), **STORE_RESPONSES})
    def cancel_batch(batch_id: BatchId) -> Batch:
        """Cancel a batch: `cancelling` while running lines finish, then `cancelled` with the answers so far."""
        try:
            return Batch(**batches.cancel(batch_id))
        except BatchNotFound as exc:
            raise HTTPException(404, str(exc)) from None
        except BatchFinished as exc:
            raise HTTPException(409, str(exc)) from None

    return router
