"""What a job leaves in Redis: no Celery results of batch tasks nobody reads.

The job record carries a batch's counts and answers; a stored task result beside it
would sit unread until ``result_expires`` (the job TTL, 7 days), one per batch.
Results of calls someone waits for (search, store info) are still stored and read.
"""

from __future__ import annotations

import json
from pathlib import Path

import redis

from producer.client import Client
from tests.conftest import Stack
from tests.faults import record, wait_finished
from tests.test_time_limits import synthetic_docs


def batch_results(conn: redis.Redis, job_id: str) -> list[str]:
    """Celery result keys whose result names ``job_id`` (batch tasks return it)."""
    found = []
    for key in conn.scan_iter("celery-task-meta-*", count=1000):
        raw = conn.get(key)
        result = json.loads(raw).get("result") if raw else None
        if isinstance(result, dict) and result.get("job") == job_id:
            found.append(key)
    return found


def test_batch_tasks_store_no_results(stack: Stack, redis_client: redis.Redis, tmp_path: Path) -> None:
    client = Client(stack.settings(batch_bytes=10_000))
    ingest = client.ingest([synthetic_docs(tmp_path / "docs", "growth", 6)])
    questions = tmp_path / "q.txt"
    questions.write_text("How do I back up a volume?\nWhat is a snapshot?\n")
    asked = client.ask_file(questions)
    for job in (ingest, asked):
        info = wait_finished(record(stack, job.id, redis_client), 120, stack)
        assert info.status == "completed" and info.batches_done >= 1, info
        assert batch_results(redis_client, job.id) == []
    assert client.search("snapshot", timeout=60)[0]  # a call someone waits for still gets its result
