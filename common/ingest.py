"""Embed-and-upsert for one batch of documents: chunk, embed, write, prune stale chunks.

Per-item problems (a document that cannot be chunked or embedded) become item errors
and the rest of the batch still lands; store failures raise :class:`StoreError` so
the task can be retried, since they are usually transient.

With :class:`~common.docseq.DocSequences` (workers always have it) a document whose
newer version is already stored is skipped, and after the upsert the batch's versions
are recorded set-if-greater before pruning, so a late or concurrent older batch neither
overwrites nor deletes a newer version (see :mod:`common.docseq`).

Before any chunking, documents whose stored points already carry their content hash
(:meth:`Ingestor.content_hash`: the producer's version hash, source, model, prefixes and
chunk settings) are skipped: their version is adopted in :mod:`common.docseq`
(compare-and-set, so a skip never stands in for a version replaced meanwhile) and their
points are relabelled with its number, costing one store lookup per batch and no
embedding. ``force`` re-embeds them.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
import time
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any


from common import metrics
from common.chunking import Chunk, Chunker
from common.docseq import DocSequences
from common.jobs import BatchOutcome
from common.schemas import DocumentItem, ItemError, point_id
from common.sparse import Bm25Encoder
from common.vectorstore import Store, StoredChunk

if TYPE_CHECKING:  # torch loads in the pool process only, never in Celery's main process
    from common.embedding import Embedder

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

    Room is left for the special tokens, the model's document prefix, and a little for
    re-tokenising a chunk's text, which can differ by a token or two at its edges.
    """
    window = embedder.max_tokens - embedder.special_tokens - embedder.prefix_tokens - 4
    return Chunker(embedder.tokenizer, max_tokens=min(chunk_tokens, window), overlap=overlap)


def failed_outcome(items: Sequence[DocumentItem], reason: str) -> BatchOutcome:
    """Every item of a batch failed for one reason (e.g. the store stayed unreachable)."""
    outcome = BatchOutcome()
    for item in items:
        Ingestor._fail(outcome, item, reason)
    return outcome


class Ingestor:
    """Turns document batches into stored points with one loaded model and one store.

    Every chunk gets its dense vector and its BM25 sparse vector, so one collection
    serves dense and hybrid retrieval alike (the choice is made at query time).
    """

    def __init__(self, embedder: Embedder, store: Store, chunk_tokens: int = 256, overlap: int = 32,
                 sequences: DocSequences | None = None):
        self.embedder = embedder
        self.store = store
        self.sequences = sequences  # None: no ordering between versions (tests, tools)
        self.chunker = make_chunker(embedder, chunk_tokens, overlap)
        self.bm25 = Bm25Encoder()
        # chunks embedded per store write: a few forward passes, so one write overlaps the next embed
        self.group_tokens = 4 * embedder.batch_tokens
        self._embedding_thread: tuple[int, ThreadPoolExecutor] | None = None  # (pid, executor)
        self._collection_ready = False
        self._collection_lock = threading.Lock()

    def ensure_collection(self) -> None:
        # The warm-up thread and the first batch may both get here on a fresh store;
        # creating the collection twice at once fails in the loser.
        with self._collection_lock:
            if not self._collection_ready:
                spec = self.embedder.spec
                self.store.ensure_collection(self.embedder.dimension, spec["model"],
                                             query_prefix=spec["query_prefix"],
                                             document_prefix=spec["document_prefix"])
                self._collection_ready = True

    def ingest(self, items: Sequence[DocumentItem], force: bool = False) -> BatchOutcome:
        started = time.perf_counter()
        outcome = BatchOutcome()
        self.ensure_collection()
        items = list(items) if force else self._skip_unchanged(items, outcome)
        lap = metrics.Lap()  # stage timings: tokenize (chunking), embed, upsert
        prepared: list[_Prepared] = []
        for item, chunks in zip(items, self.chunker.split_many([item.content for item in items])):
            if isinstance(chunks, Exception):  # a tokenizer failure on odd text is this item's problem
                self._fail(outcome, item, f"could not be chunked: {chunks}")
            elif not chunks:
                self._fail(outcome, item, "empty content")
            else:
                prepared.append(_Prepared(item, chunks))
        prepared = self._newest(prepared, outcome)
        lap("tokenize")
        rows = [(p.item, chunk) for p in prepared for chunk in p.chunks]
        outcome.tokens, embed_s, write_s = self._embed_and_write(rows)
        pruning = time.perf_counter()
        if prepared:  # else nothing was written: every document was skipped or failed
            self._prune(prepared)
        for p in prepared:
            self._succeed(outcome, p.item)
        metrics.observe("embed", embed_s)
        metrics.observe("upsert", write_s + time.perf_counter() - pruning)
        outcome.chunks += len(rows)  # after any counted in _skip_unchanged
        outcome.seconds = time.perf_counter() - started
        return outcome

    def _embed_and_write(self, rows: list[tuple[DocumentItem, Chunk]]) -> tuple[int, float, float]:
        """Embed the chunks group by group, writing group k while group k+1 embeds.

        The embedder runs in this ingestor's one embedding thread (torch releases the GIL),
        the store writes stay in the calling task thread (a soft time limit lands there,
        and the store-owner transport is the task's), and at most one group is embedded
        ahead of the writes, so memory stays bounded. Returns the tokens embedded, and the
        seconds spent waiting for embeddings and writing (the stage timings).
        """
        groups = self._groups(rows)
        tokens, embed_s, write_s = 0, 0.0, 0.0
        pending = self._embed_async(groups[0]) if groups else None
        for k, group in enumerate(groups):
            assert pending is not None
            waited = time.perf_counter()
            vectors, stats = pending.result()
            writing = time.perf_counter()
            pending = self._embed_async(groups[k + 1]) if k + 1 < len(groups) else None
            self._write(group, vectors)
            tokens += stats.tokens
            embed_s += writing - waited
            write_s += time.perf_counter() - writing
        return tokens, embed_s, write_s

    def _groups(self, rows: list[tuple[DocumentItem, Chunk]]) -> list[list[tuple[DocumentItem, Chunk]]]:
        """Consecutive runs of chunks of about ``group_tokens`` tokens each."""
        groups: list[list[tuple[DocumentItem, Chunk]]] = []
        size = self.group_tokens + 1
        for row in rows:
            if size > self.group_tokens:
                groups.append([])
                size = 0
            groups[-1].append(row)
            size += row[1].tokens
        return groups

    def _embed_async(self, group: list[tuple[DocumentItem, Chunk]]) -> Future:
        # Made in the process that uses it: an executor inherited through fork has a dead thread
        # it counts as alive, and a task submitted to it would wait forever.
        if self._embedding_thread is None or self._embedding_thread[0] != os.getpid():
            self._embedding_thread = (os.getpid(), ThreadPoolExecutor(1, thread_name_prefix="ragq-embed"))
        return self._embedding_thread[1].submit(
            self.embedder.encode_document_ids_with_stats, [chunk.ids for _, chunk in group])

    def _write(self, group: list[tuple[DocumentItem, Chunk]], vectors: Any) -> None:
        terms = self.bm25.documents([chunk.text for _, chunk in group])
        hashes = {id(item): self.content_hash(item) for item, _ in group}  # one per document, not per chunk
        self.store.upsert([
            StoredChunk(id=point_id(item.key, item.segment, chunk.index, item.seq), vector=vectors[row],
                        payload=self._payload(item, chunk, hashes[id(item)]), sparse=terms[row])
            for row, (item, chunk) in enumerate(group)
        ])

    def _newest(self, prepared: list[_Prepared], outcome: BatchOutcome) -> list[_Prepared]:
        """Drop versions older than one already stored, or than another in this batch.

        A dropped document counts as completed: a newer version of it is (or will be) stored.
        """
        top: dict[str, int] = {}
        for p in prepared:
            top[p.item.key] = max(top.get(p.item.key, p.item.seq), p.item.seq)
        if self.sequences is not None:
            for key, seq in self._stored(list(top)).items():
                top[key] = max(top[key], seq)
        fresh = []
        for p in prepared:
            if p.item.seq < top[p.item.key]:
                log.info("%s: skipped, version %d is older than the stored %d",
                         item_label(p.item), p.item.seq, top[p.item.key])
                self._succeed(outcome, p.item)
            else:
                fresh.append(p)
        return fresh

    def content_hash(self, item: DocumentItem) -> str:
        """What decides whether a stored document can be kept as it is: the producer's
        version hash (text and payload fields), its source and segmentation, and how it
        would be embedded (model, prefixes, chunk window and overlap)."""
        blob = json.dumps([item.version, item.source, item.segments, self.embedder.spec,
                           self.chunker.max_tokens, self.chunker.overlap], sort_keys=True)
        return hashlib.sha1(blob.encode("utf-8")).hexdigest()

    def _skip_unchanged(self, items: Sequence[DocumentItem], outcome: BatchOutcome) -> list[DocumentItem]:
        """Items still to embed; the unchanged ones are counted done (and skipped) here.

        A batch delivered again after its points were written (a store call that timed
        out, a worker killed before recording) finds its own version stored: it is counted
        with its chunks, as its first run would have been, not as skipped, and its pruning
        is done (again)."""
        keys = list(dict.fromkeys(item.key for item in items if item.version))
        if not keys:
            return list(items)
        stored = self.store.stored_versions({"doc_key": keys})
        moves: dict[str, tuple[int, int]] = {}
        same: set[int] = set()  # indices in ``items`` of the unchanged ones
        for n, item in enumerate(items):
            have = stored.get(item.key)
            if (item.version and have is not None and have.content_hash == self.content_hash(item)
                    and item.segment in have.segments and item.seq >= have.doc_seq):
                moves[item.key] = (have.doc_seq, max(item.seq, moves.get(item.key, (0, 0))[1]))
                same.add(n)
        adopted = self.sequences.adopt(moves) if self.sequences is not None else set(moves)
        self.store.relabel({key: moves[key] for key in adopted})
        rest, again = [], []
        for n, item in enumerate(items):
            if n in same and item.key in adopted:
                self._succeed(outcome, item)
                if stored[item.key].doc_seq == item.seq:  # this very version, delivered again
                    outcome.chunks += stored[item.key].points_of(item.segment)
                    again.append(_Prepared(item, []))
                else:
                    outcome.skipped += item.segment == 0
            else:
                rest.append(item)
        if again:  # its points are written; the pruning that follows them may not have been
            self._prune(again)
        return rest

    def _prune(self, prepared: list[_Prepared]) -> None:
        """Delete what this batch's versions replace, after recording them.

        The versions are recorded (set-if-greater) only now that their points are written,
        so the recorded version of a document always has its points. A version that lost
        to a newer one stored meanwhile deletes only its own points: the newer one pruned
        (or will prune) the rest, and points it adopted unchanged must stay.
        """
        mine = {p.item.key: (p.item.seq, p.item.version) for p in prepared}
        if self.sequences is None or not mine:
            self.store.delete_older_many(mine)
            return
        stored = self._advance({key: seq for key, (seq, _) in mine.items()})
        won = {key: keep for key, keep in mine.items() if stored[key] == keep[0]}
        if won:
            self.store.delete_older_many(won)
        for key, (seq, _) in mine.items():
            if key not in won:
                self.store.delete_where({"doc_key": key, "doc_seq": seq})

    def _stored(self, keys: list[str]) -> dict[str, int]:
        # a redis.RedisError propagates: the task waits for Redis as for its job record
        return self.sequences.stored(keys) if self.sequences is not None else {}

    def _advance(self, seqs: dict[str, int]) -> dict[str, int]:
        assert self.sequences is not None
        return self.sequences.advance(seqs)

    def _payload(self, item: DocumentItem, chunk: Chunk, content_hash: str) -> dict:
        payload = dict(item.extra)
        payload.update(
            text=chunk.text, title=item.title, product=item.product, url=item.url,
            source=item.source, content_hash=content_hash,
            doc_key=item.key, doc_version=item.version, doc_seq=item.seq, segment=item.segment,
            segments=item.segments, chunk_index=chunk.index, char_start=chunk.start, **self.embedder.spec,
            # how to make more vectors like these: what a re-index or a switched alias reads back
            embed_model=getattr(self.embedder, "requested_model", self.embedder.model_name), chunk_tokens=self.chunker.max_tokens,
            chunk_overlap=self.chunker.overlap,
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
