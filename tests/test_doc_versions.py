"""An older version of a document never replaces or deletes a newer one.

Versions are numbered by the producer as their batches are sent (common.docseq). Two
interleavings are driven here against real Redis and a real embedded store:

* a batch parked by the producer before a newer job of the same document, delivered to
  a real worker only after that job finished (as a redelivery after a worker died);
* two batches of one document running at once: the Ingestor the worker builds
  (``Runtime.ingestor()``), in two threads of this process, with the store calls
  (upsert, prune) of the two released in a fixed order by a turnstile around the real
  store. Items are the producer's own messages, read back from a parked queue.
"""

from __future__ import annotations

import base64
import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from common.priorities import queue_keys
from common.runtime import Runtime
from common.schemas import DocumentItem
from common.vectorstore import EdgeStore, Store
from producer.client import Client
from tests.conftest import Stack

pytestmark = [pytest.mark.fault, pytest.mark.timeout(300)]

#: Version 1 of the page is long (several chunks), version 2 short: leftovers would show.
OLD = "\n\n".join(f"Old paragraph {i}: the retention period of queue messages was three days, "
                  "and the console showed it under the settings tab of every topic. " * 3 for i in range(8))
NEW = "The retention period of queue messages is now seven days."


def page(directory: Path, key: str, content: str) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{key}.json"
    path.write_text(json.dumps({"id": key, "title": key, "product": "MQ", "content": content}))
    return path


def park(settings_stack: Stack, parked: str, path: Path) -> tuple[str, bytes]:
    """Ingest ``path`` through the real producer into a queue no worker reads; returns
    the job id and the raw message (one batch; a one-document job is interactive work)."""
    client = Client(settings_stack.settings(ingest_queue=parked, interactive_queue=parked))
    job = client.ingest([path])
    raw = [raw for key in queue_keys(parked) for raw in client.redis.lrange(key, 0, -1)]
    assert len(raw) == 1, f"expected one parked batch, got {len(raw)}"
    client.redis.delete(*queue_keys(parked))
    return job.id, raw[0].encode() if isinstance(raw[0], str) else raw[0]


def items_of(raw: bytes) -> list[DocumentItem]:
    """The documents of a parked message, as the worker's task decodes them."""
    args = json.loads(base64.b64decode(json.loads(raw)["body"]))[0]
    return [DocumentItem.from_dict(d) for d in args[2]]


def stored(store: Store, key: str) -> list[dict[str, Any]]:
    return store.scroll_payloads({"doc_key": key})


# --- a real worker: the old batch arrives after the newer job finished ---------------------------


@pytest.fixture(scope="module")
def own_stack(redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    s = Stack(redis_url, tmp_path_factory.mktemp("versions"))
    s.start_worker()
    yield s
    s.stop_worker()


def test_old_batch_delivered_after_a_newer_job_changes_nothing(own_stack: Stack, tmp_path: Path) -> None:
    stack = own_stack
    settings = stack.settings()
    client = Client(settings)
    old_job, old_raw = park(stack, f"{settings.ingest_queue}-parked", page(tmp_path / "v1", "page", OLD))
    new = client.ingest([page(tmp_path / "v2", "page", NEW)]).wait(120)
    assert (new.status, new.completed) == ("completed", 1)

    client.redis.lpush(settings.ingest_queue, old_raw)  # the old batch, delivered late
    old = client.job(old_job).wait(120)
    assert (old.status, old.completed, old.failed) == ("completed", 1, 0), old
    points = client.store_info()["points"]

    stack.stop_worker()  # it owns the embedded store: read it directly
    store = EdgeStore(stack.data_dir / "qdrant" / settings.collection, settings.collection)
    try:
        rows = stored(store, "page")
        texts = sorted(r["text"] for r in rows)
    finally:
        store.close()
    print(f"\nafter the late old batch: {points} points, texts {[t[:30] for t in texts]}")
    assert texts == [NEW], f"the old version came back: {len(rows)} points, e.g. {texts[0][:60]!r}"
    assert points == 1


# --- two batches of one document at once, in a fixed order -----------------------------------------


class Turnstile:
    """Holds each thread's store writes (upsert, prune) until the script releases them."""

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.waiting: dict[str, str] = {}  # thread name -> the op it is held at
        self.released: set[tuple[str, str]] = set()
        self.ended: set[str] = set()

    def gate(self, op: str) -> None:
        me = threading.current_thread().name
        with self.cond:
            self.waiting[me] = op
            self.cond.notify_all()
            if not self.cond.wait_for(lambda: (me, op) in self.released, timeout=60):
                raise AssertionError(f"{me} never released at {op}")
            del self.waiting[me]

    def end(self) -> None:
        with self.cond:
            self.ended.add(threading.current_thread().name)
            self.cond.notify_all()

    def settled(self, who: str) -> None:
        """Wait until ``who`` is held at its next write, or has finished."""
        with self.cond:
            if not self.cond.wait_for(lambda: who in self.waiting or who in self.ended, timeout=60):
                raise AssertionError(f"{who} neither reached a store write nor finished")

    def release(self, who: str, op: str) -> None:
        with self.cond:
            assert self.waiting.get(who) == op, f"{who} is at {self.waiting.get(who)}, not {op}"
            self.released.add((who, op))
            self.cond.notify_all()
        with self.cond:
            self.cond.wait_for(lambda: self.waiting.get(who) != op, timeout=60)
        self.settled(who)


class GatedStore:
    """The real store; its writes pass the turnstile first (the op is the method's kind)."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.turnstile: Turnstile | None = None

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self.store, name)
        kind = "upsert" if name == "upsert" else "prune" if name.startswith("delete") else None
        if kind is None or not callable(attr):
            return attr

        def gated(*args: Any, **kwargs: Any) -> Any:
            if self.turnstile is not None:
                self.turnstile.gate(kind)
            return attr(*args, **kwargs)

        return gated


class GatedRuntime(Runtime):
    """The worker's Runtime, its store wrapped so the test orders the two batches' writes."""

    def store_named(self, collection: str) -> Store:
        with self._locks["store"]:
            if collection not in self._stores:
                from common.vectorstore import open_store

                self._stores[collection] = GatedStore(open_store(self.settings, collection))  # type: ignore[assignment]
            return self._stores[collection]


@pytest.fixture(scope="module")
def runtime(redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatedRuntime]:
    stack = Stack(redis_url, tmp_path_factory.mktemp("inproc"))  # settings only: no worker
    rt = GatedRuntime(stack.settings())
    rt.stack = stack  # type: ignore[attr-defined]
    yield rt
    rt.close()


#: Scripts: "start X" runs batch X until its first store write; "X op" releases that write
#: and runs X on to its next one. A is the older version (long), B the newer (short).
SCRIPTS = {
    # A finds B's newer version recorded and skips its document: it writes nothing at all
    "older-runs-after-newer-finished": ["start B", "B upsert", "B prune", "start A"],
    "older-checked-first-written-last": ["start A", "start B", "B upsert", "B prune", "A upsert", "A prune"],
    "crossed-older-prunes-first": ["start A", "A upsert", "start B", "B upsert", "A prune", "B prune"],
    "crossed-newer-prunes-first": ["start A", "A upsert", "start B", "B upsert", "B prune", "A prune"],
}


@pytest.mark.parametrize("script", list(SCRIPTS))
def test_two_batches_of_one_document_end_with_the_newer_version(
    runtime: GatedRuntime, tmp_path: Path, script: str
) -> None:
    stack: Stack = runtime.stack  # type: ignore[attr-defined]
    key = f"page-{script}"
    parked = f"{stack.settings().ingest_queue}-parked"
    batches = {"A": items_of(park(stack, parked, page(tmp_path / "a", key, OLD))[1]),
               "B": items_of(park(stack, parked, page(tmp_path / "b", key, NEW))[1])}
    ingestor = runtime.ingestor()
    ingestor.ensure_collection()
    gated: GatedStore = runtime.store()  # type: ignore[assignment]
    turnstile = gated.turnstile = Turnstile()
    outcomes: dict[str, Any] = {}

    def run() -> None:
        me = threading.current_thread().name
        try:
            outcomes[me] = ingestor.ingest(batches[me])
        except Exception as exc:
            outcomes[me] = exc
        finally:
            turnstile.end()

    threads = {}
    try:
        for step in SCRIPTS[script]:
            who, what = step.split()
            if who == "start":
                threads[what] = threading.Thread(target=run, name=what, daemon=True)
                threads[what].start()
                turnstile.settled(what)
            else:
                turnstile.release(who, what)
        for t in threads.values():
            t.join(60)
    finally:
        gated.turnstile = None
    assert all(not isinstance(o, Exception) and o.completed == 1 for o in outcomes.values()), outcomes

    rows = stored(gated.store, key)
    versions = {r["doc_version"] for r in rows}
    print(f"\n{script}: {len(rows)} points, versions {sorted(versions)}")
    assert rows, "the document was deleted"
    assert [r["text"] for r in rows] == [NEW], f"{len(rows)} points of versions {versions}"
