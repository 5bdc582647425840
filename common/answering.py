"""Answer one batch of questions: retrieve, build prompts, generate. No Celery here.

The batch is answered the way throughput wants it. For a local or extractive generator:
one embedding pass for all of its questions, one batched vector query per distinct
``(top_k, filter)`` group, then every prompt handed to the generator at once (a padded
batch). For an OpenAI-compatible endpoint the same steps are pipelined a few questions
at a time (:data:`PIPELINE_QUESTIONS`): each group's requests are in flight while the
next group is embedded. A question that fails (its generation errored, its filter was
refused) becomes an output line with ``error`` set and a per-item error in the job;
its sources are kept. Store failures raise :class:`~common.vectorstore.StoreError` so
the task can retry the batch.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field

from common.config import Settings
from common.generators import Generator
from common.generators.base import Conversation, Generation, GroundedGenerator, NoneGenerator
from common.interrupts import interrupts
from common import metrics
from common.jobs import BatchOutcome
from common.prompts import PromptSource, build_messages
from common.questions import QuestionItem, answer_line, rejected_line
from common.retrieval import Query, Retriever
from common.schemas import ItemError, Source

log = logging.getLogger(__name__)

#: ``model`` of a line whose answer was not generated (``none`` backend, retrieval-only job).
NO_MODEL = "none"
#: Questions retrieved at a time in a pipelined batch. Small enough that an endpoint's
#: slots fill a few questions at a time rather than after the whole batch's retrieval,
#: large enough that an embedding pass and a store query still serve many questions.
PIPELINE_QUESTIONS = 8


@dataclass
class AnsweredBatch:
    """Output lines in input order (rejected input lines included) and the batch's counts."""

    lines: list[dict]
    outcome: BatchOutcome


@dataclass
class _Work:
    item: QuestionItem
    sources: list[Source]
    error: str | None = None
    refs: dict[int, int] = field(default_factory=dict)  # source index -> its [n] in the prompt
    retrieval_s: float = 0.0  # the retrieval call this item was part of


@dataclass
class _Pending:
    """Items whose answers one generator call is computing (a future of a list, or of a
    dict by item index for a grounded generator, which answered already)."""

    work: list[_Work]
    future: Future


def _done(value: object) -> Future:
    future: Future = Future()
    future.set_result(value)
    return future


class Answerer:
    """Retrieve-then-generate over loaded resources; cheap to build, keeps no state."""

    def __init__(
        self,
        retriever: Retriever,
        generator: Generator | None,
        *,
        top_k: int = 5,
        prompt_lang: str = "auto",
        context_tokens: int = 1500,
        pipeline: int = PIPELINE_QUESTIONS,
    ) -> None:
        self.retriever = retriever
        self.generator = generator
        self.top_k = top_k
        self.prompt_lang = prompt_lang
        self.context_tokens = context_tokens
        self.pipeline = max(1, pipeline)

    @classmethod
    def from_settings(cls, retriever: Retriever, generator: Generator | None, settings: Settings) -> Answerer:
        return cls(retriever, generator, top_k=settings.top_k, prompt_lang=settings.prompt_lang,
                   context_tokens=settings.context_tokens)

    def answer(self, items: Sequence[QuestionItem], *, generate: bool = True) -> AnsweredBatch:
        """Answer the valid items of ``items``; refused ones come back as error lines.

        Refused items were counted by the producer, so only the others enter the counts.
        With a concurrent generator (an HTTP endpoint) the batch is pipelined: its
        questions are retrieved ``pipeline`` at a time, and each group's requests go out
        as soon as it is retrieved, so the embedding of the next group overlaps the
        requests in flight instead of leaving the endpoint idle for the whole batch's
        retrieval. A local or extractive generator gets the whole batch at once.
        """
        started = time.perf_counter()
        order = time.monotonic()  # this batch's rank for the shared in-flight budget: older first
        work = [_Work(item, []) for item in items if item.ok]
        generating = generate and self.generator is not None and not isinstance(self.generator, NoneGenerator)
        if generating and self.generator is not None and self.generator.concurrent \
                and not isinstance(self.generator, GroundedGenerator):
            generations = self._pipelined(work, order)
        else:
            lap = metrics.Lap()  # stage timings: search (embed + query), generate
            self._retrieve(work)
            lap("search")
            generations = self._collect(self._submit(work, order)) if generating else {}
            if generating:
                lap("generate")

        outcome = BatchOutcome()
        answered: dict[int, dict] = {}
        for w in work:
            gen = generations.get(w.item.index)
            error = w.error or (gen.error if gen else None)
            sources = [{**s.__dict__, "ref": w.refs.get(n)} for n, s in enumerate(w.sources)]
            usage = None
            if gen is not None and (gen.prompt_tokens is not None or gen.completion_tokens is not None):
                usage = {"prompt_tokens": gen.prompt_tokens, "completion_tokens": gen.completion_tokens}
                outcome.tokens += gen.completion_tokens or 0
            answered[w.item.index] = answer_line(
                w.item,
                answer=gen.text if gen is not None and gen.ok else None,
                sources=sources,
                model=(gen.model or None) if gen is not None else NO_MODEL,
                timings={"retrieval_s": round(w.retrieval_s, 4),
                         "generation_s": round(gen.seconds, 4) if gen is not None else 0.0},
                usage=usage,
                error=error,
            )
            if error:
                outcome.failed += 1
                outcome.errors.append(ItemError(w.item.label, error))
            else:
                outcome.completed += 1
        lines = [answered[i.index] if i.ok else rejected_line(i) for i in items]
        outcome.seconds = time.perf_counter() - started
        return AnsweredBatch(lines, outcome)

    # -- steps ------------------------------------------------------------------------
    def _pipelined(self, work: list[_Work], order: float) -> dict[int, Generation]:
        """Retrieve ``pipeline`` questions, send their requests, retrieve the next ones ...

        Whatever stops the batch midway (a store failure the task retries, the soft
        time limit) cancels the requests already sent: a retried batch sends its own.
        """
        pending: list[_Pending] = []
        searching = 0.0
        first_sent: float | None = None
        try:
            for start in range(0, len(work), self.pipeline):
                group = work[start:start + self.pipeline]
                searching += self._retrieve(group)
                if first_sent is None:
                    first_sent = time.perf_counter()
                pending.extend(self._submit(group, order))
            generations = self._collect(pending)
        except BaseException:
            for p in pending:
                p.future.cancel()
            raise
        metrics.observe("search", searching)
        if first_sent is not None:
            metrics.observe("generate", time.perf_counter() - first_sent)
        return generations

    def _retrieve(self, work: list[_Work]) -> float:
        """Fill each item's sources: one encode call, one store query per (top_k, filter)."""
        if not work:
            return 0.0
        started = time.perf_counter()
        found = self.retriever.run([Query(w.item.question, w.item.top_k or self.top_k, w.item.filter)
                                    for w in work])
        for w, sources in zip(work, found):
            if isinstance(sources, str):
                w.error = sources
            else:
                w.sources = sources
        seconds = time.perf_counter() - started
        for w in work:
            w.retrieval_s = seconds
        return seconds

    def _submit(self, work: list[_Work], order: float) -> list[_Pending]:
        """Prompts for every item that retrieval did not fail, handed to the generator:
        one call per answer length, ranked by ``order`` (when the batch began) for the
        shared in-flight budget. A grounded generator answers here and now."""
        todo = [w for w in work if w.error is None]
        if not todo:
            return []
        if isinstance(self.generator, GroundedGenerator):
            return [_Pending(todo, _done(self._answer_from_sources(todo, self.generator)))]
        conversations = []
        for w in todo:
            prompt_sources = [PromptSource(s.title, s.url, s.product, s.text, s.score) for s in w.sources]
            messages, used = build_messages(w.item.question, prompt_sources, lang=self.prompt_lang,
                                            context_tokens=self.context_tokens)
            w.refs = {index: n for n, index in enumerate(used, start=1)}
            conversations.append(messages)
        assert self.generator is not None
        pending = []
        for max_tokens, rows in _by_answer_length(todo).items():
            batch = [todo[n] for n in rows]
            try:
                future = self.generator.submit([conversations[n] for n in rows], max_tokens=max_tokens,
                                               order=order)
            except interrupts():  # the soft time limit ends the batch, it is no generator failure
                raise
            except Exception as exc:
                future = Future()
                future.set_exception(exc)
            pending.append(_Pending(batch, future))
        return pending

    def _collect(self, pending: list[_Pending]) -> dict[int, Generation]:
        """Wait for every submitted call; one that raised fails its questions, not the batch."""
        results: dict[int, Generation] = {}
        for p in pending:
            try:
                got = p.future.result()
            except interrupts():  # the soft time limit ends the batch, it is no generator failure
                raise
            except Exception as exc:  # a generator bug must not lose the batch's retrieval
                log.error("generator failed on a batch of %d questions", len(p.work), exc_info=exc)
                reason = f"generation failed: {type(exc).__name__}: {' '.join(str(exc).split())[:300]}"
                got = [Generation(None, "", 0.0, error=reason) for _ in p.work]
            if isinstance(got, dict):  # a grounded generator's answers, by item index
                results.update(got)
                continue
            if len(got) != len(p.work):
                raise RuntimeError(f"generator returned {len(got)} answers for {len(p.work)} prompts")
            for w, g in zip(p.work, got):
                results[w.item.index] = g
        return results

    def _answer_from_sources(self, todo: list[_Work], generator: GroundedGenerator) -> dict[int, Generation]:
        """A generator that reads the sources itself (extractive): no prompt, citations from it."""
        sources = [[PromptSource(s.title, s.url, s.product, s.text, s.score) for s in w.sources] for w in todo]
        results: dict[int, Generation] = {}
        for max_tokens, rows in _by_answer_length(todo).items():
            got = generator.answer_from_sources([todo[n].item.question for n in rows], [sources[n] for n in rows],
                                                lang=self.prompt_lang, max_tokens=max_tokens)
            for n, (generation, cited) in zip(rows, got):
                todo[n].refs = {index: ref for ref, index in enumerate(cited, start=1)}
                results[todo[n].item.index] = generation
        return results


def _by_answer_length(todo: list[_Work]) -> dict[int | None, list[int]]:
    """Rows of ``todo`` by the answer length they ask for: one generator call per length."""
    groups: dict[int | None, list[int]] = {}
    for n, w in enumerate(todo):
        groups.setdefault(w.item.max_tokens, []).append(n)
    return groups


class UnavailableGenerator(Generator):
    """Stands in for a generator that could not be built: every answer fails with ``reason``."""

    model_name = ""

    def __init__(self, reason: str) -> None:
        self.reason = reason

    def generate(self, conversations: Sequence[Conversation], *, max_tokens: int | None = None,
                 temperature: float | None = None) -> list[Generation]:
        return [Generation(None, "", 0.0, error=self.reason) for _ in conversations]


def failed_batch(items: Sequence[QuestionItem], reason: str) -> AnsweredBatch:
    """Every valid question of a batch failed for one reason (e.g. the store stayed down)."""
    outcome = BatchOutcome()
    lines = []
    for item in items:
        if not item.ok:
            lines.append(rejected_line(item))
            continue
        lines.append(answer_line(item, answer=None, sources=[], model=None, error=reason))
        outcome.failed += 1
        outcome.errors.append(ItemError(item.label, reason))
    return AnsweredBatch(lines, outcome)
