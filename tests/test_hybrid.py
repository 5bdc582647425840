"""Hybrid retrieval: BM25 sparse vectors beside the dense ones, fused by reciprocal rank.

Real model (all-MiniLM-L6-v2), real stores (the embedded engine and qdrant-client's local
mode, which runs the server backend's code), the real ingest and retrieval code.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from common.config import MINILM_MODEL, Settings
from common.embedding import Embedder
from common.ingest import Ingestor
from common.retrieval import Query, Retriever
from common.schemas import DocumentItem
from common.sparse import Bm25Encoder
from common.vectorstore import VectorStore, open_store

#: Pages on different topics, each naming a product code in passing: a user who types
#: the code wants that page, but a code carries little meaning for a dense model.
TOPICS = [
    "Snapshots copy a cloud disk at a point in time; restore one to roll the disk back.",
    "Security groups filter inbound and outbound traffic of instances by port and address.",
    "A VPC is an isolated network; subnets divide its address range by availability zone.",
    "Object storage keeps files as objects in buckets, addressed by key, with lifecycle rules.",
    "Load balancers spread requests across backend servers and check their health.",
    "The CDN caches static files at edge nodes near users and refreshes them on request.",
    "Relational database instances offer automatic backups and read-only replicas.",
    "Message queues decouple producers from consumers; messages are kept for three days.",
    "Kubernetes clusters run containers on node groups that scale with the workload.",
    "Elastic IP addresses can be bound to an instance and moved to another one.",
    "Monitoring collects CPU, memory and disk metrics and raises alarms on thresholds.",
    "Access keys sign API requests; rotate them regularly and never share the secret.",
]
CODES = ["QT-24A", "XW-31F", "KR-57C", "ZP-86D", "MV-12K", "BL-49H", "NH-73J", "PD-65M",
         "FG-28Q", "SC-94T", "YE-37W", "UA-58Z"]


def _page(topic: str, code: str) -> str:
    return f"{topic} This feature is sold under product code {code}."


def _item(key: str, text: str, product: str = "VM") -> DocumentItem:
    url = f"https://docs.example/{key}"
    return DocumentItem(key=key, item=key, content=text, title=key, product=product, url=url,
                        version=DocumentItem.version_of(text, key, product, url, {}))


@pytest.fixture(scope="module")
def embedder() -> Embedder:
    return Embedder(MINILM_MODEL, "cpu", threads=1)


@pytest.fixture(scope="module", params=["embedded", "qdrant-local"])
def store(request: pytest.FixtureRequest, embedder: Embedder,
          tmp_path_factory: pytest.TempPathFactory) -> Iterator[VectorStore]:
    root = tmp_path_factory.mktemp(request.param)
    url = None if request.param == "embedded" else f"path:{root / 'local'}"
    with open_store(Settings(_env_file=None, data_dir=root, qdrant_url=url, collection="hybrid")) as s:
        docs = [_item(f"page-{code}", _page(topic, code)) for topic, code in zip(TOPICS, CODES)]
        docs.append(_item("errors", "HTTP error 403 means the request was refused: the access key "
                                    "lacks permission for the bucket.", product="OSS"))
        docs.append(_item("ports", "Redis listens on port 6379 inside the VPC; open it in the security "
                                   "group.", product="Redis"))
        docs.append(_item("zh-disk", "云硬盘卸载：在控制台选择云硬盘，点击卸载，然后确认。卸载后数据不会丢失。", product="Disk"))
        outcome = Ingestor(embedder, s, chunk_tokens=128).ingest(docs)
        assert outcome.completed == len(docs) and not outcome.errors
        yield s


def _top1(retriever: Retriever, texts: list[str]) -> list[str]:
    rows = retriever.run([Query(t, 3) for t in texts])
    return [row[0].url.rsplit("/", 1)[-1] for row in rows]  # type: ignore[union-attr]


def test_hybrid_finds_pages_by_exact_code_that_dense_misses(embedder: Embedder, store: VectorStore) -> None:
    queries = list(CODES)  # what a user types when they have the code
    wanted = [f"page-{code}" for code in CODES]
    dense = _top1(Retriever(embedder, store, mode="dense"), queries)
    hybrid = _top1(Retriever(embedder, store, mode="hybrid"), queries)
    assert hybrid == wanted
    dense_right = sum(d == w for d, w in zip(dense, wanted))
    # MiniLM's word pieces match some codes by their fragments (8 of 12 when measured)
    assert dense_right < len(CODES), f"dense alone found all {len(CODES)} codes: the test shows nothing"


def test_numbers_and_chinese_words_are_terms(embedder: Embedder, store: VectorStore) -> None:
    """Bare numbers survive BM25 tokenization, and Chinese is segmented into words."""
    hybrid = Retriever(embedder, store, mode="hybrid")
    assert _top1(hybrid, ["403", "6379", "卸载"]) == ["errors", "ports", "zh-disk"]
    bm25 = Bm25Encoder()
    assert bm25.queries(["403"])[0].indices  # the multilingual tokenizer alone drops it
    assert len(bm25.queries(["如何卸载云硬盘"])[0].indices) >= 3  # words, not one clause


def test_hybrid_scores_are_fused_ranks_and_filters_hold(embedder: Embedder, store: VectorStore) -> None:
    [row] = Retriever(embedder, store, mode="hybrid").run([Query(CODES[3], 5, {"product": "VM"})])
    assert isinstance(row, list) and len(row) == 5
    assert {s.product for s in row} == {"VM"}
    assert row[0].url.endswith(f"page-{CODES[3]}")
    assert all(0 < s.score <= 2 / 60 for s in row)  # RRF, k=60: at most 1/60 from each ranking


def test_a_dense_only_collection_is_refused_for_hybrid_with_the_reason(embedder: Embedder, tmp_path: Path) -> None:
    settings = Settings(_env_file=None, data_dir=tmp_path, collection="old")
    with open_store(settings) as s:
        s._has_sparse = lambda: False  # type: ignore[method-assign]  # as built before hybrid
        Ingestor(embedder, s).ingest([_item("a", "a page about disks")])
        [row] = Retriever(embedder, s, mode="hybrid").run([Query("disks", 3)])
        assert isinstance(row, str) and "RAGQ_RETRIEVAL=dense" in row
        [dense] = Retriever(embedder, s, mode="dense").run([Query("disks", 3)])
        assert isinstance(dense, list) and dense[0].url.endswith("/a")
