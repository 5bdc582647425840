"""Answer one batch of questions: retrieve, build prompts, generate. No Celery here.

The batch is answered the way throughput wants it: one embedding pass for all of its
questions, one batched vector query per distinct ``(top_k, filter)`` group, then every
prompt handed to the generator at once (a padded batch for a local model, concurrent
requests for an OpenAI-compatible server). A question that fails (its generation
errored, its filter was refused) becomes an output line with ``error`` set and a
per-item error in the job; its sources are kept. Store failures raise
:class:`~common.vectorstore.StoreError` so the task can retry the batch.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from common.config import Settings
from common.embedding import Embedder
from common.generators import Generator
from common.generators.base import Conversation, Generation, NoneGenerator
from common import metrics
from common.jobs import BatchOutcome
from common.prompts import PromptSource, build_messages
from common.questions import QuestionItem, answer_line, rejected_line
from common.schemas import ItemError, Source
from common.vectorstore import Store

log = logging.getLogger(__name__)

#: ``model`` of a line whose answer was not generated (``none`` backend, retrieval-only job).
NO_MODEL = "none"


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


class Answerer:
    """Retrieve-then-generate over loaded resources; cheap to build, keeps no state."""

    def __init__(
        self,
        embedder: Embedder,
        store: Store,
        generator: Generator | None,
        *,
        top_k: int = 5,
        prompt_lang: str = "auto",
        context_tokens: int = 1500,
    ) -> None:
        self.embedder = embedder
        self.store = store
        self.generator = generator
        self.top_k = top_k
        self.prompt_lang = prompt_lang
        self.context_tokens = context_tokens

    @classmethod
    def from_settings(
        cls, embedder: Embedder, store: Store, generator: Generator | None, settings: Settings
    ) -> Answerer:
        return cls(embedder, store, generator, top_k=settings.top_k, prompt_lang=settings.prompt_lang,
                   context_tokens=settings.context_tokens)

    def answer(self, items: Sequence[QuestionItem], *, generate: bool = True) -> AnsweredBatch:
        """Answer the valid items of ``items``; refused ones come back as error lines.

        Refused items were counted by the producer, so only the others enter the counts.
        """
        started = time.perf_counter()
        work = [_Work(item, []) for item in items if item.ok]
        lap = metrics.Lap()  # stage timings: search (embed + query), generate
        retrieval_s = self._retrieve(work)
        lap("search")
        generating = generate and self.generator is not None and not isinstance(self.generator, NoneGenerator)
        generations = self._generate(work) if generating else {}
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
                timings={"retrieval_s": round(retrieval_s, 4),
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
    def _retrieve(self, work: list[_Work]) -> float:
        """Fill each item's sources: one encode call, one store query per group."""
        if not work:
            return 0.0
        started = time.perf_counter()
        vectors = self.embedder.encode([w.item.question for w in work])
        groups: dict[tuple[int, str], list[int]] = {}
        for row, w in enumerate(work):
            top_k = w.item.top_k or self.top_k
            key = (top_k, json.dumps(w.item.filter or {}, sort_keys=True, ensure_ascii=False))
            groups.setdefault(key, []).append(row)
        for (top_k, filter_json), rows in groups.items():
            filter_ = json.loads(filter_json) or None
            try:
                hits = self.store.search(vectors[rows], top_k=top_k, filter=filter_, distinct_docs=True)
            except ValueError as exc:  # a refused filter, a collection of another dimension
                for row in rows:
                    work[row].error = f"retrieval failed: {exc}"
                continue
            for row, row_hits in zip(rows, hits):
                work[row].sources = [Source.from_payload(h.payload, h.score) for h in row_hits]
        return time.perf_counter() - started

    def _generate(self, work: list[_Work]) -> dict[int, Generation]:
        """One generate() call for every item that retrieval did not fail."""
        todo = [w for w in work if w.error is None]
        if not todo:
            return {}
        conversations = []
        for w in todo:
            prompt_sources = [PromptSource(s.title, s.url, s.product, s.text, s.score) for s in w.sources]
            messages, used = build_messages(w.item.question, prompt_sources, lang=self.prompt_lang,
                                            context_tokens=self.context_tokens)
            w.refs = {index: n for n, index in enumerate(used, start=1)}
            conversations.append(messages)
        assert self.generator is not None
        by_length: dict[int | None, list[int]] = {}  # one generate() call per answer length asked
        for n, w in enumerate(todo):
            by_length.setdefault(w.item.max_tokens, []).append(n)
        results: list[Generation | None] = [None] * len(todo)
        for max_tokens, rows in by_length.items():
            try:
                got = self.generator.generate([conversations[n] for n in rows], max_tokens=max_tokens)
            except Exception as exc:  # a generator bug must not lose the batch's retrieval
                log.exception("generator failed on a batch of %d questions", len(rows))
                reason = f"generation failed: {type(exc).__name__}: {' '.join(str(exc).split())[:300]}"
                got = [Generation(None, "", 0.0, error=reason) for _ in rows]
            if len(got) != len(rows):
                raise RuntimeError(f"generator returned {len(got)} answers for {len(rows)} prompts")
            for n, g in zip(rows, got):
                results[n] = g
        return {w.item.index: g for w, g in zip(todo, results) if g is not None}


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
