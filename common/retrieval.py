"""Retrieval: embed questions in one pass, query the store, return sources.

One :class:`Retriever` per worker process serves the search task and question batches
alike: queries get the model's query prefix, and with ``RAGQ_RETRIEVAL=hybrid`` a BM25
query vector too, so the store fuses the dense and the keyword ranking.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from common.schemas import Source
from common.sparse import Bm25Encoder
from common.vectorstore import Store, StoreMismatchError, spec_difference

if TYPE_CHECKING:  # torch loads in the pool process only, never in Celery's main process
    from common.embedding import Embedder

#: How long a passed collection check holds before the collection is looked at again.
_CHECK_TTL_S = 60.0


@dataclass(frozen=True)
class Query:
    text: str
    top_k: int
    filter: Mapping[str, Any] | None = None


class Retriever:
    """Queries in, the ``top_k`` best distinct documents out (one chunk per document)."""

    def __init__(self, embedder: Embedder, store: Store, *, mode: str = "hybrid") -> None:
        if mode not in ("hybrid", "dense"):
            raise ValueError(f"retrieval mode must be 'hybrid' or 'dense', got {mode!r}")
        self.embedder = embedder
        self.store = store
        self.mode = mode
        self._bm25 = Bm25Encoder() if mode == "hybrid" else None
        self._checked_at = float("-inf")

    def check_collection(self) -> None:
        """Refuse a collection whose vectors were made by another model or with other prefixes.

        Searching it would return neighbours that mean nothing; the error says what differs.
        """
        if time.monotonic() - self._checked_at < _CHECK_TTL_S:
            return
        info = self.store.info()
        if not info.points or info.model is None:
            return  # nothing stored yet: nothing to disagree with
        theirs = {"model": info.model, "query_prefix": info.query_prefix, "document_prefix": info.document_prefix}
        differs = spec_difference(theirs, self.embedder.spec)
        if differs is not None:
            field, have, want = differs
            raise StoreMismatchError(
                f"collection {info.name!r} was built with {field} {have!r}, but this worker "
                f"embeds queries with {field} {want!r}: set RAGQ_EMBED_MODEL / "
                "RAGQ_QUERY_PREFIX / RAGQ_DOCUMENT_PREFIX as they were at ingest, or search another "
                "collection (RAGQ_COLLECTION)"
            )
        self._checked_at = time.monotonic()

    def run(self, queries: Sequence[Query]) -> list[list[Source] | str]:
        """Sources per query, or the reason its retrieval failed (a refused filter, a mismatch).

        One encode call for all queries, one batched store query per distinct
        ``(top_k, filter)``; store failures (StoreError) propagate so the caller can retry.
        """
        if not queries:
            return []
        try:
            self.check_collection()
        except ValueError as exc:
            return [f"retrieval failed: {exc}" for _ in queries]
        texts = [q.text for q in queries]
        vectors = self.embedder.encode_queries(texts)
        terms = self._bm25.queries(texts) if self._bm25 is not None else None
        groups: dict[tuple[int, str], list[int]] = {}
        for row, q in enumerate(queries):
            key = (q.top_k, json.dumps(dict(q.filter or {}), sort_keys=True, ensure_ascii=False))
            groups.setdefault(key, []).append(row)
        results: list[list[Source] | str] = [[] for _ in queries]
        for (top_k, filter_json), rows in groups.items():
            try:
                hits = self.store.search(
                    vectors[rows], top_k=top_k, filter=json.loads(filter_json) or None, distinct_docs=True,
                    sparse=[terms[r] for r in rows] if terms is not None else None,
                )
            except ValueError as exc:  # a refused filter, a collection of another dimension
                for row in rows:
                    results[row] = f"retrieval failed: {exc}"
                continue
            for row, row_hits in zip(rows, hits):
                results[row] = [Source.from_payload(h.payload, h.score) for h in row_hits]
        return results


def retrieve(
    retriever: Retriever,
    queries: Sequence[str],
    *,
    top_k: int = 5,
    filter: Mapping[str, Any] | None = None,
) -> list[list[Source]]:
    """The ``top_k`` best distinct documents for each query; a refused query raises ValueError."""
    rows = retriever.run([Query(q, top_k, filter or None) for q in queries])
    for row in rows:
        if isinstance(row, str):
            raise ValueError(row.removeprefix("retrieval failed: "))
    return rows  # type: ignore[return-value]
