"""Faults injected for real into a running ragq: pool processes and whole workers
SIGKILLed mid-batch, a poison batch, Redis shut down and restarted mid-job, an
unreachable vector store, an LLM endpoint that is down, slow or failing, cancellation.

Each test asserts the outcome (exact counts, stored points, answers exactly once,
per-item reasons) and prints one ``FAULT ...`` line with what the fault cost (time to
recover, items redone), visible under ``pytest -s``.
"""

from __future__ import annotations

import base64
import json
import math
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from common.limits import longest_hard_limit
from producer.client import Client
from tests.conftest import REPO, Stack, copy_docs, require_corpus
from tests.faults import (
    BatchWatch,
    FakeLLM,
    RedisServer,
    alive,
    attempts,
    expected_chunks,
    free_port,
    kill_worker_tree,
    planned_batches,
    pool_child,
    record,
    recorded_batches,
    report,
    start_worker_unprobed,
    wait_finished,
    wait_for,
)

pytestmark = [pytest.mark.fault, pytest.mark.timeout(300)]

LLM_KEY = "sk-fault-test-key-4f1d"


# --- inputs ----------------------------------------------------------------------------------


def corpus_files(n: int, offset: int, max_chars: int = 6000) -> list[Path]:
    """``n`` corpus pages spread over the products; each ``offset`` (0-12) gives pages
    that no other offset gives, so tests sharing a store never re-ingest each other's."""
    corpus = require_corpus()
    manifest = [json.loads(line) for line in (corpus / "manifest.jsonl").open()]
    small = [m for m in manifest if m["chars"] <= max_chars]
    picked = small[offset::13][:n]
    assert len(picked) == n
    return [corpus / m["file"] for m in picked]


def long_document(path: Path, name: str, words: int) -> Path:
    """One document of ``words`` words: a batch that runs for seconds on a CPU."""
    rng = random.Random(name)
    vocab = "cloud server disk snapshot region zone network bandwidth billing image volume backup".split()
    path.parent.mkdir(parents=True, exist_ok=True)
    content = " ".join(rng.choice(vocab) for _ in range(words))
    path.write_text(json.dumps({"id": name, "title": name, "content": content}))
    return path


def points(client: Client) -> int:
    return int(client.store_info(timeout=60)["points"])


# --- a worker on the embedded store, redeliveries capped at 2 ---------------------------------


@pytest.fixture(scope="module")
def ingest_stack(redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    stack = Stack(redis_url, tmp_path_factory.mktemp("faults-ingest"), RAGQ_MAX_TASK_ATTEMPTS="2")
    stack.start_worker()
    yield stack
    stack.stop_worker()


def test_pool_process_killed_mid_ingest_batch(ingest_stack: Stack, tmp_path: Path) -> None:
    """SIGKILL the pool process while it embeds a batch: Celery requeues the message
    (reject_on_worker_lost), a new pool process redoes it, and the job ends exact:
    every document once, the same points as an undisturbed run, one batch delivered twice."""
    stack = ingest_stack
    files = corpus_files(40, offset=0)
    root = copy_docs(files, tmp_path / "docs")
    settings = stack.settings(batch_bytes=15_000)
    batches = planned_batches(settings, [root])
    want_chunks = expected_chunks(settings, batches)
    assert len(batches) >= 4
    client = Client(settings)
    before = points(client)

    job = client.ingest([root])
    rec = record(stack, job.id, client.redis)
    watch = BatchWatch(rec)
    batch, kills = None, 0
    while batch is None:  # a kill that lands between two batches interrupts nothing: again
        assert kills < 4, f"could not kill a batch mid-run: {attempts(rec)}"
        # a batch begun (its delivery counted) and not recorded, after at least one recorded
        wait_for(lambda: recorded_batches(rec) and watch.running() is not None, 120,
                 "a running batch after the first recorded one", poll_s=0.01, on_timeout=stack.log_text)
        killed_pid = pool_child(stack)
        os.kill(killed_pid, signal.SIGKILL)
        killed_at, kills = time.monotonic(), kills + 1
        batch = watch.running()  # the dead process records nothing more: this one was cut off
        wait_for(lambda: pool_child(stack) != killed_pid, 60, "a new pool process")
    wait_for(lambda: batch in recorded_batches(rec), 180, f"batch {batch} to be redone", on_timeout=stack.log_text)
    redone_at = time.monotonic()

    info = wait_finished(rec, 180, stack)
    assert info.status == "completed", (info, stack.log_text()[-3000:])
    assert (info.total, info.completed, info.failed) == (len(files), len(files), 0)
    assert info.batches_done == info.batches_total == len(batches)
    assert info.chunks == want_chunks  # counted once, though one batch was embedded twice
    assert points(client) - before == want_chunks  # stored once: same ids overwritten
    tries = attempts(rec)
    assert tries[batch] >= 2 and set(tries) == set(range(len(batches))), tries
    assert pool_child(stack) != killed_pid and stack.proc.poll() is None
    log = stack.log_text()
    assert "WorkerLostError" in log and "signal 9" in log
    report("pool-process-killed-ingest", batches=len(batches), killed_batch=batch,
           items_redone=len(batches[batch].items), kills=kills,
           recover_s=redone_at - killed_at, job_s=info.elapsed_s or 0.0, chunks=want_chunks)


def test_concurrent_first_use_of_a_fresh_store(tmp_path: Path) -> None:
    """A job queued before its worker starts meets the worker's warm-up thread: both use
    one Ingestor (Runtime.ingestor()) and call ensure_collection on the fresh store at the
    same time. Seen in worker logs: the loser gets "cannot create edge shard: path
    already contains segment data" (or "in use by another process"), a StoreError that
    costs the first batch a retry, and with RAGQ_MAX_TASK_ATTEMPTS=1 fails its documents.
    Here two threads are released together: both must succeed, the shard be usable."""
    from common.config import DEFAULT_EMBED_MODEL
    from common.ingest import Ingestor
    from common.vectorstore import EdgeStore
    from tests.faults import _embedder

    embedder = _embedder(DEFAULT_EMBED_MODEL)
    failures: list[str] = []
    for round_ in range(3):
        store = EdgeStore(tmp_path / f"round{round_}" / "c", "c")
        ingestor = Ingestor(embedder, store)
        barrier = threading.Barrier(2)

        def first_use() -> None:
            barrier.wait()
            try:
                ingestor.ensure_collection()
            except Exception as exc:  # what the worker's task would see
                failures.append(str(exc))

        threads = [threading.Thread(target=first_use) for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        if not failures:
            assert store.count() == 0  # one shard, created once, usable
        store.close()
    assert not failures, f"{len(failures)} of 3 rounds failed, e.g. {failures[0]}"


def test_poison_batch_fails_after_the_cap_and_the_worker_goes_on(ingest_stack: Stack, tmp_path: Path) -> None:
    """A batch whose pool process dies every time it runs it: after RAGQ_MAX_TASK_ATTEMPTS
    (2) deliveries the third fails its items with the reason, no loop; the rest of the job
    lands, and the worker serves the next job."""
    stack = ingest_stack
    settings = stack.settings(batch_bytes=30_000)
    root = tmp_path / "docs"
    good = copy_docs(corpus_files(6, offset=3), root / "a-good")
    poison_path = long_document(root / "z-poison" / "poison.json", "poison", words=4000)  # ~29 KB: last, alone
    batches = planned_batches(settings, [root])
    poison = next(b.index for b in batches if any(i.key == "poison" for i in b.items))
    assert [i.key for i in batches[poison].items] == ["poison"], "the poison document must be alone in its batch"
    client = Client(settings)

    started = time.monotonic()
    job = client.ingest([root])
    rec = record(stack, job.id, client.redis)
    killed = []
    for delivery in (1, 2):  # kill the pool process each time it begins the poison batch
        wait_for(lambda: attempts(rec).get(poison, 0) >= delivery, 120, f"delivery {delivery} of the poison batch",
                 poll_s=0.01, on_timeout=stack.log_text)
        pid = pool_child(stack)
        os.kill(pid, signal.SIGKILL)
        killed.append(pid)

    info = wait_finished(rec, 180, stack)
    gave_up_s = time.monotonic() - started
    good_docs = len(list(good.rglob("*.json")))
    assert info.status == "completed_with_errors", info
    assert (info.total, info.completed, info.failed) == (good_docs + 1, good_docs, 1)
    assert attempts(rec)[poison] == 3  # two deaths, then the delivery that gave up
    [error] = info.errors
    assert error["item"] == str(poison_path)
    assert error["reason"].startswith("gave up after 2 attempts: the worker running this batch stopped each time")
    assert "delivered 3 times; failing its items" in stack.log_text()

    # the worker is not stuck on it: a new job runs through
    after = client.ingest([long_document(tmp_path / "next" / "next.json", "after-poison", words=200)])
    nxt = wait_finished(record(stack, after.id, client.redis), 120, stack)
    assert (nxt.status, nxt.completed) == ("completed", 1)
    assert stack.proc.poll() is None
    report("poison-batch", max_task_attempts=2, kills=len(killed), deliveries=attempts(rec)[poison],
           items_failed=1, items_landed=good_docs, until_given_up_s=gave_up_s)


# --- questions against a controllable OpenAI-compatible server -------------------------------


class QAStack:
    def __init__(self, stack: Stack, fake: FakeLLM) -> None:
        self.stack = stack
        self.fake = fake
        self.client = Client(stack.settings())

    def questions(self, tmp_path: Path, tag: str, n: int) -> Path:
        path = tmp_path / f"{tag}.jsonl"
        topics = ["snapshot", "billing", "bandwidth", "invoice", "security group", "disk", "renewal", "region"]
        path.write_text("".join(json.dumps({"custom_id": f"{tag}-{i}", "question": f"[{tag}-{i:02d}] How does "
                                            f"{topics[i % len(topics)]} work?"}) + "\n" for i in range(n)))
        return path

    def reset(self) -> None:
        self.fake.delay_s = 0.0
        self.fake.statuses.clear()
        if self.fake.server is None:
            self.fake.start()


@pytest.fixture(scope="module")
def qa(redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[QAStack]:
    fake = FakeLLM().start()
    data = tmp_path_factory.mktemp("faults-qa")
    stack = Stack(redis_url, data, RAGQ_LLM_BACKEND="openai", RAGQ_LLM_BASE_URL=fake.base_url,
                  RAGQ_LLM_MODEL="fake-model", RAGQ_LLM_API_KEY=LLM_KEY, RAGQ_LLM_TIMEOUT_S="3",
                  RAGQ_LLM_MAX_RETRIES="2", RAGQ_QA_BATCH_SIZE="3", RAGQ_TOP_K="3", RAGQ_CONTEXT_TOKENS="200")
    stack.start_worker()
    root = copy_docs(corpus_files(12, offset=5), data / "docs")
    done = json.loads(stack.cli("ingest", str(root), "--wait", "--json", check=True).stdout)
    assert done["status"] == "completed" and done["completed"] == 12
    qa = QAStack(stack, fake)
    yield qa
    stack.stop_worker()
    fake.stop()


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_pool_process_killed_mid_question_batch(qa: QAStack, tmp_path: Path) -> None:
    """SIGKILL the pool process while its batch's LLM requests are in flight: the batch is
    redone by a new pool process, and every question is answered exactly once, in order."""
    qa.reset()
    qa.fake.delay_s = 1.5
    path = qa.questions(tmp_path, "kill", 12)  # 4 batches of 3
    first_request = len(qa.fake.requests)
    job = qa.client.ask_file(path)
    rec = record(qa.stack, job.id, qa.client.redis)
    wait_for(lambda: recorded_batches(rec) and qa.fake.in_flight > 0 and
             [b for b in attempts(rec) if b not in recorded_batches(rec)], 120,
             "a batch with LLM requests in flight after the first recorded one", poll_s=0.02,
             on_timeout=qa.stack.log_text)
    [batch] = [b for b in attempts(rec) if b not in recorded_batches(rec)]
    pid = pool_child(qa.stack)
    os.kill(pid, signal.SIGKILL)
    killed_at = time.monotonic()
    wait_for(lambda: batch in recorded_batches(rec), 120, f"batch {batch} to be redone", on_timeout=qa.stack.log_text)
    recover_s = time.monotonic() - killed_at

    out = tmp_path / "answers.jsonl"
    info = wait_finished(rec, 120, qa.stack)
    result = qa.stack.cli("results", job.id, "--output", str(out), check=True)
    assert info.status == "completed", info
    assert (info.total, info.completed, info.failed) == (12, 12, 0)
    lines = read_jsonl(out)
    assert [line["custom_id"] for line in lines] == [f"kill-{i}" for i in range(12)]  # once each, in order
    for i, line in enumerate(lines):
        assert line["error"] is None and line["answer"] == f"echo: Question: {line['question']}"
        assert len(line["sources"]) == 3
    assert attempts(rec)[batch] == 2
    redone = [f"kill-{3 * batch + k:02d}" for k in range(3)]
    assert all(qa.fake.posts_of(f"[{q}]") == 2 for q in redone)  # asked again after the kill ...
    others = [f"kill-{i:02d}" for i in range(12) if f"kill-{i:02d}" not in redone]
    assert all(qa.fake.posts_of(f"[{q}]") == 1 for q in others)  # ... and no other question was
    assert "wrote 12 of 12 answers" in result.stderr
    report("pool-process-killed-qa", killed_batch=batch, questions_redone=len(redone),
           llm_requests=len(qa.fake.requests) - first_request, questions=12,
           recover_s=recover_s, job_s=info.elapsed_s or 0.0)


def test_llm_down_failing_slow_then_back(qa: QAStack, tmp_path: Path) -> None:
    """The endpoint refuses connections, answers 500 then 200, answers too slowly, then
    comes back: per-question errors that name the cause (sources kept), retries that
    succeed, timeouts, and the same worker answering normally afterwards."""
    qa.reset()
    base = qa.fake.base_url
    pid = pool_child(qa.stack)

    def run(tag: str, n: int) -> tuple[dict, list[dict], float]:
        path = qa.questions(tmp_path, tag, n)
        out = tmp_path / f"{tag}.out.jsonl"
        started = time.monotonic()
        result = qa.stack.cli("ask-file", str(path), "--output", str(out), "--json", timeout=180)
        return json.loads(result.stdout), read_jsonl(out), time.monotonic() - started

    # down: connection refused, after 1 + RAGQ_LLM_MAX_RETRIES attempts each
    qa.fake.stop()
    info, lines, down_s = run("down", 3)
    reason = f"connection refused to {base} after 3 attempts"
    assert (info["status"], info["completed"], info["failed"]) == ("failed", 0, 3)
    assert [e["reason"] for e in info["errors"]] == [reason] * 3
    assert all(line["error"] == reason and line["answer"] is None and len(line["sources"]) == 3 for line in lines)

    # 5xx then 200: retried with backoff, answered
    qa.fake.start()
    qa.fake.statuses[:] = [500, 503, 500]
    sent = len(qa.fake.requests)
    info, lines, flaky_s = run("flaky", 3)
    assert (info["status"], info["completed"], info["failed"]) == ("completed", 3, 0), info
    assert all(line["error"] is None and line["answer"].startswith("echo: Question: [flaky-") for line in lines)
    assert len(qa.fake.requests) - sent == 6  # three failed requests, each retried once
    assert [r["status"] for r in qa.fake.requests[sent:]].count(200) == 3

    # slow: beyond RAGQ_LLM_TIMEOUT_S (3 s) -> per-question timeouts, retried, then failed
    qa.fake.delay_s = 6.0
    info, lines, slow_s = run("slow", 2)
    timeout_reason = f"timed out after 3 s waiting for {base} (3 attempts)"
    assert (info["status"], info["failed"]) == ("failed", 2), info
    assert [e["reason"] for e in info["errors"]] == [timeout_reason] * 2
    assert all(len(line["sources"]) == 3 for line in lines)

    # back: the same worker (same pool process) answers a new job
    qa.fake.delay_s = 0.0
    info, lines, back_s = run("back", 4)
    assert (info["status"], info["completed"], info["failed"]) == ("completed", 4, 0), info
    assert pool_child(qa.stack) == pid and qa.stack.proc.poll() is None
    assert LLM_KEY not in qa.stack.log_text() and qa.fake.auth == {f"Bearer {LLM_KEY}"}
    report("llm-endpoint", down_job_s=down_s, flaky_job_s=flaky_s, retried_requests=3, slow_job_s=slow_s,
           back_job_s=back_s)


def test_cancel_a_running_question_job_keeps_partial_results(qa: QAStack, tmp_path: Path) -> None:
    """``ragq cancel`` mid-job: status cancelled, the running batch finishes, the queued
    ones are skipped, and the answers stored so far stay readable with ``ragq results``."""
    qa.reset()
    qa.fake.delay_s = 1.5
    path = qa.questions(tmp_path, "cancel", 15)  # 5 batches of 3
    job = qa.client.ask_file(path)
    rec = record(qa.stack, job.id, qa.client.redis)
    wait_for(lambda: len(recorded_batches(rec)) >= 1, 120, "the first batch", poll_s=0.02)
    cancelled = qa.stack.cli("cancel", job.id)
    cancelled_at = time.monotonic()
    # the CLI's start-up (a second or more on a loaded CI machine) lets further batches
    # finish before the cancel lands: count those, then at most the running one may follow
    done_at_cancel = len(recorded_batches(rec))
    assert cancelled.returncode == 0 and f"cancelled job {job.id}" in cancelled.stderr, cancelled.stderr
    # a search sent now is interactive: the one process serves it once the running batch
    # ends, ahead of the job's remaining (skipped) batches, so no more can have run by then
    qa.client.search("anything", timeout=120)
    drained_s = time.monotonic() - cancelled_at
    info = rec.info()
    assert info.status == "cancelled"
    assert done_at_cancel <= 3, f"{done_at_cancel} batches ended before the cancel: the test cannot tell"
    assert 1 <= info.batches_done <= done_at_cancel + 1 < info.batches_total == 5, info  # at most the running one
    assert info.completed == 3 * info.batches_done and info.completed < info.total == 15
    assert set(attempts(rec)) == set(range(info.batches_done))  # skipped batches never began
    out = tmp_path / "partial.jsonl"
    result = qa.stack.cli("results", job.id, "--output", str(out))
    assert result.returncode == 1  # a cancelled job is not a success ...
    lines = read_jsonl(out)  # ... but its answers are kept
    assert [line["custom_id"] for line in lines] == [f"cancel-{i}" for i in range(info.completed)]
    assert all(line["answer"] and line["error"] is None for line in lines)
    assert f"wrote {info.completed} of 15 answers" in result.stderr and "cancelled" in result.stderr
    status = qa.stack.cli("status", job.id, "--json")
    assert json.loads(status.stdout)["status"] == "cancelled" and status.returncode == 1
    report("cancel-question-job", batches_done=info.batches_done, batches_skipped=5 - info.batches_done,
           answers_kept=len(lines), queue_drained_s=drained_s)


# --- the whole worker killed: redelivery after the visibility timeout --------------------------

#: Small per-batch limits, so the visibility timeout (above the longest hard limit) is short.
SMALL_LIMITS = {"RAGQ_BATCH_BYTES": "50000", "RAGQ_TASK_BASE_S": "20", "RAGQ_INGEST_S_PER_MB": "100",
                "RAGQ_QA_S_PER_QUESTION": "2", "RAGQ_QA_BATCH_SIZE": "4"}


def unacked(conn: redis.Redis, job_id: str) -> int:
    """Messages of ``job_id`` delivered and not acked (kombu's Redis transport keeps them,
    with their delivery time, in the ``unacked`` hash and ``unacked_index``)."""
    count = 0
    for raw in conn.hvals("unacked"):
        envelope = json.loads(raw)[0]
        body = base64.b64decode(envelope["body"]) if envelope["properties"].get("body_encoding") == "base64" \
            else envelope["body"].encode()
        count += job_id.encode() in body
    return count


@pytest.mark.timeout(420)
def test_whole_worker_killed_mid_batch_is_redelivered_after_the_visibility_timeout(
        redis_url: str, tmp_path: Path) -> None:
    """SIGKILL launcher, Celery main and pool process mid-batch (no requeue is possible);
    a new worker started at once gets the unacked message back once it is older than
    the visibility timeout, and the job ends exact."""
    probe = Stack(redis_url, tmp_path / "probe", **SMALL_LIMITS).settings()
    visibility = math.floor(longest_hard_limit(probe)) + 2
    stack = Stack(redis_url, tmp_path / "store", **SMALL_LIMITS, RAGQ_VISIBILITY_TIMEOUT_S=str(visibility))
    stack.start_worker()
    try:
        settings = stack.settings(batch_bytes=15_000)
        root = copy_docs(corpus_files(24, offset=1), tmp_path / "docs")
        batches = planned_batches(settings, [root])
        want_chunks = expected_chunks(settings, batches)
        client = Client(settings)
        job = client.ingest([root])
        rec = record(stack, job.id, client.redis)
        watch = BatchWatch(rec)
        wait_for(lambda: recorded_batches(rec) and watch.running() is not None, 120,
                 "a running batch after the first recorded one", poll_s=0.01, on_timeout=stack.log_text)
        tree = kill_worker_tree(stack)
        killed_at = time.monotonic()
        target = watch.running()
        assert target is not None, "the batch finished between its detection and the kill (a millisecond window)"
        begun = attempts(rec)[target]
        assert unacked(client.redis, job.id) >= 1  # the killed batch's message waits in the unacked hash

        stack.start_worker()  # a new worker at once, as a supervisor or an operator would
        restarted_s = time.monotonic() - killed_at
        wait_for(lambda: attempts(rec)[target] > begun, visibility + 150, f"batch {target} to be redelivered",
                 poll_s=0.2, on_timeout=stack.log_text)
        redelivered_s = time.monotonic() - killed_at
        info = wait_finished(rec, 180, stack)
        recover_s = time.monotonic() - killed_at

        assert info.status == "completed", info
        assert (info.total, info.completed, info.failed) == (24, 24, 0)
        assert info.batches_done == info.batches_total == len(batches)
        assert info.chunks == want_chunks and points(client) == want_chunks
        assert attempts(rec)[target] == begun + 1
        assert not any(alive(p) for p in tree)
        assert unacked(client.redis, job.id) == 0
        # kombu restores a message once it is older than the visibility timeout, on a
        # sweep: at worker start, then every unacked_restore_interval x throttle (10 x 10 s)
        assert visibility - 15 <= redelivered_s <= visibility + 100 + 30
        report("whole-worker-killed", visibility_timeout_s=visibility, killed_batch=target,
               items_redone=len(batches[target].items), worker_restarted_s=restarted_s,
               redelivered_after_s=redelivered_s, recover_s=recover_s)
    finally:
        stack.stop_worker()


# --- Redis restarted mid-job -------------------------------------------------------------------

REDIS_PASSWORD = "redis-pw-3c9e1f7a"


@pytest.mark.timeout(300)
def test_redis_restarted_mid_job(tmp_path: Path) -> None:
    """A private redis-server (AOF, fsync always, password) is shut down mid-job and
    restarted 2 s later on the same port and files: the worker and the waiting producer
    reconnect, the job completes exactly, search works, and the password shows nowhere."""
    server = RedisServer(tmp_path / "redis", REDIS_PASSWORD)
    server.start()
    stack = Stack(server.url, tmp_path / "store", RAGQ_BATCH_BYTES="15000")  # `ragq ingest` makes 5+ batches
    try:
        stack.start_worker()
        settings = stack.settings()
        # a first small job creates the collection, so the measured job meets an existing store
        first = json.loads(stack.cli("ingest", str(long_document(tmp_path / "first" / "first.json", "first", 50)),
                                     "--wait", "--json", check=True).stdout)
        root = copy_docs(corpus_files(30, offset=2), tmp_path / "docs")
        batches = planned_batches(settings, [root])
        want_chunks = expected_chunks(settings, batches)
        job_id = stack.cli("ingest", str(root), check=True, timeout=120).stdout.strip()
        waiter = subprocess.Popen([sys.executable, "-m", "producer", "status", job_id, "--wait", "--json"],
                                  cwd=REPO, env=stack.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        conn = server.client()
        rec = record(stack, job_id, conn)
        watch = BatchWatch(rec)
        wait_for(lambda: recorded_batches(rec) and watch.running() is not None, 120,
                 "a running batch after the first recorded one", poll_s=0.01, on_timeout=stack.log_text)
        done_before = len(recorded_batches(rec))
        server.shutdown()
        down_at = time.monotonic()
        time.sleep(2.0)
        server.start()
        outage_s = time.monotonic() - down_at

        rec = record(stack, job_id, server.client())
        info = wait_finished(rec, 180, stack)
        recover_s = time.monotonic() - down_at
        out, err = waiter.communicate(timeout=60)
        assert waiter.returncode == 0, err[-3000:]
        assert json.loads(out)["status"] == "completed"
        assert info.status == "completed", (info, stack.log_text()[-3000:])
        assert (info.total, info.completed, info.failed) == (30, 30, 0)
        assert info.batches_done == info.batches_total == len(batches)
        client = Client(stack.settings())
        assert info.chunks == want_chunks and points(client) == want_chunks + first["chunks"]
        hits = json.loads(stack.cli("search", "cloud disk snapshot", "--json", check=True).stdout)
        assert hits  # the worker reconnected to broker and result backend
        redone = [b for b, n in attempts(rec).items() if n > 1]  # redelivered, or retried after an error

        log = stack.log_text()
        assert "Connection to broker lost" in log or "Cannot connect to redis" in log
        status_json = stack.cli("status", job_id, "--json", check=True).stdout
        config = stack.cli("config", check=True).stdout + stack.cli("config", "--json", check=True).stdout
        for text, where in ((log, "worker log"), (status_json, "ragq status --json"), (config, "ragq config"),
                            (out + err, "ragq status --wait")):
            assert REDIS_PASSWORD not in text, f"the Redis password appears in {where}"
        assert "127.0.0.1" in config and ":***@" in config
        # the batch that ran across the outage could not be acked on the lost connection:
        # its message stays in kombu's unacked hash until the visibility timeout, is then
        # redelivered and skipped as already recorded (the record keeps it exactly-once)
        report("redis-restart", outage_s=outage_s, batches_before=done_before, batches=len(batches),
               batches_run_twice=len(redone), unacked_left=unacked(server.client(), job_id),
               recover_s=recover_s, job_s=info.elapsed_s or 0.0)
    finally:
        stack.stop_worker()
        server.stop()


@pytest.mark.timeout(120)
def test_redis_restarted_while_a_batch_waits_to_be_retried(tmp_path: Path) -> None:
    """Redis goes away for 2 s while a batch that failed on the store waits to try again.
    Store retries happen inside the task (a Celery retry with a countdown would be held in
    the worker's memory, and a Redis restart then parks its message in kombu's unacked
    hash until the visibility timeout). The job must end promptly."""
    server = RedisServer(tmp_path / "redis", REDIS_PASSWORD)
    server.start()
    stack = Stack(server.url, tmp_path / "store", RAGQ_QDRANT_URL=f"http://127.0.0.1:{free_port()}",
                  RAGQ_MAX_TASK_ATTEMPTS="3")
    try:
        start_worker_unprobed(stack)
        job_id = stack.cli("ingest", str(long_document(tmp_path / "d" / "doc.json", "retry", 50)),
                           check=True, timeout=120).stdout.strip()
        # the task sleeps 0.5-1.5 s before its second attempt: restart Redis in that pause
        wait_for(lambda: "store failed" in stack.log_text() and "retrying in" in stack.log_text(), 60,
                 "the first store failure", poll_s=0.005, on_timeout=stack.log_text)
        server.shutdown()
        down_at = time.monotonic()
        time.sleep(2.0)
        server.start()
        rec = record(stack, job_id, server.client())
        try:
            info = wait_finished(rec, 20, stack)
        except AssertionError:
            info = rec.info()
        stalled = unacked(server.client(), job_id)
        report("redis-restart-during-retry-countdown", outage_s=2.0, job_status=info.status,
               waited_s=time.monotonic() - down_at, messages_parked_until_visibility_timeout=stalled)
        assert info.is_finished, (f"job still {info.status} 20 s after Redis came back; {stalled} message(s) "
                                  f"parked in kombu's unacked hash until the visibility timeout")
        assert (info.status, info.failed) == ("failed", 1)  # the store is still unreachable
    finally:
        stack.stop_worker()
        server.stop()


# --- the vector store unreachable ----------------------------------------------------------------

QDRANT_KEY = "qdrant-key-77a1b2"


@pytest.mark.timeout(300)
def test_vector_store_unreachable(redis_url: str, tmp_path: Path) -> None:
    """RAGQ_QDRANT_URL points at a closed port: each ingest batch is retried with growing
    backoff, then its items fail naming the store; the worker stays up, answers a search
    with a clear error, and the next job fails per item too instead of hanging."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    stack = Stack(redis_url, tmp_path / "store", RAGQ_QDRANT_URL=url, RAGQ_QDRANT_API_KEY=QDRANT_KEY,
                  RAGQ_MAX_TASK_ATTEMPTS="3")
    start_worker_unprobed(stack)
    try:
        pool = pool_child(stack)
        settings = stack.settings(batch_bytes=15_000)
        root = copy_docs(corpus_files(4, offset=4), tmp_path / "docs")
        client = Client(settings)
        started = time.monotonic()
        job = client.ingest([root])
        rec = record(stack, job.id, client.redis)
        info = wait_finished(rec, 120, stack)
        failed_s = time.monotonic() - started
        assert (info.status, info.total, info.completed, info.failed) == ("failed", 4, 0, 4), info
        for error in info.errors:
            assert error["reason"].startswith(f"vector store unavailable after 3 attempts: qdrant store {url}"), error
            assert "Connection refused" in error["reason"] or "connection refused" in error["reason"].lower()
        log = stack.log_text()
        per_task: dict[str, list[float]] = {}  # "ingest batch 0 of job ID: store failed (...); retrying in 1.23s"
        for batch, delay in re.findall(rf"ingest batch (\d+) of job {job.id}: store failed .*?; retrying in ([0-9.]+)s", log):
            per_task.setdefault(batch, []).append(float(delay))
        delays = [d for ds in per_task.values() for d in ds]
        assert len(per_task) == info.batches_total, log[-3000:]
        for first, second in per_task.values():  # two retries per batch, then the failure
            assert 0.5 <= first <= 1.5 and 1.0 <= second <= 3.0  # exponential, jittered

        searched = stack.cli("search", "cloud disk", timeout=120)  # answered, not hanging
        again = client.ingest([root])  # the next job fails per item too, it does not hang
        info2 = wait_finished(record(stack, again.id, client.redis), 120, stack)
        assert (info2.status, info2.failed) == ("failed", 4)
        assert stack.proc.poll() is None and pool_child(stack) == pool  # nothing crashed or restarted
        records = json.dumps([info.to_dict(), info2.to_dict()])
        for text in (stack.log_text(), records, searched.stdout + searched.stderr, stack.cli("config").stdout):
            assert QDRANT_KEY not in text
        report("vector-store-unreachable", batches=info.batches_total, retries=len(delays),
               backoff_s="/".join(f"{d:.2f}" for d in next(iter(per_task.values()))), until_failed_s=failed_s)
        # `ragq search` fails with a message naming the store, as `ragq` does for its own
        # errors, not with a Python traceback of the worker's exception
        assert searched.returncode != 0
        assert url in searched.stderr and "Traceback" not in searched.stderr, searched.stderr[-2000:]
    finally:
        stack.stop_worker()
