"""Answers from any OpenAI-compatible endpoint: vLLM, mistral.rs, llama.cpp server, OpenAI.

Throughput of vLLM-class servers comes from many concurrent requests, so a batch is
sent as concurrent requests. One generator is one client for the life of the process:
its requests run on one long-lived event loop (:mod:`common.generators.loop`), share
one pool of keep-alive connections, and share one budget of ``max_in_flight``
requests across every batch that calls it at once (pipelined sub-batches, a threads
pool's slots), so the server never sees more than that from one worker process.
The client's own retries are off; the retry loop here is explicit so its policy is
visible and tested.

With a rate limiter (:mod:`common.ratelimit`, one per endpoint and model, shared by
every worker through Redis) each attempt first books its request and its estimated
tokens, waiting for budget rather than failing. A 429 is not a failure but "not now":
its ``Retry-After`` becomes a pause every worker honours, and it is retried without
counting against ``max_retries``, for as long as the request's time held by rate
limits stays within ``timeout_s``.
"""

from __future__ import annotations

import asyncio
import email.utils
import logging
import os
import re
import random
import time
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import Future
from typing import TYPE_CHECKING, Any, TypeVar

import httpx
import openai
import redis

from common.generators.base import Conversation, Generation, Generator
from common.generators.loop import LoopThread
from common.generators.slots import PrioritySlots
from common.prompts import approx_tokens

if TYPE_CHECKING:
    from common.ratelimit import Grant, RateLimiter

T = TypeVar("T")
log = logging.getLogger(__name__)

OPENAI_BASE_URL = "https://api.openai.com/v1"
#: Statuses worth another try: request timeout, conflict, rate limit, server errors.
RETRY_STATUSES = frozenset({408, 409, 429})
#: Tokens a chat message costs beyond its text (role and separators), for estimates.
MESSAGE_OVERHEAD_TOKENS = 4


class RequestFailed(Exception):
    """A request that failed for good; the message names the cause (never the API key)."""


class OpenAIGenerator(Generator):
    """Chat completions over HTTP, one concurrent request per conversation."""

    concurrent = True

    def __init__(
        self,
        *,
        base_url: str | None = None,
        api_key: str | None = None,
        model: str | None = None,
        max_tokens: int = 256,
        temperature: float = 0.2,
        timeout_s: float = 60.0,
        max_retries: int = 3,
        max_in_flight: int = 32,
        backoff_s: float = 0.5,
        backoff_max_s: float = 8.0,
        limiter_factory: Callable[[str], RateLimiter] | None = None,
    ) -> None:
        """``limiter_factory(model)`` makes the shared rate limiter of this endpoint and
        model; it is called on the generator's loop, once per process."""
        self.base_url = (base_url or OPENAI_BASE_URL).rstrip("/")
        # Local servers want no key, but the client insists on one.
        self._api_key = api_key or "no-key"
        self._model = model or None
        self.max_tokens = max_tokens
        self.temperature = temperature
        self.timeout_s = timeout_s
        self.max_retries = max(0, max_retries)
        self.max_in_flight = max(1, max_in_flight)
        self.backoff_s = backoff_s
        self.backoff_max_s = backoff_max_s
        self._loop = LoopThread()
        # Made on the loop at first use, and again in a forked child (see _session).
        self._client: openai.AsyncOpenAI | None = None
        self._slots: PrioritySlots | None = None
        self._pid: int | None = None
        self._limiter_factory = limiter_factory
        self._limiters: dict[str, RateLimiter] = {}
        #: Clients this generator has made (one per process that used it).
        self.clients_made = 0

    @property
    def model_name(self) -> str:  # type: ignore[override]
        """The configured model, else the first one the server lists (asked once)."""
        if self._model is None:
            self._model = self._loop.run(self._resolve_model())
        return self._model

    def generate(
        self,
        conversations: Sequence[Conversation],
        *,
        max_tokens: int | None = None,
        temperature: float | None = None,
    ) -> list[Generation]:
        if not conversations:
            return []
        return self._loop.run(self._generate(list(conversations), max_tokens, temperature, time.monotonic()))

    def submit(
        self,
        conversations: Sequence[Conversation],
        *,
        max_tokens: int | None = None,
        temperature: float | None = None,
        order: float | None = None,
    ) -> Future[list[Generation]]:
        """The requests start now, on the generator's loop; the caller is free meanwhile.

        Where the budget is full, a freed slot goes to the request of the lowest ``order``
        (``time.monotonic()`` when its batch began; now, by default): older batches first.
        """
        order = time.monotonic() if order is None else order
        return self._loop.submit(self._generate(list(conversations), max_tokens, temperature, order))

    def close(self) -> None:
        self._loop.close(cleanup=self._close_client())

    # --- internals ----------------------------------------------------------------

    async def _generate(self, conversations: list[Conversation], max_tokens: int | None,
                        temperature: float | None, order: float) -> list[Generation]:
        if not conversations:
            return []
        max_tokens = self.max_tokens if max_tokens is None else max_tokens
        temperature = self.temperature if temperature is None else temperature
        try:
            model = self._model or await self._resolve_model()
        except RequestFailed as exc:
            error = f"could not list models: {exc}"
            return [Generation(None, "unknown", 0.0, error=error) for _ in conversations]
        self._model = model
        client, slots = self._session()
        calls = (self._one(client, slots, order, model, c, max_tokens, temperature) for c in conversations)
        return list(await asyncio.gather(*calls))

    def _session(self) -> tuple[openai.AsyncOpenAI, PrioritySlots]:
        """The process's client and in-flight budget, made on the loop the first time.

        Only the loop's thread calls this, and it does not await, so no two callers
        ever make a client each.
        """
        if self._client is None or self._slots is None or self._pid != os.getpid():
            # keep-alive for every slot, so a busy worker never reconnects between batches
            limits = httpx.Limits(max_connections=self.max_in_flight + 4,
                                  max_keepalive_connections=self.max_in_flight)
            self._client = openai.AsyncOpenAI(
                base_url=self.base_url, api_key=self._api_key, timeout=self.timeout_s, max_retries=0,
                http_client=openai.DefaultAsyncHttpxClient(limits=limits, timeout=self.timeout_s),
            )
            self._slots = PrioritySlots(self.max_in_flight)
            self._limiters = {}  # a forked child's Redis connections are its own
            self._pid = os.getpid()
            self.clients_made += 1
        return self._client, self._slots

    def _limiter(self, model: str) -> RateLimiter | None:
        """The endpoint's shared limiter for ``model``, made on the loop at first use."""
        if self._limiter_factory is None:
            return None
        if model not in self._limiters:
            self._limiters[model] = self._limiter_factory(model)
        return self._limiters[model]

    async def _close_client(self) -> None:
        client, self._client, self._slots = self._client, None, None
        limiters, self._limiters = list(self._limiters.values()), {}
        if self._pid != os.getpid():
            return
        if client is not None:
            await client.close()
        for limiter in limiters:
            await limiter.close()

    async def _resolve_model(self) -> str:
        client, _ = self._session()
        page = await self._with_retries(lambda: client.models.list())
        if not page.data:
            raise RequestFailed(f"no models served at {self.base_url}")
        return page.data[0].id

    async def _one(
        self, client: openai.AsyncOpenAI, slots: PrioritySlots, order: float, model: str,
        conversation: Conversation, max_tokens: int, temperature: float,
    ) -> Generation:
        async with slots.hold(order):
            start = time.perf_counter()
            try:
                response = await self._with_retries(
                    lambda: client.chat.completions.create(
                        model=model, messages=conversation,  # type: ignore[arg-type]
                        max_tokens=max_tokens, temperature=temperature,
                    ),
                    limiter=self._limiter(model),
                    tokens=estimate_tokens(conversation, max_tokens),
                    used=lambda r: r.usage.total_tokens if r.usage else None,
                )
            except RequestFailed as exc:
                return Generation(None, model, time.perf_counter() - start, error=str(exc))
            seconds = time.perf_counter() - start
        if not response.choices:
            return Generation(None, response.model or model, seconds, error="response has no choices")
        usage = response.usage
        return Generation(
            text=(response.choices[0].message.content or "").strip(),
            model=response.model or model,
            seconds=seconds,
            prompt_tokens=usage.prompt_tokens if usage else None,
            completion_tokens=usage.completion_tokens if usage else None,
        )

    async def _with_retries(self, call: Callable[[], Awaitable[T]], *, limiter: RateLimiter | None = None,
                            tokens: int = 0, used: Callable[[T], int | None] | None = None) -> T:
        """``call()``, retried with exponential backoff and jitter on transient failures.

        With ``limiter``, each attempt first books one request and ``tokens`` from the
        endpoint's shared budget, and ``used(result)`` corrects the estimate after. A 429
        pauses every worker and is waited out within ``timeout_s``, apart from the retries.
        """
        attempts = failures = limited = 0
        held_s = 0.0  # time this request spent held by rate limits: bookings and 429 pauses
        while True:
            grant = None
            if limiter is not None:
                grant, waited = await self._book(limiter, tokens, self.timeout_s - held_s)
                held_s += waited
            attempts += 1
            try:
                result = await call()
            except openai.OpenAIError as exc:
                if _rate_limited(exc):
                    limited += 1
                    pause = _retry_after_429(exc)
                    pause = self._delay(limited, exc) if pause is None else pause
                    if held_s + pause > self.timeout_s:
                        raise RequestFailed(self._describe(exc, attempts)) from exc
                    if limiter is None or not await self._pause(limiter, pause):
                        await asyncio.sleep(pause)  # alone: nobody else to tell
                        held_s += pause
                    continue  # the next booking waits for the shared pause
                failures += 1
                if failures > self.max_retries or not _retryable(exc):
                    raise RequestFailed(self._describe(exc, attempts)) from exc
                await asyncio.sleep(self._delay(failures, exc))
                continue
            if limiter is not None and grant is not None and used is not None:
                await self._settle(limiter, grant, used(result))
            return result

    async def _book(self, limiter: RateLimiter, tokens: int, max_wait_s: float) -> tuple[Grant | None, float]:
        """Book from the shared budget: (the grant, seconds waited). With Redis unreachable
        the request goes unlimited: a rate limit must not fail answers the endpoint would give."""
        from common.ratelimit import NoBudget

        started = time.monotonic()
        try:
            grant = await limiter.acquire(tokens, max_wait_s=max(0.0, max_wait_s))
        except NoBudget as exc:
            if not limiter.limited:  # only a 429's pause held it
                raise RequestFailed(f"rate limited: {self.base_url} asked to wait {exc.wait_s:.0f} s more "
                                    f"(429 Retry-After), beyond the {self.timeout_s:g} s timeout") from exc
            raise RequestFailed(
                f"rate limited: no budget at {self.base_url} within {self.timeout_s:g} s "
                f"({limiter.rpm or 'unlimited'} requests/min, {limiter.tpm or 'unlimited'} tokens/min; "
                f"next start in {exc.wait_s:.0f} s)") from exc
        except redis.RedisError as exc:
            log.warning("rate limiter unavailable, sending unlimited: %s", exc)
            return None, time.monotonic() - started
        return grant, grant.waited_s

    async def _pause(self, limiter: RateLimiter, seconds: float) -> bool:
        try:
            await limiter.pause(seconds)
            return True
        except redis.RedisError as exc:
            log.warning("rate limiter unavailable, backing off alone: %s", exc)
            return False

    async def _settle(self, limiter: RateLimiter, grant: Grant, used_tokens: int | None) -> None:
        try:
            await limiter.settle(grant, used_tokens)
        except redis.RedisError as exc:  # the estimate stands: the budget errs on the safe side
            log.warning("rate limiter unavailable, token estimate kept: %s", exc)

    def _delay(self, attempt: int, exc: Exception) -> float:
        """Backoff before retry ``attempt + 1``: doubling, capped, jittered, >= Retry-After."""
        delay = min(self.backoff_max_s, self.backoff_s * 2 ** (attempt - 1))
        # Jitter spreads the retries of many in-flight requests that failed together.
        delay = random.uniform(delay / 2, delay)
        retry_after = _retry_after(exc)
        if retry_after is not None:
            delay = max(delay, min(retry_after, self.backoff_max_s))
        return delay

    def _describe(self, exc: Exception, attempts: int) -> str:
        tries = f"{attempts} attempt{'s' if attempts != 1 else ''}"
        if isinstance(exc, openai.APITimeoutError):
            text = f"timed out after {self.timeout_s:g} s waiting for {self.base_url} ({tries})"
        elif isinstance(exc, openai.APIConnectionError):
            chain = _cause_chain(exc)
            if any(isinstance(e, ConnectionRefusedError) or "refused" in str(e).lower() for e in chain):
                text = f"connection refused to {self.base_url} after {tries}"
            else:
                # The transport's own error (httpx) says it best; deeper ones get cryptic.
                detail = next((str(e) for e in chain[1:] if str(e)), type(exc).__name__)
                text = f"connection error to {self.base_url} after {tries}: {detail}"
        elif isinstance(exc, openai.APIStatusError):
            text = f"HTTP {exc.status_code}: {_status_detail(exc)}"
            if attempts > 1:
                text += f" (after {tries})"
        else:
            text = f"{type(exc).__name__}: {exc}"
        return text.replace(self._api_key, "***") if self._api_key else text


def estimate_tokens(conversation: Conversation, max_tokens: int) -> int:
    """What a request may cost before it is sent: its prompt, estimated, plus ``max_tokens``
    (what providers count against a tokens-per-minute limit until the answer is in)."""
    prompt = sum(approx_tokens(m.get("content") or "") + MESSAGE_OVERHEAD_TOKENS for m in conversation)
    return prompt + max(0, max_tokens)


def _retryable(exc: Exception) -> bool:
    if isinstance(exc, openai.APIConnectionError):  # timeouts included
        return True
    if isinstance(exc, openai.APIStatusError):
        if _quota_exhausted(exc):
            return False
        return exc.status_code in RETRY_STATUSES or exc.status_code >= 500
    return False


def _quota_exhausted(exc: openai.APIStatusError) -> bool:
    """OpenAI's 429 for an account out of credit: waiting does not help."""
    return exc.status_code == 429 and exc.code == "insufficient_quota"


def _rate_limited(exc: Exception) -> bool:
    return isinstance(exc, openai.APIStatusError) and exc.status_code == 429 and not _quota_exhausted(exc)


def _retry_after_429(exc: openai.APIStatusError) -> float | None:
    """Seconds a 429 asks to wait: ``retry-after-ms``, ``Retry-After`` (seconds or an HTTP
    date), else OpenAI's ``x-ratelimit-reset-*`` of the budget it says is exhausted."""
    headers = exc.response.headers
    try:
        return float(headers["retry-after-ms"]) / 1000
    except (KeyError, ValueError):
        pass
    value = headers.get("retry-after")
    if value:
        try:
            return max(0.0, float(value))
        except ValueError:
            try:
                when = email.utils.parsedate_to_datetime(value)
                return max(0.0, when.timestamp() - time.time())
            except (TypeError, ValueError):
                pass
    resets = [_duration(headers.get(f"x-ratelimit-reset-{kind}", "")) for kind in ("requests", "tokens")
              if headers.get(f"x-ratelimit-remaining-{kind}") == "0"]
    resets = [r for r in resets if r is not None]
    return max(resets) if resets else None


_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ms|h|m|s)")


def _duration(text: str) -> float | None:
    """OpenAI's reset durations: ``1s``, ``6m0s``, ``20ms``, ``1h2m3.5s``."""
    parts = _DURATION.findall(text.strip())
    if not parts or "".join(n + u for n, u in parts) != text.strip():
        return None
    scale = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001}
    return sum(float(n) * scale[u] for n, u in parts)


def _retry_after(exc: Exception) -> float | None:
    if not isinstance(exc, openai.APIStatusError):
        return None
    try:
        return float(exc.response.headers.get("retry-after", ""))
    except ValueError:
        return None  # absent, or an HTTP date: the exponential backoff will do


def _status_detail(exc: openai.APIStatusError) -> str:
    body: Any = exc.body
    if isinstance(body, dict) and body.get("message"):
        detail = str(body["message"])
    else:
        detail = exc.response.text or exc.response.reason_phrase
    return " ".join(detail.split())[:300]


def _cause_chain(exc: BaseException) -> list[BaseException]:
    """``exc`` and what led to it (explicit cause, else implicit context), outermost first."""
    chain = [exc]
    while len(chain) < 20:
        nxt = chain[-1].__cause__ or chain[-1].__context__
        if nxt is None or nxt in chain:
            break
        chain.append(nxt)
    return chain
