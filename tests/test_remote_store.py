"""RemoteStore: a process that does not own the embedded store reaches it over a transport.

The transport here calls the owner's :func:`serve` in the same process (the workers send
the same request as a Celery task), so the wire format, staging in real Redis and the
error kinds are tested without a worker; the soak test runs the real multi-process setup.
"""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import redis

from common.remote_store import RemoteStore, serve
from common.vectorstore import EdgeStore, StoreError, StoreMismatchError
from tests.test_vectorstore import DIM, MODEL, make_chunk, unit_vectors


class Owner:
    """The store's owner, answering requests in-process; counts what it was sent."""

    def __init__(self, path: Path, client: redis.Redis) -> None:
        self.store = EdgeStore(path, "test_docs")
        self.client = client
        self.requests: list[tuple[str, dict[str, Any]]] = []
        self.staged_seen: list[bool] = []

    def transport(self, method: str, request: dict[str, Any], timeout: float) -> dict[str, Any]:
        self.requests.append((method, request))
        if "staged" in request:
            self.staged_seen.append(bool(self.client.exists(request["staged"])))
        return serve(self.store, self.client, method, request)


@pytest.fixture
def owner(tmp_path: Path, redis_client: redis.Redis):
    o = Owner(tmp_path / "shard", redis_client)
    yield o
    o.store.close()


def remote(owner: Owner, prefix: str, timeout: float = 5.0) -> RemoteStore:
    return RemoteStore(owner.client, owner.transport, collection="test_docs", location="/shard",
                       queue="store-test", prefix=prefix, timeout_s=timeout)


def test_remote_calls_match_the_owners_store(owner: Owner, redis_client: redis.Redis) -> None:
    prefix = f"ragq-test-{uuid.uuid4().hex[:6]}"
    store = remote(owner, prefix)
    rng = np.random.default_rng(21)
    vectors = unit_vectors(rng, 600)
    chunks = [make_chunk(f"doc{i // 6}", i % 6, vectors[i]) for i in range(600)]
    store.ensure_collection(DIM, MODEL)
    store.upsert(chunks)  # ~600 * (payload + 128 B of vector): over the inline limit, so staged

    method, request = owner.requests[-1]
    assert method == "upsert" and set(request) == {"staged", "collection"}  # the owner may hold several
    assert owner.staged_seen == [True]
    assert not redis_client.keys(f"{prefix}:*"), "staged request left behind"

    assert store.count() == owner.store.count() == 600
    queries = vectors[[3, 77, 599]]
    for distinct in (True, False):
        got = store.search(queries, top_k=4, distinct_docs=distinct)
        want = owner.store.search(queries, top_k=4, distinct_docs=distinct)
        assert got == want  # same ids, scores (exact through JSON) and payloads
    assert store.search(queries[:1], top_k=1)[0][0].id == chunks[3].id
    assert store.count({"doc_key": ["doc1", "doc2"]}) == 12
    assert len(store.scroll_payloads({"doc_key": "doc5"})) == 6
    assert store.info() == owner.store.info()

    # A newer, shorter version of doc0 replaces the old one through the owner.
    store.upsert([make_chunk("doc0", i, v, version="v2") for i, v in enumerate(unit_vectors(rng, 2))])
    assert store.delete_older_many({"doc0": (0, "v2"), "doc1": (0, "v1")}) == 4
    assert store.count() == 596


def test_errors_keep_their_kind(owner: Owner) -> None:
    store = remote(owner, "ragq-test-errors")
    rng = np.random.default_rng(22)
    store.upsert([make_chunk("a", 0, unit_vectors(rng, 1)[0])])
    with pytest.raises(StoreMismatchError, match="RAGQ_COLLECTION"):
        store.ensure_collection(DIM + 1, MODEL)
    with pytest.raises(ValueError, match="only str or int"):
        store.search(unit_vectors(rng, 1), top_k=3, filter={"product": True})
    assert store.count() == 1  # nothing was lost to the bad calls


def test_an_absent_owner_is_a_store_error_naming_its_queue(owner: Owner, redis_client: redis.Redis) -> None:
    def silent(method: str, request: dict[str, Any], timeout: float) -> dict[str, Any]:
        raise TimeoutError(f"no reply in {timeout}s")

    store = RemoteStore(redis_client, silent, collection="test_docs", location="/shard",
                        queue="store-test", prefix="ragq-test-silent", timeout_s=0.5)
    big = [make_chunk(f"d{i}", 0, v) for i, v in enumerate(unit_vectors(np.random.default_rng(23), 400))]
    with pytest.raises(StoreError, match="store-test"):
        store.upsert(big)
    assert not redis_client.keys("ragq-test-silent:*"), "a staged request outlived its failed call"


def test_expired_staged_request_is_a_store_error(owner: Owner, redis_client: redis.Redis) -> None:
    reply = serve(owner.store, redis_client, "upsert", {"staged": "ragq-test-gone:store:staged:x"})
    assert reply["error"] == "store" and "expired" in reply["message"]
    assert serve(owner.store, redis_client, "drop_everything", {})["error"] == "value"


def test_document_level_calls_through_the_owner(owner: Owner) -> None:
    """stored_versions, relabel and delete_where answer through the owner as in its process."""
    store = remote(owner, "ragq-test-docs")
    rng = np.random.default_rng(24)
    chunks = [make_chunk(f"doc{i // 3}", i % 3, v) for i, v in enumerate(unit_vectors(rng, 9))]
    store.upsert(chunks)
    keys = {"doc_key": ["doc0", "doc1", "doc2"]}
    assert store.stored_versions(keys) == owner.store.stored_versions(keys)
    assert set(store.stored_versions(keys)) == {"doc0", "doc1", "doc2"}
    assert store.relabel({"doc1": (0, 7)}) == 3
    assert store.stored_versions({"doc_key": "doc1"})["doc1"].doc_seq == 7
    assert store.delete_where({"doc_key": ["doc0", "doc1"]}) == {"doc0": 3, "doc1": 3}
    assert store.count() == 3
    with pytest.raises(ValueError, match="at least one condition"):
        store.delete_where({})
    assert store.count() == 3
