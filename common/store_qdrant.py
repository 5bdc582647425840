"""The server backend: a Qdrant server through ``qdrant-client`` (or its local mode)."""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from qdrant_client import QdrantClient
from qdrant_client import models as qm

from common.sparse import SPARSE_NAME, SparseVector
from common.vectorstore import (
    _KEYS_PER_LOOKUP, INDEXED_FIELDS, RRF_K, Keep, SearchHit, StoredChunk, VectorStore, _Where,
)


class QdrantStore(VectorStore):
    """A collection on a Qdrant server, or in qdrant-client's local mode (tests)."""

    backend = "qdrant"
    #: upload_points splits an ingest batch itself (UPLOAD_BATCH points per request)
    _write_batch = 1 << 30
    #: Points per write request: a few hundred 384-d points with payload are ~1 MB, well
    #: under a server's 32 MB REST and 4 MB gRPC message limits, and amortise the round trip.
    UPLOAD_BATCH = 256

    def __init__(
        self, client: QdrantClient, collection: str, location: str, *, secrets: Sequence[str] = (),
        owns_client: bool = True,
    ) -> None:
        """`secrets` (e.g. the API key) are blanked out of any error message; a store on a
        shared client (``owns_client=False``) leaves it open when closed."""
        super().__init__()
        self.client = client
        self.owns_client = owns_client
        self.name = collection
        self.location = location
        self._secrets = tuple(s for s in secrets if s)
        self._config: tuple[int, str] | None = None
        self._sparse: bool | None = None

    def close(self) -> None:
        if self.owns_client:
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

    def _has_sparse(self) -> bool:
        if self._sparse is None:
            with self._wrap("read collection"):
                sparse = self.client.get_collection(self.name).config.params.sparse_vectors or {}
            self._sparse = SPARSE_NAME in sparse
        return self._sparse

    def _create(self, dimension: int) -> None:
        params = qm.VectorParams(size=dimension, distance=qm.Distance.COSINE)
        sparse = {SPARSE_NAME: qm.SparseVectorParams(modifier=qm.Modifier.IDF)}
        try:
            self.client.create_collection(self.name, vectors_config=params, sparse_vectors_config=sparse)
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
            # the range condition of stale-chunk deletes (_older_filter)
            self.client.create_payload_index(self.name, "doc_seq", field_schema=qm.PayloadSchemaType.INTEGER, wait=True)

    def _upsert(self, chunks: Sequence[StoredChunk]) -> None:
        points = []
        for c in chunks:
            dense = np.asarray(c.vector, dtype=np.float32).tolist()
            vector: Any = dense if c.sparse is None else {
                "": dense, SPARSE_NAME: qm.SparseVector(indices=c.sparse.indices, values=c.sparse.values)}
            points.append(qm.PointStruct(id=c.id, vector=vector, payload=dict(c.payload)))
        # One process per worker: parallel > 1 would fork uploaders, which a Celery prefork
        # child (a daemonic process) may not have; the workers are the parallelism. Point
        # ids are deterministic, so upload_points' own retries of a batch are idempotent.
        self.client.upload_points(self.name, points=points, batch_size=self.UPLOAD_BATCH, parallel=1,
                                  max_retries=3, wait=True)

    def _delete_older(self, keep: Mapping[str, Keep]) -> int:
        """Stale chunks deleted by one filter per ~thousand documents, evaluated by the server,
        instead of their ids scrolled over the network and sent back: a count (the number is
        the caller's) and a delete, whatever the number of stale points."""
        keys = list(keep)
        deleted = 0
        for start in range(0, len(keys), _KEYS_PER_LOOKUP):
            stale = qm.Filter(should=[_older_filter(key, *keep[key]) for key in keys[start : start + _KEYS_PER_LOOKUP]])
            with self._wrap("count stale chunks"):
                found = self.client.count(self.name, count_filter=stale, exact=True).count
            if found:
                with self._wrap("delete stale chunks"):
                    self.client.delete(self.name, points_selector=qm.FilterSelector(filter=stale), wait=True)
            deleted += found
        return deleted

    def _count(self, where: _Where) -> int:
        return self.client.count(self.name, count_filter=self._filter(where), exact=True).count

    def _delete_ids(self, ids: Sequence[str]) -> None:
        self.client.delete(self.name, points_selector=qm.PointIdsList(points=list(ids)), wait=True)

    def _set_payload(self, ids: Sequence[str], values: Mapping[str, Any]) -> None:
        self.client.set_payload(self.name, payload=dict(values), points=list(ids), wait=True)

    def _query(self, queries: np.ndarray, limit: int, where: _Where,
               sparse: list[SparseVector] | None = None) -> list[list[SearchHit]]:
        client_filter = self._filter(where)
        if sparse is None:
            requests = [
                qm.QueryRequest(query=q.tolist(), limit=limit, filter=client_filter, with_payload=True)
                for q in queries
            ]
        else:
            requests = [
                qm.QueryRequest(
                    query=qm.RrfQuery(rrf=qm.Rrf(k=RRF_K)), limit=limit, filter=client_filter,
                    with_payload=True,
                    prefetch=[
                        qm.Prefetch(query=q.tolist(), limit=limit, filter=client_filter),
                        qm.Prefetch(query=qm.SparseVector(indices=terms.indices, values=terms.values),
                                    using=SPARSE_NAME, limit=limit, filter=client_filter),
                    ],
                )
                for q, terms in zip(queries, sparse)
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


def _older_filter(doc_key: str, seq: int, version: str | None) -> qm.Filter:
    """The points of ``doc_key`` older than (seq, version), as vectorstore._older decides:
    a lower doc_seq (none counts as 0), or the same with another doc_version."""
    older: list[Any] = [qm.FieldCondition(key="doc_seq", range=qm.Range(lt=seq))]
    if seq > 0:
        older.append(qm.IsEmptyCondition(is_empty=qm.PayloadField(key="doc_seq")))
    if version is not None:
        same = [qm.FieldCondition(key="doc_seq", match=qm.MatchValue(value=seq))]
        if seq == 0:
            same = [qm.Filter(should=[same[0], qm.IsEmptyCondition(is_empty=qm.PayloadField(key="doc_seq"))])]
        older.append(qm.Filter(must=same, must_not=[qm.FieldCondition(key="doc_version", match=qm.MatchValue(value=version))]))
    return qm.Filter(must=[qm.FieldCondition(key="doc_key", match=qm.MatchValue(value=doc_key))], should=older)
