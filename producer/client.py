"""The Python API of ragq's producer side: submit jobs, poll them, search.

``Client().ingest(paths)`` streams the inputs, validates them, packs them into
byte-bounded batches, enqueues one Celery task per batch on the ``ingest`` queue and
returns a :class:`Job` handle at once. The producer never loads a model: it sends
tasks by name, so it imports neither torch nor the worker code.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import redis
from celery import Celery

from common import priorities, tasknames
from common.batching import pack_batches
from common.config import Settings
from common.deletion import DeleteSelector
from common.docseq import DocSequences, Stamper
from common.embed_lines import EmbedItem
from common.embed_lines import pack as pack_embed_items
from common.embed_lines import refused_line as refused_embed_line
from common.evaluation import (
    CUTOFF,
    EvalError,
    EvalQuestion,
    EvalReport,
    QuestionResult,
    read_eval_file,
    read_eval_lines,
)
from common.inputs import InputEvent, InputReader, document_from_object
from common.jobs import BatchOutcome, JobInfo, JobRecord
from common.limits import ingest_limits, qa_limits
from common.questions import MAX_TOP_K, AnswerResult, LineItem, QuestionItem, QuestionReader, rejected_line
from common.runtime import redis_client
from common.webhooks import check_url
from common.schemas import DocumentItem, ItemError, JobKind, JobStatus, Source
from workers.celeryconfig import build_config

ProgressCallback = Callable[[JobInfo], None]
T = TypeVar("T")

#: Item errors written to the record in one round trip while streaming.
_ERROR_FLUSH = 200


class RagqError(RuntimeError):
    """A problem the user can act on (no worker answering, job not found, ...)."""


class JobTimeout(RagqError):
    pass


class WorkerTimeout(RagqError):
    """No worker answered a synchronous request (search, info, embed) in time."""


class WorkerFailed(RagqError):
    """A worker took a synchronous request and failed it (the store unreachable, say)."""


@dataclass(frozen=True)
class WorkerRequest:
    """One synchronous request to a worker (a task whose result is awaited): what to send."""

    name: str
    args: tuple[Any, ...]
    argsrepr: str | None
    what: str  # for messages: "search", "embedding", "info"
    #: Someone waits for it: the interactive queue, ahead of bulk batches.
    interactive: bool = True


def worker_failed(what: str, exc_type: str, message: str) -> WorkerFailed:
    return WorkerFailed(f"the worker failed the {what} request: {exc_type}: {' '.join(message.split())[:500]}")


@dataclass
class Job:
    """A handle on one job: an id and a connection, like arq's ``Job``."""

    id: str
    client: Client

    def record(self) -> JobRecord:
        return self.client._record(self.id)

    def refresh(self) -> JobInfo:
        return self.record().info()

    def status(self) -> JobStatus:
        return self.record().status()

    def wait(
        self,
        timeout: float | None = None,
        *,
        poll_s: float = 0.5,
        on_progress: ProgressCallback | None = None,
    ) -> JobInfo:
        """Poll until the job reaches a final status; raise :class:`JobTimeout` after ``timeout``."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            info = self.refresh()
            if on_progress is not None:
                on_progress(info)
            if info.status == JobStatus.not_found.value:
                raise RagqError(f"job {self.id} not found (expired or never created)")
            if info.is_finished:
                return info
            if deadline is not None and time.monotonic() >= deadline:
                raise JobTimeout(f"job {self.id} still {info.status} after {timeout:.0f}s ({info.done}/{info.total} items)")
            time.sleep(poll_s)

    def cancel(self) -> bool:
        return self.record().cancel()

    def results(self) -> Iterable[dict[str, Any]]:
        return self.record().iter_results()

    def answers(self) -> list[AnswerResult]:
        """The output lines stored so far (all of them once finished), in input order."""
        return [AnswerResult.from_line(line, job_id=self.id) for line in self.results()]


@contextmanager
def _enqueuing(record: JobRecord) -> Iterator[None]:
    """Seal the job once its batches are enqueued; a producer that stops midway fails it."""
    try:
        yield
    except BaseException as exc:
        record.fail(f"producer stopped while enqueuing: {exc!r}")
        raise
    finally:
        record.seal()


class Client:
    """Connects to Redis and sends tasks by name; build one per process and reuse it."""

    def __init__(self, settings: Settings | None = None) -> None:
        self.settings = settings or Settings()
        self.redis: redis.Redis = redis_client(self.settings)
        self.celery = Celery("ragq-producer", set_as_current=False)
        self.celery.config_from_object(build_config(self.settings))
        self._sender: Celery | None = None

    def _record(self, job_id: str) -> JobRecord:
        return JobRecord(self.redis, job_id, prefix=self.settings.key_prefix, ttl=self.settings.job_ttl_s)

    def job(self, job_id: str) -> Job:
        return Job(job_id, self)

    def ping(self) -> None:
        try:
            self.redis.ping()
        except redis.RedisError as exc:
            raise RagqError(f"cannot reach Redis: {exc}") from exc

    # -- ingestion -------------------------------------------------------------------
    def webhook_for(self, url: str | None) -> str | None:
        """Where a new job's end is announced: its own URL (checked), else ``RAGQ_WEBHOOK_URL``."""
        if url:
            try:
                return check_url(url)
            except ValueError as exc:
                raise RagqError(str(exc)) from None
        return self.settings.webhook_url

    def ingest(self, paths: Iterable[str | Path], *, job_id: str | None = None, source: str | None = None,
               force: bool = False, sync: bool = False,
               webhook_url: str | None = None, priority: int | None = None) -> Job:
        """Stream ``paths`` into batches on the ingest queue; returns once all are enqueued.

        Each document records its source: ``source``, else the resolved path given. With
        ``sync`` the job remembers the keys it sent, so :meth:`delete_stale` can delete the
        sources' other documents once it completed. ``force`` re-embeds unchanged documents.
        ``priority`` orders bulk jobs (``common/priorities.py``); a job of one document
        is interactive work and goes ahead of them all.
        """
        paths = [str(p) for p in paths]
        reader = InputReader(max_document_bytes=self.settings.max_document_bytes,
                             follow_symlinks=self.settings.follow_symlinks)
        sources = [source or str(Path(p).resolve()) for p in paths]
        events = reader.read_sources(paths, source)
        meta = {"sync_sources": list(dict.fromkeys(sources))} if sync else {}
        return self._enqueue_documents(events, inputs=paths, job_id=job_id, force=force, sync=sync, meta=meta,
                                       webhook_url=webhook_url, priority=priority,
                                       final_meta=lambda: {"skipped_files": reader.skipped_files})

    def delete(self, selector: DeleteSelector, *, job_id: str | None = None) -> Job:
        """Queue a delete job for the documents ``selector`` names; returns at once."""
        return self._submit_delete(selector, meta={"filter": selector.filter}, job_id=job_id)

    def delete_stale(self, ingest_job: str) -> Job:
        """After a sync ingest (``ingest(..., sync=True)``) completed without errors, delete
        the documents of its sources that it did not send. Refused for any other outcome:
        a partial run must never delete what it merely failed to read."""
        info = self.job(ingest_job).refresh()
        sources = info.meta.get("sync_sources")
        if info.kind != "ingest" or not sources:
            raise RagqError(f"job {ingest_job} is not a sync ingest (`ragq ingest --sync`)")
        if info.status != JobStatus.completed.value or info.failed:
            raise RagqError(f"job {ingest_job} ended {info.status} with {info.failed} failed: "
                            "not deleting anything for the sync")
        selector = DeleteSelector.stale(sources, ingest_job)
        return self._submit_delete(selector, meta={"sync_of": ingest_job, "sources": sources})

    def _submit_delete(self, selector: DeleteSelector, *, meta: dict[str, Any], job_id: str | None = None) -> Job:
        delivery = self._delivery(None)
        self.ping()
        record = JobRecord.create(self.redis, JobKind.delete, meta={**meta, "collection": self.settings.collection},
                                  prefix=self.settings.key_prefix, ttl=self.settings.job_ttl_s, job_id=job_id,
                                  webhook_url=self.webhook_for(None))
        with _enqueuing(record):
            record.add_items(batches=1)
            self.celery.send_task(tasknames.DELETE_DOCUMENTS, args=(record.id, 0, selector.to_dict()),
                                  argsrepr=f"({record.id!r}, batch=0)", ignore_result=True, **delivery)
        return Job(record.id, self)

    def ingest_documents(
        self, docs: Iterable[Any], *, source: str = "http", job_id: str | None = None, force: bool = False,
        webhook_url: str | None = None, priority: int | None = None,
    ) -> Job:
        """Queue documents given as corpus-format objects (``content``, ``title``, ...).

        Each is validated like a file's; a bad one becomes a per-item error named
        ``request[n]`` and the rest go on. A document without ``id`` or ``url`` is keyed
        by a hash of its fields, so sending it again rewrites its points instead of adding
        copies (its position in a request says nothing about which document it is).
        """
        events = (document_from_object(doc, item=f"request[{n}]", default_key=_content_key(source, doc))
                  for n, doc in enumerate(docs))
        return self._enqueue_documents(events, inputs=[source], job_id=job_id, force=force, webhook_url=webhook_url,
                                       priority=priority)

    def _enqueue_documents(
        self,
        events: Iterable[InputEvent],
        *,
        inputs: list[str],
        job_id: str | None,
        webhook_url: str | None = None,
        force: bool = False,
        sync: bool = False,
        meta: dict[str, Any] | None = None,
        final_meta: Callable[[], dict[str, Any]] | None = None,
        priority: int | None = None,
    ) -> Job:
        """Pack validated documents into batches and enqueue them as one job; seal it at the end.

        A job whose only batch holds one document is interactive (someone is likely
        waiting for it); any other goes to the ingest queue at ``priority``.
        """
        bulk = self._delivery(priority)
        url = self.webhook_for(webhook_url)
        self.ping()
        record = JobRecord.create(
            self.redis, JobKind.ingest, meta={"inputs": inputs, "collection": self.settings.collection,
                                               "model": self.settings.embed_model, "force": force, **(meta or {})},
            prefix=self.settings.key_prefix, ttl=self.settings.job_ttl_s, job_id=job_id, webhook_url=url,
        )
        stamp = Stamper(DocSequences(self.redis, self.settings.key_prefix))
        with _enqueuing(record):
            batches = 0
            for batch, only in _alone(pack_batches(self._documents(events, record), self.settings.batch_bytes)):
                documents = sum(1 for i in batch.items if i.segment == 0)
                record.add_items(items=documents, batches=1)
                # numbered as sent: a document sent later is the newer version
                payload = [item.to_dict() for item in stamp(batch.items)]
                if sync:  # before the batch runs, so the job cannot complete without them
                    record.add_seen([item.key for item in batch.items])
                delivery = self._delivery(interactive=True) if only and documents == 1 else bulk
                self._send_ingest(record.id, batch.index, payload, batch.nbytes, force, delivery)
                batches += 1
            record.update_meta(batches=batches, **(final_meta() if final_meta else {}))
        return Job(record.id, self)

    def _documents(self, events: Iterable[DocumentItem | ItemError], record: JobRecord) -> Iterable[DocumentItem]:
        """Pass documents on; collect the reader's errors into the job record."""
        pending: list[ItemError] = []
        for event in events:
            if isinstance(event, ItemError):
                pending.append(event)
                if len(pending) >= _ERROR_FLUSH:
                    record.add_items(errors=pending)
                    pending = []
            else:
                yield event
        if pending:
            record.add_items(errors=pending)

    def _send_ingest(self, job_id: str, batch: int, payload: list[dict], nbytes: int, force: bool,
                     delivery: dict[str, Any]) -> None:
        soft, hard = ingest_limits(self.settings, nbytes)
        self.celery.send_task(
            tasknames.INGEST_BATCH,
            args=(job_id, batch, payload),
            kwargs={"force": True} if force else {},
            argsrepr=f"({job_id!r}, batch={batch}, documents={len(payload)}, bytes={nbytes})",
            soft_time_limit=soft, time_limit=hard,
            ignore_result=True,  # the job record has the counts; a stored result would sit unread for days
            **delivery,
        )

    # -- questions -------------------------------------------------------------------
    def ask(
        self,
        question: str,
        *,
        top_k: int | None = None,
        filter: Mapping[str, Any] | None = None,
        timeout: float = 300.0,
        generate: bool = True,
    ) -> AnswerResult:
        """Answer one question through the queue and wait for it (a one-question job).

        A per-question failure (say the LLM endpoint is down) comes back in
        ``AnswerResult.error`` with the sources still filled; :class:`RagqError` means no
        answer at all (invalid question, no worker within ``timeout``).
        """
        obj: dict[str, Any] = {"custom_id": "1", "question": question}
        if top_k is not None:
            obj["top_k"] = top_k
        if filter:
            obj["filter"] = dict(filter)
        item = QuestionReader().from_object(obj, where="question", default_id="1")
        if not item.ok:
            raise RagqError(f"invalid question: {item.error}")
        job = self._submit_questions([item], meta={"inputs": ["(ask)"]}, generate=generate, interactive=True)
        try:
            info = job.wait(timeout, poll_s=0.1)
        except JobTimeout:
            job.cancel()
            state = job.refresh()
            if state.status in (JobStatus.queued.value, JobStatus.cancelled.value) and not state.started_at:
                raise RagqError(
                    f"no worker took the question within {timeout:.0f}s: is one running on the "
                    f"'{self.settings.interactive_queue}' queue? Start one with `ragq worker`."
                ) from None
            raise RagqError(f"no answer within {timeout:.0f}s (job {job.id} cancelled)") from None
        answers = job.answers()
        if not answers:
            raise RagqError(f"job {job.id} ended {info.status} without an answer: {info.reason or info.errors}")
        return answers[0]

    def ask_file(self, path: str | Path, *, job_id: str | None = None, generate: bool = True,
                 webhook_url: str | None = None, priority: int | None = None) -> Job:
        """Queue every question of a .jsonl or .txt file; returns once all are enqueued.

        Bad lines become per-item errors (and error lines in the output); the rest runs.
        ``priority`` orders bulk jobs (``common/priorities.py``).
        """
        self._delivery(priority)  # refused before the file is read
        try:
            items = QuestionReader().read_file(path)
        except (OSError, ValueError) as exc:
            raise RagqError(str(exc)) from exc
        return self._submit_questions(items, meta={"inputs": [str(path)]}, job_id=job_id, generate=generate,
                                      webhook_url=webhook_url, priority=priority)

    def ask_many(
        self,
        questions: Iterable[str | Mapping[str, Any]],
        *,
        job_id: str | None = None,
        generate: bool = True,
        webhook_url: str | None = None,
        priority: int | None = None,
        interactive: bool = False,
    ) -> Job:
        """Queue questions given as strings or JSONL-style objects (``{"custom_id", "question", ...}``).

        ``generate=False`` makes a retrieval-only job: sources filled, ``answer`` null,
        whatever backend the workers run (for evaluating retrieval, e.g. hit@k).
        ``priority`` orders bulk jobs; ``interactive`` (someone waits, as for
        ``/v1/answer``) sends the job ahead of them all instead.
        """
        items = QuestionReader().read_objects(questions)
        return self._submit_questions(items, meta={"inputs": ["(api)"]}, job_id=job_id, generate=generate,
                                      webhook_url=webhook_url, priority=priority, interactive=interactive)

    def evaluate(
        self,
        path_or_lines: str | Path | Iterable[str | bytes | Mapping[str, Any]],
        *,
        top_k: int = CUTOFF,
        timeout: float | None = None,
        on_progress: ProgressCallback | None = None,
    ) -> EvalReport:
        """Measure retrieval: hit@1/3/5/10, MRR@10 and nDCG@10 of lines that name their source page.

        ``path_or_lines`` is a JSONL file (``questions-dev.jsonl`` shape: ``query`` or
        ``question``, ``source_url`` (a url or a list), ``product``, ``id``) or its lines
        (JSON text, or objects). The questions run as one retrieval-only question job on
        the workers, so the figures are those of the deployed model, store and retrieval;
        ``top_k`` (10 to 100) is how many distinct documents each retrieves. Bad lines and
        questions whose retrieval failed are ``report.errors``, the rest is measured.
        :class:`JobTimeout` (job cancelled) if it has not finished within ``timeout``.
        """
        if isinstance(top_k, bool) or not isinstance(top_k, int) or not CUTOFF <= top_k <= MAX_TOP_K:
            raise RagqError(f"top_k must be between {CUTOFF} and {MAX_TOP_K} (the metrics look {CUTOFF} deep), "
                            f"got {top_k!r}")
        if isinstance(path_or_lines, (str, Path)):
            source = str(path_or_lines)
            try:
                parsed = list(read_eval_file(path_or_lines))
            except OSError as exc:
                raise RagqError(str(exc)) from exc
        else:
            source = "(lines)"
            parsed = list(read_eval_lines(path_or_lines, name="input"))
        questions = [p for p in parsed if isinstance(p, EvalQuestion)]
        errors = [p for p in parsed if isinstance(p, EvalError)]
        meta: dict[str, Any] = {"collection": self.settings.collection, "job_id": None, "elapsed_s": None,
                                "lines": len(parsed)}
        if not questions:
            return EvalReport.build(source, top_k, [], errors, meta)

        reader = QuestionReader()  # the question job's own validation and shape
        items = [reader.from_object({"custom_id": str(q.line), "question": q.question, "top_k": top_k},
                                    where=q.item, default_id=str(q.line)) for q in questions]
        started = time.perf_counter()
        job = self._submit_questions(items, meta={"inputs": [source], "eval": True}, generate=False)
        try:
            info = job.wait(timeout, poll_s=0.2, on_progress=on_progress)
        except JobTimeout as exc:
            job.cancel()
            raise JobTimeout(f"{exc}; evaluation cancelled") from None
        answers = {a.custom_id: a for a in job.answers()}
        results: list[QuestionResult] = []
        for q in questions:
            answer = answers.get(str(q.line))
            if answer is None:
                errors.append(EvalError(q.line, q.item, f"no result (job {info.status})", q.id))
            elif answer.error:
                errors.append(EvalError(q.line, q.item, answer.error, q.id))
            else:
                results.append(QuestionResult.of(q, answer.urls))
        meta.update(job_id=job.id, elapsed_s=round(time.perf_counter() - started, 3), model=self._store_model())
        return EvalReport.build(source, top_k, results, errors, meta)

    def _store_model(self) -> str | None:
        """The embedding model of the stored points, as a worker reports it (None if it can't)."""
        try:
            return self.store_info(timeout=10).get("model")
        except (RagqError, redis.RedisError):
            return None

    def submit_items(
        self,
        items: Iterable[QuestionItem],
        *,
        meta: dict[str, Any],
        job_id: str | None = None,
        generate: bool = True,
        webhook_url: str | None = None,
        priority: int | None = None,
    ) -> Job:
        """Queue already-read question items (from :class:`QuestionReader`) as one job: the Batch API's way in."""
        return self._submit_questions(items, meta=meta, job_id=job_id, generate=generate, webhook_url=webhook_url,
                                      priority=priority)

    def _submit_questions(
        self,
        items: Iterable[QuestionItem],
        *,
        meta: dict[str, Any],
        job_id: str | None = None,
        generate: bool = True,
        webhook_url: str | None = None,
        priority: int | None = None,
        interactive: bool = False,
    ) -> Job:
        delivery = self._delivery(priority, interactive=interactive)
        url = self.webhook_for(webhook_url)
        self.ping()
        size = self.settings.questions_per_batch
        record = JobRecord.create(
            self.redis, JobKind.questions,
            meta={**meta, "collection": self.settings.collection, "generate": generate, "batch_size": size},
            prefix=self.settings.key_prefix, ttl=self.settings.job_ttl_s, job_id=job_id, webhook_url=url,
        )
        with _enqueuing(record):
            batches = 0
            batch: list[QuestionItem] = []
            for item in items:
                batch.append(item)
                if len(batch) >= size:
                    self._send_questions(record, batches, batch, generate, delivery)
                    batches, batch = batches + 1, []
            if batch:
                self._send_questions(record, batches, batch, generate, delivery)
                batches += 1
            record.update_meta(batches=batches)
        return Job(record.id, self)

    def _send_questions(self, record: JobRecord, batch: int, items: list[QuestionItem], generate: bool,
                        delivery: dict[str, Any]) -> None:
        """Enqueue one batch (refused lines ride along to keep their output place)."""
        if _counted_or_done(record, batch, items, rejected_line):
            soft, hard = qa_limits(self.settings, len(items), generate)
            self.celery.send_task(
                tasknames.ANSWER_BATCH,
                args=(record.id, batch, [i.to_dict() for i in items]),
                kwargs={"generate": generate},
                argsrepr=f"({record.id!r}, batch={batch}, questions={sum(1 for i in items if i.ok)})",
                soft_time_limit=soft, time_limit=hard,
                ignore_result=True,  # answers are in the job record
                **delivery,
            )

    def submit_embeddings(
        self,
        items: Iterable[EmbedItem],
        *,
        meta: dict[str, Any],
        job_id: str | None = None,
        webhook_url: str | None = None,
        priority: int | None = None,
    ) -> Job:
        """Queue ``/v1/embeddings`` lines (from :class:`EmbedLineReader`) as one job for the workers' model."""
        delivery = self._delivery(priority)
        url = self.webhook_for(webhook_url)
        self.ping()
        record = JobRecord.create(
            self.redis, JobKind.embeddings, meta={**meta, "model": self.settings.embed_model},
            prefix=self.settings.key_prefix, ttl=self.settings.job_ttl_s, job_id=job_id, webhook_url=url,
        )
        with _enqueuing(record):
            batches = 0
            for group in pack_embed_items(items, max_chars=self.settings.batch_bytes,
                                          max_lines=tasknames.EMBED_BATCH_LINES):
                if _counted_or_done(record, batches, group, refused_embed_line):
                    nbytes = sum(i.chars for i in group)
                    soft, hard = ingest_limits(self.settings, nbytes)
                    self.celery.send_task(
                        tasknames.EMBED_BATCH, args=(record.id, batches, [i.to_dict() for i in group]),
                        argsrepr=f"({record.id!r}, batch={batches}, lines={len(group)}, chars={nbytes})",
                        soft_time_limit=soft, time_limit=hard, ignore_result=True, **delivery,
                    )
                batches += 1
            record.update_meta(batches=batches)
        return Job(record.id, self)

    # -- retrieval -------------------------------------------------------------------
    def search_request(
        self, queries: str | list[str], *, top_k: int | None = None, filter: Mapping[str, Any] | None = None
    ) -> WorkerRequest:
        many = [queries] if isinstance(queries, str) else list(queries)
        k = top_k or self.settings.top_k
        return WorkerRequest(tasknames.SEARCH, (many, k, dict(filter) if filter else None),
                             f"(queries={len(many)}, top_k={k})", "search")

    def search(
        self,
        queries: str | list[str],
        *,
        top_k: int | None = None,
        filter: Mapping[str, Any] | None = None,
        timeout: float = 60.0,
    ) -> list[list[Source]]:
        """Retrieve through the queue (a worker owns the model and the store)."""
        rows = self._call(self.search_request(queries, top_k=top_k, filter=filter), timeout)
        return [[Source(**hit) for hit in row] for row in rows]

    def reindex(self, model: str, *, chunk_tokens: int | None = None, chunk_overlap: int | None = None,
                query_prefix: str | None = None, document_prefix: str | None = None,
                job_id: str | None = None) -> Job:
        """Re-index ``RAGQ_COLLECTION`` to another model or chunking beside the live collection,
        switching searches to it in one step when it is complete (:mod:`producer.reindex`)."""
        from common.reindex import Recipe
        from producer.reindex import submit_reindex

        recipe = Recipe(model, chunk_tokens, chunk_overlap, query_prefix, document_prefix)
        return submit_reindex(self, recipe, job_id=job_id)

    def drop_old_collections(self, timeout: float = 600.0) -> dict[str, Any]:
        """After a re-index: delete the collections searches no longer use (``{live, dropped}``)."""
        from producer.reindex import drop_old

        return drop_old(self, timeout)

    def store_info(self, timeout: float = 30.0) -> dict[str, Any]:
        return self._call(WorkerRequest(tasknames.STORE_INFO, (), None, "info"), timeout)

    def optimize(self, timeout: float = 1800.0) -> dict[str, Any]:
        """Have the store's owner build its vector index now: ``{changed, seconds, points, backend}``."""
        return self._call(WorkerRequest(tasknames.STORE_OPTIMIZE, (), None, "optimize", interactive=False), timeout)

    def embed_request(self, texts: list[str]) -> WorkerRequest:
        return WorkerRequest(tasknames.EMBED, (list(texts),), f"(texts={len(texts)})", "embedding")

    def embed(self, texts: list[str], *, timeout: float = 60.0) -> dict[str, Any]:
        """Embed ``texts`` as given on a worker: vectors as lists, token counts, and the
        indices of inputs over the model's window (``too_long``, then no vectors)."""
        return self._call(self.embed_request(texts), timeout)

    def _call(self, request: WorkerRequest, timeout: float) -> Any:
        """Send ``request`` and block this thread until its result (Celery's own wait)."""
        result = self.celery.send_task(request.name, args=request.args, argsrepr=request.argsrepr,
                                       **self._delivery(interactive=request.interactive))
        return self._await(result, timeout, request.what)

    def send(self, request: WorkerRequest) -> str:
        """Send ``request`` without subscribing to its result; returns the task id.

        For callers that wait their own way (the HTTP server, on :meth:`result_key`'s
        notification): Celery's producer would otherwise subscribe this process to every
        result it sends and buffer results nobody drains.
        """
        if self._sender is None:
            sender = Celery("ragq-sender", set_as_current=False)
            sender.config_from_object({**build_config(self.settings), "result_backend": None})
            self._sender = sender
        return self._sender.send_task(request.name, args=request.args, argsrepr=request.argsrepr,
                                      **self._delivery(interactive=request.interactive)).id

    def result_key(self, task_id: str) -> str:
        """The result backend's key of a task, which is also the channel its result is published on."""
        key = self.celery.backend.get_key_for_task(task_id)
        return key.decode() if isinstance(key, bytes) else key

    def decode_result(self, raw: str | bytes) -> dict[str, Any]:
        """A stored result's meta: ``status`` (a Celery state), ``result`` (or the exception's fields)."""
        return self.celery.backend.decode_result(raw)

    def no_worker(self, what: str, timeout: float) -> WorkerTimeout:
        return WorkerTimeout(
            f"no worker answered the {what} request within {timeout:.0f}s: is one running "
            f"on the '{self.settings.interactive_queue}' queue? Start one with `ragq worker`.")

    def _await(self, result: Any, timeout: float, what: str) -> Any:
        from celery.exceptions import TimeoutError as CeleryTimeout

        try:
            return result.get(timeout=timeout)
        except CeleryTimeout:
            result.revoke()
            raise self.no_worker(what, timeout) from None
        except (RagqError, redis.RedisError):
            raise
        except Exception as exc:  # raised by the task on the worker, re-raised here by Celery
            if not self._redis_answers():
                raise  # the broker went away (Celery raises a bare error then): not the worker's doing
            raise worker_failed(what, type(exc).__name__, str(exc)) from None
        finally:
            result.forget()

    def _redis_answers(self) -> bool:
        try:
            return bool(self.redis.ping())
        except redis.RedisError:
            return False

    def queue_depths(self) -> dict[str, int]:
        """Messages waiting per queue (Flower does not show this); the store queue when embedded."""
        s = self.settings
        queues = [s.interactive_queue, s.ingest_queue, s.qa_queue] + ([] if s.qdrant_url else [s.store_queue])
        return priorities.queue_depths(self.redis, queues)

    def _delivery(self, priority: int | None = None, *, interactive: bool = False) -> dict[str, Any]:
        """How a task is sent: to the interactive queue at the top priority, or to its bulk
        queue (``task_routes``) at the job's priority, checked here for CLI and HTTP alike."""
        if interactive:
            return {"queue": self.settings.interactive_queue, "priority": priorities.INTERACTIVE}
        try:
            return {"priority": priorities.broker_priority(priorities.check_priority(priority))}
        except ValueError as exc:
            raise RagqError(str(exc)) from None


def _alone(items: Iterable[T]) -> Iterator[tuple[T, bool]]:
    """Each of ``items`` with whether it is the only one (one look-ahead)."""
    it = iter(items)
    for first in it:
        second = next(it, None)
        yield first, second is None
        if second is not None:
            yield second, False
            for rest in it:
                yield rest, False


def _counted_or_done(record: JobRecord, batch: int, items: Sequence[LineItem],
                     rejected: Callable[[Any], dict[str, Any]]) -> bool:
    """Count a batch's lines; True if a worker has work in it, else its error lines are written here."""
    valid = sum(1 for i in items if i.ok)
    record.add_items(items=valid, batches=1, errors=[ItemError(i.label, i.error) for i in items if i.error])
    if valid:
        return True
    record.save_results(batch, [rejected(i) for i in items])
    record.finish_batch(batch, BatchOutcome())
    return False


def _content_key(source: str, obj: Any) -> str:
    """The key of a document sent without ``id`` or ``url``: a hash of its fields."""
    if not isinstance(obj, dict):
        return source
    blob = json.dumps(obj, sort_keys=True, ensure_ascii=True, default=str)
    return f"{source}:sha1:{hashlib.sha1(blob.encode('ascii')).hexdigest()}"
