"""``/health``: Redis, a consumer on each queue, and the store as its owner last reported it.

Nothing is sent to a worker's queue: a store check queued on ``qa`` waited behind bulk
batches and made a busy, healthy deployment answer 503. Consumers come from a broadcast
that each worker's main process answers (not its busy pool process); the store from
:class:`common.store_status.StoreStatus`. The result is computed at most once per
``ttl_s`` however many callers ask, so a load balancer polling many servers costs Redis
and the workers little (and a caller rarely waits for the one-second broadcast).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

import redis
from fastapi.concurrency import run_in_threadpool

from common.config import Settings
from common.store_status import StoreStatus
from producer.client import Client

log = logging.getLogger("ragq.http")

#: Seconds ``/health`` waits for workers to answer the broadcast.
HEALTH_INSPECT_TIMEOUT_S = 1.0
#: Seconds a computed result is served again.
HEALTH_TTL_S = 3.0


class HealthCheck:
    """The checks of ``/health``, cached for ``ttl_s`` and computed by one caller at a time."""

    def __init__(self, client: Client, settings: Settings, scrub: Callable[[str], str], probe: redis.Redis,
                 *, ttl_s: float = HEALTH_TTL_S) -> None:
        self.client = client
        self.settings = settings
        self.scrub = scrub
        self.probe = probe
        self.ttl_s = ttl_s
        self._cached: tuple[float, dict[str, dict[str, Any]]] | None = None
        self._refresh: asyncio.Future[dict[str, dict[str, Any]]] | None = None

    async def checks(self) -> dict[str, dict[str, Any]]:
        """The cached result while fresh; else one refresh for all callers (the stale result
        meanwhile, if it is at most 3 × ``ttl_s`` old)."""
        age = time.monotonic() - self._cached[0] if self._cached else None
        if self._cached and age is not None and age < self.ttl_s:
            return self._cached[1]
        if self._refresh is None or self._refresh.done():
            self._refresh = asyncio.ensure_future(self._run())
        if self._cached and age is not None and age < 3 * self.ttl_s:
            return self._cached[1]
        return await asyncio.shield(self._refresh)

    async def _run(self) -> dict[str, dict[str, Any]]:
        result = await run_in_threadpool(self._compute)
        self._cached = (time.monotonic(), result)
        return result

    def _compute(self) -> dict[str, dict[str, Any]]:
        settings, checks = self.settings, {}
        try:
            self.probe.ping()
            checks["redis"] = {"ok": True}
        except redis.RedisError as exc:
            checks["redis"] = {"ok": False, "error": self.scrub(f"{type(exc).__name__}: {exc}")}
            checks["queues"] = {"ok": False, "error": "not checked: Redis is unreachable"}
            checks["store"] = {"ok": False, "error": "not checked: Redis is unreachable"}
            return checks

        # with the embedded store, its owner consumes the store queue; searches need it too
        embedded = not settings.qdrant_url
        queues = ((settings.interactive_queue, settings.ingest_queue, settings.qa_queue)
                  + ((settings.store_queue,) if embedded else ()))
        consumers = self._consumers(queues)
        missing = [q for q in queues if not consumers.get(q)]
        checks["queues"] = {
            "ok": not missing,
            **{q: {"workers": consumers.get(q, []), "waiting": depth} for q, depth in self.client.queue_depths().items()},
        }
        if missing:
            checks["queues"]["error"] = f"no worker consumes {', '.join(repr(q) for q in missing)}"
        owner_queue = settings.store_queue if embedded else settings.interactive_queue
        for queue in (settings.interactive_queue, owner_queue):
            if not consumers.get(queue):
                checks["store"] = {"ok": False, "error": f"not checked: no worker consumes {queue!r}"}
                return checks
        checks["store"] = self._store()
        return checks

    def _store(self) -> dict[str, Any]:
        try:
            status = StoreStatus(self.client.redis, prefix=self.settings.key_prefix).read()
        except redis.RedisError as exc:
            return {"ok": False, "error": self.scrub(f"{type(exc).__name__}: {exc}")[:500]}
        if status is None:
            return {"ok": False, "error": "no worker has opened the store yet"}
        shown = {"ok": status["ok"], "collection": status.get("name"), "points": status.get("points"),
                 "model": status.get("model"), "backend": status.get("backend"),
                 "reported_at": status["at"], "reported_by": status["by"]}
        if not status["ok"]:
            shown["error"] = self.scrub(status.get("error") or "the store failed")
        return shown

    def _consumers(self, queues: tuple[str, ...]) -> dict[str, list[str]]:
        """Workers consuming each queue, from a broadcast with a short timeout."""
        try:
            replies = self.client.celery.control.inspect(timeout=HEALTH_INSPECT_TIMEOUT_S).active_queues() or {}
        except Exception as exc:  # the broker went away between the ping and the broadcast
            log.warning("inspect failed: %s", type(exc).__name__)
            return {}
        found: dict[str, list[str]] = {q: [] for q in queues}
        for worker, consumed in sorted(replies.items()):
            for queue in consumed or []:
                if queue.get("name") in found:
                    found[queue["name"]].append(worker)
        return found
