"""Batches past their time limits, for real: a pool process frozen (SIGSTOP) until its
hard limit kills it, and a batch that overruns its soft limit.

Small limits (RAGQ_INGEST_S_PER_MB=5; RAGQ_TASK_BASE_S=5, or 30 where a fresh pool process
must load its model first) keep the hard limit near its fixed 30 s margin, so one frozen
batch costs about 36-68 s. The documents are synthetic,
so these tests need no corpus.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from common.limits import ingest_limits
from producer.client import Client
from tests.conftest import REPO, Stack
from tests.faults import (
    BatchWatch,
    attempts,
    expected_chunks,
    planned_batches,
    pool_child,
    record,
    recorded_batches,
    report,
    wait_finished,
    wait_for,
)

pytestmark = [pytest.mark.fault, pytest.mark.timeout(300)]

LIMITS = {"RAGQ_TASK_BASE_S": "5", "RAGQ_INGEST_S_PER_MB": "5", "RAGQ_MAX_TASK_ATTEMPTS": "2"}
#: The hard-limit test kills the pool process; the new one loads torch and the model before
#: its first batch runs (the main process holds neither), which takes longer than 5 s on a
#: loaded 2-core machine: its batches get room for that (soft ~30 s, hard ~68 s).
HARD_LIMITS = {**LIMITS, "RAGQ_TASK_BASE_S": "30"}
VOCAB = ("cloud server disk snapshot region zone network bandwidth billing image volume backup "
         "instance security group load balancer bucket object storage quota renewal invoice").split()


def synthetic_docs(root: Path, tag: str, n: int, words: int = 300) -> Path:
    """``n`` JSON documents of ``words`` words each, distinct per ``tag``."""
    rng = random.Random(tag)
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        content = " ".join(rng.choice(VOCAB) for _ in range(words))
        (root / f"{tag}-{i:03d}.json").write_text(json.dumps({"id": f"{tag}-{i}", "title": f"{tag} {i}",
                                                              "content": content}))
    return root


def points(client: Client) -> int:
    return int(client.store_info(timeout=60)["points"])


@pytest.fixture(scope="module")
def limits_stack(redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    stack = Stack(redis_url, tmp_path_factory.mktemp("time-limits"), **HARD_LIMITS)
    stack.start_worker()
    yield stack
    stack.stop_worker()


def test_batch_past_its_hard_limit_is_requeued_and_redone(limits_stack: Stack, tmp_path: Path) -> None:
    """Freeze the pool process running a batch: at the hard limit Celery kills it, and the
    batch must come back at once (not after the 30-minute visibility timeout, and not
    acked and lost), count a second attempt, and the job end with exact counts."""
    stack = limits_stack
    root = synthetic_docs(tmp_path / "docs", "hard", 16)
    settings = stack.settings(batch_bytes=10_000)
    batches = planned_batches(settings, [root])
    want_chunks = expected_chunks(settings, batches)
    assert len(batches) >= 3
    client = Client(settings)
    before = points(client)

    job = client.ingest([root])
    rec = record(stack, job.id, client.redis)
    watch = BatchWatch(rec)
    wait_for(lambda: watch.running() is not None, 120, "a running batch", poll_s=0.005, on_timeout=stack.log_text)
    frozen_pid = pool_child(stack)
    os.kill(frozen_pid, signal.SIGSTOP)
    frozen_at = time.monotonic()
    frozen = watch.running()
    assert frozen is not None, "the batch finished between its detection and the freeze"
    hard = ingest_limits(settings, batches[frozen].nbytes)[1]

    try:
        info = wait_finished(rec, hard + 90, stack)
    finally:
        try:
            os.kill(frozen_pid, signal.SIGKILL)  # if Celery never did, do not leave it stopped
        except ProcessLookupError:
            pass
    recover_s = time.monotonic() - frozen_at
    assert info.status == "completed", info
    assert (info.total, info.completed, info.failed) == (16, 16, 0)
    assert info.batches_done == info.batches_total == len(batches)
    assert info.chunks == want_chunks and points(client) - before == want_chunks
    tries = attempts(rec)
    assert tries[frozen] == 2 and all(n == 1 for b, n in tries.items() if b != frozen), tries
    assert recorded_batches(rec) == set(range(len(batches)))
    log = stack.log_text()
    assert f"Hard time limit ({hard}s) exceeded" in log or f"Hard time limit ({hard:g}s) exceeded" in log, log[-3000:]
    assert hard < recover_s < hard + 60  # back right after the kill, not after the visibility timeout
    report("hard-time-limit", hard_limit_s=hard, frozen_batch=frozen, batches=len(batches),
           recover_s=recover_s, job_s=info.elapsed_s or 0.0)


@pytest.fixture(scope="module")
def ownerless_stack(redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """One ingest worker that does not own the embedded store, and no owner: every store
    call waits the full RAGQ_STORE_REQUEST_TIMEOUT_S (60 s), well past a 5 s soft limit."""
    stack = Stack(redis_url, tmp_path_factory.mktemp("soft-limit"), **LIMITS, RAGQ_STORE_REQUEST_TIMEOUT_S="60")
    stack.data_dir.mkdir(parents=True, exist_ok=True)
    log = stack.log_path.open("ab")
    stack.proc = subprocess.Popen(
        [sys.executable, "-m", "producer", "worker", "--gpus", "none", "--no-store-owner",
         "--queues", stack.env_vars["RAGQ_INGEST_QUEUE"], "--interactive-threads", "0", "--loglevel", "INFO"],
        cwd=REPO, env=stack.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    wait_for(lambda: " ready." in stack.log_text() or stack.proc.poll() is not None, 120,
             "the worker's ready line", poll_s=0.2, on_timeout=stack.log_text)
    assert stack.proc.poll() is None, stack.log_text()[-3000:]
    yield stack
    stack.stop_worker()


def test_soft_limit_inside_a_store_call_ends_the_batch_at_once(ownerless_stack: Stack, tmp_path: Path) -> None:
    """The soft limit lands while the task waits for the store's owner. It must end the
    batch with its reason at once, not become a StoreError that is retried with backoff
    (and then run into the hard limit, delivery after delivery)."""
    stack = ownerless_stack
    root = synthetic_docs(tmp_path / "docs", "soft", 3, words=100)
    settings = stack.settings()
    [batch] = planned_batches(settings, [root])
    soft = ingest_limits(settings, batch.nbytes)[0]
    client = Client(settings)

    job = client.ingest([root])
    rec = record(stack, job.id, client.redis)
    wait_for(lambda: attempts(rec).get(0), 60, "the batch to begin", poll_s=0.01, on_timeout=stack.log_text)
    begun_at = time.monotonic()
    info = wait_finished(rec, soft + 20, stack)
    ended_s = time.monotonic() - begun_at

    assert (info.status, info.total, info.completed, info.failed) == ("failed", 3, 0, 3), info
    assert [e["reason"] for e in info.errors] == [f"batch stopped at its soft time limit ({soft:g} s)"] * 3
    assert soft - 1 < ended_s < soft + 10
    assert attempts(rec) == {0: 1}
    log = stack.log_text()
    assert "Soft time limit" in log and "retrying in" not in log, log[-3000:]
    report("soft-time-limit-in-store-call", soft_limit_s=soft, batch_ended_after_s=ended_s)
