"""Worker metrics kept in Redis, for ``ragq metrics`` (Prometheus) and ``ragq top``.

Workers record cheaply: ``metrics.count(documents=3)`` and ``metrics.observe("embed", s)``
(or a :class:`Lap`) only add to an in-process buffer; after each task one pipelined
round trip adds the buffer to the worker's Redis hash (``task_postrun``, wired by
``workers/metrics_hooks.py``; the device a worker reports comes from
``common/devices.py``). The exporter process reads those hashes plus the queue
lengths on every scrape.

Why Redis rather than prometheus_client's multiprocess mode: that mode needs every
process to share one local directory with the exporter, so it cannot see workers on
other hosts or in other containers, and it leaves files behind per dead pid. ragq's
workers already share Redis, so one exporter anywhere sees every worker on every host,
and counters survive worker restarts (Prometheus also copes with resets). The cost is
one pipeline of a dozen ``HINCRBY`` per task, against batches that take seconds.

Only :class:`MetricsStore` knows the keys: ``{prefix}:metrics:workers`` (a set of worker
names), ``{prefix}:metrics:worker:{name}`` (counters and histogram buckets) and
``{prefix}:metrics:worker:{name}:info`` (device, queues, host, last seen).
"""

from __future__ import annotations

import bisect
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from common import priorities

if TYPE_CHECKING:
    import redis

#: Per-batch stage latencies that workers observe (one observation per stage per task).
STAGES = ("tokenize", "embed", "upsert", "search", "generate")
#: Upper bounds (seconds) of the histogram buckets; +Inf is implicit.
BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)

#: Counters workers add to, with the Prometheus name and help text they are served under.
COUNTERS: dict[str, tuple[str, str]] = {
    "documents": ("ragq_documents_embedded_total", "Document items chunked, embedded and stored (a split document counts per segment)."),
    "documents_failed": ("ragq_documents_failed_total", "Document items that failed (per-item errors)."),
    "chunks": ("ragq_chunks_embedded_total", "Chunks embedded and upserted."),
    "tokens": ("ragq_tokens_embedded_total", "Tokens run through the embedding model."),
    "questions": ("ragq_questions_answered_total", "Questions answered."),
    "questions_failed": ("ragq_questions_failed_total", "Questions that failed (per-item errors)."),
    "store_retries": ("ragq_store_retries_total", "Batches retried inside their task after a vector store failure."),
}

# --------------------------------------------------------------------------- recording
class _Buffer:
    """What this process recorded since its last flush (thread-safe, in memory only)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.counters: Counter[str] = Counter()
        self.stages: dict[str, list[float]] = defaultdict(list)

    def take(self) -> tuple[Counter[str], dict[str, list[float]]]:
        with self.lock:
            counters, stages = self.counters, self.stages
            self.counters, self.stages = Counter(), defaultdict(list)
        return counters, stages


_pending = _Buffer()


def take_pending() -> tuple[Counter[str], dict[str, list[float]]]:
    """What was recorded since the last call, for the flush after each task."""
    return _pending.take()


def count(**values: int) -> None:
    """Add to this process's counters, e.g. ``count(documents=3, chunks=40, tokens=9000)``."""
    with _pending.lock:
        for name, value in values.items():
            if value:
                _pending.counters[name] += int(value)


def observe(stage: str, seconds: float) -> None:
    """Record one latency observation of ``stage`` (see :data:`STAGES`)."""
    with _pending.lock:
        _pending.stages[stage].append(float(seconds))


class Lap:
    """A stopwatch for consecutive stages: ``lap = Lap(); ...; lap("tokenize"); ...; lap("embed")``."""

    __slots__ = ("last",)

    def __init__(self) -> None:
        self.last = time.perf_counter()

    def __call__(self, stage: str) -> float:
        now = time.perf_counter()
        seconds, self.last = now - self.last, now
        observe(stage, seconds)
        return seconds


# --------------------------------------------------------------------------- storage
@dataclass
class Histogram:
    """One worker's observations of one stage: per-bucket counts (not cumulative), sum, count."""

    buckets: list[int] = field(default_factory=lambda: [0] * (len(BUCKETS) + 1))
    sum: float = 0.0
    count: int = 0

    def cumulative(self) -> list[tuple[str, float]]:
        out, running = [], 0
        for bound, n in zip((*(repr(b) for b in BUCKETS), "+Inf"), self.buckets):
            running += n
            out.append((bound, float(running)))
        return out

    def quantile(self, q: float) -> float | None:
        """An upper-bound estimate of quantile ``q`` (the bound of the bucket it falls in)."""
        if not self.count:
            return None
        target, running = q * self.count, 0
        for i, n in enumerate(self.buckets):
            running += n
            if running >= target:
                return BUCKETS[i] if i < len(BUCKETS) else float("inf")
        return float("inf")


@dataclass
class WorkerMetrics:
    name: str
    info: dict[str, str] = field(default_factory=dict)
    counters: dict[str, int] = field(default_factory=dict)
    tasks: dict[tuple[str, str], int] = field(default_factory=dict)  # (queue, state) -> n
    stages: dict[str, Histogram] = field(default_factory=dict)

    @property
    def queues(self) -> list[str]:
        return [q for q in self.info.get("queues", "").split(",") if q]

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name, "info": self.info, "counters": self.counters,
            "tasks": [{"queue": q, "state": s, "count": n} for (q, s), n in sorted(self.tasks.items())],
            "stages": {k: {"count": h.count, "sum": round(h.sum, 6), "p50_le": h.quantile(0.5),
                           "p95_le": h.quantile(0.95)} for k, h in sorted(self.stages.items())},
        }


@dataclass
class Snapshot:
    """Everything the exporter and ``ragq top`` show, read in two round trips."""

    taken_at: float
    queues: dict[str, int]
    unacked: int
    workers: dict[str, WorkerMetrics]

    def to_dict(self) -> dict[str, Any]:
        return {"taken_at": self.taken_at, "queues": self.queues, "unacked": self.unacked,
                "workers": {name: w.to_dict() for name, w in sorted(self.workers.items())}}


class MetricsStore:
    """Reads and writes ragq's metric hashes; the only code that knows their keys."""

    #: Redis key of kombu's in-flight (delivered, not yet acked) messages.
    UNACKED_KEY = "unacked"

    def __init__(self, client: redis.Redis, *, prefix: str = "ragq", ttl: int = 7 * 86400) -> None:
        self.redis = client
        self.prefix = prefix
        self.ttl = ttl

    def _index_key(self) -> str:
        return f"{self.prefix}:metrics:workers"

    def _counters_key(self, worker: str) -> str:
        return f"{self.prefix}:metrics:worker:{worker}"

    def _info_key(self, worker: str) -> str:
        return f"{self.prefix}:metrics:worker:{worker}:info"

    # -- worker side --------------------------------------------------------------------
    def flush(
        self,
        worker: str,
        counters: Mapping[str, int] = {},
        stages: Mapping[str, Iterable[float]] = {},
        tasks: Mapping[tuple[str, str], int] = {},
        info: Mapping[str, object] | None = None,
    ) -> None:
        """Add a buffer to ``worker``'s totals and refresh its info, in one round trip."""
        key = self._counters_key(worker)
        pipe = self.redis.pipeline(transaction=False)
        for name, value in counters.items():
            pipe.hincrby(key, f"c:{name}", int(value))
        for (queue, state), value in tasks.items():
            pipe.hincrby(key, f"t:{queue}:{state}", int(value))
        for stage, values in stages.items():
            values = list(values)
            if not values:
                continue
            for index, n in Counter(bisect.bisect_left(BUCKETS, v) for v in values).items():
                pipe.hincrby(key, f"h:{stage}:{index}", n)
            pipe.hincrby(key, f"h:{stage}:count", len(values))
            pipe.hincrbyfloat(key, f"h:{stage}:sum", sum(values))
        pipe.expire(key, self.ttl)
        fields = {"last_seen": repr(time.time()), **{k: str(v) for k, v in (info or {}).items()}}
        pipe.hset(self._info_key(worker), mapping=fields)
        pipe.expire(self._info_key(worker), self.ttl)
        pipe.sadd(self._index_key(), worker)
        pipe.expire(self._index_key(), self.ttl)
        pipe.execute()

    def forget(self, worker: str) -> None:
        """Drop a worker's metrics (e.g. a retired host); counters restart from zero."""
        pipe = self.redis.pipeline()
        pipe.delete(self._counters_key(worker), self._info_key(worker))
        pipe.srem(self._index_key(), worker)
        pipe.execute()

    # -- reading -------------------------------------------------------------------------
    def snapshot(self, queues: Iterable[str] = ()) -> Snapshot:
        names = sorted(_text(n) for n in self.redis.smembers(self._index_key()))
        pipe = self.redis.pipeline(transaction=False)
        for name in names:
            pipe.hgetall(self._counters_key(name))
            pipe.hgetall(self._info_key(name))
        raw = pipe.execute()
        workers: dict[str, WorkerMetrics] = {}
        for i, name in enumerate(names):
            counters, info = raw[2 * i], raw[2 * i + 1]
            if not counters and not info:
                continue  # expired
            workers[name] = _parse_worker(name, counters, info)
        wanted = list(dict.fromkeys([*queues, *(q for w in workers.values() for q in w.queues)]))
        depths = priorities.queue_depths(self.redis, wanted)  # every priority's list
        unacked = self.redis.hlen(self.UNACKED_KEY)
        return Snapshot(time.time(), depths, int(unacked), workers)


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _parse_worker(name: str, counters: Mapping[Any, Any], info: Mapping[Any, Any]) -> WorkerMetrics:
    worker = WorkerMetrics(name, info={_text(k): _text(v) for k, v in info.items()})
    for raw_key, raw_value in counters.items():
        key, value = _text(raw_key), _text(raw_value)
        kind, _, rest = key.partition(":")
        if kind == "c":
            worker.counters[rest] = int(value)
        elif kind == "t":
            queue, _, state = rest.rpartition(":")
            worker.tasks[(queue, state)] = int(value)
        elif kind == "h":
            stage, _, slot = rest.rpartition(":")
            hist = worker.stages.setdefault(stage, Histogram())
            if slot == "sum":
                hist.sum = float(value)
            elif slot == "count":
                hist.count = int(value)
            elif slot.isdigit() and int(slot) < len(hist.buckets):
                hist.buckets[int(slot)] = int(value)
    return worker


# --------------------------------------------------------------------------- reading side
class PrometheusCollector:
    """A prometheus_client collector that reads a :class:`Snapshot` on every scrape."""

    def __init__(self, store: MetricsStore, queues: Iterable[str] = ()) -> None:
        self.store = store
        self.queues = list(queues)

    def describe(self) -> list[Any]:
        return []  # the families depend on what is in Redis; no up-front description

    def collect(self) -> Iterable[Any]:
        import redis
        from prometheus_client.core import (CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily,
                                            InfoMetricFamily)

        up = GaugeMetricFamily("ragq_redis_up", "1 if the exporter could read Redis on this scrape.")
        try:
            snap = self.store.snapshot(self.queues)
        except redis.RedisError:
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up

        depth = GaugeMetricFamily("ragq_queue_depth", "Messages waiting in each queue (Redis LLEN).", labels=["queue"])
        for queue, n in snap.queues.items():
            depth.add_metric([queue], n)
        yield depth
        unacked = GaugeMetricFamily("ragq_broker_unacked_messages",
                                    "Messages delivered to a worker and not yet acked (running or reserved batches).")
        unacked.add_metric([], snap.unacked)
        yield unacked

        workers = sorted(snap.workers.values(), key=lambda w: w.name)
        info = InfoMetricFamily("ragq_worker", "Each worker's host, device and queues.", labels=["worker"])
        online = GaugeMetricFamily("ragq_worker_online", "1 between the worker's start and its clean shutdown.",
                                   labels=["worker"])
        seen = GaugeMetricFamily("ragq_worker_last_seen_timestamp_seconds",
                                 "When the worker last started or finished a task (Unix time).", labels=["worker"])
        memory = GaugeMetricFamily("ragq_worker_gpu_memory_bytes", "GPU memory of the worker's process (torch).",
                                   labels=["worker", "kind"])
        for w in workers:
            labels = {k: w.info.get(k, "") for k in ("host", "device", "gpu", "gpu_name", "queues", "pool")}
            info.add_metric([w.name], labels)
            online.add_metric([w.name], 1.0 if w.info.get("state") == "online" else 0.0)
            if w.info.get("last_seen"):
                seen.add_metric([w.name], float(w.info["last_seen"]))
            for kind in ("peak", "reserved"):
                value = w.info.get(f"gpu_memory_{kind}_bytes")
                if value:
                    memory.add_metric([w.name, kind], float(value))
        yield from (info, online, seen, memory)

        names = sorted({n for w in workers for n in w.counters} | set(COUNTERS))
        for name in names:
            metric, help_text = COUNTERS.get(name, (f"ragq_{name}_total", f"Worker counter {name!r}."))
            family = CounterMetricFamily(metric, help_text, labels=["worker"])
            for w in workers:
                if name in w.counters:
                    family.add_metric([w.name], w.counters[name])
            yield family

        tasks = CounterMetricFamily("ragq_tasks", "Tasks finished per worker, queue and state "
                                    "(succeeded, failed, retried).", labels=["worker", "queue", "state"])
        for w in workers:
            for (queue, state), n in sorted(w.tasks.items()):
                tasks.add_metric([w.name, queue, state], n)
        yield tasks

        stages = HistogramMetricFamily("ragq_stage_duration_seconds", "Per-batch latency of each pipeline stage "
                                       "(tokenize, embed, upsert, search, generate).", labels=["worker", "stage"])
        for w in workers:
            for stage, hist in sorted(w.stages.items()):
                stages.add_metric([w.name, stage], hist.cumulative(), sum_value=hist.sum)
        yield stages


@dataclass
class Throughput:
    """Rates between two snapshots, for ``ragq top``."""

    interval_s: float
    queues: list[dict[str, Any]]
    workers: list[dict[str, Any]]
    unacked: int

    def to_dict(self) -> dict[str, Any]:
        return {"interval_s": round(self.interval_s, 3), "unacked": self.unacked,
                "queues": self.queues, "workers": self.workers}


def throughput(before: Snapshot, after: Snapshot) -> Throughput:
    """Per queue: waiting and tasks/s; per worker: totals, rates and stage latencies."""
    dt = max(after.taken_at - before.taken_at, 1e-9)

    def delta(w: WorkerMetrics, get: Any) -> float:
        prev = before.workers.get(w.name)
        return max(get(w) - (get(prev) if prev else 0), 0) / dt

    done_states = ("succeeded", "failed")
    queues = []
    for queue, waiting in after.queues.items():
        rate = sum(delta(w, lambda m, q=queue: sum(m.tasks.get((q, s), 0) for s in done_states))
                   for w in after.workers.values())
        queues.append({"queue": queue, "waiting": waiting, "tasks_per_s": round(rate, 3),
                       "workers": sorted(w.name for w in after.workers.values() if queue in w.queues
                                         and w.info.get("state") == "online")})
    workers = []
    for w in sorted(after.workers.values(), key=lambda m: m.name):
        tasks = {state: sum(n for (_, s), n in w.tasks.items() if s == state) for state in ("succeeded", "failed", "retried")}
        row: dict[str, Any] = {
            "name": w.name, "state": w.info.get("state", ""), "device": w.info.get("device", ""),
            "gpu": w.info.get("gpu", ""), "gpu_name": w.info.get("gpu_name", ""), "queues": w.queues,
            "last_seen_s": round(after.taken_at - float(w.info["last_seen"]), 1) if w.info.get("last_seen") else None,
            "tasks": tasks, "totals": dict(sorted(w.counters.items())),
        }
        for name in ("documents", "chunks", "tokens", "questions"):
            row[f"{name}_per_s"] = round(delta(w, lambda m, n=name: m.counters.get(n, 0)), 3)
        row["stage_mean_s"] = {stage: round(h.sum / h.count, 4) for stage, h in sorted(w.stages.items()) if h.count}
        workers.append(row)
    return Throughput(dt, queues, workers, after.unacked)
