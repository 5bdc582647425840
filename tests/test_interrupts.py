"""An interrupt (the worker's soft time limit) passes through common's broad handlers.

Celery raises ``SoftTimeLimitExceeded``, an ``Exception``, from a signal handler in
whatever line the task runs. ``common`` cannot import Celery, so the worker registers
the type (``common.interrupts``); here a stand-in type is registered and raised at the
spots where the soft limit lands in practice: a store call, a call to the store's
owner, the chunker, the generator. Each test first shows that an ordinary failure at
the same spot is still handled (StoreError, an item error, a question error), so the
test fails if the handler swallows the interrupt. The end-to-end case, a real soft
limit in a real worker, is in test_time_limits.py.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
import redis

from common.answering import Answerer
from common.retrieval import Retriever
from common.config import MINILM_MODEL
from common.embedding import Embedder
from common.generators import Conversation, Generation, Generator
from common.ingest import Ingestor
from common.interrupts import register
from common.questions import QuestionReader
from common.remote_store import RemoteStore
from common.schemas import DocumentItem
from common.vectorstore import EdgeStore, StoredChunk, StoreError


class Interrupt(Exception):
    """Stands in for Celery's SoftTimeLimitExceeded (an Exception too)."""


register(Interrupt)


def raising(exc: BaseException):
    def run(*_: object, **__: object) -> None:
        raise exc
    return run


@pytest.fixture(scope="module")
def embedder() -> Embedder:
    return Embedder(MINILM_MODEL, "cpu")


def doc(key: str, text: str) -> DocumentItem:
    return DocumentItem(key=key, item=f"{key}.md", content=text, title=key,
                        version=DocumentItem.version_of(text, key, "", "", {}))


def test_store_call_lets_the_interrupt_through(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = EdgeStore(tmp_path / "c", "c")
    chunk = StoredChunk("00000000-0000-0000-0000-000000000001", np.ones(4, dtype=np.float32), {"model": "m"})
    try:
        monkeypatch.setattr(store, "_upsert", raising(RuntimeError("disk full")))
        with pytest.raises(StoreError, match="upsert failed: .*disk full"):
            store.upsert([chunk])
        monkeypatch.setattr(store, "_upsert", raising(Interrupt()))
        with pytest.raises(Interrupt):
            store.upsert([chunk])
    finally:
        store.close()


def test_call_to_the_store_owner_lets_the_interrupt_through(redis_client: redis.Redis) -> None:
    def remote(transport) -> RemoteStore:
        return RemoteStore(redis_client, transport, collection="c", location="here", queue="store-none")

    with pytest.raises(StoreError, match="count request to the store owner failed"):
        remote(raising(ConnectionError("broker gone"))).count()
    with pytest.raises(Interrupt):
        remote(raising(Interrupt())).count()


def test_chunking_lets_the_interrupt_through(embedder: Embedder, tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    store = EdgeStore(tmp_path / "c", "c")
    try:
        ingestor = Ingestor(embedder, store)
        tokenize = ingestor.chunker._tokenize  # one call per batch, then one per text if it fails

        def failing_on_odd(exc: BaseException):
            return lambda texts: raising(exc)() if any("odd" in t for t in texts) else tokenize(texts)

        monkeypatch.setattr(ingestor.chunker, "_tokenize", failing_on_odd(ValueError("odd text")))
        outcome = ingestor.ingest([doc("a", "Cloud disks can be detached."), doc("b", "odd")])
        assert (outcome.completed, outcome.failed) == (1, 1)  # an ordinary failure is the item's
        monkeypatch.setattr(ingestor.chunker, "_tokenize", failing_on_odd(Interrupt()))
        with pytest.raises(Interrupt):  # the soft limit is the batch's: no item error, no carrying on
            ingestor.ingest([doc("c", "Snapshots are incremental."), doc("d", "odd")])
    finally:
        store.close()


class Failing(Generator):
    model_name = "failing"

    def __init__(self, exc: BaseException) -> None:
        self.exc = exc

    def generate(self, conversations: Sequence[Conversation], *, max_tokens: int | None = None,
                 temperature: float | None = None) -> list[Generation]:
        raise self.exc


def test_generation_lets_the_interrupt_through(embedder: Embedder, tmp_path: Path) -> None:
    store = EdgeStore(tmp_path / "c", "c")
    try:
        Ingestor(embedder, store).ingest([doc("a", "Messages are kept for three days.")])
        questions = list(QuestionReader().read_objects(["How long are messages kept?"]))
        result = Answerer(Retriever(embedder, store), Failing(KeyError("boom")), top_k=1).answer(questions)
        assert result.lines[0]["error"].startswith("generation failed: KeyError")  # a generator bug: per question
        with pytest.raises(Interrupt):
            Answerer(Retriever(embedder, store), Failing(Interrupt()), top_k=1).answer(questions)
    finally:
        store.close()
