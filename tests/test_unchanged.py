"""Unchanged documents are not embedded again, and skipping keeps version order right.

The worker's own Ingestor (real model, real embedded store, real Redis for the version
numbers) in this process, so each case can look at the points and the counts directly.
Items are numbered by the producer's Stamper, as they are when a batch is sent.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from common.docseq import DocSequences, Stamper
from common.ingest import Ingestor
from common.runtime import Runtime
from common.schemas import DocumentItem
from common.vectorstore import Store, StoredVersion, StoreError
from tests.conftest import Stack

pytestmark = pytest.mark.timeout(300)

LONG = "\n\n".join(f"Paragraph {i}: queue messages are kept for three days, and the console shows the "
                   "retention period under the settings tab of every topic. " * 3 for i in range(6))


def doc(key: str, content: str, **fields: Any) -> DocumentItem:
    title, product, url = fields.get("title", key), fields.get("product", "MQ"), fields.get("url", "")
    return DocumentItem(key=key, item=f"{key}.json", content=content, title=title, product=product, url=url,
                        version=DocumentItem.version_of(content, title, product, url, {}))


@pytest.fixture(scope="module")
def rt(redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Runtime]:
    stack = Stack(redis_url, tmp_path_factory.mktemp("unchanged"))  # settings only: no worker
    runtime = Runtime(stack.settings())
    yield runtime
    runtime.close()


@pytest.fixture
def stamp(rt: Runtime) -> Stamper:
    return Stamper(rt.sequences())


def texts(store: Store, key: str) -> list[str]:
    return sorted(r["text"] for r in store.scroll_payloads({"doc_key": key}))


def test_reingest_skips_embedding_and_keeps_the_points(rt: Runtime, stamp: Stamper) -> None:
    ingestor, store = rt.ingestor(), rt.store()
    first = ingestor.ingest(stamp([doc("a", LONG), doc("b", "Short page b.")]))
    assert (first.completed, first.skipped) == (2, 0) and first.chunks > 2 and first.tokens > 0
    before = store.scroll_payloads({"doc_key": ["a", "b"]})

    again = ingestor.ingest(stamp([doc("a", LONG), doc("b", "Short page b.")]))
    assert (again.completed, again.skipped, again.chunks, again.tokens) == (2, 2, 0, 0), again

    after = store.scroll_payloads({"doc_key": ["a", "b"]})
    assert sorted(r["id"] for r in after) == sorted(r["id"] for r in before)  # the same points, kept
    seqs = rt.sequences().stored(["a", "b"])
    assert {r["doc_key"]: r["doc_seq"] for r in after} == seqs  # relabelled with the new version's number

    changed = ingestor.ingest(stamp([doc("a", LONG), doc("b", "Short page b, edited.")]))
    assert (changed.completed, changed.skipped) == (2, 1) and changed.tokens > 0
    assert texts(store, "b") == ["Short page b, edited."]

    forced = ingestor.ingest(stamp([doc("a", LONG)]), force=True)
    assert (forced.skipped, forced.chunks) == (0, len(texts(store, "a")))


def test_payload_fields_and_embedding_settings_are_part_of_the_hash(rt: Runtime, stamp: Stamper) -> None:
    ingestor = rt.ingestor()
    ingestor.ingest(stamp([doc("c", "Page c about disks.")]))
    assert ingestor.ingest(stamp([doc("c", "Page c about disks.", product="Disk")])).skipped == 0  # a field
    assert ingestor.ingest(stamp([doc("c", "Page c about disks.", product="Disk")])).skipped == 1
    item = doc("c", "Page c about disks.", product="Disk")
    moved = DocumentItem(**{**item.to_dict(), "source": "/elsewhere"})
    assert ingestor.ingest(stamp([moved])).skipped == 0  # the source reaches the payload too

    other = Ingestor(rt.embedder(), rt.store(), chunk_tokens=64, overlap=8, sequences=rt.sequences())
    assert other.ingest(stamp([moved])).skipped == 0  # chunking changed: re-embedded
    assert other.ingest(stamp([moved])).skipped == 1


def test_the_store_not_redis_decides(rt: Runtime, stamp: Stamper) -> None:
    """After Redis lost the version numbers, unchanged documents are still recognised."""
    rt.ingestor().ingest(stamp([doc("d", "Page d.")]))
    seqs = rt.sequences()
    seqs.redis.hdel(seqs._key("stored"), "d")
    assert rt.ingestor().ingest(stamp([doc("d", "Page d.")])).skipped == 1
    assert "d" in seqs.stored(["d"])


def test_an_older_version_delivered_after_a_skip_changes_nothing(rt: Runtime, stamp: Stamper) -> None:
    """Stored H (1); X sent (2) but delayed; H sent again (3) and skipped; X arrives late."""
    ingestor, store = rt.ingestor(), rt.store()
    ingestor.ingest(stamp([doc("e", "Version H.")]))
    late = stamp([doc("e", LONG)])
    assert ingestor.ingest(stamp([doc("e", "Version H.")])).skipped == 1
    outcome = ingestor.ingest(late)
    assert (outcome.completed, outcome.chunks) == (1, 0)
    assert texts(store, "e") == ["Version H."]


class Interleaved:
    """The real store; the first lookup of stored versions runs ``between`` after it answers."""

    def __init__(self, store: Store, between: Any) -> None:
        self.store, self.between = store, between

    def __getattr__(self, name: str) -> Any:
        return getattr(self.store, name)

    def stored_versions(self, filter: Any) -> dict[str, StoredVersion]:
        found = self.store.stored_versions(filter)
        between, self.between = self.between, None
        if between is not None:
            between()
        return found


def test_a_skip_never_stands_in_for_a_version_stored_meanwhile(rt: Runtime, stamp: Stamper) -> None:
    """Stored H; H again is looked up (unchanged) while X, sent earlier, is stored: the
    skip must not win over X's record, so H is embedded again and is the final version."""
    ingestor = rt.ingestor()
    ingestor.ingest(stamp([doc("f", "Version H of f.")]))
    x = stamp([doc("f", LONG)])
    h = stamp([doc("f", "Version H of f.")])
    racing = Ingestor(rt.embedder(), Interleaved(rt.store(), lambda: ingestor.ingest(x)),
                      rt.settings.chunk_tokens, rt.settings.chunk_overlap, sequences=rt.sequences())
    outcome = racing.ingest(h)
    assert (outcome.completed, outcome.skipped) == (1, 0) and outcome.chunks == 1
    assert texts(rt.store(), "f") == ["Version H of f."]
    assert rt.sequences().stored(["f"])["f"] == h[0].seq


def test_a_split_document_skips_only_segments_it_has(rt: Runtime, stamp: Stamper, tmp_path: Path) -> None:
    """A document split over batches whose earlier ingest lost a segment re-embeds that one."""
    ingestor, store = rt.ingestor(), rt.store()
    whole = doc("g", LONG)
    parts = [DocumentItem(**{**whole.to_dict(), "content": piece, "segment": i, "segments": 2})
             for i, piece in enumerate((LONG[: len(LONG) // 2], LONG[len(LONG) // 2 :]))]
    ingestor.ingest(stamp(parts))
    store.delete_where({"doc_key": "g", "segment": 1})
    again = ingestor.ingest(stamp(parts))
    assert again.skipped == 1 and again.chunks > 0  # segment 0 kept, segment 1 embedded
    assert {r["segment"] for r in store.scroll_payloads({"doc_key": "g"})} == {0, 1}
    assert len({r["doc_seq"] for r in store.scroll_payloads({"doc_key": "g"})}) == 1


class PruneFailsOnce:
    """The real store, whose first prune fails as an unreachable store would."""

    def __init__(self, store: Store) -> None:
        self.store, self.failed = store, False

    def __getattr__(self, name: str) -> Any:
        return getattr(self.store, name)

    def delete_older_many(self, keep: Any) -> int:
        if not self.failed:
            self.failed = True
            raise StoreError("prune: connection refused")
        return self.store.delete_older_many(keep)


def test_a_batch_retried_after_its_write_is_counted_and_pruned_not_skipped(rt: Runtime, stamp: Stamper) -> None:
    """The task retries a batch whose upsert landed but whose prune failed: two versions
    are stored, so nothing is skipped; the retry counts its chunks and prunes the old one.
    A batch delivered again with nothing left to prune is counted without embedding."""
    rt.ingestor().ingest(stamp([doc("h", LONG)]))
    flaky = Ingestor(rt.embedder(), PruneFailsOnce(rt.store()), rt.settings.chunk_tokens,
                     rt.settings.chunk_overlap, sequences=rt.sequences())
    batch = stamp([doc("h", "Version two of h.")])
    with pytest.raises(StoreError):
        flaky.ingest(batch)
    assert len(texts(rt.store(), "h")) > 1  # both versions stored, the old one not pruned yet
    retried = flaky.ingest(batch)
    assert (retried.completed, retried.skipped, retried.chunks) == (1, 0, 1)
    assert texts(rt.store(), "h") == ["Version two of h."]

    first = rt.ingestor().ingest(batch := stamp([doc("i", LONG)]))
    redelivered = rt.ingestor().ingest(batch)
    assert (redelivered.completed, redelivered.skipped, redelivered.tokens) == (1, 0, 0)
    assert redelivered.chunks == first.chunks == len(texts(rt.store(), "i"))
