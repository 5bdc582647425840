"""The vector store behind ingest and question workers, with two interchangeable backends.

* :class:`~common.store_edge.EdgeStore` runs Qdrant's engine in-process (``qdrant-edge-py``)
  on a shard under ``settings.store_dir / settings.collection``: no server to run, much
  faster than qdrant-client's local mode, but only one process may open the shard at a time.
* :class:`~common.store_qdrant.QdrantStore` talks to a Qdrant server through
  ``qdrant-client`` (or uses the client's own local mode for ``path:`` URLs, which is how
  the server code path is tested).

Both share the logic that must not drift apart (model checks, filters, grouping by
document, hybrid fusion's parameters) in :class:`VectorStore`, here; the backends only
translate single operations. Each point holds a dense vector and, for hybrid retrieval,
a BM25 sparse vector (:mod:`common.sparse`) that queries fuse with the dense ranking by
reciprocal rank in Qdrant's own query API.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlsplit

import numpy as np

from common.config import Settings, mask_url
from common.interrupts import interrupts
from common.sparse import SparseVector

__all__ = [
    "CollectionInfo",
    "Keep",
    "EdgeStore",
    "QdrantStore",
    "SearchHit",
    "Store",
    "StoredVersion",
    "StoreError",
    "StoreMismatchError",
    "StoredChunk",
    "VectorStore",
    "open_store",
]

#: Payload fields that filters and stale-deletes select on; indexed where the backend can.
INDEXED_FIELDS = ("doc_key", "product", "source")
#: distinct_docs over-fetches top_k * this many chunks first, then grows 4x per round ...
_OVERFETCH = 8
#: ... but never past this many chunks per query (a few huge documents then yield < top_k).
_MAX_FETCH = 20_000
_UPSERT_BATCH = 512
#: Documents per stale-chunk lookup filter (one any-of condition on doc_key).
_KEYS_PER_LOOKUP = 1024
_ALL = 2**62  # a scroll limit that means "every match"
#: What pruning keeps of one document: its (doc_seq, doc_version); version None = any.
Keep = tuple[int, "str | None"]
#: Reciprocal-rank fusion's k: a hit at rank r adds 1 / (k + r); 60 is the usual choice.
RRF_K = 60
#: Payload fields that say how a collection's vectors were made; all must match to share it.
SPEC_FIELDS = ("model", "query_prefix", "document_prefix")
#: SPEC_FIELDS and what else it takes to embed more points alike (a switched alias, a re-index).
RECIPE_FIELDS = (*SPEC_FIELDS, "embed_model", "chunk_tokens", "chunk_overlap")


@dataclass(frozen=True)
class StoredChunk:
    id: str  # a UUID string (deterministic, computed by the caller)
    vector: np.ndarray  # float32, shape (dim,)
    payload: dict[str, Any]  # doc_key, doc_version, doc_seq, segment, chunk_index, model, text, ...
    sparse: SparseVector | None = None  # BM25 terms of the same text, for hybrid retrieval


@dataclass(frozen=True)
class StoredVersion:
    """What the store holds of one document, for skipping unchanged re-ingests.

    ``content_hash`` is None when its points disagree (two versions mid-prune, or points
    written before hashes were recorded): such a document is re-embedded, never skipped.
    """

    content_hash: str | None
    doc_seq: int
    segments: tuple[int, ...]
    points: tuple[int, ...] = ()  # points of each of ``segments``

    def to_dict(self) -> dict[str, Any]:
        return {"content_hash": self.content_hash, "doc_seq": self.doc_seq, "segments": list(self.segments),
                "points": list(self.points)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> StoredVersion:
        return cls(data["content_hash"], int(data["doc_seq"]), tuple(int(s) for s in data["segments"]),
                   tuple(int(n) for n in data.get("points", ())))

    def points_of(self, segment: int) -> int:
        return dict(zip(self.segments, self.points)).get(segment, 0)


@dataclass(frozen=True)
class SearchHit:
    id: str
    score: float
    payload: dict[str, Any]


@dataclass(frozen=True)
class CollectionInfo:
    name: str
    points: int
    dimension: int | None  # None if the collection does not exist yet
    distance: str  # "cosine"
    model: str | None  # payload["model"] of a stored point, None if empty
    backend: str  # "embedded" | "qdrant"
    location: str  # path or URL with no secrets
    query_prefix: str | None = None  # as recorded with the stored points (None if empty)
    document_prefix: str | None = None
    hybrid: bool = False  # whether the collection holds BM25 sparse vectors
    # how to make more vectors like the stored ones (RAGQ_EMBED_MODEL, chunk window), None if unknown
    embed_model: str | None = None
    chunk_tokens: int | None = None
    chunk_overlap: int | None = None


class StoreError(RuntimeError):
    """The store is unreachable or failed; usually worth retrying later."""


class StoreMismatchError(ValueError):
    """The existing collection cannot hold vectors of the requested model; retrying won't help."""


@dataclass(frozen=True)
class _Where:
    """A backend-neutral filter: exact match (a list means any-of) on payload keys."""

    must: tuple[tuple[str, Any], ...] = ()
    must_not: tuple[tuple[str, Any], ...] = ()

    @classmethod
    def of(cls, filter: Mapping[str, Any] | None) -> _Where:
        return cls(must=tuple((k, _check_value(k, v)) for k, v in (filter or {}).items()))


def _check_value(key: str, value: Any) -> Any:
    """Accept only what both backends match the same way: str, int, or a list of one of them."""
    values = value if isinstance(value, (list, tuple)) else [value]
    for v in values:
        # bool is refused because qdrant-edge matches True as the integer 1, never a JSON true.
        if isinstance(v, bool) or not isinstance(v, (str, int)):
            raise ValueError(f"filter {key!r}: only str or int values are supported, got {v!r}")
    if len({type(v) for v in values}) > 1:  # MatchAny takes a list of one type
        raise ValueError(f"filter {key!r}: mixed str and int values in {value!r}")
    return list(value) if isinstance(value, (list, tuple)) else value


def _reason(exc: BaseException, secrets: Sequence[str] = ()) -> str:
    """A short, single-line, secret-free description of a backend exception."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    for secret in secrets:
        if secret:
            text = text.replace(secret, "***")
    text = text if len(text) <= 200 else text[:197] + "..."
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


class Store(Protocol):
    """What ingestion, retrieval and the workers use of a store.

    A :class:`VectorStore` in this process, or a ``common.remote_store.RemoteStore``
    that asks the one process owning the embedded store to do it.
    """

    backend: str
    name: str
    location: str

    def ensure_collection(self, dimension: int, model: str, *, query_prefix: str = "",
                          document_prefix: str = "") -> None: ...
    def upsert(self, chunks: Sequence[StoredChunk]) -> None: ...
    def delete_older(self, doc_key: str, seq: int, version: str | None = None) -> int: ...
    def delete_older_many(self, keep: Mapping[str, Keep]) -> int: ...
    def stored_versions(self, filter: Mapping[str, Any]) -> dict[str, StoredVersion]: ...
    def relabel(self, moves: Mapping[str, tuple[int, int]]) -> int: ...
    def delete_where(self, filter: Mapping[str, Any]) -> dict[str, int]: ...
    def count(self, filter: Mapping[str, Any] | None = None) -> int: ...
    def search(self, vectors: np.ndarray, top_k: int, filter: Mapping[str, Any] | None = None,
               distinct_docs: bool = True,
               sparse: Sequence[SparseVector] | None = None) -> list[list[SearchHit]]: ...
    def scroll_payloads(self, filter: Mapping[str, Any] | None = None, limit: int = 10_000) -> list[dict[str, Any]]: ...
    def info(self) -> CollectionInfo: ...
    def optimize(self) -> bool: ...
    def close(self) -> None: ...


class VectorStore(ABC):
    """One collection of document chunks; see the module docstring for the backends."""

    backend: str
    name: str
    location: str
    #: Chunks per _upsert call (a backend that batches its own writes takes them all at once).
    _write_batch: int = _UPSERT_BATCH

    def __init__(self) -> None:
        self._ready: tuple[int, str] | None = None  # last (dimension, model) that passed checks
        self._exists_cached = False
        self._secrets: tuple[str, ...] = ()

    # --- public interface ---------------------------------------------------------

    def ensure_collection(self, dimension: int, model: str, *, query_prefix: str = "",
                          document_prefix: str = "") -> None:
        """Create the collection on first use, or prove the existing one fits `model`.

        Mixing models, dimensions or prefixes in one collection would silently return
        nonsense neighbours, so an incompatible collection is refused with
        StoreMismatchError. New collections get a BM25 sparse vector beside the dense one.
        """
        spec = {"model": model, "query_prefix": query_prefix, "document_prefix": document_prefix}
        if self._ready == (dimension, tuple(spec.values())):
            return
        config = self._vector_config()
        if config is None:
            with self._wrap("create collection"):
                self._create(dimension)
            config = self._vector_config()
            if config is None:
                raise StoreError(f"collection {self.name!r} was not created at {self.location}")
        have_dim, distance = config
        if have_dim != dimension or distance != "cosine":
            self._mismatch(f"dimension {have_dim} ({distance})", f"dimension {dimension} (cosine)")
        self.check_spec(spec)
        with self._wrap("create payload indexes"):
            self._ensure_indexes()
        self._exists_cached = True
        self._ready = (dimension, tuple(spec.values()))

    def check_spec(self, spec: Mapping[str, str]) -> None:
        """Raise StoreMismatchError if stored points were made another way than `spec` says.

        Points written before prefixes were recorded count as made without prefixes.
        """
        stored = self._stored_spec()
        differs = spec_difference(stored, spec) if stored is not None else None
        if differs is not None:
            field, have, want = differs
            self._mismatch(f"{field} {have!r}", f"{field} {want!r}")

    def upsert(self, chunks: Sequence[StoredChunk]) -> None:
        """Write chunks (same id = overwrite), creating the collection if needed."""
        if not chunks:
            return
        dimension = int(np.asarray(chunks[0].vector).shape[-1])
        specs = {tuple(str(c.payload.get(f, "")) for f in SPEC_FIELDS) for c in chunks}
        if len(specs) != 1 or not isinstance(chunks[0].payload.get("model"), str):
            raise ValueError(f"chunks of one upsert need one payload['model'] and prefixes, got {specs}")
        for c in chunks:
            if np.asarray(c.vector).shape != (dimension,):
                raise ValueError(f"chunk {c.id}: vector shape {np.shape(c.vector)} != ({dimension},)")
        model, query_prefix, document_prefix = specs.pop()
        self.ensure_collection(dimension, model, query_prefix=query_prefix, document_prefix=document_prefix)
        if any(c.sparse is not None for c in chunks) and not self._has_sparse():
            chunks = [StoredChunk(c.id, c.vector, c.payload) for c in chunks]  # a dense-only collection
        for start in range(0, len(chunks), self._write_batch):
            with self._wrap("upsert"):
                self._upsert(chunks[start : start + self._write_batch])

    def delete_older(self, doc_key: str, seq: int, version: str | None = None) -> int:
        """Delete points of doc_key older than version (seq, version); see delete_older_many."""
        return self.delete_older_many({doc_key: (seq, version)})

    def delete_older_many(self, keep: Mapping[str, Keep]) -> int:
        """For every doc_key in `keep` = {doc_key: (seq, version)}, delete its points that
        are older: a lower ``doc_seq`` (points stored before sequences count as 0), or the
        same one with another ``doc_version`` (unless version is None). A newer version's
        points are never touched, so a late or concurrent older batch cannot remove them.

        One lookup and one delete by id per ~thousand documents, not a count and a delete
        per document: each call is a round trip to a Qdrant server, or to the process that
        owns the embedded store. A server backend deletes by filter instead (no ids travel).
        """
        if not keep or not self._exists():
            return 0
        return self._delete_older(keep)

    def _delete_older(self, keep: Mapping[str, Keep]) -> int:
        """delete_older_many's work: find the stale points' ids, then delete them by id."""
        keys = list(keep)
        stale: list[str] = []
        for start in range(0, len(keys), _KEYS_PER_LOOKUP):
            where = _Where(must=(("doc_key", keys[start : start + _KEYS_PER_LOOKUP]),))
            with self._wrap("find stale chunks"):
                rows = self._scroll(where, _ALL, fields=["doc_key", "doc_seq", "doc_version"])
            stale.extend(r["id"] for r in rows if _older(r, *keep[r["doc_key"]]))
        for start in range(0, len(stale), _UPSERT_BATCH):
            with self._wrap("delete stale chunks"):
                self._delete_ids(stale[start : start + _UPSERT_BATCH])
        return len(stale)

    def stored_versions(self, filter: Mapping[str, Any]) -> dict[str, StoredVersion]:
        """Every document with points matching ``filter`` (e.g. ``{"doc_key": [...]}`` for a
        batch, ``{"source": s}`` for a sync), with its hash, version number and segments.

        One scroll of three small payload fields per lookup, no vectors nor texts.
        """
        where = _Where.of(filter)
        if not self._exists():
            return {}
        with self._wrap("read stored versions"):
            rows = self._scroll(where, _ALL, fields=["doc_key", "doc_seq", "content_hash", "segment"])
        seen: dict[str, tuple[set, set, dict[int, int]]] = {}
        for r in rows:
            if "doc_key" not in r:
                continue
            hashes, seqs, segments = seen.setdefault(str(r["doc_key"]), (set(), set(), {}))
            hashes.add(r.get("content_hash"))
            seqs.add(int(r.get("doc_seq") or 0))
            segment = int(r.get("segment") or 0)
            segments[segment] = segments.get(segment, 0) + 1
        return {key: StoredVersion(next(iter(h)) if len(h) == 1 and len(q) == 1 else None, max(q),
                                   tuple(sorted(g)), tuple(g[n] for n in sorted(g)))
                for key, (h, q, g) in seen.items()}

    def relabel(self, moves: Mapping[str, tuple[int, int]]) -> int:
        """Give the points of each document at version ``old`` the number ``new``
        (``moves`` = {doc_key: (old, new)}): an unchanged re-ingest adopts the stored
        points as its own version instead of embedding them again. Returns points relabelled.
        """
        moves = {k: (int(a), int(b)) for k, (a, b) in moves.items() if int(a) != int(b)}
        if not moves or not self._exists():
            return 0
        keys = list(moves)
        done = 0
        for start in range(0, len(keys), _KEYS_PER_LOOKUP):
            where = _Where(must=(("doc_key", keys[start : start + _KEYS_PER_LOOKUP]),))
            with self._wrap("find points to relabel"):
                rows = self._scroll(where, _ALL, fields=["doc_key", "doc_seq"])
            ids: dict[int, list[str]] = {}
            for r in rows:
                old, new = moves[r["doc_key"]]
                if int(r.get("doc_seq") or 0) == old:
                    ids.setdefault(new, []).append(r["id"])
            for new, group in ids.items():
                with self._wrap("relabel points"):
                    self._set_payload(group, {"doc_seq": new})
                done += len(group)
        return done

    def delete_where(self, filter: Mapping[str, Any]) -> dict[str, int]:
        """Delete every point matching ``filter`` (at least one condition); returns the
        points deleted per doc_key, so a delete job can count documents and chunks."""
        where = _Where.of(filter)
        if not where.must:
            raise ValueError("delete_where needs at least one condition; refusing to delete everything")
        if not self._exists():
            return {}
        with self._wrap("find points to delete"):
            rows = self._scroll(where, _ALL, fields=["doc_key"])
        for start in range(0, len(rows), _UPSERT_BATCH):
            with self._wrap("delete points"):
                self._delete_ids([r["id"] for r in rows[start : start + _UPSERT_BATCH]])
        per_doc: dict[str, int] = {}
        for r in rows:
            key = str(r.get("doc_key", r["id"]))
            per_doc[key] = per_doc.get(key, 0) + 1
        return per_doc

    def count(self, filter: Mapping[str, Any] | None = None) -> int:
        """Exact number of points matching `filter` (0 when the collection is missing)."""
        where = _Where.of(filter)
        if not self._exists():
            return 0
        with self._wrap("count"):
            return self._count(where)

    def search(
        self,
        vectors: np.ndarray,
        top_k: int,
        filter: Mapping[str, Any] | None = None,
        distinct_docs: bool = True,
        sparse: Sequence[SparseVector] | None = None,
    ) -> list[list[SearchHit]]:
        """Nearest chunks for every row of `vectors`, in one batched query per round.

        With `sparse` (one BM25 query vector per row) the dense and the sparse ranking
        are fused by reciprocal rank (scores are then RRF scores, not cosines). With
        distinct_docs a document's many chunks must not crowd out other documents,
        so we over-fetch, keep each doc_key's best chunk, and fetch more for rows that
        still have fewer than top_k documents while the collection has more to give.
        """
        queries = np.asarray(vectors, dtype=np.float32)
        if queries.ndim == 1:
            queries = queries[None, :]
        if queries.ndim != 2:
            raise ValueError(f"vectors must have shape (n, dim), got {queries.shape}")
        where = _Where.of(filter)
        empty: list[list[SearchHit]] = [[] for _ in range(len(queries))]
        if not len(queries) or top_k <= 0 or not self._exists():
            return empty
        config = self._vector_config()
        if config is not None and queries.shape[1] != config[0]:
            raise ValueError(f"query dimension {queries.shape[1]} != collection dimension {config[0]}")
        terms = list(sparse) if sparse is not None else None
        if terms is not None:
            if len(terms) != len(queries):
                raise ValueError(f"{len(terms)} sparse queries for {len(queries)} dense ones")
            if not self._has_sparse():
                raise ValueError(
                    f"collection {self.name!r} holds no BM25 vectors (it was built before hybrid "
                    "retrieval): set RAGQ_RETRIEVAL=dense, or re-ingest into a new collection"
                )
        if not distinct_docs:
            with self._wrap("search"):
                return [_sorted(hits)[:top_k] for hits in self._query(queries, top_k, where, terms)]

        results = empty
        pending = list(range(len(queries)))
        limit = min(top_k * _OVERFETCH, _MAX_FETCH)
        while pending:
            with self._wrap("search"):
                batch = self._query(queries[pending], limit, where,
                                    [terms[row] for row in pending] if terms is not None else None)
            unfinished = []
            for row, hits in zip(pending, batch):
                best = _best_per_doc(hits, top_k)
                exhausted = len(hits) < limit or limit >= _MAX_FETCH
                if len(best) >= top_k or exhausted:
                    results[row] = best
                else:
                    unfinished.append(row)
            pending, limit = unfinished, min(limit * 4, _MAX_FETCH)
        return results

    def scroll_payloads(
        self, filter: Mapping[str, Any] | None = None, limit: int = 10_000
    ) -> list[dict[str, Any]]:
        """Payloads of up to `limit` points, each with its "id" added (tests, inspection)."""
        where = _Where.of(filter)
        if limit <= 0 or not self._exists():
            return []
        with self._wrap("scroll"):
            return self._scroll(where, limit)

    def info(self) -> CollectionInfo:
        """What is stored where, for ``ragq info`` and start-up logs."""
        config = self._vector_config()
        points = self.count() if config is not None else 0
        spec = self._stored_spec(RECIPE_FIELDS) if points else None
        return CollectionInfo(
            name=self.name,
            points=points,
            dimension=config[0] if config else None,
            distance=config[1] if config else "cosine",
            model=spec.get("model") if spec else None,
            backend=self.backend,
            location=self.location,
            query_prefix=spec.get("query_prefix", "") if spec else None,
            document_prefix=spec.get("document_prefix", "") if spec else None,
            hybrid=config is not None and self._has_sparse(),
            embed_model=spec.get("embed_model") if spec else None,
            chunk_tokens=int(spec["chunk_tokens"]) if spec and "chunk_tokens" in spec else None,
            chunk_overlap=int(spec["chunk_overlap"]) if spec and "chunk_overlap" in spec else None,
        )

    def optimize(self) -> bool:
        """Build the vector index now; returns whether anything changed.

        A Qdrant server indexes in the background on its own, so only the embedded
        store overrides this.
        """
        return False

    @abstractmethod
    def close(self) -> None:
        """Flush and release the store; safe to call twice."""

    def __enter__(self) -> VectorStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- helpers shared by the backends -------------------------------------------

    def _exists(self) -> bool:
        if not self._exists_cached:
            self._exists_cached = self._vector_config() is not None
        return self._exists_cached

    def _stored_spec(self, fields: Sequence[str] = SPEC_FIELDS) -> dict[str, str] | None:
        """How the stored points were made (``fields`` of one point), None if there are none."""
        if not self._exists():
            return None
        with self._wrap("read a stored point"):
            rows = self._scroll(_Where(), 1, fields=list(fields))
        if not rows or not isinstance(rows[0].get("model"), str):
            return None
        return {f: str(rows[0][f]) for f in fields if f in rows[0]}

    def _mismatch(self, have: str, want: str) -> None:
        raise StoreMismatchError(
            f"collection {self.name!r} at {self.location} holds vectors of {have}, "
            f"but {want} was requested; set RAGQ_COLLECTION to another name "
            f"or delete the collection {self.name!r} to re-embed into it"
        )

    @contextmanager
    def _wrap(self, what: str) -> Iterator[None]:
        """Turn backend exceptions into StoreError with a short, secret-free reason."""
        try:
            yield
        except (StoreError, StoreMismatchError, *interrupts()):  # a soft time limit ends the batch
            raise
        except Exception as exc:
            raise StoreError(
                f"{self.backend} store {self.location}: {what} failed: {_reason(exc, self._secrets)}"
            ) from exc

    # --- what a backend implements ------------------------------------------------

    @abstractmethod
    def _vector_config(self) -> tuple[int, str] | None:
        """(dimension, lower-case distance) of the collection, None if it does not exist."""

    @abstractmethod
    def _create(self, dimension: int) -> None:
        """Create the collection: one unnamed cosine vector and the SPARSE_NAME sparse vector."""

    @abstractmethod
    def _has_sparse(self) -> bool:
        """Whether the collection has the SPARSE_NAME sparse vector (collections made before hybrid do not)."""

    @abstractmethod
    def _ensure_indexes(self) -> None: ...

    @abstractmethod
    def _upsert(self, chunks: Sequence[StoredChunk]) -> None: ...

    @abstractmethod
    def _count(self, where: _Where) -> int: ...

    @abstractmethod
    def _delete_ids(self, ids: Sequence[str]) -> None: ...

    @abstractmethod
    def _set_payload(self, ids: Sequence[str], values: Mapping[str, Any]) -> None:
        """Set payload fields ``values`` on the points ``ids`` (other fields untouched)."""

    @abstractmethod
    def _query(self, queries: np.ndarray, limit: int, where: _Where,
               sparse: list[SparseVector] | None = None) -> list[list[SearchHit]]:
        """One batched query, one list per row of `queries`: nearest neighbours, or with
        `sparse` the RRF fusion (k=RRF_K) of the dense and sparse top-`limit` rankings."""

    @abstractmethod
    def _scroll(
        self, where: _Where, limit: int, fields: list[str] | None = None
    ) -> list[dict[str, Any]]:
        """Payloads (all fields, or only `fields`) with "id" added."""


def _older(row: Mapping[str, Any], seq: int, version: str | None) -> bool:
    """Whether a stored point (its payload `row`) is older than version (seq, version)."""
    have = int(row.get("doc_seq") or 0)
    return have < seq or (have == seq and version is not None and row.get("doc_version") != version)


def spec_difference(stored: Mapping[str, Any], wanted: Mapping[str, str]) -> tuple[str, str, str] | None:
    """The first of SPEC_FIELDS in `wanted` that `stored` differs on, as (field, stored, wanted).

    A field missing from `stored` (points written before prefixes were recorded) counts as "".
    """
    for field in SPEC_FIELDS:
        if field in wanted and (stored.get(field) or "") != wanted[field]:
            return field, str(stored.get(field) or ""), wanted[field]
    return None


def _sorted(hits: list[SearchHit]) -> list[SearchHit]:
    return sorted(hits, key=lambda h: -h.score)


def _best_per_doc(hits: list[SearchHit], top_k: int) -> list[SearchHit]:
    """The best-scoring hit of each doc_key (points without one count as their own doc)."""
    seen: set[Any] = set()
    best: list[SearchHit] = []
    for hit in _sorted(hits):
        doc = hit.payload.get("doc_key", ("id", hit.id))
        if doc not in seen:
            seen.add(doc)
            best.append(hit)
            if len(best) == top_k:
                break
    return best


def open_store(settings: Settings, collection: str | None = None, *, client: Any = None) -> VectorStore:
    """The configured store: embedded unless RAGQ_QDRANT_URL is http(s)://... or path:....

    ``collection`` opens another physical collection than ``RAGQ_COLLECTION`` (a re-index's
    target, see :mod:`common.live`); ``client`` shares an open Qdrant client (local mode
    locks its folder to one client per process).
    """
    from qdrant_client import QdrantClient

    from common.store_edge import EdgeStore
    from common.store_qdrant import QdrantStore

    name = collection or settings.collection
    url = (settings.qdrant_url or "").strip()
    if not url:
        return EdgeStore(settings.store_dir / name, name)
    if client is not None:
        return QdrantStore(client, name, _qdrant_location(settings), owns_client=False,
                           secrets=[_qdrant_key(settings)])
    if url.startswith("path:"):
        path = Path(url[len("path:") :]).expanduser()
        try:
            client = QdrantClient(path=str(path))
        except Exception as exc:  # e.g. the folder is locked by another client
            raise StoreError(f"qdrant local store {path}: open failed: {_reason(exc)}") from exc
        return QdrantStore(client, name, str(path))
    if urlsplit(url).scheme not in ("http", "https"):
        raise ValueError(f"RAGQ_QDRANT_URL must be http(s)://... or path:..., got {mask_url(url)!r}")
    api_key = _qdrant_key(settings)
    try:
        client = QdrantClient(url=url, api_key=api_key or None, timeout=60,
                              prefer_grpc=settings.qdrant_grpc, grpc_port=settings.qdrant_grpc_port)
    except Exception as exc:
        reason = _reason(exc, [api_key or ""])
        raise StoreError(f"qdrant {mask_url(url)}: client setup failed: {reason}") from exc
    return QdrantStore(client, name, _qdrant_location(settings), secrets=[api_key or ""])


def _qdrant_key(settings: Settings) -> str:
    return settings.qdrant_api_key.get_secret_value() if settings.qdrant_api_key else ""


def _qdrant_location(settings: Settings) -> str:
    url = (settings.qdrant_url or "").strip()
    if url.startswith("path:"):
        return str(Path(url[len("path:") :]).expanduser())
    return mask_url(url) + (f" (gRPC port {settings.qdrant_grpc_port})" if settings.qdrant_grpc else "")


def open_pointer(settings: Settings, store: Any) -> Any:
    """The :mod:`common.live` pointer of ``RAGQ_COLLECTION`` for the store ``store`` is in."""
    from common.live import AliasPointer, FilePointer

    client = getattr(store, "client", None)
    if client is not None and store.backend == "qdrant":
        return AliasPointer(client, settings.collection, wrap=store._wrap)
    return FilePointer(settings.store_dir, settings.collection)


def __getattr__(name: str) -> Any:
    """The backends by their old names (``from common.vectorstore import EdgeStore``)."""
    if name == "EdgeStore":
        from common.store_edge import EdgeStore

        return EdgeStore
    if name == "QdrantStore":
        from common.store_qdrant import QdrantStore

        return QdrantStore
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
