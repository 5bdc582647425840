"""Embed-and-upsert for one batch of documents: chunk, embed, write, prune stale chunks.

Per-item problems (a document that cannot be chunked or embedded) become item errors
and the rest of the batch still lands; store failures raise :class:`StoreError` so
the task can be retried, since they are usually transient.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass

from common import metrics
from common.chunking import Chunk, Chunker
from common.embedding import Embedder
from common.jobs import BatchOutcome
from common.schemas import DocumentItem, ItemError, point_id
from common.vectorstore import Store, StoredChunk

log = logging.getLogger(__name__)


@dataclass
class _Prepared:
    item: DocumentItem
    chunks: list[Chunk]


def item_label(item: DocumentItem) -> str:
    """How a (segment of a) document is named in errors."""
    if item.segments > 1:
        return f"{item.item} (part {item.segment + 1} of {item.segments})"
    return item.item


def make_chunker(embedder: Embedder, chunk_tokens: int, overlap: int) -> Chunker:
    """A chunker whose chunks fit ``embedder``'s window.

    Room is left for the special tokens, and a little for re-tokenising a chunk's text,
    which can differ by a token or two at its edges.
    """
    window = embedder.max_tokens - embedder.special_tokens - 4
    return Chunker(embedder.tokenizer, max_tokens=min(chunk_tokens, window), overlap=overlap)


def failed_outcome(items: Sequence[DocumentItem], reason: str) -> BatchOutcome:
    """Every item of a batch failed for one reason (e.g. the store stayed unreachable)."""
    outcome = BatchOutcome()
    for item in items:
        Ingestor._fail(outcome, item, reason)
    return outcome


class Ingestor:
    """Turns document batches into stored points with one loaded model and one store."""

    def __init__(self, embedder: Embedder, store: Store, chunk_tokens: int = 256, overlap: int = 32):
        self.embedder = embedder
        self.store = store
        self.chunker = make_chunker(embedder, chunk_tokens, overlap)
        self._collection_ready = False
        self._collection_lock = threading.Lock()

    def ensure_collection(self) -> None:
        # The warm-up thread and the first batch may both get here on a fresh store;
        # creating the collection twice at once fails in the loser.
        with self._collection_lock:
            if not self._collection_ready:
                self.store.ensure_collection(self.embedder.dimension, self.embedder.model_name)
                self._collection_ready = True

    def ingest(self, items: Sequence[DocumentItem]) -> BatchOutcome:
        started = time.perf_counter()
        outcome = BatchOutcome()
        self.ensure_collection()
        lap = metrics.Lap()  # stage timings: tokenize (chunking), embed, upsert
        prepared: list[_Prepared] = []
        for item in items:
            try:
                chunks = self.chunker.split(item.content)
            except Exception as exc:  # a tokenizer failure on odd text is this item's problem
                self._fail(outcome, item, f"could not be chunked: {exc}")
                continue
            if not chunks:
                self._fail(outcome, item, "empty content")
                continue
            prepared.append(_Prepared(item, chunks))

        texts = [chunk.text for p in prepared for chunk in p.chunks]
        lap("tokenize")
        vectors, stats = self.embedder.encode_with_stats(texts)
        lap("embed")
        points: list[StoredChunk] = []
        row = 0
        for p in prepared:
            for chunk in p.chunks:
                points.append(StoredChunk(
                    id=point_id(p.item.key, p.item.segment, chunk.index),
                    vector=vectors[row],
                    payload=self._payload(p.item, chunk),
                ))
                row += 1
        self.store.upsert(points)
        self.store.delete_stale_many({p.item.key: p.item.version for p in prepared})
        for p in prepared:
            self._succeed(outcome, p.item)
        lap("upsert")
        outcome.chunks = len(points)
        outcome.tokens = stats.tokens
        outcome.seconds = time.perf_counter() - started
        return outcome

    def _payload(self, item: DocumentItem, chunk: Chunk) -> dict:
        payload = dict(item.extra)
        payload.update(
            text=chunk.text, title=item.title, product=item.product, url=item.url,
            doc_key=item.key, doc_version=item.version, segment=item.segment,
            chunk_index=chunk.index, model=self.embedder.model_name,
        )
        return payload

    @staticmethod
    def _succeed(outcome: BatchOutcome, item: DocumentItem) -> None:
        if item.segments > 1:
            outcome.parts.append((item.key, item.segments, True))
        else:
            outcome.completed += 1

    @staticmethod
    def _fail(outcome: BatchOutcome, item: DocumentItem, reason: str) -> None:
        outcome.errors.append(ItemError(item_label(item), reason))
        if item.segments > 1:
            outcome.parts.append((item.key, item.segments, False))
        else:
            outcome.failed += 1
