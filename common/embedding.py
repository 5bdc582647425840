"""Sentence embeddings with a transformers BERT-family model: mean pooling + L2 norm.

This is the original demo's recipe (and sentence-transformers' for models such as
all-MiniLM-L6-v2 and m3e): run the encoder, average the token states under the
attention mask, normalise to unit length so that cosine similarity is a dot product.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from transformers import AutoModel, AutoTokenizer
from transformers.utils import logging as hf_logging

from common.models import resolve_embed_model, sentence_transformers_window

log = logging.getLogger(__name__)


def pick_device(requested: str = "auto") -> torch.device:
    """``auto`` takes the first visible CUDA device (the worker pins it) or the CPU."""
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(requested)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"RAGQ_DEVICE={requested} but no CUDA device is visible to this process")
    return device


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
    """

    def __init__(
        self,
        model: str,
        device: str = "auto",
        batch_tokens: int = 16384,
        threads: int = 0,
    ) -> None:
        self.model_name = model
        self.device = pick_device(device)
        self.threads = (threads or os.cpu_count() or 1) if self.device.type == "cpu" else 0
        self._use_threads()
        path = resolve_embed_model(model)
        hf_logging.disable_progress_bar()  # worker logs, not terminals
        started = time.perf_counter()
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        dtype = torch.float16 if self.device.type == "cuda" else torch.float32
        self.model = AutoModel.from_pretrained(path, dtype=dtype).to(self.device).eval()
        self.dimension: int = int(self.model.config.hidden_size)
        self.max_tokens: int = self._window(path)
        self.batch_tokens = max(batch_tokens, self.max_tokens)
        log.info(
            "loaded embedding model %s (%d-d, window %d tokens) on %s in %.1fs",
            model, self.dimension, self.max_tokens, self.device, time.perf_counter() - started,
        )

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
        started = time.perf_counter()
        out = np.zeros((len(texts), self.dimension), dtype=np.float32)
        if not texts:
            return out, EncodeStats(0, 0, 0, 0.0)
        self._use_threads()
        encoded = self.tokenizer(
            list(texts), add_special_tokens=True, truncation=True, max_length=self.max_tokens
        )["input_ids"]
        order = sorted(range(len(texts)), key=lambda i: len(encoded[i]), reverse=True)
        tokens = sum(len(ids) for ids in encoded)
        batches = 0
        for rows in self._token_budget_batches(order, encoded):
            out[rows] = self._forward([encoded[i] for i in rows], normalize)
            batches += 1
        return out, EncodeStats(len(texts), tokens, batches, time.perf_counter() - started)

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
        input_ids = padded["input_ids"].to(self.device)
        mask = padded["attention_mask"].to(self.device)
        hidden = self.model(input_ids=input_ids, attention_mask=mask).last_hidden_state
        weights = mask.unsqueeze(-1).to(hidden.dtype)
        summed = (hidden * weights).sum(dim=1, dtype=torch.float32)
        pooled = summed / weights.sum(dim=1, dtype=torch.float32).clamp(min=1e-9)
        if normalize:
            pooled = torch.nn.functional.normalize(pooled, p=2, dim=1)
        return pooled.cpu().numpy()
