"""Redis gone while a batch writes its job record, for longer than the client retries.

The batch's work is done (points stored in the embedded store, which needs no Redis)
when it records its outcome; Redis is then shut down for longer than the job-record
client's retry window (about 11 s per command), so that write fails in the task. The batch must be
recorded once Redis is back (the task waits for it, then writes again), not be acked
and lost with the job left in progress.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest

from producer.client import Client
from tests.conftest import Stack
from tests.faults import (
    BatchWatch,
    RedisServer,
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
from tests.test_time_limits import synthetic_docs

pytestmark = [pytest.mark.fault, pytest.mark.timeout(300)]

OUTAGE_S = 30.0  # well past one write's retries (~11 s), within the task's 60 s wait


def test_job_record_write_during_a_long_redis_outage_is_requeued(tmp_path: Path) -> None:
    server = RedisServer(tmp_path / "redis", "redis-pw-record-outage")
    server.start()
    stack = Stack(server.url, tmp_path / "store")
    try:
        stack.start_worker()
        root = synthetic_docs(tmp_path / "docs", "outage", 12)
        settings = stack.settings(batch_bytes=10_000)
        batches = planned_batches(settings, [root])
        want_chunks = expected_chunks(settings, batches)
        client = Client(settings)
        job = client.ingest([root])
        rec = record(stack, job.id, server.client())
        watch = BatchWatch(rec)
        wait_for(lambda: watch.running() is not None, 120, "a running batch", poll_s=0.005,
                 on_timeout=stack.log_text)
        pid = pool_child(stack)
        os.kill(pid, signal.SIGSTOP)  # hold the batch before it records anything ...
        target = watch.running()
        assert target is not None, "the batch finished between its detection and the freeze"
        server.shutdown()  # ... take Redis away ...
        down_at = time.monotonic()
        os.kill(pid, signal.SIGCONT)  # ... and let it finish its work and try to record it
        # Redis stays away until the batch's own write has given up on the client's retries
        # (on a loaded machine the batch may need longer than OUTAGE_S to get there), and at
        # least OUTAGE_S; then it returns within the task's 60 s wait.
        failed = f"ingest batch {target} of job {job.id}: job record write failed"
        wait_for(lambda: failed in stack.log_text() and time.monotonic() - down_at > OUTAGE_S,
                 OUTAGE_S + 120, "the batch's failed job-record write", poll_s=0.2, on_timeout=stack.log_text)
        server.start()
        up_at = time.monotonic()

        rec = record(stack, job.id, server.client())
        info = wait_finished(rec, 120, stack)
        recover_s = time.monotonic() - up_at
        assert info.status == "completed", (info, stack.log_text()[-3000:])
        assert (info.total, info.completed, info.failed) == (12, 12, 0)
        assert info.batches_done == info.batches_total == len(batches)
        assert recorded_batches(rec) == set(range(len(batches)))
        assert info.chunks == want_chunks and int(client.store_info(timeout=60)["points"]) == want_chunks
        assert attempts(rec) == {b: 1 for b in range(len(batches))}  # recorded late, nothing redone
        assert failed in stack.log_text()
        report("job-record-write-in-redis-outage", outage_s=up_at - down_at, batch=target,
               deliveries=attempts(rec)[target], recover_s=recover_s, job_s=info.elapsed_s or 0.0)
    finally:
        stack.stop_worker()
        server.stop()
