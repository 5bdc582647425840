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
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import redis
from celery import Celery

from common import tasknames
from common.batching import pack_batches
from common.config import Settings
from common.inputs import InputEvent, InputReader, document_from_object
from common.jobs import BatchOutcome, JobInfo, JobRecord
from common.limits import ingest_limits, qa_limits
from common.questions import AnswerResult, QuestionItem, QuestionReader, rejected_line
from common.runtime import redis_client
from common.schemas import DocumentItem, ItemError, JobKind, JobStatus, Source
from workers.celeryconfig import build_config

ProgressCallback = Callable[[JobInfo], None]

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
    def ingest(self, paths: Iterable[str | Path], *, job_id: str | None = None) -> Job:
        """Stream ``paths`` into batches on the ingest queue; returns once all are enqueued."""
        paths = [str(p) for p in paths]
        reader = InputReader(max_document_bytes=self.settings.max_document_bytes,
                             follow_symlinks=self.settings.follow_symlinks)
        return self._enqueue_documents(reader.read(paths), inputs=paths, job_id=job_id,
                                       final_meta=lambda: {"skipped_files": reader.skipped_files})

    def ingest_documents(
        self, docs: Iterable[Any], *, source: str = "http", job_id: str | None = None
    ) -> Job:
        """Queue documents given as corpus-format objects (``content``, ``title``, ...).

        Each is validated like a file's; a bad one becomes a per-item error named
        ``request[n]`` and the rest go on. A document without ``id`` or ``url`` is keyed
        by a hash of its fields, so sending it again rewrites its points instead of adding
        copies (its position in a request says nothing about which document it is).
        """
        events = (document_from_object(doc, item=f"request[{n}]", default_key=_content_key(source, doc))
                  for n, doc in enumerate(docs))
        return self._enqueue_documents(events, inputs=[source], job_id=job_id)

    def _enqueue_documents(
        self,
        events: Iterable[InputEvent],
        *,
        inputs: list[str],
        job_id: str | None,
        final_meta: Callable[[], dict[str, Any]] | None = None,
    ) -> Job:
        """Pack validated documents into batches and enqueue them as one job; seal it at the end."""
        self.ping()
        record = JobRecord.create(
            self.redis, JobKind.ingest, meta={"inputs": inputs, "collection": self.settings.collection,
                                               "model": self.settings.embed_model},
            prefix=self.settings.key_prefix, ttl=self.settings.job_ttl_s, job_id=job_id,
        )
        with _enqueuing(record):
            batches = 0
            for batch in pack_batches(self._documents(events, record), self.settings.batch_bytes):
                record.add_items(items=sum(1 for i in batch.items if i.segment == 0), batches=1)
                self._send_ingest(record.id, batch.index, batch.to_payload(), batch.nbytes)
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

    def _send_ingest(self, job_id: str, batch: int, payload: list[dict], nbytes: int) -> None:
        soft, hard = ingest_limits(self.settings, nbytes)
        self.celery.send_task(
            tasknames.INGEST_BATCH,
            args=(job_id, batch, payload),
            argsrepr=f"({job_id!r}, batch={batch}, documents={len(payload)}, bytes={nbytes})",
            soft_time_limit=soft, time_limit=hard,
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
        job = self._submit_questions([item], meta={"inputs": ["(ask)"]}, generate=generate)
        try:
            info = job.wait(timeout, poll_s=0.1)
        except JobTimeout:
            job.cancel()
            state = job.refresh()
            if state.status in (JobStatus.queued.value, JobStatus.cancelled.value) and not state.started_at:
                raise RagqError(
                    f"no worker took the question within {timeout:.0f}s: is one running on the "
                    f"'{self.settings.qa_queue}' queue? Start one with `ragq worker`."
                ) from None
            raise RagqError(f"no answer within {timeout:.0f}s (job {job.id} cancelled)") from None
        answers = job.answers()
        if not answers:
            raise RagqError(f"job {job.id} ended {info.status} without an answer: {info.reason or info.errors}")
        return answers[0]

    def ask_file(self, path: str | Path, *, job_id: str | None = None, generate: bool = True) -> Job:
        """Queue every question of a .jsonl or .txt file; returns once all are enqueued.

        Bad lines become per-item errors (and error lines in the output); the rest runs.
        """
        try:
            items = QuestionReader().read_file(path)
        except (OSError, ValueError) as exc:
            raise RagqError(str(exc)) from exc
        return self._submit_questions(items, meta={"inputs": [str(path)]}, job_id=job_id, generate=generate)

    def ask_many(
        self,
        questions: Iterable[str | Mapping[str, Any]],
        *,
        job_id: str | None = None,
        generate: bool = True,
    ) -> Job:
        """Queue questions given as strings or JSONL-style objects (``{"custom_id", "question", ...}``).

        ``generate=False`` makes a retrieval-only job: sources filled, ``answer`` null,
        whatever backend the workers run (for evaluating retrieval, e.g. hit@k).
        """
        items = QuestionReader().read_objects(questions)
        return self._submit_questions(items, meta={"inputs": ["(api)"]}, job_id=job_id, generate=generate)

    def _submit_questions(
        self,
        items: Iterable[QuestionItem],
        *,
        meta: dict[str, Any],
        job_id: str | None = None,
        generate: bool = True,
    ) -> Job:
        self.ping()
        size = max(1, self.settings.qa_batch_size)
        record = JobRecord.create(
            self.redis, JobKind.questions,
            meta={**meta, "collection": self.settings.collection, "generate": generate, "batch_size": size},
            prefix=self.settings.key_prefix, ttl=self.settings.job_ttl_s, job_id=job_id,
        )
        with _enqueuing(record):
            batches = 0
            batch: list[QuestionItem] = []
            for item in items:
                batch.append(item)
                if len(batch) >= size:
                    self._send_questions(record, batches, batch, generate)
                    batches, batch = batches + 1, []
            if batch:
                self._send_questions(record, batches, batch, generate)
                batches += 1
            record.update_meta(batches=batches)
        return Job(record.id, self)

    def _send_questions(self, record: JobRecord, batch: int, items: list[QuestionItem], generate: bool) -> None:
        """Enqueue one batch (refused lines ride along to keep their output place)."""
        valid = sum(1 for i in items if i.ok)
        errors = [ItemError(i.label, i.error) for i in items if i.error]
        record.add_items(items=valid, batches=1, errors=errors)
        if not valid:  # nothing for a worker to do: write the error lines here
            record.save_results(batch, [rejected_line(i) for i in items])
            record.finish_batch(batch, BatchOutcome())
            return
        soft, hard = qa_limits(self.settings, len(items), generate)
        self.celery.send_task(
            tasknames.ANSWER_BATCH,
            args=(record.id, batch, [i.to_dict() for i in items]),
            kwargs={"generate": generate},
            argsrepr=f"({record.id!r}, batch={batch}, questions={valid})",
            soft_time_limit=soft, time_limit=hard,
        )

    # -- retrieval -------------------------------------------------------------------
    def search(
        self,
        queries: str | list[str],
        *,
        top_k: int | None = None,
        filter: Mapping[str, Any] | None = None,
        timeout: float = 60.0,
    ) -> list[list[Source]]:
        """Retrieve through the queue (a worker owns the model and the store)."""
        many = [queries] if isinstance(queries, str) else list(queries)
        result = self.celery.send_task(
            tasknames.SEARCH, args=(many, top_k or self.settings.top_k, dict(filter) if filter else None),
            argsrepr=f"(queries={len(many)}, top_k={top_k or self.settings.top_k})",
        )
        rows = self._await(result, timeout, "search")
        return [[Source(**hit) for hit in row] for row in rows]

    def store_info(self, timeout: float = 30.0) -> dict[str, Any]:
        result = self.celery.send_task(tasknames.STORE_INFO)
        return self._await(result, timeout, "info")

    def embed(self, texts: list[str], *, timeout: float = 60.0) -> dict[str, Any]:
        """Embed ``texts`` as given on a worker: vectors as lists, token counts, and the
        indices of inputs over the model's window (``too_long``, then no vectors)."""
        result = self.celery.send_task(tasknames.EMBED, args=(list(texts),),
                                       argsrepr=f"(texts={len(texts)})")
        return self._await(result, timeout, "embedding")

    def _await(self, result: Any, timeout: float, what: str) -> Any:
        from celery.exceptions import TimeoutError as CeleryTimeout

        try:
            return result.get(timeout=timeout)
        except CeleryTimeout:
            result.revoke()
            raise WorkerTimeout(
                f"no worker answered the {what} request within {timeout:.0f}s: is one running "
                f"on the '{self.settings.qa_queue}' queue? Start one with `ragq worker`."
            ) from None
        except (RagqError, redis.RedisError):
            raise
        except Exception as exc:  # raised by the task on the worker, re-raised here by Celery
            if not self._redis_answers():
                raise  # the broker went away (Celery raises a bare error then): not the worker's doing
            raise WorkerFailed(f"the worker failed the {what} request: {type(exc).__name__}: "
                               f"{' '.join(str(exc).split())[:500]}") from None
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
        queues = [s.ingest_queue, s.qa_queue] + ([] if s.qdrant_url else [s.store_queue])
        return {q: int(self.redis.llen(q)) for q in queues}


def _content_key(source: str, obj: Any) -> str:
    """The key of a document sent without ``id`` or ``url``: a hash of its fields."""
    if not isinstance(obj, dict):
        return source
    blob = json.dumps(obj, sort_keys=True, ensure_ascii=True, default=str)
    return f"{source}:sha1:{hashlib.sha1(blob.encode('ascii')).hexdigest()}"
