"""``ragq reindex``: a new collection built beside the live one from what the store holds,
searches answered from the old one throughout, one switch, and ``--drop-old``.

A real worker (``ragq worker``), the real CLI, real Redis and real models
(all-MiniLM-L6-v2 re-indexed to multilingual-e5-small), on both store backends: the
embedded store (its pointer is a file) and qdrant-client's local mode (a collection alias).
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from common.chunking import Chunker
from common.models import resolve_embed_model
from common.reindex import join_chunks, rebuild_documents
from producer.client import Client
from tests.conftest import MINILM_MODEL, Stack
from tests.test_documents_over_time import job_json, write

pytestmark = pytest.mark.timeout(600)

E5 = "intfloat/multilingual-e5-small"
TOPICS = ["rotate access keys", "detach a cloud disk", "resize a MySQL instance", "renew an SSL certificate",
          "bind an elastic IP", "create a snapshot policy", "enable CDN caching", "restore a Redis backup"]


def test_chunks_join_back_into_their_document_exactly() -> None:
    """What a re-index embeds again is the document itself, not its chunks glued together."""
    chunker = Chunker(AutoTokenizer.from_pretrained(resolve_embed_model(MINILM_MODEL)), max_tokens=24, overlap=8)
    text = ("Cloud disks attach to one instance at a time.\n\nTo detach a disk, stop writes first, "
            "then choose Detach in the console; the data stays on the disk. " * 6).strip()
    chunks = chunker.split(text)
    assert len(chunks) > 5
    payloads = [{"text": c.text, "chunk_index": c.index, "char_start": c.start} for c in reversed(chunks)]
    assert join_chunks(payloads) == text
    # points written before offsets were recorded: joined on the texts' overlaps
    legacy = [{"text": c.text, "chunk_index": c.index} for c in chunks]
    assert join_chunks(legacy).split() == text.split()
    # two versions mid-prune: only the newest one's chunks make the document
    rows = [{"doc_key": "k", "doc_seq": 2, "segment": 0, "text": "new", "chunk_index": 0, "char_start": 0,
             "doc_version": "v2", "tier": "gold"},
            {"doc_key": "k", "doc_seq": 1, "segment": 0, "text": "old", "chunk_index": 0, "char_start": 0}]
    (doc,) = rebuild_documents(rows)
    assert (doc.content, doc.version, doc.seq, doc.extra) == ("new", "v2", 2, {"tier": "gold"})


@pytest.fixture(scope="module", params=["embedded", "qdrant-local"])
def stack(request: pytest.FixtureRequest, redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    data = tmp_path_factory.mktemp(f"reindex-{request.param}")
    extra = {"RAGQ_QDRANT_URL": f"path:{data / 'qdrant-local'}"} if request.param == "qdrant-local" else {}
    s = Stack(redis_url, data, RAGQ_REINDEX_PAGE_DOCUMENTS="2", **extra)
    s.start_worker()
    yield s
    s.stop_worker()


def test_reindex_switches_in_one_step_while_searches_keep_answering(stack: Stack, tmp_path: Path) -> None:
    client = Client(stack.settings())
    docs = tmp_path / "docs"
    for n, topic in enumerate(TOPICS):
        body = f"How to {topic}. " + " ".join(f"Step {i}: to {topic}, open the console and follow step {i}."
                                               for i in range(12))
        write(docs, f"page{n}", body, product=f"P{n % 3}", tier=f"t{n}")
    first = job_json(stack.cli("ingest", str(docs), "--wait", "--json"))[0]
    assert (first["status"], first["completed"]) == ("completed", len(TOPICS)), first
    before = client.store_info()
    assert (before["name"], before["model"]) == ("test_docs", MINILM_MODEL)

    seen: list[tuple[str, str]] = []  # (collection answering, top title) per search during the rebuild
    failures: list[str] = []
    stop = threading.Event()

    def search_meanwhile() -> None:
        while not stop.is_set():
            try:
                name = client.store_info(timeout=60)["name"]
                hits = client.search("detach a cloud disk", top_k=3, timeout=60)[0]
                seen.append((name, hits[0].title if hits else ""))
            except Exception as exc:  # noqa: BLE001 - any failure is what the test looks for
                failures.append(f"{type(exc).__name__}: {exc}")

    searcher = threading.Thread(target=search_meanwhile, daemon=True)
    started = stack.cli("reindex", "--model", E5, "--chunk-tokens", "48", "--json", check=True)
    job_id = json.loads(started.stdout)["id"]
    searcher.start()
    info = client.job(job_id).wait(timeout=480)
    stop.set()
    searcher.join(120)

    assert info.status == "completed", info
    assert (info.kind, info.total, info.completed, info.failed) == ("reindex", len(TOPICS), len(TOPICS), 0)
    assert info.meta["switched"] and info.meta["previous"] == "test_docs" and info.meta["target"] == "test_docs__r1"
    assert not failures, failures[:3]
    names = [name for name, _ in seen]
    assert names and names[0] == "test_docs", names  # the rebuild took several batches; searches went on
    assert names == sorted(names, key=lambda n: n != "test_docs"), names  # old, then new: one switch
    assert all(title == "page1" for _, title in seen), seen

    after = client.store_info()
    assert after["name"] == "test_docs__r1" and after["model"].startswith(E5), after
    assert after["chunk_tokens"] == 48 and after["points"] > before["points"]  # smaller chunks, more of them
    top = client.search("renew an SSL certificate", top_k=1)[0][0]
    assert top.title == "page3" and top.product == "P0"

    # the rebuilt documents kept their hashes: the same files again are all unchanged
    again = job_json(stack.cli("ingest", str(docs), "--wait", "--json"))[0]
    assert (again["completed"], again["skipped"], again["chunks"]) == (len(TOPICS), len(TOPICS), 0), again
    write(docs, "page0", "How to rotate access keys: now with a new rotation schedule.", product="P0", tier="t0")
    changed = job_json(stack.cli("ingest", str(docs), "--wait", "--json"))[0]
    assert (changed["skipped"], changed["chunks"]) == (len(TOPICS) - 1, 1), changed
    assert client.store_info()["model"] == after["model"]  # embedded into the live collection, by its model

    # the pointer outlives the worker
    stack.stop_worker()
    stack.start_worker()
    assert client.store_info()["name"] == "test_docs__r1"

    dropped = stack.cli("reindex", "--drop-old", "--json", check=True)
    assert json.loads(dropped.stdout) == {"live": "test_docs__r1", "dropped": ["test_docs"]}
    if "RAGQ_QDRANT_URL" not in stack.env_vars:
        assert not (stack.settings().store_dir / "test_docs").exists()
        assert (stack.settings().store_dir / "test_docs__r1").is_dir()
    assert client.search("rotate access keys", top_k=1)[0][0].title == "page0"


def test_reindex_refuses_what_it_cannot_do(stack: Stack) -> None:
    nothing = stack.cli("reindex")
    assert nothing.returncode != 0 and "--model" in nothing.stderr
    tiny = stack.cli("reindex", "--chunk-tokens", "4")
    assert tiny.returncode != 0 and "at least 16" in tiny.stderr
