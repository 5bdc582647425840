"""The vector store behind ingest and question workers, with two interchangeable backends.

* :class:`EdgeStore` runs Qdrant's engine in-process (``qdrant-edge-py``) on a shard
  under ``settings.store_dir / settings.collection``: no server to run, much faster than
  qdrant-client's local mode, but only one process may open the shard at a time.
* :class:`QdrantStore` talks to a Qdrant server through ``qdrant-client`` (or uses the
  client's own local mode for ``path:`` URLs, which is how the server code path is tested).

Both share the logic that must not drift apart (model checks, filters, grouping by
document) in :class:`VectorStore`; the backends only translate single operations.
"""

from __future__ import annotations

import json
import warnings
from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlsplit

import numpy as np
import qdrant_edge as qe
from qdrant_client import QdrantClient
from qdrant_client import models as qm

from common.config import Settings, mask_url

__all__ = [
    "CollectionInfo",
    "EdgeStore",
    "QdrantStore",
    "SearchHit",
    "Store",
    "StoreError",
    "StoreMismatchError",
    "StoredChunk",
    "VectorStore",
    "open_store",
]

#: Payload fields that filters and stale-deletes select on; indexed where the backend can.
INDEXED_FIELDS = ("doc_key", "product")
#: distinct_docs over-fetches top_k * this many chunks first, then grows 4x per round ...
_OVERFETCH = 8
#: ... but never past this many chunks per query (a few huge documents then yield < top_k).
_MAX_FETCH = 20_000
_UPSERT_BATCH = 512
#: Documents per stale-chunk lookup filter (one any-of condition on doc_key).
_KEYS_PER_LOOKUP = 1024
_ALL = 2**62  # a scroll limit that means "every match"


@dataclass(frozen=True)
class StoredChunk:
    id: str  # a UUID string (deterministic, computed by the caller)
    vector: np.ndarray  # float32, shape (dim,)
    payload: dict[str, Any]  # doc_key, doc_version, segment, chunk_index, model, text, ...


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

    def ensure_collection(self, dimension: int, model: str) -> None: ...
    def upsert(self, chunks: Sequence[StoredChunk]) -> None: ...
    def delete_stale(self, doc_key: str, keep_version: str) -> int: ...
    def delete_stale_many(self, keep: Mapping[str, str]) -> int: ...
    def count(self, filter: Mapping[str, Any] | None = None) -> int: ...
    def search(self, vectors: np.ndarray, top_k: int, filter: Mapping[str, Any] | None = None,
               distinct_docs: bool = True) -> list[list[SearchHit]]: ...
    def scroll_payloads(self, filter: Mapping[str, Any] | None = None, limit: int = 10_000) -> list[dict[str, Any]]: ...
    def info(self) -> CollectionInfo: ...
    def close(self) -> None: ...


class VectorStore(ABC):
    """One collection of document chunks; see the module docstring for the backends."""

    backend: str
    name: str
    location: str

    def __init__(self) -> None:
        self._ready: tuple[int, str] | None = None  # last (dimension, model) that passed checks
        self._exists_cached = False
        self._secrets: tuple[str, ...] = ()

    # --- public interface ---------------------------------------------------------

    def ensure_collection(self, dimension: int, model: str) -> None:
        """Create the collection on first use, or prove the existing one fits `model`.

        Mixing models or dimensions in one collection would silently return nonsense
        neighbours, so an incompatible collection is refused with StoreMismatchError.
        """
        if self._ready == (dimension, model):
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
        stored = self._stored_model()
        if stored is not None and stored != model:
            self._mismatch(f"model {stored!r}", f"model {model!r}")
        with self._wrap("create payload indexes"):
            self._ensure_indexes()
        self._exists_cached = True
        self._ready = (dimension, model)

    def upsert(self, chunks: Sequence[StoredChunk]) -> None:
        """Write chunks (same id = overwrite), creating the collection if needed."""
        if not chunks:
            return
        dimension = int(np.asarray(chunks[0].vector).shape[-1])
        models = {c.payload.get("model") for c in chunks}
        if len(models) != 1 or not isinstance(next(iter(models)), str):
            raise ValueError(f"chunks of one upsert need one payload['model'], got {models}")
        for c in chunks:
            if np.asarray(c.vector).shape != (dimension,):
                raise ValueError(f"chunk {c.id}: vector shape {np.shape(c.vector)} != ({dimension},)")
        self.ensure_collection(dimension, models.pop())
        for start in range(0, len(chunks), _UPSERT_BATCH):
            with self._wrap("upsert"):
                self._upsert(chunks[start : start + _UPSERT_BATCH])

    def delete_stale(self, doc_key: str, keep_version: str) -> int:
        """Delete points of doc_key left over from a version other than keep_version."""
        return self.delete_stale_many({doc_key: keep_version})

    def delete_stale_many(self, keep: Mapping[str, str]) -> int:
        """For every doc_key in `keep`, delete its points of any other version than keep[doc_key].

        One lookup (ids and versions of the batch's documents) and one delete by id per
        ~thousand documents, not a count and a delete per document: each call is a round
        trip to a Qdrant server, or to the process that owns the embedded store.
        """
        if not keep or not self._exists():
            return 0
        keys = list(keep)
        stale: list[str] = []
        for start in range(0, len(keys), _KEYS_PER_LOOKUP):
            where = _Where(must=(("doc_key", keys[start : start + _KEYS_PER_LOOKUP]),))
            with self._wrap("find stale chunks"):
                rows = self._scroll(where, _ALL, fields=["doc_key", "doc_version"])
            stale.extend(r["id"] for r in rows if r.get("doc_version") != keep.get(r.get("doc_key")))
        for start in range(0, len(stale), _UPSERT_BATCH):
            with self._wrap("delete stale chunks"):
                self._delete_ids(stale[start : start + _UPSERT_BATCH])
        return len(stale)

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
    ) -> list[list[SearchHit]]:
        """Nearest chunks for every row of `vectors`, in one batched query per round.

        With distinct_docs a document's many chunks must not crowd out other documents,
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
        if not distinct_docs:
            with self._wrap("search"):
                return [_sorted(hits)[:top_k] for hits in self._query(queries, top_k, where)]

        results = empty
        pending = list(range(len(queries)))
        limit = min(top_k * _OVERFETCH, _MAX_FETCH)
        while pending:
            with self._wrap("search"):
                batch = self._query(queries[pending], limit, where)
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
        return CollectionInfo(
            name=self.name,
            points=points,
            dimension=config[0] if config else None,
            distance=config[1] if config else "cosine",
            model=self._stored_model() if points else None,
            backend=self.backend,
            location=self.location,
        )

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

    def _stored_model(self) -> str | None:
        with self._wrap("read a stored point"):
            rows = self._scroll(_Where(), 1, fields=["model"])
        model = rows[0].get("model") if rows else None
        return model if isinstance(model, str) else None

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
        except (StoreError, StoreMismatchError):
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
    def _create(self, dimension: int) -> None: ...

    @abstractmethod
    def _ensure_indexes(self) -> None: ...

    @abstractmethod
    def _upsert(self, chunks: Sequence[StoredChunk]) -> None: ...

    @abstractmethod
    def _count(self, where: _Where) -> int: ...

    @abstractmethod
    def _delete_ids(self, ids: Sequence[str]) -> None: ...

    @abstractmethod
    def _query(self, queries: np.ndarray, limit: int, where: _Where) -> list[list[SearchHit]]:
        """One batched nearest-neighbour query; one list per row of `queries`."""

    @abstractmethod
    def _scroll(
        self, where: _Where, limit: int, fields: list[str] | None = None
    ) -> list[dict[str, Any]]:
        """Payloads (all fields, or only `fields`) with "id" added."""


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


# ----------------------------------------------------------------------------------
# Embedded: qdrant-edge
# ----------------------------------------------------------------------------------


class EdgeStore(VectorStore):
    """Qdrant's engine in-process, one shard directory per collection.

    The shard holds an exclusive lock on its write-ahead log, so a second EdgeStore on the
    same path (in this or any other process) fails with StoreError until close().
    """

    backend = "embedded"
    _CONFIG_FILE = "edge_config.json"  # written by EdgeShard.create next to wal/ and segments/

    def __init__(self, path: Path, collection: str) -> None:
        super().__init__()
        self.path = Path(path)
        self.name = collection
        self.location = str(self.path)
        self._shard: qe.EdgeShard | None = None
        self._dimension: tuple[int, str] | None = None
        self._closed = False
        self._open()  # take the lock now, so a second owner fails at start-up, not mid-job

    def close(self) -> None:
        self._closed = True
        shard, self._shard = self._shard, None
        if shard is not None:
            with self._wrap("close"):
                shard.flush()  # the WAL would replay anyway; flushing makes the next open cheap
                shard.close()

    def optimize(self) -> bool:
        """Build the HNSW index and merge segments; edge never does this on its own.

        Until then every search is an exact scan, fine for tens of thousands of chunks.
        Blocks (seconds per ten thousand 384-d vectors); call it after a large ingest.
        """
        shard = self._open()
        if shard is None:
            return False
        with self._wrap("optimize"):
            return shard.optimize()

    def _open(self) -> qe.EdgeShard | None:
        """The shard, loading it from disk if another call or process created it meanwhile."""
        if self._closed:
            raise StoreError(f"embedded store {self.path} is closed")
        if self._shard is None and (self.path / self._CONFIG_FILE).exists():
            try:
                self._shard = qe.EdgeShard.load(str(self.path))
            except Exception as exc:
                if "WouldBlock" in str(exc):
                    raise StoreError(
                        f"embedded store {self.path} is in use by another process or store "
                        "(only one may open it); stop the other worker, or use a Qdrant server "
                        "(RAGQ_QDRANT_URL) for several workers"
                    ) from exc
                raise StoreError(f"embedded store {self.path}: open failed: {_reason(exc)}") from exc
        return self._shard

    def _require(self) -> qe.EdgeShard:
        shard = self._open()
        if shard is None:
            raise StoreError(f"embedded store {self.path} does not exist; call ensure_collection")
        return shard

    def _vector_config(self) -> tuple[int, str] | None:
        if self._dimension is None and self._open() is not None:
            # EdgeShard exposes no config getter; its own config file is the source of truth.
            try:
                params = json.loads((self.path / self._CONFIG_FILE).read_text())["vectors"][""]
                self._dimension = (int(params["size"]), str(params["distance"]).lower())
            except (OSError, ValueError, KeyError, TypeError) as exc:
                reason = _reason(exc)
                raise StoreError(f"embedded store {self.path}: unreadable config: {reason}") from exc
        return self._dimension

    def _create(self, dimension: int) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        config = qe.EdgeConfig(vectors=qe.EdgeVectorParams(size=dimension, distance=qe.Distance.Cosine))
        self._shard = qe.EdgeShard.create(str(self.path), config)

    def _ensure_indexes(self) -> None:
        shard = self._require()
        have = shard.info().payload_schema
        for name in INDEXED_FIELDS:
            if name not in have:
                shard.update(qe.UpdateOperation.create_field_index(name, qe.PayloadSchemaType.Keyword))

    def _upsert(self, chunks: Sequence[StoredChunk]) -> None:
        points = [
            qe.Point(c.id, np.asarray(c.vector, dtype=np.float32).tolist(), dict(c.payload))
            for c in chunks
        ]
        self._require().update(qe.UpdateOperation.upsert_points(points))

    def _count(self, where: _Where) -> int:
        return self._require().count(qe.CountRequest(exact=True, filter=self._filter(where)))

    def _delete_ids(self, ids: Sequence[str]) -> None:
        self._require().update(qe.UpdateOperation.delete_points(list(ids)))

    def _query(self, queries: np.ndarray, limit: int, where: _Where) -> list[list[SearchHit]]:
        edge_filter = self._filter(where)
        requests = [
            qe.QueryRequest(
                limit=limit, query=qe.Query.Nearest(q.tolist()), filter=edge_filter, with_payload=True
            )
            for q in queries
        ]
        batch = self._require().query_batch(qe.QueryBatchRequest(requests))
        return [
            [SearchHit(str(p.id), float(p.score), dict(p.payload or {})) for p in hits]
            for hits in batch
        ]

    def _scroll(
        self, where: _Where, limit: int, fields: list[str] | None = None
    ) -> list[dict[str, Any]]:
        shard = self._require()
        out: list[dict[str, Any]] = []
        offset = None
        while len(out) < limit:
            request = qe.ScrollRequest(
                offset=offset, limit=min(limit - len(out), 1000), filter=self._filter(where),
                with_payload=fields if fields is not None else True,
            )
            records, offset = shard.scroll(request)
            out.extend({**(r.payload or {}), "id": str(r.id)} for r in records)
            if offset is None or not records:
                break
        return out

    @staticmethod
    def _filter(where: _Where) -> qe.Filter | None:
        def condition(key: str, value: Any) -> qe.FieldCondition:
            match = qe.MatchAny(value) if isinstance(value, list) else qe.MatchValue(value)
            return qe.FieldCondition(key, match=match)

        if not where.must and not where.must_not:
            return None
        return qe.Filter(
            must=[condition(k, v) for k, v in where.must] or None,
            must_not=[condition(k, v) for k, v in where.must_not] or None,
        )


# ----------------------------------------------------------------------------------
# Qdrant server (or qdrant-client local mode)
# ----------------------------------------------------------------------------------


class QdrantStore(VectorStore):
    """A collection on a Qdrant server, or in qdrant-client's local mode (tests)."""

    backend = "qdrant"

    def __init__(
        self, client: QdrantClient, collection: str, location: str, *, secrets: Sequence[str] = ()
    ) -> None:
        """`secrets` (e.g. the API key) are blanked out of any error message."""
        super().__init__()
        self.client = client
        self.name = collection
        self.location = location
        self._secrets = tuple(s for s in secrets if s)
        self._config: tuple[int, str] | None = None

    def close(self) -> None:
        with self._wrap("close"):
            self.client.close()

    def _vector_config(self) -> tuple[int, str] | None:
        if self._config is None:
            with self._wrap("read collection"):
                if not self.client.collection_exists(self.name):
                    return None
                params = self.client.get_collection(self.name).config.params.vectors
            if not isinstance(params, qm.VectorParams):
                self._mismatch("named vectors", "one unnamed cosine vector")
            self._config = (int(params.size), str(params.distance.value).lower())
        return self._config

    def _create(self, dimension: int) -> None:
        params = qm.VectorParams(size=dimension, distance=qm.Distance.COSINE)
        try:
            self.client.create_collection(self.name, vectors_config=params)
        except Exception:
            if not self.client.collection_exists(self.name):  # else another worker won the race
                raise

    def _ensure_indexes(self) -> None:
        with warnings.catch_warnings():
            # local mode warns that payload indexes have no effect there; servers use them.
            warnings.filterwarnings("ignore", message="Payload indexes have no effect")
            for name in INDEXED_FIELDS:
                self.client.create_payload_index(
                    self.name, name, field_schema=qm.PayloadSchemaType.KEYWORD, wait=True
                )

    def _upsert(self, chunks: Sequence[StoredChunk]) -> None:
        points = [
            qm.PointStruct(
                id=c.id, vector=np.asarray(c.vector, dtype=np.float32).tolist(), payload=dict(c.payload)
            )
            for c in chunks
        ]
        self.client.upsert(self.name, points=points, wait=True)

    def _count(self, where: _Where) -> int:
        return self.client.count(self.name, count_filter=self._filter(where), exact=True).count

    def _delete_ids(self, ids: Sequence[str]) -> None:
        self.client.delete(self.name, points_selector=qm.PointIdsList(points=list(ids)), wait=True)

    def _query(self, queries: np.ndarray, limit: int, where: _Where) -> list[list[SearchHit]]:
        client_filter = self._filter(where)
        requests = [
            qm.QueryRequest(query=q.tolist(), limit=limit, filter=client_filter, with_payload=True)
            for q in queries
        ]
        batch = self.client.query_batch_points(self.name, requests=requests)
        return [
            [SearchHit(str(p.id), float(p.score), dict(p.payload or {})) for p in response.points]
            for response in batch
        ]

    def _scroll(
        self, where: _Where, limit: int, fields: list[str] | None = None
    ) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        offset = None
        while len(out) < limit:
            records, offset = self.client.scroll(
                self.name, scroll_filter=self._filter(where), limit=min(limit - len(out), 1000),
                offset=offset, with_payload=fields if fields is not None else True,
            )
            out.extend({**(r.payload or {}), "id": str(r.id)} for r in records)
            if offset is None or not records:
                break
        return out

    @staticmethod
    def _filter(where: _Where) -> qm.Filter | None:
        def condition(key: str, value: Any) -> qm.FieldCondition:
            match = qm.MatchAny(any=value) if isinstance(value, list) else qm.MatchValue(value=value)
            return qm.FieldCondition(key=key, match=match)

        if not where.must and not where.must_not:
            return None
        return qm.Filter(
            must=[condition(k, v) for k, v in where.must] or None,
            must_not=[condition(k, v) for k, v in where.must_not] or None,
        )


def open_store(settings: Settings) -> VectorStore:
    """The configured store: embedded unless RAGQ_QDRANT_URL is http(s)://... or path:...."""
    url = (settings.qdrant_url or "").strip()
    if not url:
        return EdgeStore(settings.store_dir / settings.collection, settings.collection)
    if url.startswith("path:"):
        path = Path(url[len("path:") :]).expanduser()
        try:
            client = QdrantClient(path=str(path))
        except Exception as exc:  # e.g. the folder is locked by another client
            raise StoreError(f"qdrant local store {path}: open failed: {_reason(exc)}") from exc
        return QdrantStore(client, settings.collection, str(path))
    if urlsplit(url).scheme not in ("http", "https"):
        raise ValueError(f"RAGQ_QDRANT_URL must be http(s)://... or path:..., got {mask_url(url)!r}")
    api_key = settings.qdrant_api_key.get_secret_value() if settings.qdrant_api_key else None
    try:
        client = QdrantClient(url=url, api_key=api_key or None, timeout=60)
    except Exception as exc:
        reason = _reason(exc, [api_key or ""])
        raise StoreError(f"qdrant {mask_url(url)}: client setup failed: {reason}") from exc
    return QdrantStore(client, settings.collection, mask_url(url), secrets=[api_key or ""])
