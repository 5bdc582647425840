"""The generator interface every answer backend implements."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from common.prompts import PromptSource

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
    #: Whether ``submit`` returns before the answers are in (requests in flight elsewhere),
    #: so a caller can retrieve the next questions meanwhile. A local model computes in
    #: the calling thread: splitting its batch would only make its batches smaller.
    concurrent: bool = False

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

    def submit(
        self,
        conversations: Sequence[Conversation],
        *,
        max_tokens: int | None = None,
        temperature: float | None = None,
        order: float | None = None,
    ) -> Future[list[Generation]]:
        """``generate`` as a future. Here it runs now, in this thread; a ``concurrent``
        generator returns at once. Cancelling the future abandons what is still pending.
        ``order`` (``time.monotonic()`` when the caller's batch began) ranks the calls of
        several batches waiting for one in-flight budget, oldest first; ignored here."""
        future: Future[list[Generation]] = Future()
        try:
            future.set_result(self.generate(conversations, max_tokens=max_tokens, temperature=temperature))
        except Exception as exc:
            future.set_exception(exc)
        return future

    def close(self) -> None:
        """Release models, clients and memory; the generator is unusable afterwards."""

    def __enter__(self) -> Generator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class GroundedGenerator(Generator):
    """A generator that answers from the retrieved sources themselves, not from a prompt.

    ``answer_from_sources`` returns, per question, the answer and the indices of the
    sources it cites, in citation order: ``[n]`` in the answer is ``sources[cited[n - 1]]``.
    """

    @abstractmethod
    def answer_from_sources(
        self,
        questions: Sequence[str],
        sources: Sequence[Sequence[PromptSource]],
        *,
        lang: str = "auto",
        max_tokens: int | None = None,
    ) -> list[tuple[Generation, list[int]]]:
        """One (Generation, cited source indices) per question, same order."""


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
