"""Sentence embeddings with a transformers BERT-family model: mean pooling + L2 norm.

This is the original demo's recipe (and sentence-transformers' for models such as
all-MiniLM-L6-v2 and m3e): run the encoder, average the token states under the
attention mask, normalise to unit length so that cosine similarity is a dot product.
"""

from __future__ import annotations

import functools
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from transformers import AutoModel, AutoTokenizer
from transformers.utils import logging as hf_logging

from common.models import default_prefixes, resolve_embed_source, sentence_transformers_window

if TYPE_CHECKING:
    from common.config import Settings

log = logging.getLogger(__name__)


def pick_device(requested: str = "auto") -> torch.device:
    """``auto`` takes the first visible CUDA device (the worker pins it) or the CPU."""
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(requested)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"RAGQ_DEVICE={requested} but no CUDA device is visible to this process")
    return device


#: Token budget of one forward pass when RAGQ_EMBED_BATCH_TOKENS is 0 (auto), per device.
#: CPU: bench/embed_budget.py (multilingual-e5-small, 287 chunks, 2 cores, best of 2 each):
#: 2048 0.92, 4096 0.89, 8192 0.98, 16384 1.00 of the best, all within the machine's noise,
#: so the smaller of the two best (half the activation memory). GPU: not measured here (no
#: card lent); large passes keep a card busy and fit a few GB of activations.
CPU_BATCH_TOKENS = 8192
GPU_BATCH_TOKENS = 65536

_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def pick_dtype(requested: str, device: torch.device) -> torch.dtype:
    """``auto``: bf16 on a GPU that supports it (fp16's range overflows in some models'
    activations, bf16's does not), else fp16 on a GPU, fp32 on the CPU."""
    if requested == "auto":
        if device.type != "cuda":
            return torch.float32
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if requested not in _DTYPES:
        raise ValueError(f"RAGQ_DTYPE={requested!r}: expected auto, fp32, fp16 or bf16")
    return _DTYPES[requested]


#: glibc mallopt parameters (malloc.h) and the values ragq sets; see keep_freed_memory().
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_MMAP_THRESHOLD = 256 * 1024 * 1024
_TRIM_THRESHOLD = 1024 * 1024 * 1024


def keep_freed_memory() -> bool:
    """Let glibc keep activation buffers for reuse instead of unmapping them after each batch.

    A forward pass on the CPU allocates tens of MB per layer (attention scores, the FFN's
    intermediate); glibc serves allocations that large with mmap and unmaps them when
    freed, so the next batch page-faults the same memory in again. Measured on 2 cores with
    multilingual-e5-small over 34k tokens: 1.5 million minor faults and 3.5 s of system time
    per pass; with the thresholds raised, none, and 15% less CPU per token. Memory then
    stays at the process's peak working set, which the next batch needs anyway. Linux/glibc
    only; elsewhere nothing changes.
    """
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    if not name or os.uname().sysname != "Linux":
        return False
    try:
        libc = ctypes.CDLL(name)
        return bool(libc.mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD)) and bool(
            libc.mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD))
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return False


@dataclass(frozen=True)
class EncodeStats:
    """What one :meth:`Embedder.encode` call cost, for job counts and benchmarks."""

    texts: int
    tokens: int
    batches: int
    seconds: float


class Embedder:
    """A loaded embedding model; build one per worker process and keep it.

    ``batch_tokens`` bounds the padded size (rows x longest row) of one forward pass, so
    the memory a batch needs is the same whatever the texts' lengths; texts are sorted
    longest first so padding is small and an out-of-memory error shows on batch one.

    Models trained with instructions (e5: ``query: `` / ``passage: ``) get them from
    :meth:`encode_queries` and :meth:`encode_documents`, like sentence-transformers'
    prompts; :meth:`encode` embeds texts as given. ``model_name`` is the id recorded with
    the vectors (it names the weights' origin when they are an offline conversion).
    """

    def __init__(
        self,
        model: str,
        device: str = "auto",
        batch_tokens: int = 0,
        threads: int = 0,
        *,
        dtype: str = "auto",
        query_prefix: str | None = None,
        document_prefix: str | None = None,
        models_dir: Path | None = None,
    ) -> None:
        self.device = pick_device(device)
        self.threads = (threads or os.cpu_count() or 1) if self.device.type == "cpu" else 0
        self._use_threads()
        keep_freed_memory()
        source = resolve_embed_source(model, models_dir)
        self.requested_model = model  # as configured (RAGQ_EMBED_MODEL): what loads it again
        self.model_name = source.model_id
        default_query, default_document = default_prefixes(model)
        self.query_prefix = default_query if query_prefix is None else query_prefix
        self.document_prefix = default_document if document_prefix is None else document_prefix
        path = source.path
        hf_logging.disable_progress_bar()  # worker logs, not terminals
        started = time.perf_counter()
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.dtype = pick_dtype(dtype, self.device)
        self.model = AutoModel.from_pretrained(path, dtype=self.dtype).to(self.device).eval()
        self.dimension: int = int(self.model.config.hidden_size)
        self.max_tokens: int = self._window(path)
        if not batch_tokens:
            batch_tokens = GPU_BATCH_TOKENS if self.device.type == "cuda" else CPU_BATCH_TOKENS
        self.batch_tokens = max(batch_tokens, self.max_tokens)
        log.info(
            "loaded embedding model %s (%d-d, window %d tokens) on %s as %s in %.1fs; %d tokens a pass",
            model, self.dimension, self.max_tokens, self.device, str(self.dtype).removeprefix("torch."),
            time.perf_counter() - started, self.batch_tokens,
        )

    @classmethod
    def from_settings(cls, settings: Settings, *, threads: int | None = None) -> Embedder:
        """The embedder ``settings`` describe (model, device, budget, prefixes, cache dir)."""
        return cls(
            settings.embed_model, settings.device, settings.embed_batch_tokens,
            settings.torch_threads if threads is None else threads,
            query_prefix=settings.query_prefix, document_prefix=settings.document_prefix,
            models_dir=settings.models_dir, dtype=settings.dtype,
        )

    @property
    def spec(self) -> dict[str, str]:
        """How this embedder makes vectors, as recorded with every stored point (SPEC_FIELDS)."""
        return {"model": self.model_name, "query_prefix": self.query_prefix,
                "document_prefix": self.document_prefix}

    @property
    def prefix_tokens(self) -> int:
        """Tokens the longer of the two prefixes adds to an input."""
        return max((self.count_tokens(p) for p in (self.query_prefix, self.document_prefix) if p), default=0)

    def encode_queries(self, texts: Sequence[str]) -> np.ndarray:
        """Embed search queries, with the model's query prefix."""
        return self.encode([self.query_prefix + t for t in texts])

    def encode_documents_with_stats(self, texts: Sequence[str]) -> tuple[np.ndarray, EncodeStats]:
        """Embed passages to store, with the model's document prefix."""
        return self.encode_with_stats([self.document_prefix + t for t in texts])

    def _window(self, path: str) -> int:
        """Tokens one input may hold, special tokens included."""
        limits = [int(getattr(self.model.config, "max_position_embeddings", 512))]
        if 0 < self.tokenizer.model_max_length < 1_000_000:
            limits.append(int(self.tokenizer.model_max_length))
        trained = sentence_transformers_window(path)
        if trained:
            limits.append(trained)
        return min(limits)

    @property
    def special_tokens(self) -> int:
        """Tokens the tokenizer adds around one input ([CLS] and [SEP] for BERT)."""
        return self.tokenizer.num_special_tokens_to_add(pair=False)

    def count_tokens(self, text: str) -> int:
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def encode(self, texts: Sequence[str], normalize: bool = True) -> np.ndarray:
        """Embed ``texts`` into a float32 array of shape (len(texts), dimension)."""
        vectors, _ = self.encode_with_stats(texts, normalize=normalize)
        return vectors

    def encode_with_stats(
        self, texts: Sequence[str], normalize: bool = True
    ) -> tuple[np.ndarray, EncodeStats]:
        if not texts:
            return np.zeros((0, self.dimension), dtype=np.float32), EncodeStats(0, 0, 0, 0.0)
        started = time.perf_counter()
        encoded = self.tokenizer(
            list(texts), add_special_tokens=True, truncation=True, max_length=self.max_tokens
        )["input_ids"]
        return self._encode_ids(encoded, normalize, started)

    def encode_document_ids_with_stats(
        self, rows: Sequence[Sequence[int]], normalize: bool = True
    ) -> tuple[np.ndarray, EncodeStats]:
        """Embed passages given as token ids (the chunker's, without special tokens).

        The document prefix's ids and the special tokens are added here, so a chunk is
        tokenized once, when it is cut, not again before the forward pass. For WordPiece
        (MiniLM) the ids equal those of tokenizing ``prefix + text``; for SentencePiece (e5)
        they may differ by the word-start mark on the first piece, and the vectors stay
        within cosine 0.98 (mean 0.9995) of the text's (tests/test_tokenize_once.py).
        """
        started = time.perf_counter()
        prefix = self._document_prefix_ids
        room = self.max_tokens - self.special_tokens - len(prefix)
        head, tail = self._special_frame
        encoded = [head + prefix + list(ids[:room]) + tail for ids in rows]
        return self._encode_ids(encoded, normalize, started)

    @functools.cached_property
    def _special_frame(self) -> tuple[list[int], list[int]]:
        """The special tokens the tokenizer puts before and after one input ([CLS] .. [SEP]),
        read off a probe, since tokenizers differ (and not all expose a method for it)."""
        bare = list(self.tokenizer("probe", add_special_tokens=False)["input_ids"])
        framed = list(self.tokenizer("probe", add_special_tokens=True)["input_ids"])
        for at in range(len(framed) - len(bare) + 1):
            if framed[at : at + len(bare)] == bare:
                return framed[:at], framed[at + len(bare):]
        raise RuntimeError(f"cannot tell the special tokens of {type(self.tokenizer).__name__}")

    @functools.cached_property
    def _document_prefix_ids(self) -> list[int]:
        """The prefix's ids as they appear before a text, read off ``prefix + probe``: alone,
        ``passage: `` ends in a lone SentencePiece ``▁`` that is not there before a word."""
        if not self.document_prefix:
            return []
        bare = list(self.tokenizer("probe", add_special_tokens=False)["input_ids"])
        joined = list(self.tokenizer(self.document_prefix + "probe", add_special_tokens=False)["input_ids"])
        if joined[len(joined) - len(bare):] == bare:
            return joined[: len(joined) - len(bare)]
        return list(self.tokenizer(self.document_prefix, add_special_tokens=False)["input_ids"])

    def _encode_ids(self, encoded: list[list[int]], normalize: bool, started: float) -> tuple[np.ndarray, EncodeStats]:
        out = np.zeros((len(encoded), self.dimension), dtype=np.float32)
        if not encoded:
            return out, EncodeStats(0, 0, 0, 0.0)
        self._use_threads()
        order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]), reverse=True)
        tokens = sum(len(ids) for ids in encoded)
        batches = 0
        for rows in self._token_budget_batches(order, encoded):
            batches += self._forward_halving(rows, encoded, normalize, out)
        return out, EncodeStats(len(encoded), tokens, batches, time.perf_counter() - started)

    def _forward_halving(self, rows: list[int], encoded: list[list[int]], normalize: bool, out: np.ndarray) -> int:
        """Forward ``rows`` into ``out``; on a GPU out-of-memory error, halve and retry.

        The token budget bounds a batch's memory, but other processes on the card, or a
        fragmented cache, can still leave too little for it: halving until it fits costs
        a little speed instead of failing the batch. One row that does not fit fails.
        Returns the number of forward passes run.
        """
        try:
            out[rows] = self._forward([encoded[i] for i in rows], normalize)
            return 1
        except torch.OutOfMemoryError:
            if len(rows) == 1:
                raise
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        half = len(rows) // 2
        log.warning("out of memory embedding %d inputs; retrying as %d and %d", len(rows), half, len(rows) - half)
        return (self._forward_halving(rows[:half], encoded, normalize, out)
                + self._forward_halving(rows[half:], encoded, normalize, out))

    def _use_threads(self) -> None:
        """Apply the CPU thread count in the calling thread.

        OpenMP keeps the count per thread: set only where the model was loaded (a
        worker's warm-up thread), a forked pool process's task thread ran on every
        core, and two worker processes sharing a CPU spun against each other (seen as
        2 busy threads per process and mostly system time). Setting it is cheap.
        """
        if self.threads:
            torch.set_num_threads(self.threads)

    def _token_budget_batches(
        self, order: list[int], encoded: list[list[int]]
    ) -> list[list[int]]:
        """Split length-sorted rows so rows x longest row stays within the budget."""
        batches: list[list[int]] = []
        current: list[int] = []
        for i in order:
            longest = len(encoded[current[0]]) if current else len(encoded[i])
            if current and (len(current) + 1) * longest > self.batch_tokens:
                batches.append(current)
                current = []
            current.append(i)
        if current:
            batches.append(current)
        return batches

    @torch.inference_mode()
    def _forward(self, rows: list[list[int]], normalize: bool) -> np.ndarray:
        padded = self.tokenizer.pad({"input_ids": rows}, return_tensors="pt")
        input_ids, mask = padded["input_ids"], padded["attention_mask"]
        if self.device.type == "cuda":  # page-locked, so the copies run asynchronously
            input_ids = input_ids.pin_memory().to(self.device, non_blocking=True)
            mask = mask.pin_memory().to(self.device, non_blocking=True)
        hidden = self._run_model(input_ids, mask)
        weights = mask.unsqueeze(-1).to(hidden.dtype)
        summed = (hidden * weights).sum(dim=1, dtype=torch.float32)
        pooled = summed / weights.sum(dim=1, dtype=torch.float32).clamp(min=1e-9)
        if normalize:
            pooled = torch.nn.functional.normalize(pooled, p=2, dim=1)
        return pooled.cpu().numpy()  # the one host sync of a batch: its result

    def _run_model(self, input_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, attention_mask=mask).last_hidden_state
