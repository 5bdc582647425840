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

import redis
from celery import Task
from celery.exceptions import Reject, SoftTimeLimitExceeded
from celery.signals import worker_process_init, worker_process_shutdown

from common import interrupts, metrics, tasknames
from common.answering import Answerer, UnavailableGenerator, failed_batch
from common.docseq import fill_missing
from common.embed_lines import EmbedItem, embed_items, failed_items
from common.generators import Generator
from common.ingest import failed_outcome
from common.jobs import BatchOutcome, JobRecord
from common.questions import QuestionItem
from common.runtime import Runtime
from common.schemas import DocumentItem, ItemError, JobStatus
from common.store_status import StoreStatus
from common.vectorstore import StoreError
from workers import control  # noqa: F401  (registers ragq_main_process in the main process)
from workers.app import app, settings
from workers.metrics_hooks import install_worker_hooks

log = logging.getLogger("ragq.worker")
T = TypeVar("T")
install_worker_hooks(settings)  # counters and stage timings -> Redis after each task
interrupts.register(SoftTimeLimitExceeded)  # common's handlers let it end the batch

_runtime: Runtime | None = None
_runtime_lock = threading.Lock()

#: How long a task whose job-record write failed waits for Redis to answer again
#: before it gives its message back (beyond the client's own ~9 s of retries).
_RECORD_WAIT_S = 60.0


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
            serving = {settings.ingest_queue, settings.qa_queue, settings.interactive_queue}
            if not queues or serving & queues:
                rt.embedder()
            if owns_store():
                try:
                    store = rt.store()  # the embedded store's lock is taken now: a second owner fails at start
                except Exception as exc:
                    _report_store(ok=False, error=f"could not open the store: {type(exc).__name__}: {exc}")
                    raise
                _report_store(ok=True, info=store.info().__dict__)
            if settings.ingest_queue in queues and owns_store():
                rt.ingestor().ensure_collection()
            if not queues or {settings.qa_queue, settings.interactive_queue} & queues:
                rt.generator()  # a local model loads here, not in the first question batch
        except Exception:  # the first task will raise the same error with its context
            log.exception("warm-up failed")

    threading.Thread(target=load, name="ragq-warmup", daemon=True).start()


@worker_process_shutdown.connect
def _release(**_: Any) -> None:
    if _runtime is not None:
        _runtime.close()


_store_failing = False


def _report_store(*, ok: bool, info: dict[str, Any] | None = None, error: str | None = None) -> None:
    """Tell ``/health`` what this store-owning process found (never breaks a task)."""
    global _store_failing
    _store_failing = not ok
    if not owns_store():
        return  # the owner reports its own store; this process only reaches it
    try:
        StoreStatus(runtime().redis, prefix=settings.key_prefix, ttl=settings.job_ttl_s).report(
            ok=ok, info=info, error=error)
    except Exception as exc:
        log.warning("could not report the store's status: %s", exc)


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


def _redis_answers(within_s: float) -> bool:
    """Wait (bounded) until the job-record Redis answers a PING again."""
    deadline = time.monotonic() + within_s
    try:
        while True:
            try:
                return bool(runtime().redis.ping())
            except redis.RedisError:
                if time.monotonic() > deadline:
                    return False
                time.sleep(1.0)
    except SoftTimeLimitExceeded:
        return False


def _recorded(what: str, write: Callable[[], T]) -> T:
    """Run a job-record write; never let a Redis failure get the message acked.

    A write that fails past the client's retries (Redis down, or full under
    ``noeviction``) is tried once more when Redis answers again; failing that, the
    message is rejected with requeue: it goes back to the queue, or, if Redis cannot
    take it back either, stays unacked until the visibility timeout. An acked message
    here would be a batch lost and a job in progress for ever.
    """
    try:
        return write()
    except redis.RedisError as exc:
        log.warning("%s: job record write failed (%s); waiting up to %.0fs for Redis", what, exc, _RECORD_WAIT_S)
    if _redis_answers(_RECORD_WAIT_S):
        try:
            return write()
        except redis.RedisError as exc:
            log.error("%s: job record write failed again (%s); requeueing the batch", what, exc)
    raise Reject(f"{what}: job record unavailable", requeue=True)


def _batch_failure(task: Task, exc: Exception) -> str:
    """The reason every item of a batch that raised ``exc`` fails with."""
    if isinstance(exc, SoftTimeLimitExceeded):
        soft = (task.request.timelimit or (None, None))[1]
        return "batch stopped at its soft time limit" + (f" ({float(soft):g} s)" if soft else "")
    return f"batch failed: {type(exc).__name__}: {exc}"


def _with_store_retries(what: str, run: Callable[[], T]) -> T | str:
    """Run ``run``, retrying a store failure with exponential backoff and jitter.

    The retries happen inside the task, not as Celery retries with a countdown: Celery
    holds such a message in memory, and a Redis restart meanwhile parks it until the
    visibility timeout. Returns the result, or the reason once every attempt failed.
    """
    attempts = settings.max_task_attempts
    for attempt in range(attempts):
        try:
            result = run()
        except StoreError as exc:
            if attempt + 1 >= attempts:
                _report_store(ok=False, error=f"{type(exc).__name__}: {exc}")
                return f"vector store unavailable after {attempts} attempts: {exc}"
            delay = _backoff(attempt)
            log.warning("%s: store failed (%s); retrying in %.2fs (attempt %d of %d)",
                        what, exc, delay, attempt + 2, attempts)
            metrics.count(store_retries=1)
            time.sleep(delay)
        else:
            if _store_failing:
                _report_store(ok=True)
            return result
    raise AssertionError("unreachable")


@app.task(name=tasknames.INGEST_BATCH)
def ingest_batch(job_id: str, batch: int, items: list[dict[str, Any]], force: bool = False) -> dict[str, Any]:
    """Chunk, embed and upsert one batch of documents of job ``job_id`` (unchanged ones
    are skipped unless ``force``)."""
    what = f"ingest batch {batch} of job {job_id}"
    job, skip, give_up = _recorded(what, lambda: _begin(job_id, batch))
    if skip:
        return {"job": job_id, "batch": batch, "skipped": skip}
    docs = [DocumentItem.from_dict(d) for d in items]
    if not all(d.seq for d in docs):  # a hand-made message: its job's number orders it
        docs = fill_missing(docs, _recorded(what, job.doc_seq))
    try:
        # The document-version records live in Redis like the job record: an outage waits
        # for Redis (then requeues), it does not fail the batch's documents.
        done = give_up or _with_store_retries(
            what, lambda: _recorded(what, lambda: runtime().ingestor().ingest(docs, force=force)))
        outcome = failed_outcome(docs, done) if isinstance(done, str) else done
    except Reject:
        raise
    except Exception as exc:  # e.g. the soft time limit: record it rather than leave the job hanging
        log.exception("ingest batch %s of job %s failed", batch, job_id)
        outcome = failed_outcome(docs, _batch_failure(ingest_batch, exc))
    _recorded(what, lambda: job.finish_batch(batch, outcome))
    metrics.count(documents=len(docs) - len(outcome.errors), documents_failed=len(outcome.errors),
                  chunks=outcome.chunks, tokens=outcome.tokens)
    return {
        "job": job_id, "batch": batch, "documents": len(docs), "completed": outcome.completed,
        "failed": outcome.failed, "skipped": outcome.skipped, "chunks": outcome.chunks, "tokens": outcome.tokens,
        "seconds": round(outcome.seconds, 3),
        "tokens_per_s": round(outcome.tokens / outcome.seconds, 1) if outcome.seconds else None,
    }


@app.task(name=tasknames.DELETE_DOCUMENTS)
def delete_documents(job_id: str, batch: int, selector: dict[str, Any]) -> dict[str, Any]:
    """Delete the documents ``selector`` names (a delete job's one batch)."""
    from common.deletion import DeleteSelector, delete_documents as delete

    what = f"delete batch {batch} of job {job_id}"
    job, skip, give_up = _recorded(what, lambda: _begin(job_id, batch))
    if skip:
        return {"job": job_id, "batch": batch, "skipped": skip}
    rt = runtime()
    chosen = DeleteSelector.from_dict(selector)
    seen = rt.job(chosen.unseen_in).seen if chosen.unseen_in else None
    tombstone = _recorded(what, job.doc_seq)
    done = give_up or _with_store_retries(what, lambda: _recorded(
        what, lambda: delete(rt.store(), rt.sequences(), chosen, tombstone, seen)))
    if isinstance(done, str):
        outcome = BatchOutcome(failed=1, errors=[ItemError("selector", done)])
    else:
        outcome = done
    _recorded(what, lambda: job.add_items(items=outcome.completed + outcome.failed))
    _recorded(what, lambda: job.finish_batch(batch, outcome))
    return {"job": job_id, "batch": batch, "documents": outcome.completed, "chunks": outcome.chunks}


@app.task(name=tasknames.ANSWER_BATCH)
def answer_batch(job_id: str, batch: int, items: list[dict[str, Any]], generate: bool = True) -> dict[str, Any]:
    """Retrieve and generate answers for one batch of questions of job ``job_id``."""
    what = f"question batch {batch} of job {job_id}"
    job, skip, give_up = _recorded(what, lambda: _begin(job_id, batch))
    if skip:
        return {"job": job_id, "batch": batch, "skipped": skip}
    rt = runtime()
    questions = [QuestionItem.from_dict(d) for d in items]
    try:
        done = give_up or _with_store_retries(
            f"question batch {batch} of job {job_id}",
            lambda: Answerer.from_settings(rt.retriever(), _generator(rt) if generate else None,
                                           settings).answer(questions, generate=generate))
        result = failed_batch(questions, done) if isinstance(done, str) else done
    except Exception as exc:  # e.g. the soft time limit: record it rather than leave the job hanging
        log.exception("question batch %s of job %s failed", batch, job_id)
        result = failed_batch(questions, _batch_failure(answer_batch, exc))
    _recorded(what, lambda: job.save_results(batch, result.lines))
    _recorded(what, lambda: job.finish_batch(batch, result.outcome))
    o = result.outcome
    metrics.count(questions=o.completed, questions_failed=o.failed)
    return {"job": job_id, "batch": batch, "questions": len(questions), "completed": o.completed,
            "failed": o.failed, "tokens": o.tokens, "seconds": round(o.seconds, 3)}


@app.task(name=tasknames.EMBED_BATCH)
def embed_batch(job_id: str, batch: int, items: list[dict[str, Any]]) -> dict[str, Any]:
    """Embed one message of a ``/v1/embeddings`` batch's lines with the process's model."""
    what = f"embedding batch {batch} of job {job_id}"
    job, skip, give_up = _recorded(what, lambda: _begin(job_id, batch))
    if skip:
        return {"job": job_id, "batch": batch, "skipped": skip}
    lines = [EmbedItem.from_dict(d) for d in items]
    model = settings.embed_model
    try:
        result = (failed_items(lines, give_up, model=model) if give_up
                  else embed_items(runtime().embedder(), lines, model=model))
    except Exception as exc:  # e.g. the soft time limit: record it rather than leave the job hanging
        log.exception("%s failed", what)
        result = failed_items(lines, _batch_failure(embed_batch, exc), model=model)
    _recorded(what, lambda: job.save_results(batch, result.lines))
    _recorded(what, lambda: job.finish_batch(batch, result.outcome))
    o = result.outcome
    return {"job": job_id, "batch": batch, "lines": len(lines), "completed": o.completed, "failed": o.failed,
            "tokens": o.tokens, "seconds": round(o.seconds, 3)}


def _generator(rt: Runtime) -> Generator:
    """The process's generator; one that cannot be built fails each question with the reason."""
    try:
        return rt.generator()
    except Exception as exc:
        log.exception("could not build the %s generator", settings.answer_backend)
        return UnavailableGenerator(f"could not start the {settings.answer_backend} generator: {type(exc).__name__}: {exc}")


@app.task(name=tasknames.SEARCH)
def search(queries: list[str], top_k: int = 5, filter: dict[str, Any] | None = None) -> list[list[dict[str, Any]]]:
    """Embed ``queries`` in one pass and run one batched query; distinct pages per query."""
    from common.retrieval import retrieve

    rt = runtime()
    lap = metrics.Lap()
    hits = retrieve(rt.retriever(), queries, top_k=top_k, filter=filter)
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
    collection = str(request.get("collection") or settings.collection)
    if method == "drop_collection":
        _drop_collection(collection)
        return {"result": None}
    reply = serve(rt.store_named(collection), rt.redis, method, request)
    stage = {"upsert": "upsert", "delete_older_many": "upsert", "search": "search"}.get(method)
    if stage:  # the owner's own view of the store stages, under its worker name
        metrics.observe(stage, time.perf_counter() - started)
    return reply


@app.task(name=tasknames.STORE_INFO)
def store_info() -> dict[str, Any]:
    """The collection as the worker that owns the store sees it."""
    try:
        info = runtime().store().info()
    except Exception as exc:
        _report_store(ok=False, error=f"{type(exc).__name__}: {exc}")
        raise
    _report_store(ok=True, info=info.__dict__)
    return {**info.__dict__, "retrieval": settings.retrieval}


@app.task(name=tasknames.STORE_OPTIMIZE)
def store_optimize() -> dict[str, Any]:
    """Build the store's vector index now (``ragq optimize``), in the process that owns it."""
    started = time.perf_counter()
    changed = runtime().store().optimize()
    info = runtime().store().info()
    return {"changed": changed, "seconds": round(time.perf_counter() - started, 3), "points": info.points,
            "backend": info.backend}


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


# --- re-index: a new collection beside the live one, then one switch ---------------------


@app.task(name=tasknames.REINDEX_PLAN)
def reindex_plan(recipe: dict[str, Any]) -> dict[str, Any]:
    """The live collection's document keys and the name of the collection to build."""
    from common.live import rebuilt_name
    from common.reindex import Plan, Recipe

    rt = runtime()
    source = rt.live()
    keys = sorted(rt.store_named(source).stored_versions({}))
    target = rebuilt_name(settings.collection, rt.pointer().physical())
    return Plan(source, target, Recipe.from_dict(recipe), keys).to_dict(with_keys=True)


@app.task(name=tasknames.REINDEX_BATCH)
def reindex_batch(job_id: str, batch: int, keys: list[str], plan: dict[str, Any]) -> dict[str, Any]:
    """Rebuild the documents ``keys`` of the plan's source into its target; the batch that
    ends the job catches up with the source's changes and switches the pointer."""
    from common.reindex import Plan, read_documents

    what = f"reindex batch {batch} of job {job_id}"
    job, skip, give_up = _recorded(what, lambda: _begin(job_id, batch))
    if skip:
        return {"job": job_id, "batch": batch, "skipped": skip}
    chosen = Plan.from_dict(plan)
    rt = runtime()
    rt.adopt_recipe(chosen.target, chosen.recipe.to_dict())

    def rebuild() -> BatchOutcome:
        docs = read_documents(rt.store_named(chosen.source), keys)
        outcome = rt.ingestor(chosen.target).ingest(docs)
        missing = len(keys) - len({d.key for d in docs})
        outcome.completed += missing  # deleted from the source since the plan: nothing to rebuild
        return outcome

    def failed(reason: str) -> BatchOutcome:
        return BatchOutcome(failed=len(keys), errors=[ItemError(f"documents {keys[0]}..", reason)])

    try:
        done = give_up or _with_store_retries(what, lambda: _recorded(what, rebuild))
        outcome = failed(done) if isinstance(done, str) else done
    except Reject:
        raise
    except Exception as exc:
        log.exception("%s failed", what)
        outcome = failed(_batch_failure(reindex_batch, exc))
    _recorded(what, lambda: job.finish_batch(batch, outcome))
    info = _recorded(what, job.info)
    switch_batch = info.batches_total - 1  # the job's last batch is the switch, run by the page ending last
    if info.batches_done == switch_batch and not job.batch_done(switch_batch):
        _switch_after_reindex(job, switch_batch, chosen, failed=info.failed)
    return {"job": job_id, "batch": batch, "documents": len(keys), "chunks": outcome.chunks}


def _switch_after_reindex(job: JobRecord, batch: int, plan: Any, *, failed: int) -> None:
    """Catch up with what the live collection changed during the rebuild, then switch,
    and only then end the job (``--wait`` returns once searches use the new collection).

    Two last pages ending at once may both get here; the catch-up is idempotent (unchanged
    documents are skipped), switching to the same target twice is one switch, and the
    switch batch is recorded once. A rebuild with failed documents does not switch.
    """
    from common.reindex import lagging, read_documents

    what = f"reindex switch of job {job.id}"
    rt = runtime()
    if failed:
        reason = (f"not switched: {failed} document(s) failed to rebuild into {plan.target}; "
                  "searches stay on " + plan.source)
        _recorded(what, lambda: job.finish_batch(batch, BatchOutcome(errors=[ItemError("switch", reason)])))
        return

    def catch_up_and_switch() -> tuple[str, int, int]:
        source, target = rt.store_named(plan.source), rt.store_named(plan.target)
        again, gone = lagging(source, target)
        if again:
            rt.ingestor(plan.target).ingest(read_documents(source, again))
        if gone:
            target.delete_where({"doc_key": gone})
        return rt.pointer().switch(plan.target), len(again), len(gone)

    done = _with_store_retries(what, catch_up_and_switch)
    if isinstance(done, str):
        _recorded(what, lambda: job.finish_batch(batch, BatchOutcome(failed=1, errors=[ItemError("switch", done)])))
        return
    previous, again, gone = done
    log.info("reindex job %s: %s now points at %s (was %s; caught up %d, deleted %d)",
             job.id, settings.collection, plan.target, previous, again, gone)
    _recorded(what, lambda: job.update_meta(switched=True, previous=previous, caught_up=again, deleted=gone))
    _recorded(what, lambda: job.finish_batch(batch, BatchOutcome()))


@app.task(name=tasknames.REINDEX_DROP_OLD)
def reindex_drop_old() -> dict[str, Any]:
    """Delete every physical collection of ``RAGQ_COLLECTION`` the pointer does not name."""
    rt = runtime()
    live = rt.live()
    old = [name for name in rt.pointer().physical() if name != live]
    for name in old:
        if owns_store():
            _drop_collection(name)
        else:
            _ask_store_owner("drop_collection", {"collection": name}, settings.store_request_timeout_s)
    return {"live": live, "dropped": old}


def _drop_collection(name: str) -> None:
    rt = runtime()
    if name == rt.live():
        raise ValueError(f"collection {name!r} is the live one; it cannot be dropped")
    pointer = rt.pointer()
    rt.forget_store(name)
    pointer.drop(name)
