"""One request and token budget per hosted endpoint, shared in Redis by every worker.

A provider's limit is per account, not per process: N workers x 32 requests in flight
must share one requests-per-minute and one tokens-per-minute budget, or together they
overrun it. Each budget is a GCRA token bucket (one Redis key holding its "theoretical
arrival time") refilled at ``limit / 60`` per second and holding at most ``burst_s``
seconds' worth, so however the requests of all workers interleave, no window of T
seconds ever carries more than ``limit * (T + burst_s) / 60``. A provider that
enforces its minute limit with a bucket of at least that burst (OpenAI and Anthropic
refill continuously) never sees a request over it.

Acquiring *books* the earliest start both buckets and the shared pause allow, in one
Lua script on Redis's clock (workers' clocks may differ), and the caller sleeps until
then: one round trip per request, no polling, first come first served across workers.
A request that would start later than its caller can wait books nothing. Tokens are
booked as an estimate and corrected once the response says what was used.

An endpoint that answers 429 anyway (the limit is shared with others, or unset) makes
its caller write a "paused until" for the endpoint; every worker's next acquire waits
for it, so one 429 backs off the whole fleet, not just the request that got it.

Only this module knows the ``{prefix}:ratelimit:{endpoint}:*`` keys.
"""

from __future__ import annotations

import asyncio
import hashlib
import random
import time
from dataclasses import dataclass

from redis import asyncio as aioredis

#: Seconds' worth of budget one bucket holds: the largest burst it lets through at once.
BURST_S = 1.0
#: The longest shared pause one 429 can impose, whatever the provider's header says.
MAX_PAUSE_S = 120.0

# KEYS: requests bucket, tokens bucket, pause
# ARGV: request interval (s per request, 0 = unlimited), token interval (s per token, 0 =
#       unlimited), burst_s, tokens, max_wait_s
# -> {wait_s as string, booked (1/0)}: the delay before the request may start; nothing
#    is booked when it exceeds max_wait_s.
_ACQUIRE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1e6
local req_iv, tok_iv, burst = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local tokens, max_wait = tonumber(ARGV[4]), tonumber(ARGV[5])

-- the earliest start a bucket allows for a cost of `cost` intervals
local function earliest(key, cost)
  local tat = tonumber(redis.call('GET', key) or '0')
  if cost <= burst then return math.max(now, tat + cost - burst), tat end
  return math.max(now, tat), tat  -- larger than the burst: only into a full bucket
end

local start = tonumber(redis.call('GET', KEYS[3]) or '0')
start = math.max(now, start)
local req_tat, tok_tat
if req_iv > 0 then
  local s
  s, req_tat = earliest(KEYS[1], req_iv)
  start = math.max(start, s)
end
if tok_iv > 0 and tokens > 0 then
  local s
  s, tok_tat = earliest(KEYS[2], tokens * tok_iv)
  start = math.max(start, s)
end
local wait = start - now
if wait > max_wait then return {string.format('%.6f', wait), 0} end

local function book(key, tat, cost)
  local new = math.max(tat, start) + cost
  redis.call('SET', key, string.format('%.6f', new), 'PX', math.ceil((new - now + burst) * 1000) + 1000)
end
if req_tat then book(KEYS[1], req_tat, req_iv) end
if tok_tat then book(KEYS[2], tok_tat, tokens * tok_iv) end
return {string.format('%.6f', wait), 1}
"""

# KEYS: tokens bucket ; ARGV: token interval, burst_s, delta tokens (may be negative)
_CORRECT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1e6
local iv, burst, delta = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local tat = tonumber(redis.call('GET', KEYS[1]) or '0')
if delta < 0 and tat <= now then return 0 end  -- the bucket is full already
local new = tat + delta * iv  -- a refund gives back what the estimate took
if delta > 0 then new = math.max(tat, now) + delta * iv end
if new <= now then redis.call('DEL', KEYS[1]) return 1 end
redis.call('SET', KEYS[1], string.format('%.6f', new), 'PX', math.ceil((new - now + burst) * 1000) + 1000)
return 1
"""

# KEYS: pause ; ARGV: seconds -> the pause's end, relative to now (never shortened)
_PAUSE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1e6
local ends = now + tonumber(ARGV[1])
local current = tonumber(redis.call('GET', KEYS[1]) or '0')
if ends > current then
  redis.call('SET', KEYS[1], string.format('%.6f', ends), 'PX', math.ceil(tonumber(ARGV[1]) * 1000) + 1000)
  current = ends
end
return string.format('%.6f', current - now)
"""

# KEYS: pause -> seconds left of the pause (0 when none)
_PAUSED_FOR = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1e6
local ends = tonumber(redis.call('GET', KEYS[1]) or '0')
return string.format('%.6f', math.max(0, ends - now))
"""


class NoBudget(Exception):
    """No budget within the caller's wait: the request should fail, not hang."""

    def __init__(self, endpoint: str, wait_s: float, max_wait_s: float) -> None:
        super().__init__(f"no budget within {max_wait_s:g} s (next start in {wait_s:.1f} s)")
        self.endpoint = endpoint
        self.wait_s = wait_s


@dataclass(frozen=True)
class Grant:
    """What one acquire booked: the token estimate to correct, the seconds it waited."""

    tokens: int
    waited_s: float


def endpoint_key(base_url: str, model: str | None) -> str:
    """A short, stable name for an endpoint and model (a URL may carry credentials)."""
    return hashlib.sha1(f"{base_url.rstrip('/')}|{model or ''}".encode()).hexdigest()[:16]


class RateLimiter:
    """The shared budget and pause of one endpoint; any number of instances, in any
    number of processes, given the same endpoint and prefix, act as one limiter.

    ``rpm`` / ``tpm`` of 0 mean unlimited (the 429 pause still applies). Methods are
    coroutines on the caller's event loop; the async Redis client belongs to that loop.
    Redis errors are let through to the caller, which decides whether to go unlimited.
    """

    def __init__(self, client: aioredis.Redis, endpoint: str, *, rpm: int = 0, tpm: int = 0,
                 prefix: str = "ragq", burst_s: float = BURST_S) -> None:
        self.redis = client
        self.endpoint = endpoint
        self.rpm = max(0, rpm)
        self.tpm = max(0, tpm)
        self.prefix = prefix
        self.burst_s = burst_s
        self._acquire = client.register_script(_ACQUIRE)
        self._correct = client.register_script(_CORRECT)
        self._pause = client.register_script(_PAUSE)
        self._paused_for = client.register_script(_PAUSED_FOR)

    @property
    def limited(self) -> bool:
        return bool(self.rpm or self.tpm)

    def key(self, what: str) -> str:
        return f"{self.prefix}:ratelimit:{self.endpoint}:{what}"

    @property
    def keys(self) -> list[str]:
        return [self.key("requests"), self.key("tokens"), self.key("paused")]

    async def acquire(self, tokens: int = 0, *, max_wait_s: float) -> Grant:
        """Book one request of about ``tokens`` tokens and sleep until it may start.

        Raises :class:`NoBudget`, booking nothing, when the start is more than
        ``max_wait_s`` away. A pause written after the booking (another worker got a
        429 meanwhile) is waited out too, and the request booked again after it, so
        requests that were due during the pause do not all go at its end.
        """
        tokens = max(0, int(tokens))
        started = time.monotonic()
        while True:
            left = max_wait_s - (time.monotonic() - started)
            wait, booked = await self._acquire(keys=self.keys, args=[
                60.0 / self.rpm if self.rpm else 0, 60.0 / self.tpm if self.tpm else 0,
                self.burst_s, tokens, max(0.0, left)])
            wait = float(wait)
            if not int(booked):
                raise NoBudget(self.endpoint, wait, max_wait_s)
            if wait > 0:
                if not self.limited:
                    # Only the pause held it: spread the waiters over a tenth of it, so
                    # they do not all hit the endpoint in the same instant.
                    wait += random.uniform(0, wait / 10)
                await asyncio.sleep(wait)
                if await self.paused_for() > 0:
                    continue
            return Grant(tokens, time.monotonic() - started)

    async def settle(self, grant: Grant, used_tokens: int | None) -> None:
        """Replace the booked estimate by what the response says it used."""
        if not self.tpm or used_tokens is None or used_tokens == grant.tokens:
            return
        await self._correct(keys=[self.key("tokens")],
                            args=[60.0 / self.tpm, self.burst_s, int(used_tokens) - grant.tokens])

    async def pause(self, seconds: float) -> float:
        """Hold every worker's requests for ``seconds`` (capped at MAX_PAUSE_S); a longer
        pause already set stands. Returns the seconds until the pause ends."""
        seconds = min(MAX_PAUSE_S, max(0.0, seconds))
        if seconds <= 0:
            return await self.paused_for()
        return float(await self._pause(keys=[self.key("paused")], args=[seconds]))

    async def paused_for(self) -> float:
        """Seconds left of the endpoint's shared pause (0 when none)."""
        return float(await self._paused_for(keys=[self.key("paused")]))

    async def reset(self) -> None:
        """Forget the budgets and the pause (tests, an operator after a plan change)."""
        await self.redis.delete(*self.keys)

    async def close(self) -> None:
        await self.redis.aclose()

