"""Webhooks: OpenAI-format events, Standard Webhooks signatures and a Redis outbox.

An event is ``{"id": "evt_...", "object": "event", "created_at", "type", "data"}``
(OpenAI's webhook payload). It is signed per the Standard Webhooks scheme: HMAC-SHA256
with the key of a ``whsec_<base64>`` secret over ``{webhook-id}.{webhook-timestamp}.{body}``,
sent as ``webhook-signature: v1,<base64>`` beside ``webhook-id`` and ``webhook-timestamp``.

Events wait in the outbox (:class:`WebhookOutbox`, the only owner of its keys) until a
receiver answers 2xx: a delivery is claimed for a lease, so a sender that dies mid-way
leaves it to be sent again, and it keeps its event id (the ``webhook-id``) on every
attempt. :class:`WebhookSender` retries with exponential backoff up to a maximum number
of attempts, then parks the delivery in a dead set for inspection. Nothing here runs in a
worker: workers only mark a job ended (:meth:`common.jobs.JobRecord.ended_ids`).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import random
import time
import uuid
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import httpx
import redis

log = logging.getLogger("ragq.webhooks")

SECRET_PREFIX = "whsec_"
#: Receivers should refuse a timestamp further than this from their clock (replays).
TOLERANCE_S = 300
#: A receiver's answer kept with a failed delivery, for ``ragq webhooks --dead``.
_ERROR_CHARS = 300

# KEYS: due ; ARGV: now, until, limit -> ids due now, each leased until ``until``
_CLAIM = """
local ids = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[3]))
for _, id in ipairs(ids) do redis.call('ZADD', KEYS[1], ARGV[2], id) end
return ids
"""


# -- events ----------------------------------------------------------------------------------

def event_id(subject: str, type_: str) -> str:
    """A stable event id: one subject reaching one state is one event, however often it is built."""
    return f"evt_{uuid.uuid5(uuid.NAMESPACE_URL, f'ragq/{subject}/{type_}').hex}"


def build_event(type_: str, data: dict[str, Any], *, subject: str, created_at: int) -> dict[str, Any]:
    return {"id": event_id(subject, type_), "object": "event", "created_at": int(created_at), "type": type_,
            "data": data}


def check_url(url: str) -> str:
    """A webhook URL as given, or ValueError saying what is wrong (the one check, CLI and HTTP alike)."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"webhook URL must be an absolute http(s) URL, got {url!r}")
    if len(url) > 2048:
        raise ValueError("webhook URL must be at most 2048 characters")
    return url


# -- Standard Webhooks signatures ------------------------------------------------------------

def secret_key(secret: str) -> bytes:
    """The HMAC key of a ``whsec_<base64>`` secret; ValueError for anything else."""
    if not secret.startswith(SECRET_PREFIX):
        raise ValueError(f"a webhook secret starts with {SECRET_PREFIX!r} (whsec_ + base64 of 24 to 64 random bytes)")
    try:
        key = base64.b64decode(secret.removeprefix(SECRET_PREFIX), validate=True)
    except ValueError:
        raise ValueError("a webhook secret is whsec_ followed by base64") from None
    if len(key) < 16:
        raise ValueError("a webhook secret's key must be at least 16 bytes")
    return key


def new_secret() -> str:
    import secrets

    return SECRET_PREFIX + base64.b64encode(secrets.token_bytes(32)).decode()


def sign(secret: str, msg_id: str, timestamp: int, body: bytes) -> str:
    """The ``webhook-signature`` value: ``v1,`` + base64 HMAC-SHA256 of ``id.timestamp.body``."""
    mac = hmac.new(secret_key(secret), f"{msg_id}.{timestamp}.".encode() + body, hashlib.sha256)
    return "v1," + base64.b64encode(mac.digest()).decode()


def headers(secret: str | None, msg_id: str, timestamp: int, body: bytes) -> dict[str, str]:
    out = {"content-type": "application/json", "webhook-id": msg_id, "webhook-timestamp": str(timestamp),
           "user-agent": "ragq-webhooks"}
    if secret:
        out["webhook-signature"] = sign(secret, msg_id, timestamp, body)
    return out


def verify(secret: str, received: dict[str, str], body: bytes, *, now: float | None = None) -> bool:
    """Whether a delivery's headers carry a valid signature of ``body`` with a fresh timestamp."""
    lower = {k.lower(): v for k, v in received.items()}
    try:
        timestamp = int(lower["webhook-timestamp"])
        expected = sign(secret, lower["webhook-id"], timestamp, body).split(",", 1)[1]
    except (KeyError, ValueError):
        return False
    if abs((now or time.time()) - timestamp) > TOLERANCE_S:
        return False
    given = [s.split(",", 1)[1] for s in lower.get("webhook-signature", "").split() if s.startswith("v1,")]
    return any(hmac.compare_digest(expected, s) for s in given)


# -- the outbox ------------------------------------------------------------------------------

@dataclass
class Delivery:
    """One event on its way to one URL."""

    id: str  # the event id, sent as webhook-id on every attempt
    url: str
    body: bytes
    attempts: int = 0
    last_error: str | None = None


class WebhookOutbox:
    """Events not yet accepted by their receiver; only this class knows the keys.

    ``{prefix}:webhooks:due`` (zset: event id -> when to send next), one hash per
    delivery ``{prefix}:webhooks:delivery:{id}`` (url, body, attempts, last_error) and
    ``{prefix}:webhooks:dead`` (zset of deliveries that used up their attempts).
    """

    def __init__(self, client: redis.Redis, *, prefix: str = "ragq", ttl: int = 7 * 86400) -> None:
        self.redis = client
        self.prefix = prefix
        self.ttl = ttl

    @property
    def due_key(self) -> str:
        return f"{self.prefix}:webhooks:due"

    @property
    def dead_key(self) -> str:
        return f"{self.prefix}:webhooks:dead"

    def _key(self, delivery_id: str) -> str:
        return f"{self.prefix}:webhooks:delivery:{delivery_id}"

    def add(self, event: dict[str, Any], url: str, *, pipe: redis.client.Pipeline | None = None) -> None:
        """Queue ``event`` for ``url``; adding the same event again changes nothing."""
        body = json.dumps(event, ensure_ascii=False, separators=(",", ":"))
        p = pipe if pipe is not None else self.redis.pipeline()
        key = self._key(event["id"])
        p.hsetnx(key, "url", url)
        p.hsetnx(key, "body", body)
        p.hsetnx(key, "attempts", 0)
        p.expire(key, self.ttl)
        p.zadd(self.due_key, {event["id"]: time.time()}, nx=True)
        if pipe is None:
            p.execute()

    def claim(self, *, limit: int = 20, lease_s: float = 60.0) -> list[Delivery]:
        """Deliveries due now, each leased to the caller for ``lease_s`` (then due again)."""
        now = time.time()
        ids = self.redis.eval(_CLAIM, 1, self.due_key, now, now + lease_s, limit)
        out = []
        for raw in ids:
            delivery_id = raw.decode() if isinstance(raw, bytes) else raw
            found = self.get(delivery_id)
            if found is None:  # expired: nothing left to send
                self.redis.zrem(self.due_key, delivery_id)
            else:
                out.append(found)
        return out

    def get(self, delivery_id: str) -> Delivery | None:
        data = {(k.decode() if isinstance(k, bytes) else k): v for k, v in self.redis.hgetall(self._key(delivery_id)).items()}
        if "body" not in data or "url" not in data:
            return None

        def text(value: Any) -> str:
            return value.decode() if isinstance(value, bytes) else str(value)

        return Delivery(id=delivery_id, url=text(data["url"]),
                        body=data["body"] if isinstance(data["body"], bytes) else str(data["body"]).encode(),
                        attempts=int(data.get("attempts") or 0),
                        last_error=text(data["last_error"]) if data.get("last_error") else None)

    def delivered(self, delivery_id: str) -> None:
        pipe = self.redis.pipeline()
        pipe.zrem(self.due_key, delivery_id)
        pipe.delete(self._key(delivery_id))
        pipe.execute()

    def failed(self, delivery_id: str, error: str, *, retry_at: float | None) -> None:
        """Count a failed attempt; send again at ``retry_at``, or park it (None: attempts used up)."""
        pipe = self.redis.pipeline()
        pipe.hincrby(self._key(delivery_id), "attempts", 1)
        pipe.hset(self._key(delivery_id), "last_error", error[:_ERROR_CHARS])
        if retry_at is None:
            pipe.zrem(self.due_key, delivery_id)
            pipe.zadd(self.dead_key, {delivery_id: time.time()})
            pipe.expire(self.dead_key, self.ttl)
        else:
            pipe.zadd(self.due_key, {delivery_id: retry_at}, xx=True)
        pipe.expire(self._key(delivery_id), self.ttl)
        pipe.execute()

    def pending(self) -> int:
        return int(self.redis.zcard(self.due_key))

    def dead(self, limit: int = 100) -> list[Delivery]:
        ids = self.redis.zrevrange(self.dead_key, 0, limit - 1)
        found = (self.get(i.decode() if isinstance(i, bytes) else i) for i in ids)
        return [d for d in found if d is not None]


class WebhookSender:
    """Sends due deliveries; a 2xx removes one, anything else schedules it again with backoff."""

    def __init__(self, outbox: WebhookOutbox, *, secret: str | None, timeout_s: float = 10.0,
                 max_attempts: int = 8, backoff_s: float = 5.0, max_backoff_s: float = 3600.0) -> None:
        self.outbox = outbox
        self.secret = secret
        self.timeout_s = timeout_s
        self.max_attempts = max_attempts
        self.backoff_s = backoff_s
        self.max_backoff_s = max_backoff_s
        self.http = httpx.Client(timeout=timeout_s, follow_redirects=False)

    def close(self) -> None:
        self.http.close()

    def retry_delay(self, attempts: int) -> float:
        """Seconds before attempt ``attempts + 1``: doubling from ``backoff_s``, jittered by up to 10%."""
        return min(self.max_backoff_s, self.backoff_s * 2 ** (attempts - 1)) * (1 + random.random() / 10)

    def send_due(self, limit: int = 20) -> int:
        """Attempt every delivery due now (up to ``limit``); how many were accepted."""
        accepted = 0
        for delivery in self.outbox.claim(limit=limit, lease_s=self.timeout_s + 30):
            accepted += self.attempt(delivery)
        return accepted

    def attempt(self, delivery: Delivery) -> bool:
        timestamp = int(time.time())
        try:
            response = self.http.post(delivery.url, content=delivery.body,
                                      headers=headers(self.secret, delivery.id, timestamp, delivery.body))
            if 200 <= response.status_code < 300:
                self.outbox.delivered(delivery.id)
                return True
            error = f"HTTP {response.status_code}: {response.text[:_ERROR_CHARS]}"
        except httpx.HTTPError as exc:
            error = f"{type(exc).__name__}: {exc}"
        attempts = delivery.attempts + 1
        if attempts >= self.max_attempts:
            log.warning("webhook %s to %s gave up after %d attempts: %s", delivery.id, delivery.url, attempts, error)
            self.outbox.failed(delivery.id, error, retry_at=None)
        else:
            self.outbox.failed(delivery.id, error, retry_at=time.time() + self.retry_delay(attempts))
        return False
