"""Chunks are tokenized once; the embedder's GPU-minded paths (dtype, OOM halving) run on the CPU;
an ingest batch writes one group of chunks to the store while the next one embeds."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from common.config import DEFAULT_EMBED_MODEL, MINILM_MODEL
from common.embedding import CPU_BATCH_TOKENS, Embedder, pick_dtype
from common.ingest import Ingestor, make_chunker
from common.schemas import DocumentItem
from common.store_edge import EdgeStore
from tests.conftest import MODEL_CACHE, require_cn_corpus, require_corpus

pytestmark = pytest.mark.timeout(900)


def _pages(corpus: Path, count: int) -> list[str]:
    files = sorted((corpus / "docs").rglob("*.json"))
    step = max(1, len(files) // count)
    return [json.loads(f.read_text(encoding="utf-8"))["content"] for f in files[::step][:count]]


@pytest.fixture(scope="module")
def minilm() -> Embedder:
    return Embedder(MINILM_MODEL, "cpu", threads=1)


@pytest.fixture(scope="module")
def e5() -> Embedder:
    return Embedder(DEFAULT_EMBED_MODEL, "cpu", threads=1, models_dir=MODEL_CACHE)


@pytest.fixture(scope="module")
def pages() -> dict[str, list[str]]:
    return {"en": _pages(require_corpus(), 20), "cn": _pages(require_cn_corpus(), 20)}


@pytest.mark.parametrize("lang", ["en", "cn"])
def test_minilm_chunk_ids_are_the_ids_of_their_text(minilm: Embedder, pages: dict, lang: str) -> None:
    """WordPiece: the ids a chunk was cut with are exactly those its text tokenizes to,
    windows included that start after an overlap (which must not open mid-word)."""
    chunker = make_chunker(minilm, 128, 32)
    chunks = [c for result in chunker.split_many(pages[lang]) for c in result]
    assert len(chunks) > 2 * len(pages[lang])  # many windows, so many overlap starts
    retokenized = minilm.tokenizer([c.text for c in chunks], add_special_tokens=False)["input_ids"]
    differing = [c.text[:60] for c, ids in zip(chunks, retokenized) if list(c.ids) != ids]
    assert not differing, f"{len(differing)} of {len(chunks)} chunks: {differing[:3]}"


@pytest.mark.parametrize("lang", ["en", "cn"])
def test_e5_vectors_from_chunk_ids_match_its_text(e5: Embedder, pages: dict, lang: str) -> None:
    """SentencePiece puts a word-start mark on a text's first piece that the same piece
    has not in the middle of a page, so ids may differ by that mark; the vectors may not."""
    chunker = make_chunker(e5, 128, 32)
    chunks = [c for result in chunker.split_many(pages[lang]) for c in result]
    from_ids, stats = e5.encode_document_ids_with_stats([c.ids for c in chunks])
    from_text, _ = e5.encode_documents_with_stats([c.text for c in chunks])
    cosine = (from_ids * from_text).sum(axis=1)
    assert stats.texts == len(chunks) and stats.tokens > 0
    assert cosine.min() >= 0.98 and cosine.mean() >= 0.9995, (cosine.min(), cosine.mean())


class _CountingTokenizer:
    """The real tokenizer, counting the calls that tokenize text."""

    def __init__(self, tokenizer: object) -> None:
        self._tokenizer = tokenizer
        self.calls: list[int] = []

    def __call__(self, text: object, **kwargs: object) -> object:
        self.calls.append(len(text) if isinstance(text, list) else 1)
        return self._tokenizer(text, **kwargs)

    def __getattr__(self, name: str) -> object:
        return getattr(self._tokenizer, name)


def test_a_batch_is_tokenized_in_one_call(tmp_path: Path, pages: dict) -> None:
    embedder = Embedder(MINILM_MODEL, "cpu", threads=1)
    with EdgeStore(tmp_path / "store", "once") as store:
        ingestor = Ingestor(embedder, store, chunk_tokens=128)
        ingestor.ensure_collection()
        counting = _CountingTokenizer(embedder.tokenizer)
        ingestor.chunker.tokenizer = embedder.tokenizer = counting  # type: ignore[assignment]
        ingestor.ingest([DocumentItem(key="warm", content="warm-up page", item="warm")])  # one-time probes
        counting.calls.clear()
        docs = pages["en"][:12] + pages["cn"][:12]
        outcome = ingestor.ingest([DocumentItem(key=f"d{i}", content=text, item=f"d{i}")
                                   for i, text in enumerate(docs)])
        assert outcome.completed == len(docs) and outcome.chunks > len(docs)
        assert counting.calls == [len(docs)], "each document's text is tokenized once, all in one call"
        assert store.count() == outcome.chunks + 1


def test_device_defaults_and_dtype() -> None:
    assert pick_dtype("auto", torch.device("cpu")) == torch.float32
    assert pick_dtype("bf16", torch.device("cpu")) == torch.bfloat16
    with pytest.raises(ValueError, match="RAGQ_DTYPE='int3'"):
        pick_dtype("int3", torch.device("cpu"))
    bf16 = Embedder(MINILM_MODEL, "cpu", threads=1, dtype="bf16")
    fp32 = Embedder(MINILM_MODEL, "cpu", threads=1)
    assert fp32.batch_tokens == CPU_BATCH_TOKENS and fp32.dtype == torch.float32
    texts = ["How do I detach a cloud disk?", "云硬盘如何从云主机卸载？"]
    got = bf16.encode(texts)
    assert got.dtype == np.float32
    assert (got * fp32.encode(texts)).sum(axis=1).min() > 0.99


class _SmallCard(Embedder):
    """An embedder whose 'card' holds at most ``fits`` inputs a pass, as a full GPU would."""

    fits = 3

    def _run_model(self, input_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        self.passes.append(int(input_ids.shape[0]))
        if input_ids.shape[0] > self.fits:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return super()._run_model(input_ids, mask)


def test_an_out_of_memory_batch_is_halved_and_retried() -> None:
    texts = [f"page {n} about cloud disks, snapshots and their billing" for n in range(10)]
    expected = Embedder(MINILM_MODEL, "cpu", threads=1).encode(texts)
    small = _SmallCard(MINILM_MODEL, "cpu", threads=1)
    small.passes = []
    vectors, stats = small.encode_with_stats(texts)
    np.testing.assert_allclose(vectors, expected, atol=1e-5)
    assert small.passes[0] == 10 and max(p for p in small.passes if p <= small.fits) <= 3
    assert stats.batches == sum(1 for p in small.passes if p <= small.fits)
    small.fits = 0  # not even one input fits: that is the batch's error, not a loop
    small.passes = []
    with pytest.raises(torch.OutOfMemoryError):
        small.encode(texts[:2])


class _TimedStore(EdgeStore):
    """The embedded store, with a slow write whose times are recorded."""

    def upsert(self, chunks: object) -> None:
        started = time.monotonic()
        time.sleep(0.6)
        super().upsert(chunks)  # type: ignore[arg-type]
        self.timed.append((started, time.monotonic()))


class _TimedEmbedder(Embedder):
    def encode_document_ids_with_stats(self, rows, normalize=True):  # type: ignore[no-untyped-def]
        started = time.monotonic()
        result = super().encode_document_ids_with_stats(rows, normalize)
        self.embeds.append((started, time.monotonic(), threading.current_thread().name))
        return result


def test_store_writes_overlap_the_next_embedding(tmp_path: Path, pages: dict) -> None:
    embedder = _TimedEmbedder(MINILM_MODEL, "cpu", threads=1, batch_tokens=512)
    embedder.embeds = []
    with _TimedStore(tmp_path / "store", "overlap") as store:
        store.timed = []
        ingestor = Ingestor(embedder, store, chunk_tokens=128)
        docs = [DocumentItem(key=f"d{i}", content=text, item=f"d{i}") for i, text in enumerate(pages["en"][:10])]
        outcome = ingestor.ingest(docs)
        assert outcome.completed == len(docs)
        groups = len(embedder.embeds)
        assert groups >= 3 and len(store.timed) == groups
        # write k ran while embedding k+1 did: they overlap in time
        for (write_start, write_end), (embed_start, embed_end, thread) in zip(store.timed, embedder.embeds[1:]):
            assert embed_start < write_end and write_start < embed_end, (store.timed, embedder.embeds)
            assert thread.startswith("ragq-embed")
        # and nothing was lost or written twice
        assert store.count() == outcome.chunks
