"""How a question job is cut into task batches when ``RAGQ_QA_BATCH_SIZE`` is left alone.

A batch against an endpoint pays a ramp-up (its first questions embedded before their
requests can start) and a hand-off to the next batch, while the in-flight budget idles:
with batches of two budget rounds that was a fifth of bulk QA's time on 2 CPU cores
(``bench/qa.py``). The default is eight rounds, and its time limits count rounds of
requests rather than questions, so the workers still accept the configuration. The
messages are read off a queue no worker consumes.
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import pytest

from common.limits import check_visibility_timeout
from common.priorities import queue_keys
from producer.client import Client
from tests.conftest import Stack
from tests.test_security import _queued_bodies

ENDPOINT = {"llm_backend": "openai", "llm_base_url": "http://127.0.0.1:9/v1", "llm_model": "m"}


def _batches(stack: Stack, n: int, **changes: object) -> tuple[list[int], list[tuple[float, float]]]:
    """Sizes and (soft, hard) time limits of the task batches of an ``n``-question job."""
    queue = f"nobody-{uuid.uuid4().hex[:8]}"
    settings = stack.settings(qa_queue=queue, interactive_queue=queue, **changes)
    check_visibility_timeout(settings)  # what a worker checks at start-up
    client = Client(settings)
    job = client.ask_many([f"Question {i} about cloud disks?" for i in range(n)])
    try:
        envelopes = [json.loads(raw) for key in queue_keys(queue) for raw in client.redis.lrange(key, 0, -1)]
        args = [json.loads(body)[0] for body in _queued_bodies(client, queue)]  # (job, batch, items, ...)
    finally:
        client.redis.delete(*queue_keys(queue))
        job.cancel()
    order = sorted(range(len(args)), key=lambda i: args[i][1])  # by batch number
    sizes = [len(args[i][2]) for i in order]
    limits = [tuple(envelopes[i]["headers"]["timelimit"][::-1]) for i in order]
    return sizes, limits


@pytest.fixture
def stack(redis_url: str, tmp_path: Path) -> Stack:
    return Stack(redis_url, tmp_path)


def test_an_endpoint_gets_eight_rounds_of_its_budget_per_batch(stack: Stack) -> None:
    sizes, limits = _batches(stack, 600, **ENDPOINT)
    assert sizes == [256, 256, 88]  # 8 x RAGQ_LLM_MAX_IN_FLIGHT (32)
    soft, hard = limits[0]
    assert soft == 120 + 8 * 60  # the base, and each of 8 rounds allowed RAGQ_LLM_TIMEOUT_S
    assert hard < stack.settings().visibility_timeout_s
    assert stack.settings(**ENDPOINT).masked()["qa_batch_size"] == 256  # what `ragq config` shows

    sizes, _ = _batches(stack, 100, llm_max_in_flight=4, **ENDPOINT)
    assert sizes == [32, 32, 32, 4]


def test_a_local_model_and_an_explicit_size_keep_their_batches(stack: Stack) -> None:
    sizes, limits = _batches(stack, 40, llm_backend="extractive")
    assert sizes == [16, 16, 8]
    assert limits[0][0] == 120 + 16 * 30  # one question after another
    sizes, _ = _batches(stack, 40, qa_batch_size=10, **ENDPOINT)
    assert sizes == [10, 10, 10, 10]
