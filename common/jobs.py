"""Job records in Redis: status, counts, per-item errors and results.

Only this module knows ragq's Redis keys (``{prefix}:job:{id}`` and its companions).
A record is one hash plus a list of errors; counters change through one Lua script per
batch, so a batch that is delivered twice (a worker killed after its work, before its
ack) is counted once, and the job's final status is decided atomically with the last
batch. Every write refreshes the record's expiry in the same round trip. A job that
reaches a final status is announced on ``{prefix}:jobs:finished`` (PUBLISH of its id, in
the same script), so a waiter (the HTTP server's ``/v1/answer``) needs no polling loop.
A job created with a webhook URL is also pushed, in that script, onto the durable list
``{prefix}:jobs:ended``, from which the webhook sender makes its event: a worker does one
RPUSH more and never waits on a receiver.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import redis

from common.docseq import DocSequences
from common.schemas import ItemError, JobKind, JobStatus

if TYPE_CHECKING:
    from redis.asyncio import Redis as AsyncRedis

_FINALIZE = """
local function announce(job, ended, channel, id)
  redis.call('PUBLISH', channel, id)
  if redis.call('HEXISTS', job, 'webhook_url') == 1 then redis.call('RPUSH', ended, id) end
end

local function finalize(job, now, channel, id, ended)
  local st = redis.call('HGET', job, 'status')
  if st ~= 'queued' and st ~= 'in_progress' then return end
  if redis.call('HGET', job, 'sealed') ~= '1' then return end
  local done = tonumber(redis.call('HGET', job, 'batches_done') or '0')
  local total = tonumber(redis.call('HGET', job, 'batches_total') or '0')
  if done < total then return end
  local failed = tonumber(redis.call('HGET', job, 'failed') or '0')
  local completed = tonumber(redis.call('HGET', job, 'completed') or '0')
  local status = 'completed'
  if failed > 0 then
    if completed == 0 then status = 'failed' else status = 'completed_with_errors' end
  end
  redis.call('HSET', job, 'status', status, 'finished_at', now)
  if not redis.call('HGET', job, 'started_at') then redis.call('HSET', job, 'started_at', now) end
  announce(job, ended, channel, id)
end
"""

# KEYS: job, batches, errors, parts, failed_docs, ended
# ARGV: batch, completed, failed, chunks, tokens, now, ttl, errors_json, parts_json, channel, id, skipped
_FINISH_BATCH = _FINALIZE + """
local job = KEYS[1]
if redis.call('EXISTS', job) == 0 then return -1 end
if redis.call('SADD', KEYS[2], ARGV[1]) == 0 then return 0 end
local completed = tonumber(ARGV[2])
local failed = tonumber(ARGV[3])
for _, p in ipairs(cjson.decode(ARGV[9])) do
  local key, segments, ok = p[1], p[2], p[3]
  redis.call('HSETNX', KEYS[4], key, segments)
  local left = redis.call('HINCRBY', KEYS[4], key, -1)
  if ok == 0 and redis.call('SADD', KEYS[5], key) == 1 then failed = failed + 1 end
  if left == 0 and redis.call('SISMEMBER', KEYS[5], key) == 0 then completed = completed + 1 end
end
redis.call('HINCRBY', job, 'completed', completed)
redis.call('HINCRBY', job, 'failed', failed)
redis.call('HINCRBY', job, 'chunks', ARGV[4])
redis.call('HINCRBY', job, 'tokens', ARGV[5])
redis.call('HINCRBY', job, 'skipped', ARGV[12])
redis.call('HINCRBY', job, 'batches_done', 1)
for _, e in ipairs(cjson.decode(ARGV[8])) do redis.call('RPUSH', KEYS[3], cjson.encode(e)) end
if redis.call('HGET', job, 'status') == 'queued' then
  redis.call('HSET', job, 'status', 'in_progress')
end
if not redis.call('HGET', job, 'started_at') then redis.call('HSET', job, 'started_at', ARGV[6]) end
finalize(job, ARGV[6], ARGV[10], ARGV[11], KEYS[6])
for i = 1, 5 do redis.call('EXPIRE', KEYS[i], ARGV[7]) end
return 1
"""

# KEYS: job, ended ; ARGV: now, ttl, channel, id
_SEAL = _FINALIZE + """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
redis.call('HSET', KEYS[1], 'sealed', '1')
finalize(KEYS[1], ARGV[1], ARGV[3], ARGV[4], KEYS[2])
redis.call('EXPIRE', KEYS[1], ARGV[2])
return 1
"""

# KEYS: job ; ARGV: now
_START = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
if redis.call('HGET', KEYS[1], 'status') == 'queued' then
  redis.call('HSET', KEYS[1], 'status', 'in_progress')
end
redis.call('HSETNX', KEYS[1], 'started_at', ARGV[1])
return 1
"""

# KEYS: job, ended ; ARGV: now, status, reason, channel, id
_END_EARLY = _FINALIZE + """
local st = redis.call('HGET', KEYS[1], 'status')
if not st then return 0 end
if st ~= 'queued' and st ~= 'in_progress' then return 0 end
redis.call('HSET', KEYS[1], 'status', ARGV[2], 'finished_at', ARGV[1])
if ARGV[3] ~= '' then redis.call('HSET', KEYS[1], 'reason', ARGV[3]) end
announce(KEYS[1], KEYS[2], ARGV[4], ARGV[5])
return 1
"""

#: Result batches read per round trip (16 questions each by default: ~1,000 lines, ~1 MB).
RESULT_WINDOW = 64

_COUNTERS = ("total", "completed", "failed", "skipped", "chunks", "tokens", "batches_total", "batches_done")


@dataclass
class BatchOutcome:
    """What one task did with its batch, for :meth:`JobRecord.finish_batch`.

    ``completed``/``failed`` count whole documents (or questions). Segments of a split
    document are reported in ``parts`` as ``(key, segments, ok)`` and counted by the
    record once all of that document's segments are in. ``skipped`` counts, among the
    completed, documents left as stored because they were unchanged (no embedding).
    """

    completed: int = 0
    failed: int = 0
    skipped: int = 0
    chunks: int = 0
    tokens: int = 0
    errors: list[ItemError] = field(default_factory=list)
    parts: list[tuple[str, int, bool]] = field(default_factory=list)
    seconds: float = 0.0


@dataclass
class JobInfo:
    """A snapshot of a job, with the key names ``ragq status --json`` prints."""

    id: str
    kind: str
    status: str
    total: int = 0
    completed: int = 0
    failed: int = 0
    skipped: int = 0  # of the completed: unchanged documents, not embedded again
    chunks: int = 0
    tokens: int = 0
    batches_total: int = 0
    batches_done: int = 0
    created_at: float | None = None
    started_at: float | None = None
    finished_at: float | None = None
    elapsed_s: float | None = None
    throughput: dict[str, float] = field(default_factory=dict)
    reason: str | None = None
    errors: list[dict[str, str]] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def status_enum(self) -> JobStatus:
        return JobStatus(self.status)

    @property
    def is_finished(self) -> bool:
        return JobStatus(self.status).is_terminal

    @property
    def done(self) -> int:
        return self.completed + self.failed

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class JobRecord:
    """A handle on one job's record; cheap to build, every method is one round trip."""

    __slots__ = ("redis", "id", "prefix", "ttl")

    def __init__(self, client: redis.Redis, job_id: str, *, prefix: str = "ragq", ttl: int = 7 * 86400):
        self.redis = client
        self.id = job_id
        self.prefix = prefix
        self.ttl = ttl

    # -- keys (nowhere else) ------------------------------------------------------
    def _key(self, suffix: str = "") -> str:
        return f"{self.prefix}:job:{self.id}{suffix}"

    @property
    def keys(self) -> tuple[str, str, str, str, str]:
        return (self._key(), self._key(":batches"), self._key(":errors"), self._key(":parts"), self._key(":failed_docs"))

    @property
    def results_key(self) -> str:
        return self._key(":results")

    @classmethod
    def index_key(cls, prefix: str) -> str:
        return f"{prefix}:jobs"

    @classmethod
    def ended_key(cls, prefix: str) -> str:
        """The list of ended jobs that have a webhook URL, oldest first, until their event is made."""
        return f"{prefix}:jobs:ended"

    @classmethod
    def ended_ids(cls, client: redis.Redis, *, prefix: str, limit: int = 100) -> list[str]:
        """Ids of ended jobs whose webhook event is not made yet (left in place: see :meth:`forget_ended`)."""
        return [i.decode() if isinstance(i, bytes) else i for i in client.lrange(cls.ended_key(prefix), 0, limit - 1)]

    @classmethod
    def forget_ended(cls, pipe: redis.client.Pipeline, *, prefix: str, job_id: str) -> None:
        """Drop a job from the ended list, in the caller's transaction that queues its event."""
        pipe.lrem(cls.ended_key(prefix), 0, job_id)

    @classmethod
    def finished_channel(cls, prefix: str) -> str:
        """The pub/sub channel on which the id of every job that reaches a final status is sent."""
        return f"{prefix}:jobs:finished"

    # -- producer side -------------------------------------------------------------
    @classmethod
    def create(
        cls,
        client: redis.Redis,
        kind: JobKind,
        *,
        meta: dict[str, Any] | None = None,
        prefix: str = "ragq",
        ttl: int = 7 * 86400,
        job_id: str | None = None,
        webhook_url: str | None = None,
    ) -> JobRecord:
        """A new queued job; with ``webhook_url`` its end is announced there (:mod:`common.webhooks`)."""
        record = cls(client, job_id or uuid.uuid4().hex, prefix=prefix, ttl=ttl)
        now = time.time()
        fields = {"kind": kind.value, "status": JobStatus.queued.value, "created_at": now, "sealed": "0",
                  "meta": json.dumps(meta or {}, ensure_ascii=False)}
        if kind in (JobKind.ingest, JobKind.delete):  # documents sent without a number / a delete's tombstone
            fields["doc_seq"] = DocSequences(client, prefix).reserve(1).start
        fields.update({name: 0 for name in _COUNTERS})
        if webhook_url:
            fields["webhook_url"] = webhook_url
        if not client.hsetnx(record._key(), "kind", kind.value):
            raise ValueError(f"job id {record.id!r} already exists")
        pipe = client.pipeline()
        pipe.hset(record._key(), mapping=fields)
        pipe.expire(record._key(), ttl)
        pipe.zadd(cls.index_key(prefix), {record.id: now})
        pipe.zremrangebyscore(cls.index_key(prefix), "-inf", now - ttl)  # their records have expired
        pipe.expire(cls.index_key(prefix), ttl)
        pipe.execute()
        return record

    def add_items(self, *, items: int = 0, batches: int = 0, errors: Sequence[ItemError] = ()) -> None:
        """Count inputs as the producer streams them; its own rejects count as failed."""
        pipe = self.redis.pipeline()
        if items or errors:
            pipe.hincrby(self._key(), "total", items + len(errors))
        if batches:
            pipe.hincrby(self._key(), "batches_total", batches)
        if errors:
            pipe.hincrby(self._key(), "failed", len(errors))
            pipe.rpush(self._key(":errors"), *(json.dumps(asdict(e), ensure_ascii=False) for e in errors))
            pipe.expire(self._key(":errors"), self.ttl)
        pipe.execute()

    def add_seen(self, keys: Sequence[str]) -> None:
        """Remember the document keys this (sync) ingest sent, for deleting the others after."""
        if keys:
            pipe = self.redis.pipeline()
            pipe.sadd(self._key(":seen"), *keys)
            pipe.expire(self._key(":seen"), self.ttl)
            pipe.execute()

    def seen(self, keys: Sequence[str]) -> set[str]:
        """Which of ``keys`` this ingest sent (see :meth:`add_seen`)."""
        if not keys:
            return set()
        flags = self.redis.smismember(self._key(":seen"), list(keys))
        return {key for key, flag in zip(keys, flags) if flag}

    def update_meta(self, **values: Any) -> None:
        meta = json.loads(self.redis.hget(self._key(), "meta") or "{}")
        meta.update(values)
        self.redis.hset(self._key(), "meta", json.dumps(meta, ensure_ascii=False))

    def seal(self) -> None:
        """The producer has enqueued everything: the job may now finish."""
        self.redis.eval(_SEAL, 2, self._key(), self.ended_key(self.prefix), time.time(), self.ttl,
                        self.finished_channel(self.prefix), self.id)

    def cancel(self) -> bool:
        """Mark the job cancelled; workers skip its remaining batches. False if already over."""
        return self._end_early(JobStatus.cancelled, "")

    def fail(self, reason: str) -> bool:
        return self._end_early(JobStatus.failed, reason)

    def _end_early(self, status: JobStatus, reason: str) -> bool:
        return bool(self.redis.eval(_END_EARLY, 2, self._key(), self.ended_key(self.prefix), time.time(),
                                    status.value, reason,
                                    self.finished_channel(self.prefix), self.id))

    # -- worker side ----------------------------------------------------------------
    def status(self) -> JobStatus:
        return _status(self.redis.hget(self._key(), "status"))

    async def status_async(self, client: AsyncRedis) -> JobStatus:
        """:meth:`status` read with an asyncio client, for a server that waits without a thread."""
        return _status(await client.hget(self._key(), "status"))

    def mark_started(self) -> None:
        """queued -> in_progress when the first batch starts (a no-op afterwards)."""
        self.redis.eval(_START, 1, self._key(), time.time())

    def doc_seq(self) -> int:
        """The version number this job's documents take when their message has none."""
        return int(self.redis.hget(self._key(), "doc_seq") or 0)

    def begin_attempt(self, batch: int) -> int:
        """Count one delivery of ``batch`` and return how many there have been.

        A message whose worker dies mid-batch is delivered again; this count lets the
        task give up after a few tries instead of looping on a poison message.
        """
        pipe = self.redis.pipeline()
        pipe.hincrby(self._key(":attempts"), str(batch), 1)
        pipe.expire(self._key(":attempts"), self.ttl)
        return int(pipe.execute()[0])

    def attempts(self) -> dict[int, int]:
        """Deliveries so far per batch (batches never started are absent)."""
        return {int(k): int(v) for k, v in self.redis.hgetall(self._key(":attempts")).items()}

    def in_flight(self) -> int:
        """Batches a worker has started and not recorded yet (one killed outright stays counted)."""
        pipe = self.redis.pipeline()
        pipe.hkeys(self._key(":attempts"))
        pipe.smembers(self._key(":batches"))
        started, done = pipe.execute()
        return len({int(b) for b in started} - {int(b) for b in done})

    def batch_done(self, batch: int) -> bool:
        return bool(self.redis.sismember(self._key(":batches"), batch))

    def finish_batch(self, batch: int, outcome: BatchOutcome) -> bool:
        """Record a batch's outcome exactly once; False if it was already recorded."""
        errors = json.dumps([asdict(e) for e in outcome.errors], ensure_ascii=False)
        parts = json.dumps([[key, segments, 1 if ok else 0] for key, segments, ok in outcome.parts])
        result = self.redis.eval(
            _FINISH_BATCH, 6, *self.keys, self.ended_key(self.prefix), batch, outcome.completed, outcome.failed,
            outcome.chunks, outcome.tokens, time.time(), self.ttl, errors, parts,
            self.finished_channel(self.prefix), self.id, outcome.skipped,
        )
        return int(result) == 1

    # -- results (question jobs) ------------------------------------------------------
    def save_results(self, batch: int, lines: Sequence[dict[str, Any]]) -> None:
        """Store one batch's output lines; written before :meth:`finish_batch`."""
        pipe = self.redis.pipeline()
        pipe.hset(self.results_key, str(batch), json.dumps(list(lines), ensure_ascii=False))
        pipe.expire(self.results_key, self.ttl)
        pipe.execute()

    def iter_results(self, *, window: int = RESULT_WINDOW) -> Iterator[dict[str, Any]]:
        """Output lines of the batches finished so far, in input order.

        Read ``window`` batches per round trip (HMGET of their indices, 0 to
        ``batches_total``), so memory stays bounded however many questions the job has;
        a batch not finished yet is skipped.
        """
        total = int(self.redis.hget(self._key(), "batches_total") or 0)
        for start in range(0, total, max(1, window)):
            fields = [str(batch) for batch in range(start, min(total, start + max(1, window)))]
            for stored in self.redis.hmget(self.results_key, fields):
                if stored is not None:
                    yield from json.loads(stored)

    # -- reading -------------------------------------------------------------------------
    def webhook_url(self) -> str | None:
        """Where this job's end is announced (kept out of :class:`JobInfo`: a URL may carry a token)."""
        value = self.redis.hget(self._key(), "webhook_url")
        return value.decode() if isinstance(value, bytes) else value

    def info(self, *, max_errors: int = 1000) -> JobInfo:
        pipe = self.redis.pipeline()
        pipe.hgetall(self._key())
        pipe.lrange(self._key(":errors"), 0, max_errors - 1)
        raw, errors = pipe.execute()
        if not raw:
            return JobInfo(id=self.id, kind="", status=JobStatus.not_found.value)
        data = {(k.decode() if isinstance(k, bytes) else k): (v.decode() if isinstance(v, bytes) else v)
                for k, v in raw.items()}
        info = JobInfo(
            id=self.id,
            kind=data.get("kind", ""),
            status=data.get("status", JobStatus.queued.value),
            created_at=_float(data.get("created_at")),
            started_at=_float(data.get("started_at")),
            finished_at=_float(data.get("finished_at")),
            reason=data.get("reason"),
            errors=[json.loads(e) for e in errors],
            meta=json.loads(data.get("meta") or "{}"),
            **{name: int(data.get(name) or 0) for name in _COUNTERS},
        )
        if info.started_at:
            end = info.finished_at or time.time()
            elapsed = max(end - info.started_at, 1e-6)
            info.elapsed_s = round(elapsed, 3)
            info.throughput = {
                "items_per_s": round(info.done / elapsed, 3),
                "chunks_per_s": round(info.chunks / elapsed, 3),
                "tokens_per_s": round(info.tokens / elapsed, 1),
            }
        return info

    @classmethod
    def recent(cls, client: redis.Redis, *, prefix: str = "ragq", limit: int = 20) -> list[str]:
        ids = client.zrevrange(cls.index_key(prefix), 0, limit - 1)
        return [i.decode() if isinstance(i, bytes) else i for i in ids]


def _status(value: str | bytes | None) -> JobStatus:
    return JobStatus(value.decode() if isinstance(value, bytes) else value) if value else JobStatus.not_found


def _float(value: str | None) -> float | None:
    return float(value) if value not in (None, "") else None
