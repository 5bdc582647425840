"""Results of a large question job stream in bounded memory: the record, ``ragq results``
and ``GET /v1/jobs/{id}/results`` alike.

A job of 20,000 answer lines (~27 MB of JSON) is written straight into a record through
JobRecord's own API, as workers store it (bench/results_rss.py does 100,000); reading it
must not hold the whole job at once anywhere.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tracemalloc
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from bench.results_rss import _MEASURE, result_line, write_job
from common.jobs import BatchOutcome, JobRecord
from common.runtime import redis_client
from common.schemas import JobKind
from tests.conftest import REPO, Stack
from tests.test_http import Server, start_server, stop_server

pytestmark = pytest.mark.timeout(300)

LINES = 20_000
BATCH = 16
#: Memory that reading may take beyond a small job's: a few windows of lines, far below the job's ~27 MB.
GROWTH_MIB = 12


@pytest.fixture(scope="module")
def stack(redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """Settings and env only: reading results needs no worker."""
    s = Stack(redis_url, tmp_path_factory.mktemp("results-stream"))
    yield s
    client = redis.Redis.from_url(redis_url)
    for key in client.scan_iter(match=f"{s.env_vars['RAGQ_KEY_PREFIX']}:*", count=1000):
        client.delete(key)


@pytest.fixture(scope="module")
def jobs(stack: Stack) -> dict[str, str]:
    settings = stack.settings()
    return {"big": write_job(settings, LINES, BATCH), "small": write_job(settings, 10, BATCH)}


def _record(stack: Stack, job_id: str) -> JobRecord:
    settings = stack.settings()
    return JobRecord(redis_client(settings), job_id, prefix=settings.key_prefix, ttl=settings.job_ttl_s)


def test_record_reads_results_in_windows(stack: Stack, jobs: dict[str, str]) -> None:
    record = _record(stack, jobs["big"])
    tracemalloc.start()
    try:
        ids = [line["custom_id"] for line in record.iter_results()]
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert ids == [str(n) for n in range(LINES)]  # every line, in input order
    assert peak < GROWTH_MIB * 2**20, f"reading {LINES} lines peaked at {peak / 2**20:.1f} MiB"


def test_partial_results_keep_their_order(stack: Stack) -> None:
    settings = stack.settings()
    record = JobRecord.create(redis_client(settings), JobKind.questions, prefix=settings.key_prefix, ttl=600)
    record.add_items(items=5 * BATCH, batches=5)
    for batch in (0, 2, 4):  # 1 and 3 still running
        record.save_results(batch, [result_line(batch * BATCH + i) for i in range(BATCH)])
        record.finish_batch(batch, BatchOutcome(completed=BATCH))
    got = [int(line["custom_id"]) for line in record.iter_results(window=2)]
    assert got == [b * BATCH + i for b in (0, 2, 4) for i in range(BATCH)]


def _peak_rss_mib(stack: Stack, *args: str) -> float:
    done = subprocess.run([sys.executable, "-c", _MEASURE, sys.executable, "-m", "producer", *args], cwd=REPO,
                          env=stack.env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-2000:]
    return int(done.stderr.strip().splitlines()[-1]) / 1024


def test_cli_results_memory_does_not_grow_with_the_job(stack: Stack, jobs: dict[str, str], tmp_path: Path) -> None:
    small = _peak_rss_mib(stack, "results", jobs["small"], "--output", str(tmp_path / "small.jsonl"))
    big = _peak_rss_mib(stack, "results", jobs["big"], "--output", str(tmp_path / "big.jsonl"))
    with (tmp_path / "big.jsonl").open() as handle:
        assert sum(1 for _ in handle) == LINES
    print(f"\nragq results peak RSS: {small:.1f} MiB for 10 lines, {big:.1f} MiB for {LINES} lines")
    assert big - small < GROWTH_MIB, f"{big:.1f} MiB for {LINES} lines against {small:.1f} MiB for 10"


def _peak_rss_of(pid: int) -> float:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmHWM:"))) / 1024


@pytest.fixture(scope="module")
def server(stack: Stack) -> Iterator[Server]:
    s = start_server(stack)
    yield s
    stop_server(s)


def test_http_results_stream_in_bounded_memory(server: Server, jobs: dict[str, str]) -> None:
    with server.client(token=None) as http:
        small = http.get(f"/v1/jobs/{jobs['small']}/results")
        assert small.status_code == 200 and len(small.text.splitlines()) == 10
        before = _peak_rss_of(server.proc.pid)
        count = 0
        with http.stream("GET", f"/v1/jobs/{jobs['big']}/results") as response:
            assert response.status_code == 200
            assert response.headers["x-ragq-job-finished"] == "true"
            for line in response.iter_lines():
                assert json.loads(line)["custom_id"] == str(count)
                count += 1
        after = _peak_rss_of(server.proc.pid)
    assert count == LINES
    print(f"\nragq serve peak RSS: {before:.1f} MiB before, {after:.1f} MiB after streaming {LINES} lines")
    assert after - before < GROWTH_MIB, f"the server's peak RSS grew {after - before:.1f} MiB"
