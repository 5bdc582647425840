"""BM25 sparse vectors for hybrid retrieval, made with Qdrant's own BM25 (qdrant-edge).

Documents and queries are turned into sparse vectors here, in the process that embeds,
so the embedded store and a Qdrant server index exactly the same thing; the collection
applies IDF (``Modifier.IDF``) at query time, from the points it holds.

Tokenization: Qdrant's multilingual tokenizer segments Chinese into words (卸载 / 云 /
硬盘) where the default one would keep a whole clause as one token, and English words
are stemmed and stop words dropped. That tokenizer discards bare numbers, which in
documentation are often what a user types (error 403, port 6379), so digit runs are
rewritten as ``n403`` words first, in documents and queries alike.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

#: Name of the sparse vector in the collection.
SPARSE_NAME = "bm25"
#: Expected words per chunk, BM25's length normalisation (a 128-token chunk holds ~90).
AVG_CHUNK_WORDS = 90.0

_NUMBER = re.compile(r"(?<![0-9A-Za-z])([0-9]+)(?![0-9A-Za-z])")


@dataclass(frozen=True)
class SparseVector:
    """Indices (term hashes) and weights; JSON-shaped so it can cross processes."""

    indices: list[int]
    values: list[float]

    def to_dict(self) -> dict[str, list]:
        return {"indices": self.indices, "values": self.values}

    @classmethod
    def from_dict(cls, data: dict) -> SparseVector:
        return cls([int(i) for i in data["indices"]], [float(v) for v in data["values"]])


class Bm25Encoder:
    """BM25 term weights for documents (term frequency, length-normalised) and queries (1 per term)."""

    def __init__(self, avg_len: float = AVG_CHUNK_WORDS) -> None:
        import qdrant_edge as qe

        config = qe.Bm25Config(tokenizer=qe.TokenizerType.Multilingual, language="english", avg_len=avg_len)
        self._model = qe.Bm25(config)

    def documents(self, texts: Sequence[str]) -> list[SparseVector]:
        return [self._convert(self._model.embed_document(_words(t))) for t in texts]

    def queries(self, texts: Sequence[str]) -> list[SparseVector]:
        return [self._convert(self._model.embed_query(_words(t))) for t in texts]

    @staticmethod
    def _convert(vector: object) -> SparseVector:
        return SparseVector(list(vector.indices), [float(v) for v in vector.values])  # type: ignore[attr-defined]


def _words(text: str) -> str:
    return _NUMBER.sub(r"n\1", text)
