"""common.vectorstore against both backends: qdrant-edge on disk and qdrant-client local mode.

Vectors are small random unit vectors, so exact nearest neighbours can be computed with
numpy and compared with what the store returns.
"""

from __future__ import annotations

import uuid
from pathlib import Path

import numpy as np
import pytest

from common.config import Settings
from common.vectorstore import (
    EdgeStore,
    StoredChunk,
    StoredVersion,
    StoreError,
    StoreMismatchError,
    VectorStore,
    open_store,
)

DIM = 32
MODEL = "test/model-a"
NS = uuid.UUID("6f1c0c52-9f0e-4a8e-9a4e-3f2d1f6a0b11")


def unit_vectors(rng: np.random.Generator, n: int, dim: int = DIM) -> np.ndarray:
    v = rng.normal(size=(n, dim)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def make_chunk(
    doc_key: str, index: int, vector: np.ndarray, *, version: str = "v1",
    product: str = "CDN", model: str = MODEL,
) -> StoredChunk:
    payload = {
        "doc_key": doc_key, "doc_version": version, "segment": 0, "chunk_index": index,
        "model": model, "text": f"chunk {index} of {doc_key}", "title": f"Title {doc_key}",
        "product": product, "url": f"https://example.com/{doc_key}", "extra": {"tags": ["a", "b"]},
    }
    return StoredChunk(str(uuid.uuid5(NS, f"{doc_key}/{index}")), vector, payload)


def settings_for(backend: str, root: Path, collection: str = "test_docs") -> Settings:
    # Explicit values and no .env, so a developer's RAGQ_* environment cannot leak in.
    if backend == "embedded":
        return Settings(_env_file=None, qdrant_url=None, data_dir=root / "data", collection=collection)
    return Settings(_env_file=None, qdrant_url=f"path:{root / 'local'}", collection=collection)


@pytest.fixture(params=["embedded", "qdrant"])
def backend(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
def open_(backend: str, tmp_path: Path):
    """open_(collection=...) -> a store of the parametrised backend, closed at teardown."""
    opened: list[VectorStore] = []

    def _open(collection: str = "test_docs") -> VectorStore:
        store = open_store(settings_for(backend, tmp_path, collection))
        opened.append(store)
        return store

    yield _open
    for store in opened:
        store.close()


@pytest.fixture
def store(open_) -> VectorStore:
    return open_()


def test_open_store_picks_backend(store: VectorStore, backend: str) -> None:
    assert store.backend == backend
    assert type(store).__name__ == {"embedded": "EdgeStore", "qdrant": "QdrantStore"}[backend]


def test_upsert_count_and_search_nearest_first(store: VectorStore) -> None:
    rng = np.random.default_rng(1)
    vectors = unit_vectors(rng, 120)
    chunks = [make_chunk(f"doc{i // 10}", i % 10, vectors[i]) for i in range(120)]
    store.ensure_collection(DIM, MODEL)
    store.upsert(chunks)
    assert store.count() == 120

    rows = [5, 103]
    results = store.search(vectors[rows], top_k=5, distinct_docs=False)
    assert len(results) == 2
    for row, hits in zip(rows, results):
        assert hits[0].id == chunks[row].id
        assert hits[0].score == pytest.approx(1.0, abs=1e-4)
        assert hits[0].payload == chunks[row].payload
        scores = [h.score for h in hits]
        assert scores == sorted(scores, reverse=True)
        expected = np.argsort(-(vectors @ vectors[row]))[:5]  # exact search: same top 5
        assert [h.id for h in hits] == [chunks[i].id for i in expected]

    payloads = store.scroll_payloads(limit=7)
    assert len(payloads) == 7
    assert all(p["id"] in {c.id for c in chunks} and p["model"] == MODEL for p in payloads)
    assert len(store.scroll_payloads()) == 120


def test_reupsert_does_not_duplicate_and_delete_older(store: VectorStore) -> None:
    rng = np.random.default_rng(2)
    a_v1 = [make_chunk("a", i, v) for i, v in enumerate(unit_vectors(rng, 5))]
    b_v1 = [make_chunk("b", i, v) for i, v in enumerate(unit_vectors(rng, 5))]
    store.upsert(a_v1 + b_v1)
    store.upsert(a_v1)  # same ids again
    assert store.count() == 10

    # Version 2 of "a" is shorter: chunks 0-2 overwrite, chunks 3-4 of v1 are stale.
    a_v2 = [make_chunk("a", i, v, version="v2") for i, v in enumerate(unit_vectors(rng, 3))]
    store.upsert(a_v2)
    assert store.count() == 10
    assert store.delete_older("a", 0, "v2") == 2
    remaining = store.scroll_payloads({"doc_key": "a"})
    assert sorted(p["chunk_index"] for p in remaining) == [0, 1, 2]
    assert {p["doc_version"] for p in remaining} == {"v2"}
    assert store.count({"doc_key": "b"}) == 5  # other documents are never touched
    assert store.delete_older("a", 0, "v2") == 0
    assert store.delete_older("missing", 0, "v1") == 0
    assert store.count() == 8


def test_delete_older_many_prunes_each_document_by_its_own_version(store: VectorStore) -> None:
    rng = np.random.default_rng(12)
    docs = {f"d{i}": 4 for i in range(30)}
    store.upsert([make_chunk(k, i, v) for k, n in docs.items() for i, v in enumerate(unit_vectors(rng, n))])
    # New versions: even documents shrink to 2 chunks, odd ones are rewritten whole; d29 untouched.
    keep = {}
    for n, key in enumerate(list(docs)[:29]):
        size = 2 if n % 2 == 0 else 4
        store.upsert([make_chunk(key, i, v, version=f"v2-{key}") for i, v in enumerate(unit_vectors(rng, size))])
        keep[key] = (0, f"v2-{key}")
    assert store.delete_older_many(keep) == 15 * 2  # the 15 even documents lose chunks 2-3
    for key in keep:
        rows = store.scroll_payloads({"doc_key": key})
        assert {r["doc_version"] for r in rows} == {keep[key][1]}
    assert store.count({"doc_key": "d29"}) == 4
    assert store.count() == 15 * 2 + 14 * 4 + 4
    assert store.delete_older_many(keep) == 0
    assert store.delete_older_many({}) == 0


def test_delete_older_keeps_newer_sequences(store: VectorStore) -> None:
    """Pruning by (seq, version) deletes only older points: an older batch that prunes
    late cannot remove a newer version's (common.docseq)."""
    rng = np.random.default_rng(13)

    def version(seq: int, n: int, tag: str) -> list[StoredChunk]:
        chunks = [make_chunk("a", i, v, version=tag) for i, v in enumerate(unit_vectors(rng, n))]
        return [StoredChunk(str(uuid.uuid5(NS, f"a/{seq}/{c.payload['chunk_index']}")), c.vector,
                            {**c.payload, "doc_seq": seq}) for c in chunks]

    store.upsert([make_chunk("a", 9, unit_vectors(rng, 1)[0], version="legacy")])  # stored before sequences
    store.upsert(version(5, 3, "v5") + version(7, 2, "v7"))
    assert store.delete_older("a", 5, "v5") == 1  # only the legacy point is older than 5
    assert store.delete_older("a", 7, None) == 3  # version 5 is older than 7; 7 itself stays
    assert store.delete_older("a", 7, "v7") == 0
    assert sorted((r["doc_seq"], r["doc_version"]) for r in store.scroll_payloads({"doc_key": "a"})) == [
        (7, "v7"), (7, "v7")]


def test_filter_on_product(store: VectorStore) -> None:
    rng = np.random.default_rng(3)
    vectors = unit_vectors(rng, 60)
    products = ["CDN", "DNS", "WAF"]
    chunks = [make_chunk(f"d{i}", 0, vectors[i], product=products[i % 3]) for i in range(60)]
    store.upsert(chunks)
    assert store.count({"product": "CDN"}) == 20
    assert store.count({"product": ["CDN", "WAF"]}) == 40

    query = vectors[[1]]  # a DNS chunk: it must not come back when filtering for CDN
    hits = store.search(query, top_k=10, filter={"product": "CDN"})[0]
    assert len(hits) == 10
    assert {h.payload["product"] for h in hits} == {"CDN"}
    cdn = [i for i in range(60) if i % 3 == 0]
    best_cdn = cdn[int(np.argmax(vectors[cdn] @ vectors[1]))]
    assert hits[0].id == chunks[best_cdn].id

    hits = store.search(query, top_k=20, filter={"product": ["CDN", "WAF"]})[0]
    assert len(hits) == 20
    assert {h.payload["product"] for h in hits} == {"CDN", "WAF"}
    assert store.search(query, top_k=5, filter={"product": "nope"}) == [[]]

    with pytest.raises(ValueError):
        store.search(query, top_k=5, filter={"product": True})


def test_distinct_docs_one_hit_per_doc_and_still_top_k(
    store: VectorStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    rng = np.random.default_rng(4)
    docs, per_doc, top_k = 20, 10, 5
    centers = unit_vectors(rng, docs)
    # Tight clusters: a query's top 40 chunks (top_k * 8) cover only 4 documents, so
    # the store has to fetch more to find 5 distinct ones.
    noisy = np.repeat(centers, per_doc, axis=0) + 0.001 * rng.normal(size=(docs * per_doc, DIM))
    vectors = (noisy / np.linalg.norm(noisy, axis=1, keepdims=True)).astype(np.float32)
    chunks = [make_chunk(f"doc{i // per_doc}", i % per_doc, vectors[i]) for i in range(len(vectors))]
    store.upsert(chunks)
    limits: list[int] = []
    query = store._query

    def counting_query(queries, limit, where, sparse=None):
        limits.append(limit)
        return query(queries, limit, where, sparse)

    monkeypatch.setattr(store, "_query", counting_query)

    hits = store.search(centers[[7, 15]], top_k=top_k)
    assert len(limits) > 1 and limits[0] == top_k * 8  # one batch per round, then more
    for query_doc, row in zip([7, 15], hits):
        assert len(row) == top_k
        keys = [h.payload["doc_key"] for h in row]
        assert len(set(keys)) == top_k
        assert keys[0] == f"doc{query_doc}"
        # Each hit is its document's best chunk, and the documents are the best top_k.
        sims = (vectors @ centers[query_doc]).reshape(docs, per_doc)
        best_docs = np.argsort(-sims.max(axis=1))[:top_k]
        assert keys == [f"doc{d}" for d in best_docs]
        for hit, d in zip(row, best_docs):
            assert hit.id == chunks[d * per_doc + int(sims[d].argmax())].id
            assert hit.score == pytest.approx(float(sims[d].max()), abs=1e-4)

    crowded = store.search(centers[[7]], top_k=top_k, distinct_docs=False)[0]
    assert {h.payload["doc_key"] for h in crowded} == {"doc7"}


def test_mismatch_and_info(open_, backend: str) -> None:
    store = open_()
    rng = np.random.default_rng(5)
    store.ensure_collection(DIM, MODEL)
    store.ensure_collection(DIM, MODEL)  # idempotent
    store.upsert([make_chunk("a", i, v) for i, v in enumerate(unit_vectors(rng, 4))])

    info = store.info()
    assert (info.name, info.points, info.dimension, info.model) == ("test_docs", 4, DIM, MODEL)
    assert (info.distance, info.backend) == ("cosine", backend)

    with pytest.raises(StoreMismatchError) as excinfo:
        store.ensure_collection(DIM + 1, MODEL)
    message = str(excinfo.value)
    assert "test_docs" in message and str(DIM) in message and str(DIM + 1) in message
    assert "RAGQ_COLLECTION" in message
    with pytest.raises(StoreMismatchError, match="test/model-b"):
        store.ensure_collection(DIM, "test/model-b")
    with pytest.raises(StoreMismatchError):
        store.upsert([make_chunk("b", 0, unit_vectors(rng, 1)[0], model="test/model-b")])
    assert store.count() == 4

    # A fresh store (no cache) sees the same mismatch; another collection name is the fix.
    store.close()
    again = open_()
    with pytest.raises(StoreMismatchError):
        again.ensure_collection(DIM, "test/model-b")
    again.close()
    other = open_("other_docs")
    other.ensure_collection(DIM + 1, "test/model-b")
    assert other.info().dimension == DIM + 1


def test_store_persists_after_close(open_) -> None:
    rng = np.random.default_rng(6)
    vectors = unit_vectors(rng, 20)
    store = open_()
    store.upsert([make_chunk(f"d{i}", 0, v) for i, v in enumerate(vectors)])
    store.close()
    store.close()  # idempotent

    reopened = open_()
    assert reopened.count() == 20
    info = reopened.info()
    assert (info.dimension, info.model, info.points) == (DIM, MODEL, 20)
    hit = reopened.search(vectors[[9]], top_k=1)[0][0]
    assert hit.payload["doc_key"] == "d9"


def test_embedded_shard_has_one_owner(tmp_path: Path) -> None:
    path = tmp_path / "shard"
    first = EdgeStore(path, "test_docs")
    first.ensure_collection(DIM, MODEL)
    with pytest.raises(StoreError, match="in use"):
        EdgeStore(path, "test_docs")
    first.close()
    with pytest.raises(StoreError, match="closed"):
        first.count()
    second = EdgeStore(path, "test_docs")
    assert second.info().dimension == DIM
    second.close()


def test_empty_or_missing_collection(store: VectorStore) -> None:
    queries = unit_vectors(np.random.default_rng(7), 2)
    assert store.search(queries, top_k=3) == [[], []]
    assert store.search(queries, top_k=3, distinct_docs=False) == [[], []]
    assert store.count() == 0
    assert store.scroll_payloads() == []
    assert store.delete_older("a", 1) == 0
    info = store.info()
    assert (info.points, info.dimension, info.model) == (0, None, None)

    store.ensure_collection(DIM, MODEL)
    assert store.search(queries, top_k=3) == [[], []]
    info = store.info()
    assert (info.points, info.dimension, info.model) == (0, DIM, None)


@pytest.mark.filterwarnings("ignore:Api key is used with an insecure connection")
def test_unreachable_server_is_store_error_without_secrets() -> None:
    settings = Settings(
        _env_file=None, qdrant_url="http://127.0.0.1:9", qdrant_api_key="sekrit-api-key",
        collection="test_docs",
    )
    store = open_store(settings)
    try:
        assert store.info  # constructing does not connect
        with pytest.raises(StoreError) as excinfo:
            store.count()
        assert "sekrit" not in str(excinfo.value)
        assert "sekrit" not in store.location
    finally:
        store.close()


def _versioned(doc_key: str, tag: str, seq: int | None, version: str, vector: np.ndarray) -> StoredChunk:
    chunk = make_chunk(doc_key, 0, vector, version=version)
    payload = dict(chunk.payload)
    if seq is not None:
        payload["doc_seq"] = seq
    return StoredChunk(str(uuid.uuid5(NS, f"{doc_key}/{tag}")), vector, payload)


def test_pruning_follows_sequence_numbers_then_versions(store: VectorStore) -> None:
    """Points without a doc_seq count as 0; lower sequences go, the same sequence keeps only its
    version, higher ones stay (a newer batch's). Both backends, whichever way they delete."""
    rng = np.random.default_rng(21)
    vectors = iter(unit_vectors(rng, 20))
    layout = {"none": (None, "a"), "s1": (1, "a"), "s2a": (2, "a"), "s2b": (2, "b"), "s3": (3, "c")}
    store.upsert([_versioned(key, tag, seq, version, next(vectors))
                  for key in ("p", "q") for tag, (seq, version) in layout.items()])
    assert store.delete_older_many({"p": (2, "b"), "q": (0, "a")}) == 3  # p: none, s1, s2a; q: nothing
    assert sorted((r.get("doc_seq"), r["doc_version"]) for r in store.scroll_payloads({"doc_key": "p"})) == [
        (2, "b"), (3, "c")]
    assert store.count({"doc_key": "q"}) == 5
    assert store.delete_older_many({"q": (2, None)}) == 2  # any version of sequence 2 stays
    assert store.delete_older_many({"q": (0, "z")}) == 0  # sequence 0 is older than every point left
    assert store.count({"doc_key": "q"}) == 3


def test_server_prunes_by_filter_without_reading_ids(tmp_path: Path, monkeypatch) -> None:
    store = open_store(settings_for("qdrant", tmp_path))
    try:
        rng = np.random.default_rng(5)
        store.upsert([make_chunk(f"d{i % 40}", i // 40, v) for i, v in enumerate(unit_vectors(rng, 160))])
        store.upsert([make_chunk(f"d{i}", 0, v, version="v2") for i, v in enumerate(unit_vectors(rng, 40))])

        def no_scroll(*args, **kwargs):
            raise AssertionError("pruning scrolled the points' ids over the network")

        monkeypatch.setattr(store.client, "scroll", no_scroll)
        assert store.delete_older_many({f"d{i}": (0, "v2") for i in range(40)}) == 120
        assert store.count() == 40
    finally:
        store.close()


def test_server_writes_go_through_upload_points_in_batches(tmp_path: Path, monkeypatch) -> None:
    store = open_store(settings_for("qdrant", tmp_path))
    calls: list[tuple[int, int, bool]] = []
    upload = store.client.upload_points

    def spy(collection_name, points, **kwargs):
        points = list(points)
        calls.append((len(points), kwargs["batch_size"], kwargs["wait"]))
        return upload(collection_name, points, **kwargs)

    try:
        monkeypatch.setattr(store.client, "upload_points", spy)
        rng = np.random.default_rng(32)
        store.upsert([make_chunk(f"u{i}", 0, v) for i, v in enumerate(unit_vectors(rng, 1300))])
        assert calls == [(1300, 256, True)]  # one call; the client splits it into 256-point requests
        assert store.count() == 1300
    finally:
        store.close()


@pytest.mark.filterwarnings("ignore:Api key is used with an insecure connection")
def test_grpc_is_used_when_configured_and_failures_stay_secret_free() -> None:
    settings = Settings(
        _env_file=None, qdrant_url="http://127.0.0.1:9", qdrant_api_key="sekrit-api-key",
        qdrant_grpc=True, qdrant_grpc_port=10, collection="test_docs",
    )
    store = open_store(settings)
    try:
        remote = store.client._client  # qdrant-client's QdrantRemote
        assert remote._prefer_grpc and remote._grpc_port == 10
        assert "gRPC port 10" in store.location
        with pytest.raises(StoreError) as excinfo:
            store.count()
        assert "sekrit" not in str(excinfo.value)
    finally:
        store.close()


def test_stored_versions_relabel_and_delete_where(store: VectorStore) -> None:
    """The document-level calls behind skipping unchanged documents and deleting them."""
    vectors = unit_vectors(np.random.default_rng(41), 7)
    chunks = [make_chunk("a", i, vectors[i]) for i in range(3)] + [make_chunk("b", i, vectors[3 + i]) for i in range(2)]
    for c in chunks:
        c.payload.update(content_hash=f"h-{c.payload['doc_key']}", doc_seq=4)
    mixed = make_chunk("c", 0, vectors[5])
    mixed.payload.update(content_hash="h-c", doc_seq=1)
    other = make_chunk("c", 1, vectors[6])
    other.payload.update(content_hash="h-c2", doc_seq=2)
    store.upsert([*chunks, mixed, other])

    found = store.stored_versions({"doc_key": ["a", "b", "c", "nothing"]})
    assert found == {"a": StoredVersion("h-a", 4, (0,), (3,)), "b": StoredVersion("h-b", 4, (0,), (2,)),
                     "c": StoredVersion(None, 2, (0,), (2,))}  # two versions mid-prune: never skipped
    assert store.stored_versions({"product": "CDN", "doc_key": "b"}) == {"b": found["b"]}

    assert store.relabel({"a": (4, 9), "b": (3, 9)}) == 3  # b is not at 3: untouched
    assert store.stored_versions({"doc_key": ["a", "b"]}) == {"a": StoredVersion("h-a", 9, (0,), (3,)), "b": found["b"]}

    assert store.delete_where({"doc_key": "c", "doc_seq": 1}) == {"c": 1}
    assert store.delete_where({"doc_key": ["a", "b"]}) == {"a": 3, "b": 2}
    assert store.count() == 1
    with pytest.raises(ValueError, match="at least one condition"):
        store.delete_where({})
