"""The vector store as the process that opens it last found it, in one Redis hash.

``/health`` used to ask the store through a task on the ``qa`` queue, which waits behind
bulk batches: under load a healthy deployment answered 503. Instead the process that
opens the store writes what it found here (at warm-up, on every ``store_info``, and
whenever a store call starts or stops failing), and ``/health`` reads it together with
the queues' consumers, without sending anything to a worker. Only this class knows the key.
"""

from __future__ import annotations

import json
import os
import socket
import time
from typing import Any

import redis


class StoreStatus:
    """Read and write ``{prefix}:store:status``; every call is one round trip."""

    def __init__(self, client: redis.Redis, *, prefix: str = "ragq", ttl: int = 7 * 86400) -> None:
        self.redis = client
        self.key = f"{prefix}:store:status"
        self.ttl = ttl

    def report(self, *, ok: bool, info: dict[str, Any] | None = None, error: str | None = None) -> None:
        """What this process found; ``info`` (collection, points, model, backend) when it could read it."""
        fields = {"ok": "1" if ok else "0", "at": repr(time.time()), "by": f"{socket.gethostname()}:{os.getpid()}",
                  "error": (error or "")[:500]}
        if info is not None:
            fields["info"] = json.dumps(info, default=str)
        pipe = self.redis.pipeline()
        pipe.hset(self.key, mapping=fields)
        pipe.expire(self.key, self.ttl)
        pipe.execute()

    def read(self) -> dict[str, Any] | None:
        """``{"ok", "at", "by", "error", **info}`` as last reported, or None if nothing ever was."""
        raw = {_text(k): _text(v) for k, v in self.redis.hgetall(self.key).items()}
        if not raw:
            return None
        info = json.loads(raw.get("info") or "{}")
        return {**info, "ok": raw.get("ok") == "1", "at": float(raw.get("at") or 0), "by": raw.get("by"),
                "error": raw.get("error") or None}


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
