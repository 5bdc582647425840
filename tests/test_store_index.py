"""The embedded store builds its HNSW index after large writes, once idle, and still finds the same hits.

Real qdrant-edge shards on disk. 8,000 384-d vectors is above qdrant's default indexing
threshold (10 MB of vectors per segment), so optimize() really builds an HNSW graph here;
the vectors are clustered like embeddings, and queries are near stored points.
"""

from __future__ import annotations

import time
import uuid
from pathlib import Path

import numpy as np
import redis

from common.remote_store import RemoteStore, serve
from common.sparse import SparseVector
from common.store_edge import EdgeStore
from common.store_index import IndexKeeper
from common.vectorstore import StoredChunk

DIM = 384
MODEL = "test/index-model"
NS = uuid.UUID("0b7f43a2-5d1e-4c59-8f0e-1e2d3c4b5a69")


def clustered(rng: np.random.Generator, n: int, clusters: int = 64) -> np.ndarray:
    centres = rng.normal(size=(clusters, DIM))
    v = centres[rng.integers(0, clusters, n)] + 0.6 * rng.normal(size=(n, DIM))
    return (v / np.linalg.norm(v, axis=1, keepdims=True)).astype(np.float32)


def chunks_for(vectors: np.ndarray, rng: np.random.Generator) -> list[StoredChunk]:
    out = []
    for i, v in enumerate(vectors):
        # BM25-like: a dozen terms of a 20,000-word vocabulary, weights that rarely tie
        terms = sorted({int(t) for t in rng.integers(0, 20_000, 12)})
        out.append(StoredChunk(
            str(uuid.uuid5(NS, str(i))), v,
            {"doc_key": f"doc{i // 4}", "doc_version": "v1", "chunk_index": i % 4, "model": MODEL,
             "text": f"chunk {i}"},
            SparseVector(terms, rng.uniform(0.5, 2.0, len(terms)).round(4).tolist())))
    return out


def top_ids(store: EdgeStore, queries: np.ndarray, sparse: list[SparseVector] | None) -> list[list[str]]:
    return [[h.id for h in row] for row in store.search(queries, top_k=5, sparse=sparse)]


def top_hits(store: EdgeStore, queries: np.ndarray, sparse: list[SparseVector]) -> list[tuple]:
    """Per row: every score, and the ids above the lowest score (RRF ties, e.g. dense rank 2
    vs sparse rank 2, come back in any order, and the last place may go to either)."""
    rows = store.search(queries, top_k=5, sparse=sparse)
    return [(tuple(round(h.score, 6) for h in row),
             frozenset(h.id for h in row if round(h.score, 6) > round(row[-1].score, 6))) for row in rows]


def test_keeper_builds_the_index_once_idle_and_hits_stay_the_same(tmp_path: Path) -> None:
    rng = np.random.default_rng(5)
    store = EdgeStore(tmp_path / "shard", "test_docs")
    try:
        vectors = clustered(rng, 8000)
        chunks = chunks_for(vectors, rng)
        store.upsert(chunks)
        before_info = store.index_info()
        assert before_info["unindexed"] == 8000  # the BM25 vectors are indexed as they arrive

        picks = rng.choice(8000, 20, replace=False)
        queries = vectors[picks] + 0.05 * rng.normal(size=(20, DIM)).astype(np.float32)
        sparse = [SparseVector(chunks[i].sparse.indices[:3], [1.0] * 3) for i in picks]  # type: ignore[union-attr]
        dense_before = top_ids(store, queries, None)
        hybrid_before = top_hits(store, queries, sparse)

        keeper = IndexKeeper(store, min_points=5000, idle_s=0.3, poll_s=0.05)
        store.last_used = time.monotonic() + 3600  # a store in use: the keeper must wait
        keeper.start()
        time.sleep(0.5)
        assert keeper.runs == 0 and store.index_info()["unindexed"] == 8000

        store.last_used = time.monotonic()  # now idle from here on
        deadline = time.monotonic() + 300
        while keeper.runs == 0 and time.monotonic() < deadline:
            time.sleep(0.1)
        keeper.stop()
        assert keeper.runs == 1

        after_info = store.index_info()
        assert after_info["indexed_vectors"] >= before_info["indexed_vectors"] + 8000
        assert after_info["unindexed"] == 0
        assert store.count() == 8000
        assert top_ids(store, queries, None) == dense_before
        assert top_hits(store, queries, sparse) == hybrid_before
        assert not keeper.check()  # nothing new was written: never indexes twice
    finally:
        store.close()

    reopened = EdgeStore(tmp_path / "shard", "test_docs")  # the index survives a restart
    try:
        assert reopened.index_info()["unindexed"] == 0
        assert top_ids(reopened, queries, None) == dense_before
    finally:
        reopened.close()


def test_small_writes_never_trigger_and_a_noop_optimize_is_not_repeated(tmp_path: Path) -> None:
    rng = np.random.default_rng(6)
    store = EdgeStore(tmp_path / "shard", "test_docs")
    try:
        store.upsert(chunks_for(clustered(rng, 300), rng))
        keeper = IndexKeeper(store, min_points=1000, idle_s=0.0)
        assert not keeper.check() and keeper.runs == 0  # below min_points

        keeper = IndexKeeper(store, min_points=200, idle_s=0.0)
        assert keeper.check() and keeper.runs == 1  # ran, but 300 vectors are below qdrant's threshold
        assert store.index_info()["unindexed"] == 300
        store.upsert(chunks_for(clustered(rng, 100), rng)[:100])  # overwrites 100 points: new writes
        assert not keeper.check()  # still 300 unindexed, none beyond what optimize() left
        assert keeper.runs == 1
    finally:
        store.close()


def test_optimize_reaches_the_owner_through_a_remote_store(tmp_path: Path, redis_client: redis.Redis) -> None:
    owner = EdgeStore(tmp_path / "shard", "test_docs")
    waited: list[float] = []

    def transport(method: str, request: dict, timeout: float) -> dict:
        waited.append(timeout)
        return serve(owner, redis_client, method, request)

    try:
        rng = np.random.default_rng(7)
        owner.upsert(chunks_for(clustered(rng, 50), rng))
        remote = RemoteStore(redis_client, transport, collection="test_docs", location="/shard",
                             queue="store-test", prefix="ragq-test-optimize", timeout_s=5.0)
        assert remote.optimize() is False  # 50 points: nothing for qdrant to index
        assert waited == [1500.0]  # an index build outlasts an ordinary call's timeout
    finally:
        owner.close()


def test_optimize_on_a_missing_collection_is_false(tmp_path: Path) -> None:
    store = EdgeStore(tmp_path / "none", "test_docs")
    try:
        assert store.optimize() is False
        assert store.index_info() == {"segments": 0, "points": 0, "indexed_vectors": 0, "unindexed": 0}
    finally:
        store.close()
