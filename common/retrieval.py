"""Retrieval: embed questions in one pass, run one batched query, return sources."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from common.embedding import Embedder
from common.schemas import Source
from common.vectorstore import Store


def retrieve(
    embedder: Embedder,
    store: Store,
    queries: Sequence[str],
    *,
    top_k: int = 5,
    filter: Mapping[str, Any] | None = None,
) -> list[list[Source]]:
    """The ``top_k`` best distinct documents for each query (one chunk per document)."""
    if not queries:
        return []
    vectors = embedder.encode(list(queries))
    rows = store.search(vectors, top_k=top_k, filter=filter or None, distinct_docs=True)
    return [[Source.from_payload(hit.payload, hit.score) for hit in row] for row in rows]
