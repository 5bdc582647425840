"""Wake waiting requests from Redis pub/sub: one connection per server, no thread per wait.

``/v1/answer``, ``/v1/search`` and ``/v1/embeddings`` used to hold a threadpool thread
each while polling at 10 Hz, so about 40 slow answers stalled every route. Now a request
awaits an :class:`asyncio.Event` that one reader task sets when Redis announces the
outcome: the job-finished channel of :class:`common.jobs.JobRecord` (the finishing Lua
script publishes the job id), or the channel Celery's Redis result backend publishes each
task result on (its result key). A waiter checks once after subscribing (the outcome may
already be there) and again on each message; a slow backstop re-check (every
``recheck_s``) covers a message lost while the pub/sub connection reconnected, and
workers of an older version that do not publish.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import TypeVar

from redis import asyncio as aioredis
from redis.exceptions import RedisError

log = logging.getLogger("ragq.http")
T = TypeVar("T")

#: Seconds between backstop re-checks: short at first (a subscription races the outcome), then this.
RECHECK_S = 2.0
_FIRST_RECHECKS = (0.25, 0.5, 1.0)


class Notifier:
    """Pub/sub for many waiters: per-channel subscriptions, plus one channel whose messages name the waiter."""

    def __init__(self, client: aioredis.Redis, *, keyed_channel: str, recheck_s: float = RECHECK_S) -> None:
        self.redis = client
        self.keyed_channel = keyed_channel  # each message on it is the key of its waiters (a job id)
        self.recheck_s = recheck_s
        self._pubsub: aioredis.client.PubSub | None = None
        self._reader: asyncio.Task[None] | None = None
        self._events: dict[str, set[asyncio.Event]] = {}
        self._lock = asyncio.Lock()

    async def _ensure_started(self) -> aioredis.client.PubSub:
        async with self._lock:
            if self._pubsub is None:
                pubsub = self.redis.pubsub(ignore_subscribe_messages=True)
                await pubsub.subscribe(self.keyed_channel)
                self._pubsub = pubsub
                self._reader = asyncio.create_task(self._read(pubsub), name="ragq-notifier")
            return self._pubsub

    async def close(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
            await asyncio.gather(self._reader, return_exceptions=True)
        if self._pubsub is not None:
            await self._pubsub.aclose()
        self._pubsub = self._reader = None

    async def _read(self, pubsub: aioredis.client.PubSub) -> None:
        while True:
            try:
                message = await pubsub.get_message(timeout=1.0)
            except asyncio.CancelledError:
                raise
            except (RedisError, OSError) as exc:  # redis-py reconnects and resubscribes on the next call
                log.warning("pub/sub connection lost (%s); waiters re-check until it is back", type(exc).__name__)
                await asyncio.sleep(0.5)
                continue
            if not message or message.get("type") != "message":
                continue
            channel, data = _text(message["channel"]), _text(message["data"])
            self._wake(f"{channel}\0{data}" if channel == self.keyed_channel else channel)

    def _wake(self, key: str) -> None:
        for event in self._events.get(key, ()):
            event.set()

    async def wait_keyed(self, key: str, check: Callable[[], Awaitable[T | None]], timeout: float) -> T | None:
        """Wait for ``check()`` to return a value, waking on ``key`` published on the keyed channel."""
        await self._ensure_started()
        return await self._wait(f"{self.keyed_channel}\0{key}", check, timeout, channel=None)

    async def wait_channel(self, channel: str, check: Callable[[], Awaitable[T | None]], timeout: float) -> T | None:
        """Wait for ``check()`` to return a value, waking on any message on ``channel``."""
        await self._ensure_started()
        return await self._wait(channel, check, timeout, channel=channel)

    async def _wait(self, key: str, check: Callable[[], Awaitable[T | None]], timeout: float,
                    channel: str | None) -> T | None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        event = asyncio.Event()
        waiters = self._events.setdefault(key, set())
        waiters.add(event)
        try:
            if channel is not None and len(waiters) == 1:
                await self._subscribe(channel)
            rechecks = iter(_FIRST_RECHECKS)
            while True:
                event.clear()  # before the check: a message during it wakes the next wait at once
                value = await check()
                if value is not None:
                    return value
                left = deadline - loop.time()
                if left <= 0:
                    return None
                try:
                    await asyncio.wait_for(event.wait(), min(left, next(rechecks, self.recheck_s)))
                except asyncio.TimeoutError:
                    pass
        finally:
            waiters.discard(event)
            if not waiters:
                del self._events[key]
                if channel is not None:
                    await self._unsubscribe(channel)

    async def _subscribe(self, channel: str) -> None:
        try:
            assert self._pubsub is not None
            await self._pubsub.subscribe(channel)
        except (RedisError, OSError) as exc:  # the re-checks still find the outcome
            log.warning("could not subscribe to a result channel: %s", type(exc).__name__)

    async def _unsubscribe(self, channel: str) -> None:
        try:
            if self._pubsub is not None:
                await self._pubsub.unsubscribe(channel)
        except (RedisError, OSError):
            pass  # the subscription went with the connection


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value
