"""Job records in real Redis: exact counts, final status, duplicates, cancellation, expiry."""

from __future__ import annotations

import uuid

import pytest
import redis

from common.jobs import BatchOutcome, JobRecord
from common.schemas import ItemError, JobKind, JobStatus


@pytest.fixture
def prefix(redis_client: redis.Redis):
    name = f"jobs-test-{uuid.uuid4().hex[:6]}"
    yield name
    for key in redis_client.scan_iter(f"{name}:*"):
        redis_client.delete(key)


def new_job(client: redis.Redis, prefix: str, ttl: int = 600) -> JobRecord:
    return JobRecord.create(client, JobKind.ingest, meta={"inputs": ["x"]}, prefix=prefix, ttl=ttl)


def test_counts_and_completion(redis_client: redis.Redis, prefix: str) -> None:
    job = new_job(redis_client, prefix)
    job.add_items(items=5, batches=2, errors=[ItemError("bad.json", "malformed JSON")])
    assert job.info().status == "queued"
    assert job.finish_batch(0, BatchOutcome(completed=3, chunks=9, tokens=900))
    job.seal()
    info = job.info()
    assert (info.status, info.total, info.completed, info.failed) == ("in_progress", 6, 3, 1)
    assert job.finish_batch(1, BatchOutcome(completed=2, chunks=4, tokens=400))
    info = job.info()
    assert info.status == JobStatus.completed_with_errors.value
    assert (info.completed, info.failed, info.chunks, info.tokens, info.batches_done) == (5, 1, 13, 1300, 2)
    assert info.errors == [{"item": "bad.json", "reason": "malformed JSON"}]
    assert info.finished_at is not None and info.throughput["tokens_per_s"] > 0


def test_a_batch_delivered_twice_is_counted_once(redis_client: redis.Redis, prefix: str) -> None:
    job = new_job(redis_client, prefix)
    job.add_items(items=2, batches=1)
    job.seal()
    outcome = BatchOutcome(completed=2, chunks=5, tokens=50, errors=[])
    assert job.finish_batch(0, outcome) is True
    assert job.finish_batch(0, outcome) is False
    info = job.info()
    assert (info.status, info.completed, info.chunks) == ("completed", 2, 5)


def test_split_document_counts_once_after_all_parts(redis_client: redis.Redis, prefix: str) -> None:
    job = new_job(redis_client, prefix)
    job.add_items(items=2, batches=3)
    job.seal()
    job.finish_batch(0, BatchOutcome(parts=[("big", 3, True)]))
    job.finish_batch(1, BatchOutcome(parts=[("big", 3, True), ("other", 2, True)]))
    assert job.info().completed == 0
    job.finish_batch(2, BatchOutcome(parts=[("big", 3, True), ("other", 2, False)],
                                      errors=[ItemError("other (part 2 of 2)", "boom")]))
    info = job.info()
    assert (info.completed, info.failed, info.status) == (1, 1, "completed_with_errors")


def test_all_failed_is_failed_and_empty_job_completes_on_seal(redis_client: redis.Redis, prefix: str) -> None:
    failing = new_job(redis_client, prefix)
    failing.add_items(errors=[ItemError("a", "bad"), ItemError("b", "bad")])
    failing.seal()
    assert failing.info().status == "failed"
    empty = new_job(redis_client, prefix)
    empty.seal()
    assert empty.info().status == "completed"


def test_cancel_is_final_and_later_batches_do_not_revive_it(redis_client: redis.Redis, prefix: str) -> None:
    job = new_job(redis_client, prefix)
    job.add_items(items=4, batches=2)
    job.seal()
    job.finish_batch(0, BatchOutcome(completed=2))
    assert job.cancel() is True
    assert job.cancel() is False
    job.finish_batch(1, BatchOutcome(completed=2))
    job.mark_started()
    info = job.info()
    assert info.status == "cancelled"
    assert job.fail("late") is False


def test_unknown_job_is_a_status_and_records_expire(redis_client: redis.Redis, prefix: str) -> None:
    missing = JobRecord(redis_client, "nope", prefix=prefix)
    assert missing.info().status == "not_found"
    missing.mark_started()  # must not create a record
    assert missing.status() == JobStatus.not_found
    job = new_job(redis_client, prefix, ttl=120)
    job.add_items(items=1, batches=1, errors=[ItemError("x", "y")])
    job.finish_batch(0, BatchOutcome(completed=1))
    for key in job.keys[:3]:
        assert 0 < redis_client.ttl(key) <= 120


def test_duplicate_job_id_is_refused(redis_client: redis.Redis, prefix: str) -> None:
    JobRecord.create(redis_client, JobKind.ingest, prefix=prefix, job_id="fixed")
    with pytest.raises(ValueError, match="already exists"):
        JobRecord.create(redis_client, JobKind.ingest, prefix=prefix, job_id="fixed")


def test_attempts_are_counted_per_batch(redis_client: redis.Redis, prefix: str) -> None:
    job = new_job(redis_client, prefix)
    assert [job.begin_attempt(0) for _ in range(3)] == [1, 2, 3]
    assert job.begin_attempt(1) == 1
    assert job.attempts() == {0: 3, 1: 1}


def test_index_forgets_jobs_older_than_the_ttl(redis_client: redis.Redis, prefix: str) -> None:
    """The index of jobs would otherwise grow for ever: its entries outlive their records."""
    import time

    index = JobRecord.index_key(prefix)
    redis_client.zadd(index, {"ancient": time.time() - 700, "recent": time.time() - 60})
    job = new_job(redis_client, prefix, ttl=600)
    assert JobRecord.recent(redis_client, prefix=prefix) == [job.id, "recent"]
    assert 0 < redis_client.ttl(index) <= 600


def test_final_status_is_announced_once_per_job(redis_client: redis.Redis, prefix: str) -> None:
    """The finishing script publishes the job id, so a waiter (``/v1/answer``) needs no polling."""
    pubsub = redis_client.pubsub(ignore_subscribe_messages=True)
    pubsub.subscribe(JobRecord.finished_channel(prefix))
    pubsub.get_message(timeout=1)  # the subscribe confirmation
    done, cancelled, sealed_last = new_job(redis_client, prefix), new_job(redis_client, prefix), new_job(redis_client, prefix)
    done.add_items(items=1, batches=1)
    done.seal()
    assert done.finish_batch(0, BatchOutcome(completed=1))
    assert not done.finish_batch(0, BatchOutcome(completed=1))  # a second delivery: no second notice
    cancelled.add_items(items=1, batches=1)
    assert cancelled.cancel() and not cancelled.cancel()
    sealed_last.add_items(items=1, batches=1)
    assert sealed_last.finish_batch(0, BatchOutcome(completed=1))  # not sealed yet: not final
    sealed_last.seal()
    ids = []
    while (message := pubsub.get_message(timeout=0.5)) is not None:
        ids.append(message["data"])
    pubsub.close()
    assert ids == [done.id, cancelled.id, sealed_last.id]
