"""Interactive work first: asks, searches and one-document ingests go ahead of bulk jobs,
and ``--priority`` orders bulk jobs (common/priorities.py, workers/launcher.py).

Where a message lands is read from Redis before any worker takes it; the ordering
tests run real workers against a loopback LLM that answers after a fixed delay, and
compare what a job record says at the moment an ask returns (no latency thresholds).
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from fastapi.testclient import TestClient

from common.priorities import DEFAULT_PRIORITY, SEP, queue_depths, queue_keys
from producer.client import Client, RagqError
from tests.conftest import Stack
from tests.faults import FakeLLM, record, wait_finished, wait_for
from workers.launcher import plan_workers

DOCS = [
    {"id": "snap", "title": "Snapshots", "product": "Disk", "content": "A snapshot copies a cloud disk at one moment."},
    {"id": "bill", "title": "Billing", "product": "Billing", "content": "Pay-as-you-go instances are billed hourly."},
    {"id": "net", "title": "Bandwidth", "product": "VPC", "content": "Public bandwidth can be changed at any time."},
]


def lists(r: redis.Redis, queue: str) -> dict[str, int]:
    """The non-empty Redis lists of ``queue``: name (step suffix shown as ``@n``) -> length."""
    return {key.replace(SEP, "@"): n for key in queue_keys(queue) if (n := r.llen(key))}


# --- where each kind of work is sent (no worker) -----------------------------------------


@pytest.fixture
def parked_stack(redis_url: str, tmp_path: Path) -> Stack:
    """A stack whose queues no worker consumes, so its messages stay readable."""
    return Stack(redis_url, tmp_path)


@pytest.fixture
def parked(parked_stack: Stack) -> Iterator[Client]:
    client = Client(parked_stack.settings())
    yield client
    s = client.settings
    client.redis.delete(*(k for q in (s.interactive_queue, s.ingest_queue, s.qa_queue) for k in queue_keys(q)))


def test_interactive_work_and_bulk_priorities_land_in_their_lists(parked: Client, tmp_path: Path) -> None:
    s, r = parked.settings, parked.redis
    one = tmp_path / "one.json"
    one.write_text(json.dumps(DOCS[0]))
    many = tmp_path / "many.jsonl"
    many.write_text("".join(json.dumps(d) + "\n" for d in DOCS))

    parked.ingest([one])  # one document: interactive, top priority
    parked.ingest([many])  # a bulk job at the default priority (5 -> broker step 5)
    parked.ingest([many], priority=9)  # served first of the bulk jobs (step 1)
    assert lists(r, s.interactive_queue) == {s.interactive_queue: 1}
    assert lists(r, s.ingest_queue) == {f"{s.ingest_queue}@5": 1, f"{s.ingest_queue}@1": 1}

    parked.ask_many(["a", "b"], priority=1)  # served last (step 9)
    parked.ask_many(["c"], interactive=True)  # /v1/answer's way in
    parked.send(parked.search_request("d"))
    parked.send(parked.embed_request(["e"]))
    assert lists(r, s.qa_queue) == {f"{s.qa_queue}@9": 1}
    assert lists(r, s.interactive_queue) == {s.interactive_queue: 4}
    assert parked.queue_depths()[s.interactive_queue] == 4
    assert queue_depths(r, [s.ingest_queue]) == {s.ingest_queue: 2}


@pytest.mark.parametrize("bad", [0, 10, -1, True, "5", 2.5])
def test_a_priority_outside_1_to_9_is_refused_before_anything_is_queued(parked: Client, bad: object) -> None:
    s = parked.settings
    with pytest.raises(RagqError, match=r"priority must be an integer from 1 \(served last\) to 9"):
        parked.ask_many(["a"], priority=bad)  # type: ignore[arg-type]
    assert queue_depths(parked.redis, [s.qa_queue, s.interactive_queue]) == {s.qa_queue: 0, s.interactive_queue: 0}


def test_cli_and_http_share_the_priority_check(parked_stack: Stack, parked: Client, tmp_path: Path) -> None:
    stack = parked_stack
    questions = tmp_path / "q.txt"
    questions.write_text("one\ntwo\n")
    refused = stack.cli("ask-file", str(questions), "--priority", "10")
    assert refused.returncode == 2 and "priority must be an integer from 1" in refused.stderr, refused.stderr
    queued = stack.cli("ask-file", str(questions), "--priority", "8", check=True)
    assert queued.returncode == 0
    s = parked.settings
    assert lists(parked.redis, s.qa_queue) == {f"{s.qa_queue}@2": 1}

    from producer.http.app import create_app

    with TestClient(create_app(s)) as http:
        bad = http.post("/v1/questions?priority=0", content='{"question": "q"}\n', headers={"content-type": "application/jsonl"})
        assert bad.status_code == 422 and "priority must be" in bad.text, bad.text
        ok = http.post("/v1/ingest?priority=7", json=DOCS)
        assert ok.status_code == 202, ok.text
        single = http.post("/v1/ingest", json=DOCS[:1])
        assert single.status_code == 202, single.text
    assert lists(parked.redis, s.ingest_queue) == {f"{s.ingest_queue}@3": 1}
    assert lists(parked.redis, s.interactive_queue) == {s.interactive_queue: 1}


def test_the_default_launch_has_an_interactive_process_per_device() -> None:
    specs = plan_workers(["ingest", "qa"], ["0", "1"], store_queue="store", interactive_queue="interactive",
                         hostname="h")
    shape = {s.name: (s.argv[s.argv.index("-Q") + 1], s.argv[s.argv.index("-P") + 1],
                      s.argv[s.argv.index("-c") + 1], s.env["CUDA_VISIBLE_DEVICES"]) for s in specs}
    assert shape == {
        "ingest-qa-gpu0@h": ("ingest,qa", "prefork", "1", "0"),
        "interactive-gpu0@h": ("interactive", "threads", "2", "0"),
        "ingest-qa-gpu1@h": ("ingest,qa", "prefork", "1", "1"),
        "interactive-gpu1@h": ("interactive", "threads", "2", "1"),
        "store@h": ("store", "prefork", "1", ""),
    }
    (single,) = plan_workers(["ingest", "qa"], [], store_queue="store", interactive_queue="interactive",
                             interactive_threads=0, hostname="h")
    assert single.argv[single.argv.index("-Q") + 1] == "interactive,ingest,qa,store"  # interactive listed first


# --- real workers ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fake() -> Iterator[FakeLLM]:
    llm = FakeLLM().start()
    yield llm
    llm.stop()


def qa_stack(redis_url: str, data: Path, fake: FakeLLM, interactive_threads: int) -> Stack:
    stack = Stack(redis_url, data, RAGQ_LLM_BACKEND="openai", RAGQ_LLM_BASE_URL=fake.base_url,
                  RAGQ_LLM_MODEL="fake-model", RAGQ_LLM_TIMEOUT_S="30", RAGQ_QA_BATCH_SIZE="4", RAGQ_TOP_K="2",
                  RAGQ_CONTEXT_TOKENS="200")
    stack.start_worker(interactive_threads=interactive_threads, timeout=240)
    docs = data / "docs.jsonl"
    docs.write_text("".join(json.dumps(d) + "\n" for d in DOCS))
    assert Client(stack.settings()).ingest([docs]).wait(120).status == "completed"
    return stack


@pytest.fixture(scope="module")
def default_stack(redis_url: str, tmp_path_factory: pytest.TempPathFactory, fake: FakeLLM) -> Iterator[Stack]:
    """``ragq worker`` as the README starts it: a bulk process, an interactive one, the store's owner."""
    stack = qa_stack(redis_url, tmp_path_factory.mktemp("interactive"), fake, interactive_threads=2)
    yield stack
    stack.stop_worker()


def bulk_questions(tag: str, n: int) -> list[dict[str, str]]:
    return [{"custom_id": f"{tag}-{i}", "question": f"[{tag}-{i:02d}] How are snapshots billed?"} for i in range(n)]


def test_an_ask_during_a_bulk_job_is_answered_before_its_remaining_batches(default_stack: Stack,
                                                                            fake: FakeLLM) -> None:
    client = Client(default_stack.settings())
    client.ask("warm-up: is the interactive process's model loaded?", timeout=120)  # not timed below
    fake.delay_s = 1.5  # each bulk batch (4 questions, one process) takes about 1.5 s
    bulk = client.ask_many(bulk_questions("bulk", 48))  # 12 batches
    rec = record(default_stack, bulk.id, client.redis)
    wait_for(lambda: rec.info().batches_done >= 1, 120, "the bulk job's first batch")

    answer = client.ask("How does a snapshot work?", timeout=60)
    after_ask = rec.info()
    hits = client.search("bandwidth", top_k=1, timeout=60)
    after_search = rec.info()
    assert answer.ok and answer.answer and hits[0], answer
    # one FIFO queue would have answered both after the last bulk batch
    assert after_ask.batches_total - after_ask.batches_done >= 6, after_ask
    assert after_search.batches_total - after_search.batches_done >= 5, after_search
    assert not after_search.is_finished
    assert "interactive-cpu@" in default_stack.log_text()
    bulk.cancel()
    wait_finished(rec, 60)


def test_priority_orders_two_bulk_jobs(default_stack: Stack, fake: FakeLLM) -> None:
    fake.delay_s = 0.5
    client = Client(default_stack.settings())
    blocker = client.ask_many(bulk_questions("blocker", 8))  # keeps the bulk process busy meanwhile
    wait_for(lambda: blocker.refresh().started_at, 60, "the blocking job to start", poll_s=0.02)
    low = client.ask_many(bulk_questions("low", 8), priority=2)  # sent first ...
    high = client.ask_many(bulk_questions("high", 8), priority=8)  # ... served first
    default = client.ask_many(bulk_questions("default", 4))  # priority 5: between them
    low_info, high_info = low.wait(120), high.wait(120)
    default_info = default.wait(120)
    assert {low_info.status, high_info.status, default_info.status} == {"completed"}
    assert high_info.finished_at <= default_info.started_at, (high_info, default_info)
    assert default_info.finished_at <= low_info.started_at, (default_info, low_info)
    assert DEFAULT_PRIORITY == 5


@pytest.fixture(scope="module")
def single_stack(redis_url: str, tmp_path_factory: pytest.TempPathFactory, fake: FakeLLM) -> Iterator[Stack]:
    """``ragq worker --interactive-threads 0``: one process serves everything, interactive first."""
    stack = qa_stack(redis_url, tmp_path_factory.mktemp("one-process"), fake, interactive_threads=0)
    yield stack
    stack.stop_worker()


def test_one_process_serves_an_ask_as_soon_as_its_running_batch_ends(single_stack: Stack, fake: FakeLLM) -> None:
    fake.delay_s = 1.0
    client = Client(single_stack.settings())
    bulk = client.ask_many(bulk_questions("solo", 24))  # 6 batches, one at a time
    rec = record(single_stack, bulk.id, client.redis)
    wait_for(lambda: rec.attempts(), 120, "the bulk job's first batch to start", poll_s=0.02)
    started = time.monotonic()
    ask = client.ask_many(["What is billed hourly?"], interactive=True)  # client.ask's (and /v1/answer's) way
    begun = len(rec.attempts())  # read after the ask was sent: no batch can begin after this before it
    ask.wait(60, poll_s=0.05)
    info = rec.info()
    (answer,) = ask.answers()
    assert answer.ok and answer.answer, answer
    assert info.batches_done <= begun, (info, begun)  # only batches begun before the ask ran first
    assert info.batches_total - info.batches_done >= 3, info
    assert time.monotonic() - started < 30
    bulk.cancel()
    wait_finished(rec, 60)
