"""When the embedded store builds its HNSW index: after large writes, once the store is idle.

qdrant-edge never indexes on its own: until ``EdgeShard.optimize()`` runs, every search
is an exact scan (milliseconds at ten thousand chunks, tens to hundreds at a million). But
``optimize()`` holds the GIL for its whole run (a thread ticking every 5 ms got one tick
in 7.6 s of indexing 15,000 vectors), so nothing else in the owning process moves while
it runs, and it takes about a minute per 40,000 384-d vectors on two busy cores.

So the process that owns the store runs it from a background thread only when both hold:

* at least ``min_points`` vectors were written since the index last caught up (small
  writes never pay for it; segments below qdrant's indexing threshold stay scanned), and
* no store call came for ``idle_s`` seconds (an ingest job's batches keep coming, so this
  fires once its last batch is stored, not between batches).

A search that arrives meanwhile waits for it; that is the price of an embedded store, and
why a deployment searched while it ingests millions of chunks wants a Qdrant server.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Protocol

log = logging.getLogger(__name__)


class Indexable(Protocol):
    """What the keeper needs of a store (:class:`~common.store_edge.EdgeStore`)."""

    last_used: float  # time.monotonic() of the last store call
    writes: int  # points written since the store was opened

    def unindexed(self) -> int: ...
    def optimize(self) -> bool: ...


class IndexKeeper:
    """A daemon thread that runs ``store.optimize()`` after large writes once the store is idle."""

    def __init__(self, store: Indexable, *, min_points: int = 20_000, idle_s: float = 5.0,
                 poll_s: float = 1.0) -> None:
        self.store = store
        self.min_points = min_points
        self.idle_s = idle_s
        self.poll_s = poll_s
        self.runs = 0  # optimize() calls made, for tests and logs
        self._floor = 0  # unindexed vectors the last optimize() left (below qdrant's threshold)
        self._seen_writes = -1  # store.writes when last checked; -1 = check once at start
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> IndexKeeper:
        if self.min_points > 0 and self._thread is None:
            self._thread = threading.Thread(target=self._run, name="ragq-index-keeper", daemon=True)
            self._thread.start()
        return self

    def stop(self, timeout: float | None = None) -> None:
        """Stop polling; an optimize() already running finishes first (it cannot be interrupted)."""
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)

    def check(self) -> bool:
        """Optimize now if the policy says so; returns whether optimize() ran."""
        writes = self.store.writes
        if writes == self._seen_writes:
            return False
        if time.monotonic() - self.store.last_used < self.idle_s:
            return False
        self._seen_writes = writes
        pending = self.store.unindexed()
        if pending - self._floor < self.min_points:
            return False
        started = time.perf_counter()
        changed = self.store.optimize()
        self.runs += 1
        self._floor = self.store.unindexed()
        log.info("store index: %d unindexed vectors -> %d in %.1fs (changed: %s)",
                 pending, self._floor, time.perf_counter() - started, changed)
        return True

    def _run(self) -> None:
        while not self._stop.wait(self.poll_s):
            try:
                self.check()
            except Exception as exc:  # a closed or failing store: try again after the next writes
                log.warning("store index: optimize failed: %s", exc)
