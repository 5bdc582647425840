"""Question batches overlapping in one worker process (``--pool threads --concurrency 2``):
a real ``ragq worker``, real Redis, MiniLM, the embedded store, and the scripted loopback
endpoint (``tests.faults.FakeLLM``), which records its peak concurrency and connections.

Batches of 2 questions against a budget of 3: one batch alone can hold at most 2
requests, so a peak of 3 shows two batches were in flight at once, and a peak above 3
would be a budget per batch instead of one per process.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from producer.client import Client
from tests.conftest import Stack
from tests.faults import FakeLLM

DOCS = {
    "mq.md": "# Message retention\n\nMessages are kept on the server for 3 days by default, up to 7 days.\n",
    "cdn.md": "# CDN cache rules\n\nEdge nodes keep static files for the time a cache rule sets.\n",
    "vpc.md": "# Subnets\n\nA subnet is a range of IP addresses in a virtual private cloud.\n",
}
BUDGET = 3


@pytest.fixture(scope="module")
def llm() -> Iterator[FakeLLM]:
    with FakeLLM(delay_s=0.5, keep_alive=True, fail_when="BAD") as server:
        yield server


@pytest.fixture(scope="module")
def overlapping(redis_url: str, tmp_path_factory: pytest.TempPathFactory, llm: FakeLLM) -> Iterator[Stack]:
    stack = Stack(redis_url, tmp_path_factory.mktemp("qa-overlap"),
                  RAGQ_LLM_BACKEND="openai", RAGQ_LLM_BASE_URL=llm.base_url, RAGQ_LLM_MODEL="fake-model",
                  RAGQ_LLM_MAX_IN_FLIGHT=str(BUDGET), RAGQ_LLM_MAX_RETRIES="0", RAGQ_QA_BATCH_SIZE="2",
                  RAGQ_TOP_K="2")
    docs = tmp_path_factory.mktemp("qa-overlap-docs")
    for name, text in DOCS.items():
        (docs / name).write_text(text, encoding="utf-8")
    stack.start_worker(timeout=240, extra_args=["--pool", "threads", "--concurrency", "2"])
    try:
        stack.cli("ingest", str(docs), "--wait", check=True)
        yield stack
    finally:
        stack.stop_worker()


def test_overlapping_batches_share_one_budget_and_one_client(overlapping: Stack, llm: FakeLLM,
                                                             tmp_path: Path) -> None:
    questions = [f"Q{n}: how long are messages kept, case {n}?" for n in range(16)]
    questions[9] = "Q9: a BAD question about subnets?"
    path = tmp_path / "q.jsonl"
    path.write_text("".join(json.dumps({"custom_id": f"c{n}", "question": q}) + "\n"
                            for n, q in enumerate(questions)), encoding="utf-8")
    before = llm.posts
    job = Client(overlapping.settings()).ask_file(path)
    info = job.wait(timeout=240, poll_s=0.1)
    lines = list(job.results())

    assert llm.posts - before == 16
    assert [llm.posts_of(f"Q{n}:") for n in range(16)] == [1] * 16, "each question sent exactly once"
    assert llm.max_in_flight == BUDGET, f"peak {llm.max_in_flight}: one budget of {BUDGET} for the process"
    # one client for the whole process: its keep-alive pool, never a pool per batch
    assert len(llm.connections) <= BUDGET, llm.connections

    assert (info.status, info.completed, info.failed) == ("completed_with_errors", 15, 1)
    assert [line["custom_id"] for line in lines] == [f"c{n}" for n in range(16)], "input order"
    for n, line in enumerate(lines):
        assert line["question"] == questions[n] and len(line["sources"]) == 2
        if n == 9:
            assert (line["answer"], line["error"]) == (None, "HTTP 400: scripted failure 400")
        else:
            assert line["error"] is None and line["answer"] == f"echo: Question: {questions[n]}"
    assert [e["reason"] for e in info.errors] == ["HTTP 400: scripted failure 400"]
