"""The generation layer: chat conversations in, answers (or per-item errors) out.

``build_generator(settings)`` picks the backend from ``settings.llm_backend``:

* ``local`` — :class:`LocalGenerator`, a transformers model in this process;
* ``openai`` — :class:`OpenAIGenerator`, any OpenAI-compatible endpoint;
* ``none`` — :class:`NoneGenerator`, retrieval only.

torch/transformers and openai are imported only when their backend is used.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from common.config import Settings
from common.generators.base import Conversation, Generation, Generator, NoneGenerator

if TYPE_CHECKING:
    from common.generators.local import LocalGenerator, default_local_model_path
    from common.generators.remote import OpenAIGenerator

__all__ = [
    "Conversation", "Generation", "Generator", "LocalGenerator", "NoneGenerator",
    "OpenAIGenerator", "build_generator", "default_local_model_path",
]

_LAZY = {
    "LocalGenerator": "common.generators.local",
    "default_local_model_path": "common.generators.local",
    "OpenAIGenerator": "common.generators.remote",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def build_generator(settings: Settings) -> Generator:
    """The generator ``settings`` ask for; a local model is loaded here, not on first use."""
    if settings.llm_backend == "none":
        return NoneGenerator()
    if settings.llm_backend == "openai":
        from common.generators.remote import OpenAIGenerator

        key = settings.llm_api_key.get_secret_value() if settings.llm_api_key else None
        return OpenAIGenerator(
            base_url=settings.llm_base_url, api_key=key, model=settings.llm_model,
            max_tokens=settings.llm_max_tokens, temperature=settings.llm_temperature,
            timeout_s=settings.llm_timeout_s, max_retries=settings.llm_max_retries,
            max_in_flight=settings.llm_max_in_flight,
        )
    if settings.llm_backend == "local":
        from common.generators.local import LocalGenerator

        return LocalGenerator(
            settings.llm_model, device=settings.device,
            max_tokens=settings.llm_max_tokens, temperature=settings.llm_temperature,
        )
    raise ValueError(f"unknown llm_backend {settings.llm_backend!r}")
