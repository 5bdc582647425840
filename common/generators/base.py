"""The generator interface every answer backend implements."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass

Conversation = list[dict[str, str]]


@dataclass(frozen=True)
class Generation:
    """One answer, or why there is none (``error`` set, ``text`` ``None``)."""

    text: str | None
    model: str
    seconds: float
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    error: str | None = None  # per-item failure reason; text is None then

    @property
    def ok(self) -> bool:
        return self.error is None


class Generator(ABC):
    """Turns chat conversations into answers, a whole batch at a time.

    Batches, because throughput comes from batching (local models) or from many
    concurrent requests (vLLM-class servers), not from calling one prompt at a time.
    """

    model_name: str

    @abstractmethod
    def generate(
        self,
        conversations: Sequence[Conversation],
        *,
        max_tokens: int | None = None,
        temperature: float | None = None,
    ) -> list[Generation]:
        """One Generation per conversation, same order.

        A failing item yields ``Generation(error=...)`` — never an exception that loses
        the whole batch (programming errors excepted).
        """

    def close(self) -> None:
        """Release models, clients and memory; the generator is unusable afterwards."""

    def __enter__(self) -> Generator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class NoneGenerator(Generator):
    """Retrieval only: no model, every item comes back with ``text=None`` and no error."""

    model_name = "none"

    def generate(
        self,
        conversations: Sequence[Conversation],
        *,
        max_tokens: int | None = None,
        temperature: float | None = None,
    ) -> list[Generation]:
        return [Generation(text=None, model=self.model_name, seconds=0.0) for _ in conversations]
