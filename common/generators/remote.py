"""Answers from any OpenAI-compatible endpoint: vLLM, mistral.rs, llama.cpp server, OpenAI.

Throughput of vLLM-class servers comes from many concurrent requests, so a batch is
sent as concurrent requests (at most ``max_in_flight`` at a time). The client's own
retries are off; the retry loop here is explicit so its policy is visible and tested.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import openai

from common.generators.base import Conversation, Generation, Generator

T = TypeVar("T")

OPENAI_BASE_URL = "https://api.openai.com/v1"
#: Statuses worth another try: request timeout, conflict, rate limit, server errors.
RETRY_STATUSES = frozenset({408, 409, 429})


class RequestFailed(Exception):
    """A request that failed for good; the message names the cause (never the API key)."""


class OpenAIGenerator(Generator):
    """Chat completions over HTTP, one concurrent request per conversation."""

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
    ) -> None:
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

    @property
    def model_name(self) -> str:  # type: ignore[override]
        """The configured model, else the first one the server lists (asked once)."""
        if self._model is None:
            self._model = _run_sync(self._with_client(self._resolve_model))
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
        max_tokens = self.max_tokens if max_tokens is None else max_tokens
        temperature = self.temperature if temperature is None else temperature

        async def run(client: openai.AsyncOpenAI) -> list[Generation]:
            try:
                model = self._model or await self._resolve_model(client)
            except RequestFailed as exc:
                error = f"could not list models: {exc}"
                return [Generation(None, "unknown", 0.0, error=error) for _ in conversations]
            self._model = model
            slots = asyncio.Semaphore(self.max_in_flight)
            calls = (self._one(client, slots, model, c, max_tokens, temperature) for c in conversations)
            return list(await asyncio.gather(*calls))

        return _run_sync(self._with_client(run))

    # --- internals ----------------------------------------------------------------

    def _with_client(
        self, body: Callable[[openai.AsyncOpenAI], Awaitable[T]]
    ) -> Callable[[], Awaitable[T]]:
        """A coroutine factory running ``body`` with a client of its own event loop.

        The client's connection pool belongs to the loop that made it, and each call
        runs its own loop, so the client lives exactly as long as one call.
        """

        async def run() -> T:
            client = openai.AsyncOpenAI(
                base_url=self.base_url, api_key=self._api_key,
                timeout=self.timeout_s, max_retries=0,
            )
            async with client:
                return await body(client)

        return run

    async def _resolve_model(self, client: openai.AsyncOpenAI) -> str:
        page = await self._with_retries(lambda: client.models.list())
        if not page.data:
            raise RequestFailed(f"no models served at {self.base_url}")
        return page.data[0].id

    async def _one(
        self, client: openai.AsyncOpenAI, slots: asyncio.Semaphore, model: str,
        conversation: Conversation, max_tokens: int, temperature: float,
    ) -> Generation:
        async with slots:
            start = time.perf_counter()
            try:
                response = await self._with_retries(
                    lambda: client.chat.completions.create(
                        model=model, messages=conversation,  # type: ignore[arg-type]
                        max_tokens=max_tokens, temperature=temperature,
                    )
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

    async def _with_retries(self, call: Callable[[], Awaitable[T]]) -> T:
        """``call()``, retried with exponential backoff and jitter on transient failures."""
        attempts = self.max_retries + 1
        for attempt in range(1, attempts + 1):
            try:
                return await call()
            except openai.OpenAIError as exc:
                if attempt == attempts or not _retryable(exc):
                    raise RequestFailed(self._describe(exc, attempt)) from exc
                await asyncio.sleep(self._delay(attempt, exc))
        raise AssertionError("unreachable")

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


def _retryable(exc: Exception) -> bool:
    if isinstance(exc, openai.APIConnectionError):  # timeouts included
        return True
    if isinstance(exc, openai.APIStatusError):
        return exc.status_code in RETRY_STATUSES or exc.status_code >= 500
    return False


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


def _run_sync(make: Callable[[], Awaitable[T]]) -> T:
    """Run a coroutine to completion from sync code, in any thread.

    Each call gets a fresh event loop (``asyncio.run``), which works in worker threads;
    when this thread already runs a loop, a helper thread runs it instead.
    """
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(make())  # type: ignore[arg-type]
    with ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(lambda: asyncio.run(make())).result()  # type: ignore[arg-type]
