"""Question jobs through two real worker processes against the loopback endpoint that
answers 429 above 5 requests a second (``tests.faults.FakeLLM(rate_limit=...)``): real
``ragq worker --processes 2``, real Redis, MiniLM, the embedded store.

* ``RAGQ_LLM_RPM`` set below the endpoint's rate: not one request is refused, though
  each process alone would send 8 at once.
* No limit set: the endpoint refuses, and each 429's ``Retry-After`` silences *both*
  processes (the pause is shared in Redis), and every question is still answered, with
  no retries configured (a 429 is waited out, not counted as a failed attempt).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import pytest

from producer.client import Client
from tests.conftest import Stack
from tests.faults import FakeLLM

pytestmark = pytest.mark.timeout(240)

DOCS = {
    "mq.md": "# Message retention\n\nMessages are kept on the server for 3 days by default, up to 7 days.\n",
    "cdn.md": "# CDN cache rules\n\nEdge nodes keep static files for the time a cache rule sets.\n",
    "vpc.md": "# Subnets\n\nA subnet is a range of IP addresses in a virtual private cloud.\n",
}
#: The endpoint's limit: a bucket of 5 refilled at 5 a second.
RATE = (5.0, 5.0)
QUESTIONS = 32  # 4 batches of 8: each process holds 8 requests at once


@pytest.fixture
def llm() -> Iterator[FakeLLM]:
    with FakeLLM(delay_s=0.05, rate_limit=RATE, retry_after="1") as server:
        yield server


def start_stack(redis_url: str, data: Path, llm: FakeLLM, **env: str) -> Stack:
    stack = Stack(redis_url, data, RAGQ_LLM_BACKEND="openai", RAGQ_LLM_BASE_URL=llm.base_url,
                  RAGQ_LLM_MODEL="fake-model", RAGQ_LLM_MAX_RETRIES="0", RAGQ_LLM_TIMEOUT_S="20",
                  RAGQ_QA_BATCH_SIZE="8", RAGQ_TOP_K="2", **env)
    docs = data / "docs"
    docs.mkdir(parents=True)
    for name, text in DOCS.items():
        (docs / name).write_text(text, encoding="utf-8")
    stack.start_worker(timeout=240, processes=2)
    stack.cli("ingest", str(docs), "--wait", check=True)
    return stack


def ask_all(stack: Stack, tmp_path: Path) -> tuple[object, list[dict]]:
    path = tmp_path / "q.jsonl"
    path.write_text("".join(json.dumps({"custom_id": f"c{n}", "question": f"Q{n}: how long are messages kept?"})
                            + "\n" for n in range(QUESTIONS)), encoding="utf-8")
    job = Client(stack.settings()).ask_file(path)
    info = job.wait(timeout=180, poll_s=0.1)
    return info, list(job.results())


def answered_all(info: object, lines: list[dict], stack: Stack) -> None:
    assert (info.status, info.completed, info.failed) == ("completed", QUESTIONS, 0), (
        info.errors, stack.log_text()[-3000:])
    assert [line["custom_id"] for line in lines] == [f"c{n}" for n in range(QUESTIONS)]
    assert all(line["error"] is None and line["answer"].startswith("echo: Question: Q") for line in lines)


def ran_at_once(stack: Stack) -> None:
    """Two batches were generating at the same time: both processes shared the endpoint."""
    spans = []
    for line in stack.log_text().splitlines():
        found = re.search(r"^\[(\S+ \S+): INFO/[^]]+\] Task ragq\.answer_batch\[[^]]+\] succeeded in ([\d.]+)s", line)
        if found:
            end = datetime.strptime(found[1], "%Y-%m-%d %H:%M:%S,%f").timestamp()
            spans.append((end - float(found[2]), end))
    spans.sort()
    assert any(b[0] < a[1] for a, b in zip(spans, spans[1:])), f"the batches ran one after another: {spans}"


def test_a_limit_below_the_endpoints_rate_gets_no_429(redis_url: str, tmp_path: Path, llm: FakeLLM) -> None:
    stack = start_stack(redis_url, tmp_path / "ragq", llm, RAGQ_LLM_RPM="240")  # 4 a second, both processes
    try:
        before = llm.posts
        info, lines = ask_all(stack, tmp_path)
    finally:
        stack.stop_worker()
    answered_all(info, lines, stack)
    ran_at_once(stack)
    assert llm.statuses_seen(429) == [], "a request went over the endpoint's limit"
    assert llm.posts - before == QUESTIONS  # each sent once
    times = llm.statuses_seen(200)[-QUESTIONS:]
    # 32 at 4 a second with 4 at once: about 7 s from first to last (unlimited, well under 1)
    assert times[-1] - times[0] > 6.0, times[-1] - times[0]


def test_without_a_limit_a_429_pauses_every_worker(redis_url: str, tmp_path: Path, llm: FakeLLM) -> None:
    stack = start_stack(redis_url, tmp_path / "ragq", llm)
    try:
        info, lines = ask_all(stack, tmp_path)
    finally:
        stack.stop_worker()
    answered_all(info, lines, stack)  # with RAGQ_LLM_MAX_RETRIES=0
    ran_at_once(stack)
    refused = llm.statuses_seen(429)
    assert refused, "the endpoint never refused: the test proves nothing"
    arrivals = [r["at"] for r in llm.requests]
    # Retry-After: 1 from each 429 at t: requests already on their way may still land just
    # after t, and then nothing, from either process, until the second is up.
    for t in refused:
        early = [a - t for a in arrivals if t + 0.3 < a < t + 0.95]
        assert not early, f"requests {early} s after a 429 that said Retry-After: 1"
    assert llm.posts - len(refused) == QUESTIONS
