"""Batch records in Redis: what ``POST /v1/batches`` was asked, and how its batch ended.

A batch is a question job (:class:`common.jobs.JobRecord`) plus this record, which keeps
what OpenAI's ``Batch`` object has and the job has not: the endpoint, input file,
window, metadata, the cancel and expiry times, and once finalized, the final status,
counts and output/error file ids. Only this module knows its keys
(``{prefix}:batch:{id}``, the index ``{prefix}:batches`` and a finalizing lock).
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import redis

#: Final statuses: once one is recorded the batch never changes again.
FINAL = ("completed", "failed", "cancelled", "expired")


@dataclass
class BatchState:
    """The stored fields of one batch (times are Unix seconds)."""

    id: str
    job_id: str
    endpoint: str
    input_file_id: str
    completion_window: str
    created_at: int
    expires_at: int
    metadata: dict[str, str] | None = None
    in_progress_at: int | None = None
    cancelling_at: int | None = None
    finalizing_at: int | None = None
    final: str | None = None  # one of FINAL once finalized
    final_at: int | None = None
    output_file_id: str | None = None
    error_file_id: str | None = None
    errors: list[dict[str, Any]] | None = None
    counts: dict[str, int] = field(default_factory=dict)


_JSON_FIELDS = {"metadata", "errors", "counts"}
_INT_FIELDS = {"created_at", "expires_at", "in_progress_at", "cancelling_at", "finalizing_at", "final_at"}


class BatchRecord:
    """One batch's record; every method is one round trip."""

    def __init__(self, client: redis.Redis, batch_id: str, *, prefix: str = "ragq", ttl: int = 30 * 86400) -> None:
        self.redis = client
        self.id = batch_id
        self.prefix = prefix
        self.ttl = ttl

    # -- keys (nowhere else) ------------------------------------------------------
    @property
    def key(self) -> str:
        return f"{self.prefix}:batch:{self.id}"

    @property
    def lock_key(self) -> str:
        return f"{self.key}:finalizing"

    @classmethod
    def index_key(cls, prefix: str) -> str:
        return f"{prefix}:batches"

    @staticmethod
    def new_id() -> str:
        return f"batch_{uuid.uuid4().hex}"

    # -- writing ------------------------------------------------------------------
    def create(self, state: BatchState) -> None:
        pipe = self.redis.pipeline()
        pipe.hset(self.key, mapping=_encode({k: v for k, v in state.__dict__.items() if v is not None}))
        pipe.expire(self.key, self.ttl)
        pipe.zadd(self.index_key(self.prefix), {self.id: state.created_at})
        pipe.zremrangebyscore(self.index_key(self.prefix), "-inf", time.time() - self.ttl)
        pipe.expire(self.index_key(self.prefix), self.ttl)
        pipe.execute()

    def update(self, **values: Any) -> None:
        """Set fields of a batch that is not final yet (a final one never changes)."""
        if self.redis.hget(self.key, "final"):
            return
        self.redis.hset(self.key, mapping=_encode(values))

    def mark(self, name: str, now: int) -> None:
        """Set a timestamp field once (``cancelling_at``, ``finalizing_at``): later calls keep the first."""
        self.redis.hsetnx(self.key, name, now)

    def lock(self, seconds: int) -> bool:
        """Take the right to finalize for ``seconds`` (one API server writes the output files)."""
        return bool(self.redis.set(self.lock_key, "1", nx=True, ex=seconds))

    def unlock(self) -> None:
        self.redis.delete(self.lock_key)

    # -- reading ------------------------------------------------------------------
    def load(self) -> BatchState | None:
        raw = self.redis.hgetall(self.key)
        if not raw:
            return None
        data = {(k.decode() if isinstance(k, bytes) else k): (v.decode() if isinstance(v, bytes) else v)
                for k, v in raw.items()}
        values: dict[str, Any] = {}
        for name in BatchState.__dataclass_fields__:
            if name not in data or data[name] == "":
                continue
            value: Any = data[name]
            if name in _JSON_FIELDS:
                value = json.loads(value)
            elif name in _INT_FIELDS:
                value = int(float(value))
            values[name] = value
        return BatchState(**values)

    @classmethod
    def page(cls, client: redis.Redis, *, prefix: str, after: str | None, limit: int) -> tuple[list[str], bool]:
        """Batch ids, newest first, after the id ``after``; (ids, has_more)."""
        index = cls.index_key(prefix)
        start = 0
        if after is not None:
            rank = client.zrevrank(index, after)
            if rank is None:
                return [], False
            start = rank + 1
        ids = client.zrevrange(index, start, start + limit)  # one more than asked: is there a next page?
        ids = [i.decode() if isinstance(i, bytes) else i for i in ids]
        return ids[:limit], len(ids) > limit


def _encode(values: dict[str, Any]) -> dict[str, str | int]:
    out: dict[str, str | int] = {}
    for name, value in values.items():
        if name in _JSON_FIELDS:
            out[name] = json.dumps(value, ensure_ascii=False) if value is not None else ""
        else:
            out[name] = "" if value is None else value
    return out
