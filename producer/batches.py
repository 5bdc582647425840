"""The Batch API's batches: a question job per batch, and the output files written when it ends.

``create`` streams the input file's request lines through :class:`QuestionReader` (the
envelope adapted by :mod:`common.batch_lines`) into a question job, exactly as
``ask-file`` does with a file of questions: bad lines keep their place as errors, the rest
run. ``get`` reads the job; once the job has ended, the caller that takes the batch's
finalizing lock writes the output and error files from the job's results (streamed, a
window of result batches at a time) into the file store and records the final status. So
workers never touch files: whichever API server (or CLI) looks first finalizes.

Used by the HTTP routes (``/v1/batches``) and the CLI (``ragq batches``) alike.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from typing import Any

from common.batch_lines import CHAT_ENDPOINT, LineDefaults, Respond, chat_adapter, chat_completion, output_line
from common.batches import BatchRecord, BatchState
from common.embed_lines import EMBEDDINGS_ENDPOINT, EmbedLineReader, embedding_response
from common.files import FileStore, StoredFile
from common.jobs import JobInfo
from common.questions import QuestionReader, was_refused
from common.schemas import JobStatus
from common.webhooks import check_url
from producer.client import Client, RagqError

ENDPOINTS = (CHAT_ENDPOINT, EMBEDDINGS_ENDPOINT)
#: How an answered line's response body is built, per endpoint.
_RESPOND: dict[str, Respond] = {CHAT_ENDPOINT: chat_completion, EMBEDDINGS_ENDPOINT: embedding_response}
WINDOWS = {"24h": 24 * 3600}
#: How long a cancelled batch waits for the batches workers are running before it is finalized.
CANCEL_GRACE_S = 600
#: Refused lines listed in a failed batch's ``errors`` (all of them are in its error file).
MAX_LISTED_ERRORS = 100
_LINE = re.compile(r":(\d+)(?::| \(|$)")


class BatchNotFound(RagqError):
    pass


class BatchInvalid(RagqError):
    """A create request that cannot run; ``param`` names the field."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(message)
        self.param = param


class BatchFinished(RagqError):
    pass


class Batches:
    """Create, read, list and cancel batches; reading a finished one finalizes it."""

    def __init__(self, client: Client, files: FileStore) -> None:
        self.client = client
        self.files = files

    def _record(self, batch_id: str) -> BatchRecord:
        s = self.client.settings
        return BatchRecord(self.client.redis, batch_id, prefix=s.key_prefix, ttl=max(s.file_ttl_s, s.job_ttl_s))

    # -- create ------------------------------------------------------------------------
    def create(self, input_file_id: str, endpoint: str = CHAT_ENDPOINT, completion_window: str = "24h",
               metadata: dict[str, str] | None = None, webhook_url: str | None = None) -> dict[str, Any]:
        """Validate the request, queue the file's lines as a question job; the batch object.

        The batch's end is announced (``batch.completed``, ...) at ``webhook_url``, else at
        ``RAGQ_WEBHOOK_URL`` when set.
        """
        if endpoint not in ENDPOINTS:
            raise BatchInvalid("endpoint", f"endpoint must be one of {list(ENDPOINTS)}, not {endpoint!r}")
        if completion_window not in WINDOWS:
            raise BatchInvalid("completion_window", f"completion_window must be one of {list(WINDOWS)}")
        stored = self.files.get(input_file_id)
        if stored is None:
            raise BatchInvalid("input_file_id", f"file {input_file_id} not found (expired, deleted or never uploaded)")
        if stored.purpose != "batch":
            raise BatchInvalid("input_file_id", f"file {input_file_id} has purpose {stored.purpose!r}, not 'batch'")
        try:
            defaults = LineDefaults.from_metadata(metadata)
        except ValueError as exc:
            raise BatchInvalid("metadata", str(exc)) from None
        try:
            url = check_url(webhook_url) if webhook_url else None
        except ValueError as exc:
            raise BatchInvalid("webhook_url", str(exc)) from None
        self.client.ping()
        batch_id = BatchRecord.new_id()
        now = int(time.time())
        state = BatchState(id=batch_id, job_id=batch_id.removeprefix("batch_"), endpoint=endpoint,
                           input_file_id=input_file_id, completion_window=completion_window, created_at=now,
                           expires_at=now + WINDOWS[completion_window], metadata=metadata or None)
        record = self._record(batch_id)
        record.create(state)
        handle = self.files.open(input_file_id)
        if handle is None:
            raise BatchInvalid("input_file_id", f"file {input_file_id} not found")
        meta = {"inputs": [input_file_id], "batch_id": batch_id}
        with handle:
            if endpoint == EMBEDDINGS_ENDPOINT:
                lines = EmbedLineReader(self.client.settings.embed_model).read_lines(handle, name=input_file_id)
                self.client.submit_embeddings(lines, meta=meta, job_id=state.job_id, webhook_url=url)
            else:
                items = QuestionReader().read_lines(handle, name=input_file_id, jsonl=True,
                                                    adapt=chat_adapter(endpoint, defaults))
                self.client.submit_items(items, meta=meta, job_id=state.job_id, webhook_url=url)
        record.update(in_progress_at=int(time.time()))
        return self.get(batch_id)

    # -- read ----------------------------------------------------------------------------
    def get(self, batch_id: str) -> dict[str, Any]:
        """The batch object now; a batch whose job has ended is finalized first."""
        record = self._record(batch_id)
        state = record.load()
        if state is None:
            raise BatchNotFound(f"batch {batch_id} not found (expired or never created)")
        if state.final:
            return _view(state, None, state.final)
        job = self.client.job(state.job_id)
        info = job.refresh()
        now = time.time()
        if info.status == JobStatus.not_found.value:
            if state.in_progress_at is None and now - state.created_at < CANCEL_GRACE_S:
                return _view(state, None, "validating")
            return self._finalize(record, info)
        if not info.is_finished:
            if now >= state.expires_at:
                job.cancel()  # the window has passed: what is done is kept, the rest expires
                return self.get(batch_id)
            return _view(state, info, "cancelling" if state.cancelling_at else
                         ("in_progress" if state.in_progress_at else "validating"))
        if (info.status == JobStatus.cancelled.value and state.cancelling_at
                and now - state.cancelling_at < CANCEL_GRACE_S and job.record().in_flight()):
            return _view(state, info, "cancelling")  # batches being answered now still write their lines
        return self._finalize(record, info)

    def list(self, *, after: str | None = None, limit: int = 20) -> tuple[list[dict[str, Any]], bool]:
        s = self.client.settings
        ids, more = BatchRecord.page(self.client.redis, prefix=s.key_prefix, after=after, limit=limit)
        batches = []
        for batch_id in ids:
            try:
                batches.append(self.get(batch_id))
            except BatchNotFound:
                continue  # expired between the index and the record
        return batches, more

    def cancel(self, batch_id: str) -> dict[str, Any]:
        """Cancel a running batch: queued lines are skipped, answers so far go to its output file."""
        record = self._record(batch_id)
        state = record.load()
        if state is None:
            raise BatchNotFound(f"batch {batch_id} not found (expired or never created)")
        if state.final:
            raise BatchFinished(f"batch {batch_id} already {state.final}")
        record.mark("cancelling_at", int(time.time()))
        self.client.job(state.job_id).cancel()
        return self.get(batch_id)

    # -- finalize ------------------------------------------------------------------------
    def _finalize(self, record: BatchRecord, info: JobInfo) -> dict[str, Any]:
        """Write the output and error files and record the final status (one caller at a time)."""
        if not record.lock(CANCEL_GRACE_S):
            state = record.load()
            assert state is not None
            return _view(state, info, "cancelling" if state.cancelling_at else "finalizing")
        try:
            state = record.load()
            if state is None or state.final:  # another caller finished it meanwhile
                return self.get(record.id)
            record.mark("finalizing_at", int(time.time()))
            refused: list[dict[str, Any]] = []
            output, _ = self._write(state, ok=True)
            error, _ = self._write(state, ok=False, refused=refused)
            final, errors = _decide(state, info, output, refused)
            record.update(final=final, final_at=int(time.time()), output_file_id=output.id if output else None,
                          error_file_id=error.id if error else None, errors=errors,
                          counts={"total": info.total, "completed": info.completed, "failed": info.failed})
        finally:
            record.unlock()
        return self.get(record.id)

    def _write(self, state: BatchState, *, ok: bool,
               refused: list[dict[str, Any]] | None = None) -> tuple[StoredFile | None, int]:
        """The output (``ok``) or error file of the batch, or None when it would be empty."""
        created = int(time.time())
        written = 0
        respond = _RESPOND[state.endpoint]

        def lines() -> Iterator[dict[str, Any]]:
            nonlocal written
            for index, result in enumerate(self.client.job(state.job_id).results()):
                good, line = output_line(result, batch_id=state.id, index=index, created=created, respond=respond)
                if good != ok:
                    continue
                written += 1
                if refused is not None and was_refused(result) and len(refused) < MAX_LISTED_ERRORS:
                    refused.append(_listed_error(result))
                yield line

        kind = "output" if ok else "error"
        stored = self.files.write_lines(lines(), filename=f"{state.id}_{kind}.jsonl", purpose="batch_output")
        if not written:
            self.files.delete(stored.id)
            return None, 0
        return stored, written


def _decide(state: BatchState, info: JobInfo, output: StoredFile | None,
            refused: list[dict[str, Any]]) -> tuple[str, list[dict[str, Any]] | None]:
    """The final status and, for a batch that could not run at all, its ``errors``."""
    if info.status == JobStatus.not_found.value:
        return "failed", [{"code": "job_expired", "message": f"the job {state.job_id} of this batch has expired"}]
    if info.status == JobStatus.cancelled.value:
        return ("cancelled" if state.cancelling_at else "expired"), None
    if info.status == JobStatus.failed.value and info.reason:
        return "failed", [{"code": "batch_failed", "message": info.reason}]
    if info.total == 0:
        return "failed", [{"code": "empty_file", "message": "the input file has no requests"}]
    if output is None and info.completed == 0 and len(refused) == min(info.failed, MAX_LISTED_ERRORS):
        return "failed", refused  # every line was refused: nothing ran
    return "completed", None


def _listed_error(result: dict[str, Any]) -> dict[str, Any]:
    message = str(result.get("error") or "")
    match = _LINE.search(message)
    return {"code": "invalid_request", "message": message, "param": None,
            "line": int(match.group(1)) if match else None}


def _view(state: BatchState, info: JobInfo | None, status: str) -> dict[str, Any]:
    """The OpenAI ``Batch`` object of a batch in ``status``."""
    if state.final:
        counts = state.counts
    elif info is not None and info.status != JobStatus.not_found.value:
        counts = {"total": info.total, "completed": info.completed, "failed": info.failed}
    else:
        counts = {"total": 0, "completed": 0, "failed": 0}
    ended = {f"{name}_at": state.final_at if state.final == name else None
             for name in ("completed", "failed", "expired")}
    return {
        "id": state.id, "object": "batch", "endpoint": state.endpoint,
        "errors": {"object": "list", "data": state.errors} if state.errors else None,
        "input_file_id": state.input_file_id, "completion_window": state.completion_window, "status": status,
        "output_file_id": state.output_file_id, "error_file_id": state.error_file_id,
        "created_at": state.created_at, "in_progress_at": state.in_progress_at, "expires_at": state.expires_at,
        "finalizing_at": state.finalizing_at, **ended, "cancelling_at": state.cancelling_at,
        "cancelled_at": state.final_at if state.final == "cancelled" else None,
        "request_counts": {k: int(counts.get(k, 0)) for k in ("total", "completed", "failed")},
        "metadata": state.metadata, "job_id": state.job_id,
    }
