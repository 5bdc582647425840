"""The generation layer: chat conversations in, answers (or per-item errors) out.

``build_generator(settings)`` picks the backend from ``settings.llm_backend`` (``auto``:
``openai`` with a base URL, ``local`` with a model, else ``extractive``):

* ``extractive`` — :class:`ExtractiveGenerator`, the best sentences of the sources, no LLM;
* ``local`` — :class:`LocalGenerator`, a transformers model in this process;
* ``openai`` — :class:`OpenAIGenerator`, any OpenAI-compatible endpoint;
* ``none`` — :class:`NoneGenerator`, retrieval only.

torch/transformers and openai are imported only when their backend is used.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from common.config import Settings
from common.generators.base import Conversation, Generation, Generator, GroundedGenerator, NoneGenerator

if TYPE_CHECKING:
    from common.embedding import Embedder
    from common.generators.extractive import ExtractiveGenerator
    from common.generators.local import LocalGenerator, default_local_model_path
    from common.generators.remote import OpenAIGenerator
    from common.ratelimit import RateLimiter

__all__ = [
    "Conversation", "ExtractiveGenerator", "Generation", "Generator", "GroundedGenerator",
    "LocalGenerator", "NoneGenerator", "OpenAIGenerator", "build_generator", "default_local_model_path",
]

_LAZY = {
    "ExtractiveGenerator": "common.generators.extractive",
    "LocalGenerator": "common.generators.local",
    "default_local_model_path": "common.generators.local",
    "OpenAIGenerator": "common.generators.remote",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _shared_limiter(settings: Settings, base_url: str, model: str) -> RateLimiter:
    """The budget every worker shares for ``base_url`` and ``model`` (``RAGQ_LLM_RPM`` / ``_TPM``)."""
    from common.ratelimit import RateLimiter, endpoint_key
    from common.runtime import async_redis_client

    return RateLimiter(async_redis_client(settings), endpoint_key(base_url, model),
                       rpm=settings.llm_rpm, tpm=settings.llm_tpm, prefix=settings.key_prefix)


def build_generator(settings: Settings, embedder: Embedder | None = None) -> Generator:
    """The generator ``settings`` ask for; a local model is loaded here, not on first use.

    ``embedder`` is the worker's loaded embedding model, which the extractive backend
    scores sentences with (one is loaded from ``settings`` if not given). The ``openai``
    backend shares its endpoint's rate limits and 429 pauses with every worker through
    the Redis of ``settings``.
    """
    backend = settings.answer_backend
    if backend == "none":
        return NoneGenerator()
    if backend == "extractive":
        from common.embedding import Embedder
        from common.generators.extractive import ExtractiveGenerator

        return ExtractiveGenerator(embedder or Embedder.from_settings(settings),
                                   max_tokens=settings.llm_max_tokens)
    if backend == "openai":
        from common.generators.remote import OpenAIGenerator

        key = settings.llm_api_key.get_secret_value() if settings.llm_api_key else None
        generator = OpenAIGenerator(
            base_url=settings.llm_base_url, api_key=key, model=settings.llm_model,
            max_tokens=settings.llm_max_tokens, temperature=settings.llm_temperature,
            timeout_s=settings.llm_timeout_s, max_retries=settings.llm_max_retries,
            max_in_flight=settings.llm_max_in_flight,
            limiter_factory=lambda model: _shared_limiter(settings, generator.base_url, model),
        )
        return generator
    if backend == "local":
        from common.generators.local import LocalGenerator

        return LocalGenerator(
            settings.llm_model, device=settings.device,
            max_tokens=settings.llm_max_tokens, temperature=settings.llm_temperature,
        )
    raise ValueError(f"unknown llm_backend {settings.llm_backend!r}")
