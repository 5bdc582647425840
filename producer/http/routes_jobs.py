"""``/v1/ingest``, ``/v1/questions`` and ``/v1/jobs/...``: queue jobs, follow them, read their results."""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from typing import Annotated, Any

from fastapi import APIRouter, Depends, HTTPException, Query, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import StreamingResponse

from common.deletion import DeleteSelector
from common.jobs import JobInfo
from common.priorities import PRIORITY_HELP, check_priority
from common.schemas import JobStatus
from common.webhooks import check_url
from producer.client import Client
from producer.http.bodies import documents_body, invalid, lines_body, parse_documents, parse_questions
from producer.http.context import Context
from producer.http.schemas import (
    BODY_RESPONSES,
    JOB_NOT_FOUND,
    STORE_RESPONSES,
    VALIDATION_RESPONSE,
    DeleteRequest,
    JobId,
    problem,
)


def jobs_router(ctx: Context) -> APIRouter:
    client = ctx.client
    router = APIRouter()

    @router.post(
        "/ingest", status_code=202, response_model=JobInfo, tags=["jobs"],
        responses={**BODY_RESPONSES, 415: problem("Body neither JSON nor JSONL."), **VALIDATION_RESPONSE,
                   **STORE_RESPONSES},
        openapi_extra=documents_body(),
    )
    async def ingest(request: Request, response: Response, webhook_url: WebhookUrl = None,
                     force: Annotated[bool, Query(description="Re-embed documents even if unchanged.")] = False,
                     priority: JobPriority = None) -> JobInfo:
        """Queue documents for embedding and upsert: a JSON array, or JSONL (one object per line).

        The whole body is validated first: any invalid document answers 422 naming it
        (``["body", 3, "content"]``, or ``["body", "line 4", ...]`` for JSONL) and nothing
        is queued. Returns the job (as ``ragq status --json`` prints it) with 202.
        Documents unchanged since they were stored are not embedded again (``skipped``).
        A body of one document is interactive work, served ahead of bulk jobs.
        """
        body = await request.body()  # bounded by max_body_size: 413 past it
        docs = await run_in_threadpool(parse_documents, body, request.headers.get("content-type"))
        job = await run_in_threadpool(client.ingest_documents, docs, source="http", force=force,
                                      webhook_url=webhook_url, priority=priority)
        info = await run_in_threadpool(job.refresh)
        response.headers["Location"] = f"/v1/jobs/{job.id}"
        return info

    @router.delete("/documents", status_code=202, response_model=JobInfo, tags=["jobs"],
                   responses={**BODY_RESPONSES, **VALIDATION_RESPONSE, **STORE_RESPONSES})
    def delete_documents(body: DeleteRequest, response: Response) -> JobInfo:
        """Queue a delete job for the documents matching every condition given (at least
        one); the job counts documents (``completed``) and chunks deleted."""
        try:
            selector = DeleteSelector.of(**body.model_dump())
        except ValueError as exc:
            raise invalid(["body"], str(exc)) from None
        job = client.delete(selector)
        response.headers["Location"] = f"/v1/jobs/{job.id}"
        return job.refresh()

    @router.get("/jobs/{job_id}", response_model=JobInfo, tags=["jobs"],
                responses={**JOB_NOT_FOUND, **STORE_RESPONSES})
    def get_job(job_id: JobId) -> JobInfo:
        """A job's status, counts, throughput and per-item errors."""
        return existing(client, job_id)

    @router.get(
        "/jobs/{job_id}/results", tags=["jobs"], response_class=StreamingResponse,
        responses={200: {"description": "One JSON object per line, in input order.",
                         "content": {"application/x-ndjson": {"schema": {"type": "string"}}}},
                   **JOB_NOT_FOUND, **STORE_RESPONSES},
    )
    def job_results(job_id: JobId) -> StreamingResponse:
        """Stream the result lines finished so far as JSONL (partial while the job runs).

        ``X-Ragq-Job-Status`` tells whether more may come; ingest jobs have no result lines.
        """
        info = existing(client, job_id)
        return StreamingResponse(
            jsonl_chunks(client.job(job_id).results()),  # read window by window as the client takes it
            media_type="application/x-ndjson",
            headers={"X-Ragq-Job-Status": info.status, "X-Ragq-Job-Finished": str(info.is_finished).lower()},
        )

    @router.post("/jobs/{job_id}/cancel", response_model=JobInfo, tags=["jobs"],
                 responses={**JOB_NOT_FOUND, 409: problem("The job had already finished."), **STORE_RESPONSES})
    def cancel_job(job_id: JobId) -> JobInfo:
        """Cancel a queued or running job: workers skip its remaining batches."""
        job = client.job(job_id)
        if not job.cancel():
            info = existing(client, job_id)
            raise HTTPException(409, f"job {job_id} already finished ({info.status})")
        return job.refresh()

    @router.post(
        "/questions", status_code=202, response_model=JobInfo, tags=["jobs"],
        responses={**BODY_RESPONSES, 415: problem("Body neither JSONL nor JSON."), **VALIDATION_RESPONSE,
                   **STORE_RESPONSES},
        openapi_extra=lines_body("QuestionLine"),
    )
    async def questions(
        request: Request,
        response: Response,
        generate: Annotated[bool, Query(description="false: a retrieval-only job (sources, no answers).")] = True,
        webhook_url: WebhookUrl = None,
        priority: JobPriority = None,
    ) -> JobInfo:
        """Queue a question job: JSONL (one question object per line) or a JSON array of them.

        Like ingest, the body is validated first and any invalid line answers 422 naming
        it. Answers come from ``GET /v1/jobs/{id}/results``, one line per question, in order.
        """
        body = await request.body()
        lines = await run_in_threadpool(parse_questions, body, request.headers.get("content-type"))
        job = await run_in_threadpool(client.ask_many, lines, generate=generate, webhook_url=webhook_url,
                                      priority=priority)
        info = await run_in_threadpool(job.refresh)
        response.headers["Location"] = f"/v1/jobs/{job.id}"
        return info

    return router


def _webhook_url(webhook_url: Annotated[str | None, Query(
        max_length=2048, description="Announce the job's end here (job.completed, ...) instead of at RAGQ_WEBHOOK_URL.",
)] = None) -> str | None:
    """The ``webhook_url`` query parameter, checked like the CLI's (:func:`common.webhooks.check_url`)."""
    if webhook_url is None:
        return None
    try:
        return check_url(webhook_url)
    except ValueError as exc:
        raise invalid(["query", "webhook_url"], str(exc)) from None


WebhookUrl = Annotated[str | None, Depends(_webhook_url)]


def _priority(priority: Annotated[int | None, Query(description=PRIORITY_HELP)] = None) -> int | None:
    """The ``priority`` query parameter, checked like the CLI's (:func:`common.priorities.check_priority`)."""
    if priority is None:
        return None
    try:
        return check_priority(priority)
    except ValueError as exc:
        raise invalid(["query", "priority"], str(exc)) from None


JobPriority = Annotated[int | None, Depends(_priority)]


def jsonl_chunks(lines: Iterable[dict[str, Any]], size: int = 64 * 1024) -> Iterator[str]:
    """JSONL in pieces of about ``size`` characters: few threadpool hops, bounded memory."""
    pending: list[str] = []
    held = 0
    for line in lines:
        text = json.dumps(line, ensure_ascii=False) + "\n"
        pending.append(text)
        held += len(text)
        if held >= size:
            yield "".join(pending)
            pending, held = [], 0
    if pending:
        yield "".join(pending)


def existing(client: Client, job_id: str) -> JobInfo:
    info = client.job(job_id).refresh()
    if info.status == JobStatus.not_found.value:
        raise HTTPException(404, f"job {job_id} not found (expired or never created)")
    return info
