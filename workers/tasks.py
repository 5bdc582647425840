"""Celery tasks: thin glue between messages, job records and ``common``.

Each task loads its job record, calls library code with the process's loaded
resources, and saves the outcome. Results stay small (counts and timings) so Flower's
task pages show throughput without carrying documents.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

from celery.signals import worker_process_init, worker_process_shutdown

from common import metrics, tasknames
from common.answering import Answerer, UnavailableGenerator, failed_batch
from common.generators import Generator
from common.ingest import failed_outcome
from common.jobs import JobRecord
from common.questions import QuestionItem
from common.runtime import Runtime
from common.schemas import DocumentItem, JobStatus
from common.vectorstore import StoreError
from workers.app import app, settings

log = logging.getLogger("ragq.worker")
T = TypeVar("T")
metrics.install_worker_hooks(settings)  # counters and stage timings -> Redis after each task

_runtime: Runtime | None = None
_runtime_lock = threading.Lock()


def runtime() -> Runtime:
    """This process's resources, created in the process that runs tasks (after fork)."""
    global _runtime
    with _runtime_lock:
        if _runtime is None:
            _runtime = Runtime(settings, store_transport=None if owns_store() else _ask_store_owner)
        return _runtime


def _consumed_queues() -> set[str]:
    """The queues this worker consumes (empty when it was started without ``-Q``)."""
    consume_from = app.amqp.queues.consume_from
    return {q.name for q in consume_from.values()} if consume_from else set()


def owns_store() -> bool:
    """Whether this process opens the vector store itself.

    Always with a Qdrant server; with the embedded store only the process consuming
    the store queue (or one started without ``-Q``, which consumes everything) does, and
    the others send it their store calls.
    """
    queues = _consumed_queues()
    return bool(settings.qdrant_url) or not queues or settings.store_queue in queues


def _ask_store_owner(method: str, request: dict[str, Any], timeout: float) -> dict[str, Any]:
    """Transport of a RemoteStore: one ``ragq.store_call`` task, waited for.

    The request expires with the wait, so an owner that comes back late never runs a
    call its sender gave up on (and has since retried).
    """
    from celery.exceptions import TimeoutError as CeleryTimeout

    result = app.send_task(tasknames.STORE_CALL, args=[method, request], queue=settings.store_queue,
                           expires=timeout, argsrepr=f"({method!r})")
    try:
        return result.get(timeout=timeout, interval=0.01, disable_sync_subtasks=False)
    except CeleryTimeout as exc:
        raise TimeoutError(str(exc)) from exc
    finally:
        result.forget()


@worker_process_init.connect
def _warm_up(**_: Any) -> None:
    """Load the models in the background so the first batch does not pay for it.

    worker_process_init handlers must return within seconds, so the load runs in a
    thread; a task arriving meanwhile waits on the same lock instead of loading twice.
    """

    def load() -> None:
        try:
            queues = _consumed_queues()
            rt = runtime()
            if not queues or settings.ingest_queue in queues or settings.qa_queue in queues:
                rt.embedder()
            if owns_store():
                rt.store()  # the embedded store's lock is taken now: a second owner fails at start
            if settings.ingest_queue in queues and owns_store():
                rt.ingestor().ensure_collection()
            if not queues or settings.qa_queue in queues:
                rt.generator()  # a local model loads here, not in the first question batch
        except Exception:  # the first task will raise the same error with its context
            log.exception("warm-up failed")

    threading.Thread(target=load, name="ragq-warmup", daemon=True).start()


@worker_process_shutdown.connect
def _release(**_: Any) -> None:
    if _runtime is not None:
        _runtime.close()


def _backoff(attempt: int) -> float:
    return min(60.0, 2.0 ** attempt) * (0.5 + random.random())


def _begin(job_id: str, batch: int) -> tuple[JobRecord, str | None, str | None]:
    """Load the job and decide what to do with this delivery of ``batch``.

    Returns (job, skip, give_up): ``skip`` names why the batch is not run at all
    (cancelled or unknown job, already recorded); ``give_up`` is the reason to fail its
    items instead of running them, once it has been delivered more than
    ``max_task_attempts`` times (its worker died each time: killed, out of memory).
    """
    job = runtime().job(job_id)
    status = job.status()
    if status in (JobStatus.cancelled, JobStatus.not_found):
        return job, status.value, None
    if job.batch_done(batch):
        return job, "already recorded", None
    job.mark_started()
    attempt = job.begin_attempt(batch)
    if attempt > settings.max_task_attempts:
        log.error("batch %s of job %s delivered %d times; failing its items", batch, job_id, attempt)
        return job, None, (f"gave up after {attempt - 1} attempts: the worker running this batch "
                           "stopped each time (killed, out of memory or past its hard time limit)")
    return job, None, None


def _with_store_retries(what: str, run: Callable[[], T]) -> T | str:
    """Run ``run``, retrying a store failure with exponential backoff and jitter.

    The retries happen inside the task, not as Celery retries with a countdown: Celery
    holds such a message in memory, and a Redis restart meanwhile parks it until the
    visibility timeout. Returns the result, or the reason once every attempt failed.
    """
    attempts = settings.max_task_attempts
    for attempt in range(attempts):
        try:
            return run()
        except StoreError as exc:
            if attempt + 1 >= attempts:
                return f"vector store unavailable after {attempts} attempts: {exc}"
            delay = _backoff(attempt)
            log.warning("%s: store failed (%s); retrying in %.2fs (attempt %d of %d)",
                        what, exc, delay, attempt + 2, attempts)
            metrics.count(store_retries=1)
            time.sleep(delay)
    raise AssertionError("unreachable")


@app.task(name=tasknames.INGEST_BATCH)
def ingest_batch(job_id: str, batch: int, items: list[dict[str, Any]]) -> dict[str, Any]:
    """Chunk, embed and upsert one batch of documents of job ``job_id``."""
    job, skip, give_up = _begin(job_id, batch)
    if skip:
        return {"job": job_id, "batch": batch, "skipped": skip}
    docs = [DocumentItem.from_dict(d) for d in items]
    try:
        done = give_up or _with_store_retries(f"ingest batch {batch} of job {job_id}",
                                              lambda: runtime().ingestor().ingest(docs))
        outcome = failed_outcome(docs, done) if isinstance(done, str) else done
    except Exception as exc:  # e.g. the soft time limit: record it rather than leave the job hanging
        log.exception("ingest batch %s of job %s failed", batch, job_id)
        outcome = failed_outcome(docs, f"batch failed: {type(exc).__name__}: {exc}")
    job.finish_batch(batch, outcome)
    metrics.count(documents=len(docs) - len(outcome.errors), documents_failed=len(outcome.errors),
                  chunks=outcome.chunks, tokens=outcome.tokens)
    return {
        "job": job_id, "batch": batch, "documents": len(docs), "completed": outcome.completed,
        "failed": outcome.failed, "chunks": outcome.chunks, "tokens": outcome.tokens,
        "seconds": round(outcome.seconds, 3),
        "tokens_per_s": round(outcome.tokens / outcome.seconds, 1) if outcome.seconds else None,
    }


@app.task(name=tasknames.ANSWER_BATCH)
def answer_batch(job_id: str, batch: int, items: list[dict[str, Any]], generate: bool = True) -> dict[str, Any]:
    """Retrieve and generate answers for one batch of questions of job ``job_id``."""
    job, skip, give_up = _begin(job_id, batch)
    if skip:
        return {"job": job_id, "batch": batch, "skipped": skip}
    rt = runtime()
    questions = [QuestionItem.from_dict(d) for d in items]
    try:
        done = give_up or _with_store_retries(
            f"question batch {batch} of job {job_id}",
            lambda: Answerer.from_settings(rt.embedder(), rt.store(), _generator(rt) if generate else None,
                                           settings).answer(questions, generate=generate))
        result = failed_batch(questions, done) if isinstance(done, str) else done
    except Exception as exc:  # e.g. the soft time limit: record it rather than leave the job hanging
        log.exception("question batch %s of job %s failed", batch, job_id)
        result = failed_batch(questions, f"batch failed: {type(exc).__name__}: {exc}")
    job.save_results(batch, result.lines)
    job.finish_batch(batch, result.outcome)
    o = result.outcome
    metrics.count(questions=o.completed, questions_failed=o.failed)
    return {"job": job_id, "batch": batch, "questions": len(questions), "completed": o.completed,
            "failed": o.failed, "tokens": o.tokens, "seconds": round(o.seconds, 3)}


def _generator(rt: Runtime) -> Generator:
    """The process's generator; one that cannot be built fails each question with the reason."""
    try:
        return rt.generator()
    except Exception as exc:
        log.exception("could not build the %s generator", settings.llm_backend)
        return UnavailableGenerator(f"could not start the {settings.llm_backend} generator: {type(exc).__name__}: {exc}")


@app.task(name=tasknames.SEARCH)
def search(queries: list[str], top_k: int = 5, filter: dict[str, Any] | None = None) -> list[list[dict[str, Any]]]:
    """Embed ``queries`` in one pass and run one batched query; distinct pages per query."""
    from common.retrieval import retrieve

    rt = runtime()
    lap = metrics.Lap()
    hits = retrieve(rt.embedder(), rt.store(), queries, top_k=top_k, filter=filter)
    lap("search")
    return [[source.__dict__ for source in row] for row in hits]


@app.task(name=tasknames.STORE_CALL)
def store_call(method: str, request: dict[str, Any]) -> dict[str, Any]:
    """One store call from a worker process that does not own the embedded store."""
    from common.remote_store import serve

    rt = runtime()
    if rt.store_transport is not None:  # would send the call to itself
        raise RuntimeError(f"this worker does not own the store; it must consume {settings.store_queue!r}")
    started = time.perf_counter()
    reply = serve(rt.store(), rt.redis, method, request)
    stage = {"upsert": "upsert", "delete_stale_many": "upsert", "search": "search"}.get(method)
    if stage:  # the owner's own view of the store stages, under its worker name
        metrics.observe(stage, time.perf_counter() - started)
    return reply


@app.task(name=tasknames.STORE_INFO)
def store_info() -> dict[str, Any]:
    """The collection as the worker that owns the store sees it."""
    info = runtime().store().info()
    return dict(info.__dict__)


@app.task(name=tasknames.EMBED)
def embed(texts: list[str]) -> dict[str, Any]:
    """Embed ``texts`` as given (no chunking), for the OpenAI-style ``/v1/embeddings``.

    An input longer than the model's window is reported in ``too_long`` instead of
    being cut silently; the caller turns that into a validation error.
    """
    if not texts or len(texts) > tasknames.EMBED_MAX_INPUTS or sum(map(len, texts)) > tasknames.EMBED_MAX_CHARS:
        raise ValueError(f"1 to {tasknames.EMBED_MAX_INPUTS} texts of at most "
                         f"{tasknames.EMBED_MAX_CHARS} characters in all")
    embedder = runtime().embedder()
    tokens = [embedder.count_tokens(text) for text in texts]
    window = embedder.max_tokens - embedder.special_tokens
    too_long = [i for i, n in enumerate(tokens) if n > window]
    vectors = [] if too_long else embedder.encode(texts).tolist()
    return {"model": settings.embed_model, "dimension": embedder.dimension, "window": window,
            "tokens": tokens, "too_long": too_long, "embeddings": vectors}
