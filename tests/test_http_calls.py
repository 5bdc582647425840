"""Worker requests awaited on the result backend's notification (producer/http/calls.py), in
real Redis with Celery's own Redis backend storing the outcome as a worker's task would."""

from __future__ import annotations

import asyncio
import time
import uuid

import pytest
from celery import states
from fastapi import HTTPException

from common.config import Settings
from producer.client import WorkerRequest, WorkerTimeout
from producer.http.app import build_context


def _outcome_later(ctx, task_id: str, delay: float, store) -> None:
    async def later() -> None:
        await asyncio.sleep(delay)
        store(ctx.client.celery.backend, task_id)

    asyncio.get_running_loop().create_task(later())


def _call(redis_url: str, store, delay: float, timeout: float = 5.0):
    ctx = build_context(Settings(_env_file=None, redis_url=redis_url, key_prefix=f"calls-{uuid.uuid4().hex[:6]}",
                                 qa_queue="qa-calls-test"), None)
    task_id = uuid.uuid4().hex
    ctx.client.send = lambda request: task_id  # the outcome is stored below, as a worker's backend stores it

    async def main():
        _outcome_later(ctx, task_id, delay, store)
        started = time.monotonic()
        try:
            return await ctx.calls.call(WorkerRequest("ragq.search", (), None, "search"), timeout), \
                time.monotonic() - started
        finally:
            await ctx.notifier.close()
            await ctx.aredis.aclose()

    return asyncio.run(main())


def test_result_wakes_the_waiter(redis_url: str) -> None:
    result, waited = _call(redis_url, lambda backend, tid: backend.store_result(tid, [["hit"]], states.SUCCESS), 0.3)
    assert result == [["hit"]]
    assert waited < 0.6  # the publish woke it (the backstop re-checks come at 0.25 s and 0.75 s)


def test_worker_failure_is_a_502_naming_the_error(redis_url: str) -> None:
    with pytest.raises(HTTPException) as failed:
        _call(redis_url, lambda backend, tid: backend.store_result(tid, ValueError("store unreachable"),
                                                                   states.FAILURE), 0.1)
    assert failed.value.status_code == 502
    assert failed.value.detail == "the worker failed the search request: ValueError: store unreachable"


def test_no_outcome_is_a_timeout(redis_url: str) -> None:
    with pytest.raises(WorkerTimeout, match="no worker answered the search request within 1s"):
        _call(redis_url, lambda backend, tid: None, 0.1, timeout=1.0)
