"""The embedded backend: Qdrant's engine in this process (``qdrant-edge-py``)."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import qdrant_edge as qe

from common.sparse import SPARSE_NAME, SparseVector
from common.vectorstore import (
    INDEXED_FIELDS,
    RRF_K,
    SearchHit,
    StoredChunk,
    StoreError,
    VectorStore,
    _reason,
    _Where,
)


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
        self._sparse: bool | None = None
        self._closed = False
        self.last_used = time.monotonic()  # of the last store call; the IndexKeeper waits for idle
        self.writes = 0  # points upserted since open
        self._optimizing = threading.Lock()  # close() waits for a running optimize()
        self._open()  # take the lock now, so a second owner fails at start-up, not mid-job

    def close(self) -> None:
        self._closed = True
        with self._optimizing:
            shard, self._shard = self._shard, None
        if shard is not None:
            with self._wrap("close"):
                shard.flush()  # the WAL would replay anyway; flushing makes the next open cheap
                shard.close()

    def optimize(self) -> bool:
        """Build the HNSW index and merge segments; edge never does this on its own.

        Until then every search is an exact scan, fine for tens of thousands of chunks.
        Blocks, holding the GIL (about a minute per 40,000 384-d vectors on two cores), so
        the owning process calls it when idle (:mod:`common.store_index`) or on
        ``ragq optimize``. Returns whether anything changed. Concurrent calls from other
        threads are safe: qdrant's shard swaps segments under its own locks (as a server's
        optimizers do), and the binding's held GIL makes them wait for the end anyway.
        """
        with self._optimizing:
            shard = self._open()
            if shard is None:
                return False
            with self._wrap("optimize"):
                changed = shard.optimize()
                shard.flush()
                return changed

    def index_info(self) -> dict[str, int]:
        """Segments, points and indexed vectors (dense and BM25 counted separately) of the shard."""
        shard = self._shard if not self._closed else None
        if shard is None:
            return {"segments": 0, "points": 0, "indexed_vectors": 0, "unindexed": 0}
        with self._wrap("read shard info"):
            info = shard.info()
        per_point = 2 if self._has_sparse() else 1  # the BM25 index is always built as points arrive
        unindexed = max(0, info.points_count * per_point - info.indexed_vectors_count)
        return {"segments": info.segments_count, "points": info.points_count,
                "indexed_vectors": info.indexed_vectors_count, "unindexed": unindexed}

    def unindexed(self) -> int:
        """Dense vectors that searches still scan exactly (an estimate from the shard's counts)."""
        return self.index_info()["unindexed"]

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
        self.last_used = time.monotonic()
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
        config = qe.EdgeConfig(
            vectors=qe.EdgeVectorParams(size=dimension, distance=qe.Distance.Cosine),
            sparse_vectors={SPARSE_NAME: qe.EdgeSparseVectorParams(modifier=qe.Modifier.Idf)},
        )
        self._shard = qe.EdgeShard.create(str(self.path), config)

    def _has_sparse(self) -> bool:
        if self._sparse is None and self._open() is not None:
            try:
                config = json.loads((self.path / self._CONFIG_FILE).read_text())
            except (OSError, ValueError) as exc:
                raise StoreError(f"embedded store {self.path}: unreadable config: {_reason(exc)}") from exc
            self._sparse = SPARSE_NAME in (config.get("sparse_vectors") or {})
        return bool(self._sparse)

    def _ensure_indexes(self) -> None:
        shard = self._require()
        have = shard.info().payload_schema
        for name in INDEXED_FIELDS:
            if name not in have:
                shard.update(qe.UpdateOperation.create_field_index(name, qe.PayloadSchemaType.Keyword))

    def _upsert(self, chunks: Sequence[StoredChunk]) -> None:
        points = []
        for c in chunks:
            dense = np.asarray(c.vector, dtype=np.float32).tolist()
            vector: Any = dense if c.sparse is None else {
                "": dense, SPARSE_NAME: qe.SparseVector(c.sparse.indices, c.sparse.values)}
            points.append(qe.Point(c.id, vector, dict(c.payload)))
        self._require().update(qe.UpdateOperation.upsert_points(points))
        self.writes += len(points)

    def _count(self, where: _Where) -> int:
        return self._require().count(qe.CountRequest(exact=True, filter=self._filter(where)))

    def _delete_ids(self, ids: Sequence[str]) -> None:
        self._require().update(qe.UpdateOperation.delete_points(list(ids)))

    def _set_payload(self, ids: Sequence[str], values: Mapping[str, Any]) -> None:
        self._require().update(qe.UpdateOperation.set_payload(list(ids), dict(values)))

    def _query(self, queries: np.ndarray, limit: int, where: _Where,
               sparse: list[SparseVector] | None = None) -> list[list[SearchHit]]:
        edge_filter = self._filter(where)
        if sparse is None:
            requests = [
                qe.QueryRequest(
                    limit=limit, query=qe.Query.Nearest(q.tolist()), filter=edge_filter, with_payload=True
                )
                for q in queries
            ]
        else:
            requests = [
                qe.QueryRequest(
                    limit=limit, query=qe.Fusion.Rrf(k=RRF_K), filter=edge_filter, with_payload=True,
                    prefetches=[
                        qe.Prefetch(limit=limit, query=qe.Query.Nearest(q.tolist()), filter=edge_filter),
                        qe.Prefetch(limit=limit, filter=edge_filter, query=qe.Query.Nearest(
                            qe.SparseVector(terms.indices, terms.values), using=SPARSE_NAME)),
                    ],
                )
                for q, terms in zip(queries, sparse)
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
