"""The shared rate limiter (common/ratelimit.py) against real Redis, and the OpenAI
generator's use of it against the loopback endpoint that answers 429 above a rate
(``tests.faults.FakeLLM(rate_limit=...)``).

Limiter instances with clients of their own, on event loops in threads of their own,
stand for workers: they share nothing but Redis. Budgets are a few per second, so a
test takes seconds; what holds per second holds per minute.
"""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator

import httpx
import openai
import pytest
from redis import asyncio as aioredis

from common.generators.remote import OpenAIGenerator, _retry_after_429, estimate_tokens
from common.ratelimit import NoBudget, RateLimiter, endpoint_key
from tests.faults import FakeLLM

ENDPOINT = endpoint_key("http://127.0.0.1:1/v1", "fake-model")


@pytest.fixture
def prefix(redis_client) -> Iterator[str]:
    name = f"ragq-test-rl-{uuid.uuid4().hex[:6]}"
    yield name
    keys = list(redis_client.scan_iter(f"{name}:*"))
    if keys:
        redis_client.delete(*keys)


def limiter(redis_url: str, prefix: str, **budget: int) -> RateLimiter:
    return RateLimiter(aioredis.Redis.from_url(redis_url, decode_responses=True), ENDPOINT, prefix=prefix, **budget)


def run(redis_url: str, prefix: str, body: Callable[[RateLimiter], Awaitable[object]], **budget: int) -> object:
    """``body(limiter)`` on a fresh event loop with a limiter (and Redis client) of its own."""
    async def main() -> object:
        lim = limiter(redis_url, prefix, **budget)
        try:
            return await body(lim)
        finally:
            await lim.close()

    return asyncio.run(main())


def as_workers(n: int, redis_url: str, prefix: str, body: Callable[[RateLimiter], Awaitable[object]],
               **budget: int) -> list[object]:
    """``body`` run by ``n`` limiters at once, each on a thread and event loop of its own."""
    out: list[object] = [None] * n
    go = threading.Barrier(n)

    def worker(i: int) -> None:
        go.wait()
        out[i] = run(redis_url, prefix, body, **budget)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert all(o is not None for o in out), "a worker did not finish"
    return out


def most_in_any_window(times: list[float], window_s: float) -> int:
    times = sorted(times)
    return max(sum(1 for u in times[i:] if u < t + window_s) for i, t in enumerate(times))


# --- the limiter -------------------------------------------------------------------


def test_two_workers_together_never_exceed_the_request_budget(redis_url: str, prefix: str) -> None:
    rpm = 600  # 10 a second, at most one second's worth (10) at once

    async def thirty_requests(lim: RateLimiter) -> list[float]:
        async def one() -> float:
            await lim.acquire(max_wait_s=30)
            return time.monotonic()
        return list(await asyncio.gather(*(one() for _ in range(15))))

    started = time.monotonic()
    both = as_workers(2, redis_url, prefix, thirty_requests, rpm=rpm)
    times = [t for worker in both for t in worker]  # type: ignore[union-attr]
    elapsed = time.monotonic() - started
    # Alone, each worker would have let 10 go at once and the other 5 within half a second.
    assert most_in_any_window(times, 1.0) <= 10 + 10 + 1  # burst + a second's refill (+1: wake-up jitter)
    assert most_in_any_window(times, 0.5) <= 10 + 5 + 1
    assert most_in_any_window(times, 0.05) <= 10 + 1
    # 30 requests at 10/s with 10 at once: the last starts after about 2 s, not before.
    assert 1.9 <= elapsed < 4.0, elapsed


def test_the_token_budget_is_booked_then_corrected_by_usage(redis_url: str, prefix: str) -> None:
    async def body(lim: RateLimiter) -> dict[str, float]:
        out = {}
        t = time.monotonic()
        grant = await lim.acquire(200, max_wait_s=5)  # the whole burst (200 tokens a second)
        out["first"] = time.monotonic() - t
        with pytest.raises(NoBudget):  # 100 more fit in 0.5 s: not within 0.2, and nothing booked
            await lim.acquire(100, max_wait_s=0.2)
        await lim.settle(grant, 20)  # the answer used 20: 180 come back
        t = time.monotonic()
        small = await lim.acquire(150, max_wait_s=5)
        out["after_refund"] = time.monotonic() - t
        await lim.settle(small, 350)  # it used 200 more than booked: charged
        t = time.monotonic()
        await lim.acquire(100, max_wait_s=5)
        out["after_charge"] = time.monotonic() - t
        return out

    waits = run(redis_url, prefix, body, tpm=12_000)
    assert waits["first"] < 0.1 and waits["after_refund"] < 0.1, waits
    # 20 + 350 tokens booked within ~0.1 s, 200 a second: 100 more wait for about 1.35 s
    assert 1.1 < waits["after_charge"] < 1.7, waits


def test_two_workers_share_the_token_budget(redis_url: str, prefix: str) -> None:
    async def four_requests(lim: RateLimiter) -> list[float]:
        out = []
        for _ in range(4):
            await lim.acquire(100, max_wait_s=10)
            out.append(time.monotonic())
        return out

    started = time.monotonic()
    both = as_workers(2, redis_url, prefix, four_requests, tpm=12_000)  # 200 tokens a second
    elapsed = time.monotonic() - started
    times = [t for worker in both for t in worker]  # type: ignore[union-attr]
    # 800 tokens, 200 at once then 200 a second: 3 s; either worker alone would take 1.5 s
    assert 2.8 < elapsed < 4.5, elapsed
    assert most_in_any_window(times, 1.0) <= 4 + 1


def test_a_request_larger_than_the_burst_goes_into_a_full_bucket(redis_url: str, prefix: str) -> None:
    async def body(lim: RateLimiter) -> float:
        await lim.acquire(500, max_wait_s=1)  # 2.5 s of budget: alone, at once
        t = time.monotonic()
        await lim.acquire(1, max_wait_s=5)  # waits until 301 tokens came back
        return time.monotonic() - t

    assert 1.3 < run(redis_url, prefix, body, tpm=12_000) < 1.9  # type: ignore[operator]


def test_a_429_pause_holds_every_worker_and_is_never_shortened(redis_url: str, prefix: str) -> None:
    async def pauser(lim: RateLimiter) -> float:
        left = await lim.pause(0.8)
        assert await lim.pause(0.1) > 0.7  # a shorter pause leaves the longer one
        return left

    async def other(lim: RateLimiter) -> tuple[float, float]:
        seen = await lim.paused_for()
        t = time.monotonic()
        await lim.acquire(max_wait_s=5)
        return seen, time.monotonic() - t

    assert 0.75 < run(redis_url, prefix, pauser) <= 0.8  # type: ignore[operator]
    seen, waited = run(redis_url, prefix, other)  # type: ignore[misc]
    assert 0.5 < seen <= 0.8 and seen - 0.05 < waited < seen * 1.1 + 0.1, (seen, waited)
    # unlimited and unpaused: no wait at all
    t = time.monotonic()
    run(redis_url, prefix, lambda lim: lim.acquire(10_000, max_wait_s=0))
    assert time.monotonic() - t < 0.5


def test_keys_live_under_the_prefix_per_endpoint(redis_url: str, prefix: str, redis_client) -> None:
    async def body(lim: RateLimiter) -> bool:
        await lim.acquire(10, max_wait_s=1)
        await lim.pause(5)
        return True

    run(redis_url, prefix, body, rpm=60, tpm=6000)
    keys = set(redis_client.scan_iter(f"{prefix}:*"))
    assert keys == {f"{prefix}:ratelimit:{ENDPOINT}:{k}" for k in ("requests", "tokens", "paused")}
    assert all(0 < redis_client.pttl(k) <= 6000 for k in keys)  # they expire once idle
    assert endpoint_key("http://h/v1/", "m") == endpoint_key("http://h/v1", "m") != endpoint_key("http://h/v1", "n")
    run(redis_url, prefix, lambda lim: lim.reset())
    assert not list(redis_client.scan_iter(f"{prefix}:*"))


# --- the generator on a rate-limited loopback endpoint ------------------------------------


def user(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


def shared(redis_url: str, prefix: str, **budget: int) -> Callable[[str], RateLimiter]:
    return lambda model: RateLimiter(aioredis.Redis.from_url(redis_url, decode_responses=True),
                                     endpoint_key("loopback", model), prefix=prefix, **budget)


def generator(base_url: str, **options: object) -> OpenAIGenerator:
    values: dict = dict(model="fake-model", timeout_s=10.0, max_retries=0, backoff_s=0.05, backoff_max_s=0.2)
    values.update(options)
    return OpenAIGenerator(base_url=base_url, **values)


def test_two_generators_within_the_budget_get_no_429(redis_url: str, prefix: str) -> None:
    """Two workers' clients, 10 requests each at once, against an endpoint that allows 5 a
    second: with RAGQ_LLM_RPM=240 between them, not one request is refused."""
    with FakeLLM(rate_limit=(5, 5)) as server:
        gens = [generator(server.base_url, limiter_factory=shared(redis_url, prefix, rpm=240)) for _ in range(2)]
        out: list[list] = [[], []]
        go = threading.Barrier(2)

        def work(i: int) -> None:
            go.wait()
            out[i] = gens[i].generate([user(f"worker {i} q {n}") for n in range(10)])

        try:
            threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(60)
        finally:
            for g in gens:
                g.close()
        assert server.statuses_seen(429) == []
        assert server.posts == 20
    assert all(g.error is None for batch in out for g in batch), out


def test_a_429_is_waited_out_not_counted_as_a_retry() -> None:
    """max_retries=0, and the endpoint allows one request at a time a second: each 429's
    Retry-After is waited (alone here, no Redis), and every question is answered."""
    with FakeLLM(rate_limit=(4, 1), retry_after="0.3") as server:
        gen = generator(server.base_url)
        try:
            got = gen.generate([user(f"q {n}") for n in range(4)])
        finally:
            gen.close()
        assert server.statuses_seen(429), "the endpoint never refused: the test proves nothing"
    assert [g.text for g in got] == [f"echo: q {n}" for n in range(4)], [g.error for g in got]


def test_429s_beyond_the_request_timeout_fail_the_question() -> None:
    with FakeLLM(rate_limit=(0.001, 1), retry_after="1") as server:
        gen = generator(server.base_url, timeout_s=2.5)
        try:
            started = time.monotonic()
            got = gen.generate([user("first"), user("second")])
            elapsed = time.monotonic() - started
        finally:
            gen.close()
    errors = sorted((g.error for g in got), key=bool)  # both go at once: either may take the one slot
    assert errors[0] is None
    assert errors[1] == "HTTP 429: Rate limit reached for requests (after 3 attempts)"
    assert 1.8 < elapsed < 3.0, elapsed  # two pauses of 1 s; a third would pass the 2.5 s


def test_no_budget_within_the_timeout_is_the_questions_error(redis_url: str, prefix: str) -> None:
    with FakeLLM() as server:
        gen = generator(server.base_url, timeout_s=0.5, limiter_factory=shared(redis_url, prefix, rpm=60))
        try:
            got = gen.generate([user("a"), user("b")])  # one a second: b would wait 1 s
        finally:
            gen.close()
        assert server.posts == 1
    errors = sorted((g.error for g in got), key=bool)  # either may be the one that went
    assert errors[0] is None
    assert errors[1] == (f"rate limited: no budget at {server.base_url} within 0.5 s "
                            "(60 requests/min, unlimited tokens/min; next start in 1 s)")


def test_tokens_are_estimated_then_corrected_from_usage(redis_url: str, prefix: str, redis_client) -> None:
    conversation = user("x" * 400)  # about 100 tokens + 4 for the message, + max_tokens
    assert estimate_tokens(conversation, 50) == 154
    assert estimate_tokens(user("云硬盘"), 0) == 7
    with FakeLLM() as server:
        gen = generator(server.base_url, limiter_factory=shared(redis_url, prefix, tpm=60_000))
        try:
            started = time.monotonic()
            # one after the other, as a worker's batches: 1,004 tokens booked each, 1,000 a second
            got = [gen.generate([conversation], max_tokens=900)[0] for _ in range(6)]
            elapsed = time.monotonic() - started
        finally:
            gen.close()
    assert all(g.error is None for g in got)
    # Left at 1,004 each they would take 5 s; each answer gives back all but the 10 it used
    # (the fake's usage), so the next one goes at once. (Requests booked together wait on
    # each other's estimates, as a provider that counts max_tokens up front would.)
    assert elapsed < 2.0, elapsed


def test_retry_after_forms() -> None:
    def status_429(headers: dict[str, str]) -> openai.APIStatusError:
        request = httpx.Request("POST", "http://x/v1/chat/completions")
        return openai.RateLimitError("limited", response=httpx.Response(429, headers=headers, request=request),
                                     body=None)

    assert _retry_after_429(status_429({"retry-after-ms": "250", "retry-after": "1"})) == 0.25
    assert _retry_after_429(status_429({"retry-after": "3"})) == 3.0
    date = time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(time.time() + 30))
    assert 28 < _retry_after_429(status_429({"retry-after": date})) <= 30  # type: ignore[operator]
    assert _retry_after_429(status_429({"x-ratelimit-remaining-requests": "0", "x-ratelimit-reset-requests": "1m2.5s",
                                        "x-ratelimit-remaining-tokens": "10", "x-ratelimit-reset-tokens": "9m"})) == 62.5
    assert _retry_after_429(status_429({"x-ratelimit-remaining-tokens": "0", "x-ratelimit-reset-tokens": "20ms"})) == 0.02
    assert _retry_after_429(status_429({})) is None


def test_a_pause_longer_than_the_timeout_fails_the_question_at_once(redis_url: str, prefix: str) -> None:
    """Another worker's 429 said "come back in 30 s"; a request with a 1 s timeout does not sit it out."""
    with FakeLLM() as server:
        factory = shared(redis_url, prefix)

        async def other_worker_got_a_429() -> None:
            lim = factory("fake-model")
            await lim.pause(30)
            await lim.close()

        asyncio.run(other_worker_got_a_429())
        gen = generator(server.base_url, timeout_s=1.0, limiter_factory=factory)
        try:
            started = time.monotonic()
            [got] = gen.generate([user("a")])
            elapsed = time.monotonic() - started
        finally:
            gen.close()
        assert server.posts == 0
    assert elapsed < 0.5
    assert got.error == (f"rate limited: {server.base_url} asked to wait 30 s more (429 Retry-After), "
                         "beyond the 1 s timeout")
