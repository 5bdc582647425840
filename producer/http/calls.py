"""Requests through the workers, awaited without holding a thread.

The short Redis and broker writes (create a job record, send a task) still run in the
threadpool for a few milliseconds; the wait for the outcome is an await on the
:class:`~producer.http.notify.Notifier`. Failures map to the API's status codes the way
the synchronous client's do: a worker's failure is a 502, no worker in time a 504, Redis
gone a 503.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import redis
from celery import states
from fastapi import HTTPException
from fastapi.concurrency import run_in_threadpool
from kombu.exceptions import OperationalError
from redis import asyncio as aioredis

from common.questions import AnswerResult
from common.schemas import JobStatus
from producer.client import Client, RagqError, WorkerFailed, WorkerRequest, WorkerTimeout, worker_failed
from producer.http.notify import Notifier

log = logging.getLogger("ragq.http")


class WorkerCalls:
    """Search, embeddings and one-question answers, each awaited on its completion notice."""

    def __init__(self, client: Client, aredis: aioredis.Redis, notifier: Notifier, scrub: Callable[[str], str],
                 probe: redis.Redis) -> None:
        self.client = client
        self.redis = aredis
        self.notifier = notifier
        self.scrub = scrub
        self.probe = probe

    # -- a task and its result ----------------------------------------------------------------
    async def call(self, request: WorkerRequest, timeout: float) -> Any:
        """Send ``request``; its result, a 502 if the worker failed it, a 504 after ``timeout``."""
        try:
            task_id = await run_in_threadpool(self.client.send, request)
            key = self.client.result_key(task_id)
            meta = await self.notifier.wait_channel(key, lambda: self._ready(key), timeout)
        except (RagqError, redis.RedisError, OperationalError, HTTPException):
            raise
        except Exception as exc:  # Celery or kombu failing mid-request
            raise self._unexpected(exc) from None
        if meta is None:
            await run_in_threadpool(self.client.celery.control.revoke, task_id)
            raise self.client.no_worker(request.what, timeout)
        await self.redis.delete(key)  # read once: like AsyncResult.forget()
        if meta["status"] == states.SUCCESS:
            return meta["result"]
        failure = meta.get("result")  # the backend rebuilds the worker's exception
        if isinstance(failure, BaseException):
            exc_type, message = type(failure).__name__, str(failure)
        else:
            exc_type, message = str(meta["status"]), str(failure or "")
        raise self._failed(worker_failed(request.what, exc_type, message))

    async def _ready(self, key: str) -> dict[str, Any] | None:
        raw = await self.redis.get(key)
        if raw is None:
            return None
        meta = self.client.decode_result(raw)
        return meta if meta.get("status") in states.READY_STATES else None  # not STARTED

    # -- a one-question job -----------------------------------------------------------------------
    async def answer(self, line: dict[str, Any], *, generate: bool, timeout: float) -> AnswerResult:
        """Queue a one-question job and await its end; the answer line, or the reason as an HTTP error."""
        job = await run_in_threadpool(self.client.ask_many, [line], generate=generate, interactive=True)
        record = job.record()

        async def finished() -> JobStatus | None:
            status = await record.status_async(self.redis)
            return status if status.is_terminal else None

        if await self.notifier.wait_keyed(job.id, finished, timeout) is None:
            taken = await run_in_threadpool(_cancel, job)
            raise WorkerTimeout(
                f"no answer within {timeout:g}s (job {job.id} cancelled)" if taken else
                f"no worker took the question within {timeout:g}s: is one running on the "
                f"{self.client.settings.interactive_queue!r} queue?")
        answers = await run_in_threadpool(job.answers)
        if not answers or answers[0].error:
            reason = answers[0].error if answers else "no answer line"
            raise HTTPException(502, self.scrub(f"the answer failed: {reason} (job {job.id})")[:1000])
        return answers[0]

    # -- errors ------------------------------------------------------------------------------------
    def _failed(self, exc: WorkerFailed) -> HTTPException:
        log.warning("worker request failed: %s", self.scrub(str(exc)))
        return HTTPException(502, self.scrub(str(exc))[:600])

    def _unexpected(self, exc: Exception) -> HTTPException:
        """Celery raises bare errors when Redis goes away mid-request: 503 then, else 502."""
        log.warning("worker request failed: %s: %s", type(exc).__name__, self.scrub(str(exc)))
        if not _answers(self.probe):
            return HTTPException(503, "Redis is unavailable")
        return HTTPException(502, f"the worker failed: {type(exc).__name__}: {self.scrub(str(exc))[:500]}")


def _cancel(job: Any) -> bool:
    """Cancel a job that ran out of time; whether a worker had started it."""
    job.cancel()
    return job.refresh().started_at is not None


def _answers(probe: redis.Redis) -> bool:
    try:
        return bool(probe.ping())
    except redis.RedisError:
        return False
