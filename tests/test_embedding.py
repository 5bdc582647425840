"""The embedding recipe equals sentence-transformers', and chunking loses no text."""

from __future__ import annotations

import numpy as np
import pytest

from common.chunking import Chunker
from common.embedding import Embedder
from common.models import resolve_embed_model


@pytest.fixture(scope="module")
def embedder() -> Embedder:
    return Embedder("sentence-transformers/all-MiniLM-L6-v2", device="cpu", batch_tokens=2048)


TEXTS = [
    "How do I detach a cloud disk?",
    "云硬盘如何从云主机卸载？",
    "Object storage buckets hold objects; each object has a key.",
    "short",
    "A longer passage about load balancers, listeners, health checks and backend servers " * 6,
]


def test_matches_sentence_transformers(embedder: Embedder) -> None:
    from sentence_transformers import SentenceTransformer

    reference = SentenceTransformer(resolve_embed_model(embedder.model_name), device="cpu")
    expected = reference.encode(TEXTS, normalize_embeddings=True, convert_to_numpy=True)
    got = embedder.encode(TEXTS)
    assert got.shape == (len(TEXTS), 384) and got.dtype == np.float32
    np.testing.assert_allclose(got, expected, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)


def test_batching_and_order_do_not_change_vectors(embedder: Embedder) -> None:
    one_by_one = np.stack([embedder.encode([t])[0] for t in TEXTS])
    together, stats = embedder.encode_with_stats(TEXTS)
    assert stats.batches >= 1 and stats.texts == len(TEXTS)
    np.testing.assert_allclose(together, one_by_one, atol=1e-5)
    reversed_ = embedder.encode(TEXTS[::-1])[::-1]
    np.testing.assert_allclose(reversed_, together, atol=1e-5)


def test_token_budget_limits_padded_batch_size(embedder: Embedder) -> None:
    texts = ["word " * n for n in (200, 150, 100, 50, 10, 5, 3, 1)] * 4
    encoded = embedder.tokenizer(texts)["input_ids"]
    order = sorted(range(len(texts)), key=lambda i: len(encoded[i]), reverse=True)
    batches = embedder._token_budget_batches(order, encoded)
    assert sorted(i for b in batches for i in b) == list(range(len(texts)))
    for rows in batches:  # padded size (rows x longest row) stays within the budget
        assert len(rows) * max(len(encoded[i]) for i in rows) <= embedder.batch_tokens
    assert len(batches) >= 3
    _, stats = embedder.encode_with_stats(texts)
    assert stats.batches == len(batches)


def test_window_is_the_trained_length(embedder: Embedder) -> None:
    assert embedder.max_tokens == 256
    assert embedder.special_tokens == 2


def test_chunks_cover_the_text_with_overlap_and_fit_the_window(embedder: Embedder) -> None:
    sentences = [f"Sentence number {i} explains step {i} of attaching a disk." for i in range(300)]
    text = " ".join(sentences)
    chunker = Chunker(embedder.tokenizer, max_tokens=100, overlap=20)
    chunks = chunker.split(text)
    assert len(chunks) > 5
    assert [c.index for c in chunks] == list(range(len(chunks)))
    for chunk in chunks:
        assert chunk.tokens <= 100
        assert embedder.count_tokens(chunk.text) <= 100 + 4
    for sentence in sentences:  # nothing is cut off: every sentence is whole in some chunk
        assert any(sentence in c.text for c in chunks), sentence
    for a, b in zip(chunks, chunks[1:]):  # consecutive windows overlap
        assert a.text[-30:].split()[-1] in b.text


def test_short_and_empty_texts(embedder: Embedder) -> None:
    chunker = Chunker(embedder.tokenizer, max_tokens=100, overlap=20)
    assert chunker.split("   \n ") == []
    [only] = chunker.split("  Just one line.  ")
    assert only.text == "Just one line." and only.index == 0


def test_a_second_batch_reuses_memory_instead_of_faulting_it_in(embedder: Embedder) -> None:
    """keep_freed_memory(): activation buffers stay mapped between batches (on glibc)."""
    import resource

    from common.embedding import keep_freed_memory

    if not keep_freed_memory():
        pytest.skip("not glibc: malloc thresholds cannot be set")
    texts = [" ".join(["cloud disk snapshot region"] * 60)] * 64  # one padded batch of ~16k tokens
    embedder.batch_tokens = 16384
    embedder.encode(texts)
    faults = []
    for _ in range(3):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        embedder.encode(texts)
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    # measured: ~300,000 faults per batch when glibc unmaps freed buffers, tens to ~25,000 with them kept
    assert min(faults) < 20_000, f"minor page faults per batch: {faults}"
