"""One OpenAI-compatible client per process: one in-flight budget and one pool of
keep-alive connections shared by every batch that calls it, however many at once.

Against the scripted loopback server (``tests.faults.FakeLLM``), which records the
most requests it held at once and the TCP connections they came on.
"""

from __future__ import annotations

import threading
import time

from common.generators import Generation, OpenAIGenerator
from tests.faults import FakeLLM


def user(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


def generator(base_url: str, **overrides: object) -> OpenAIGenerator:
    options: dict = dict(base_url=base_url, model="fake-model", timeout_s=10.0, max_retries=1,
                         backoff_s=0.01, backoff_max_s=0.05)
    options.update(overrides)
    return OpenAIGenerator(**options)


def in_threads(gen: OpenAIGenerator, batches: list[list[str]]) -> list[list[Generation]]:
    """Each batch generated from a thread of its own, all at once (a threads pool's slots)."""
    out: list[list[Generation] | None] = [None] * len(batches)
    start = threading.Barrier(len(batches))

    def run(n: int) -> None:
        start.wait()
        out[n] = gen.generate([user(q) for q in batches[n]])

    threads = [threading.Thread(target=run, args=(n,)) for n in range(len(batches))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert all(o is not None for o in out), "a batch did not finish"
    return out  # type: ignore[return-value]


def test_the_budget_holds_across_concurrent_batches() -> None:
    batches = [[f"batch {b} question {i}" for i in range(6)] for b in range(3)]
    with FakeLLM(delay_s=0.2) as server:
        gen = generator(server.base_url, max_in_flight=4)
        try:
            results = in_threads(gen, batches)
        finally:
            gen.close()
        # 18 requests from three batches at once: the server never holds more than the
        # one budget of 4 (a budget per batch would have let 12 through), and uses all of it.
        assert server.max_in_flight == 4
        assert server.posts == 18
    for batch, got in zip(batches, results):
        assert [g.text for g in got] == [f"echo: {q}" for q in batch], "each batch's answers in its own order"


def test_one_client_and_its_connections_serve_every_batch() -> None:
    with FakeLLM(delay_s=0.05, keep_alive=True) as server:
        gen = generator(server.base_url, max_in_flight=3)
        try:
            for round_ in range(4):  # batch after batch, as a worker takes them
                got = gen.generate([user(f"round {round_} q {i}") for i in range(6)])
                assert all(g.error is None for g in got)
            in_threads(gen, [[f"t{b} q{i}" for i in range(5)] for b in range(2)])
            assert gen.clients_made == 1
        finally:
            gen.close()
        assert server.posts == 34
        # a client per batch would have opened 3 new connections for each of the 6 calls
        assert 1 <= len(server.connections) <= 3, server.connections


def test_a_failing_request_is_its_questions_error_only() -> None:
    questions = [f"question {i}" for i in range(8)]
    questions[5] = "question 5 BAD"
    with FakeLLM(delay_s=0.05, fail_when="BAD") as server:
        gen = generator(server.base_url, max_in_flight=3)
        try:
            first, second = in_threads(gen, [questions, [f"other {i}" for i in range(4)]])
        finally:
            gen.close()
        assert server.posts_of("BAD") == 1, "a 400 is not retried"
        assert server.posts == 12
    assert [g.error for g in first] == [None] * 5 + ["HTTP 400: scripted failure 400"] + [None] * 2
    assert [g.text for n, g in enumerate(first) if n != 5] == [f"echo: {q}" for n, q in enumerate(questions) if n != 5]
    assert all(g.error is None for g in second)


def test_a_cancelled_batch_gives_its_slots_back() -> None:
    with FakeLLM(delay_s=1.0) as server:
        gen = generator(server.base_url, max_in_flight=2)
        try:
            abandoned = gen.submit([user(f"abandoned {i}") for i in range(8)])
            time.sleep(0.3)  # two of them are in flight, six wait for a slot
            abandoned.cancel()
            started = time.perf_counter()
            [answer] = gen.generate([user("next batch")])
            waited = time.perf_counter() - started
        finally:
            gen.close()
        assert answer.text == "echo: next batch"
        # It waits at most for the two in-flight requests' slots, never for the other six.
        assert waited < 2.5, waited
        assert server.posts_of("abandoned") == 2
    assert abandoned.cancelled()
