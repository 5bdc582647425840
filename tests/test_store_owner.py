"""The embedded store's owner process (``store@host``) killed, or frozen, mid-job.

Two worker processes embed and send their store calls to the owner. SIGKILL takes the
owner (Celery main and pool process) down while a batch runs, and the launcher restarts
it; SIGSTOP freezes it past ``RAGQ_STORE_REQUEST_TIMEOUT_S`` (6 s here), so a call times
out, is retried with backoff, and the expired first request is discarded, never run.
Either way the job ends exact: every document once, no batch counted twice, the same
points as an undisturbed run.
"""

from __future__ import annotations

import os
import re
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from common.metrics import MetricsStore
from producer.client import Client
from tests.conftest import Stack, copy_docs
from tests.faults import (
    BatchWatch,
    alive,
    children,
    expected_chunks,
    planned_batches,
    record,
    recorded_batches,
    report,
    wait_finished,
    wait_for,
)
from tests.test_faults import corpus_files

pytestmark = [pytest.mark.fault, pytest.mark.timeout(600)]


def owner_pid(stack: Stack) -> int | None:
    """The Celery main process of ``store@host`` under the stack's launcher."""
    assert stack.proc is not None
    for pid in children(stack.proc.pid):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if any(arg.startswith(b"store@") for arg in cmdline):
            return pid
    return None


@pytest.fixture(scope="module")
def shared(redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    stack = Stack(redis_url, tmp_path_factory.mktemp("store-owner"), RAGQ_STORE_REQUEST_TIMEOUT_S="6")
    stack.start_worker(processes=2, timeout=300)
    yield stack
    stack.stop_worker(timeout=120)


def store_retries(client: Client, prefix: str) -> int:
    workers = MetricsStore(client.redis, prefix=prefix).snapshot().workers.values()
    return sum(w.counters.get("store_retries", 0) for w in workers)


def start_job_mid_batch(stack: Stack, tmp_path: Path, offset: int):
    """Ingest 40 pages in small batches; return once one is recorded and the next runs."""
    root = copy_docs(corpus_files(40, offset=offset), tmp_path / "docs")
    settings = stack.settings(batch_bytes=15_000)
    batches = planned_batches(settings, [root])
    assert len(batches) >= 4
    client = Client(settings)
    before = int(client.store_info(timeout=60)["points"])
    rec = record(stack, client.ingest([root]).id, client.redis)
    watch = BatchWatch(rec)
    wait_for(lambda: recorded_batches(rec) and watch.running() is not None, 180,
             "a running batch after the first recorded one", poll_s=0.01, on_timeout=stack.log_text)
    return client, rec, batches, expected_chunks(settings, batches), before


def assert_exact(client: Client, rec, batches, want_chunks: int, before: int, stack: Stack):
    info = wait_finished(rec, 300, stack)
    assert (info.status, info.completed, info.failed, info.errors) == ("completed", 40, 0, []), info
    assert info.batches_done == info.batches_total == len(batches)
    assert info.chunks == want_chunks
    assert int(client.store_info(timeout=60)["points"]) - before == want_chunks
    return info


def test_store_owner_killed_mid_ingest(shared: Stack, tmp_path: Path) -> None:
    client, rec, batches, want_chunks, before = start_job_mid_batch(shared, tmp_path, offset=5)
    retries_before = store_retries(client, shared.settings().key_prefix)
    old = wait_for(lambda: owner_pid(shared), 10, "the store owner process")
    os.killpg(old, signal.SIGKILL)  # its own process group: Celery main and pool process
    killed_at = time.monotonic()
    wait_for(lambda: not alive(old), 10, "the killed owner to go")
    new = wait_for(lambda: (pid := owner_pid(shared)) not in (None, old) and pid, 60,
                   "the launcher to restart the owner", on_timeout=shared.log_text)

    info = assert_exact(client, rec, batches, want_chunks, before, shared)
    recovered_s = time.monotonic() - killed_at
    assert owner_pid(shared) == new  # the new owner answered the store_info above
    assert len(client.search(["How do I refresh the CDN cache?"], top_k=3)[0]) == 3
    assert "exited with code -9; restarting" in shared.log_text()
    report("store-owner-killed", batches=len(batches), recover_s=recovered_s,
           store_retries=store_retries(client, shared.settings().key_prefix) - retries_before,
           job_s=info.elapsed_s or 0.0, chunks=want_chunks)


def test_store_owner_frozen_past_the_request_timeout(shared: Stack, tmp_path: Path) -> None:
    client, rec, batches, want_chunks, before = start_job_mid_batch(shared, tmp_path, offset=6)
    prefix = shared.settings().key_prefix
    retries_before = store_retries(client, prefix)
    owner = wait_for(lambda: owner_pid(shared), 10, "the store owner process")
    timeouts_before = logged_timeouts(shared)
    os.killpg(owner, signal.SIGSTOP)  # the running batch's next store call will get no answer
    frozen_at = time.monotonic()
    try:
        # Two timeouts, not one: the owner runs one call at a time, so the freeze may catch a
        # call mid-run (it then finishes late, rightly, not discarded). The other timed-out call
        # was still queued, and has expired before the owner thaws.
        wait_for(lambda: logged_timeouts(shared) >= timeouts_before + 2, 60,
                 "two store calls to time out and be retried", poll_s=0.1, on_timeout=shared.log_text)
    finally:
        os.killpg(owner, signal.SIGCONT)
    frozen_s = time.monotonic() - frozen_at

    info = assert_exact(client, rec, batches, want_chunks, before, shared)
    log = shared.log_text()
    assert re.search(r"no answer to (stored_versions|upsert|delete_older_many) from the embedded store's owner within 6s", log)
    assert "Discarding revoked task: ragq.store_call" in log  # the expired request never ran
    assert owner_pid(shared) == owner  # nothing restarted: the owner just answered late
    report("store-owner-frozen", batches=len(batches), frozen_s=frozen_s,
           store_retries=store_retries(client, prefix) - retries_before, job_s=info.elapsed_s or 0.0)


def logged_timeouts(stack: Stack) -> int:
    """Store calls a worker logged as unanswered and retried (metrics flush only after a task)."""
    return stack.log_text().count("store failed (no answer to")
