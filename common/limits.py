"""Task time limits scaled to the size of the batch, and the checks that keep them sane.

A batch's soft limit raises inside the task (its items are then failed with the
reason); the hard limit kills the worker's pool process, whose message Celery then
requeues. Both grow with the work in the batch, and the broker's visibility timeout
must stay above every hard limit, or Redis would hand a still-running batch to a
second worker.
"""

from __future__ import annotations

import math

from common.config import Settings

#: The hard limit is this much longer than the soft one, plus a fixed margin, so a
#: task that catches its soft limit has time to record what happened.
HARD_FACTOR = 1.25
HARD_MARGIN_S = 30.0


def _pair(soft: float) -> tuple[float, float]:
    return round(soft, 1), round(soft * HARD_FACTOR + HARD_MARGIN_S, 1)


def ingest_limits(settings: Settings, nbytes: int) -> tuple[float, float]:
    """(soft, hard) seconds for an ingest batch of ``nbytes`` message bytes."""
    return _pair(settings.task_base_s + settings.ingest_s_per_mb * nbytes / 1_000_000)


def qa_limits(settings: Settings, questions: int, generate: bool = True) -> tuple[float, float]:
    """(soft, hard) seconds for a batch of ``questions``.

    A model in the worker answers them one after another: ``RAGQ_QA_S_PER_QUESTION`` each.
    An endpoint answers ``RAGQ_LLM_MAX_IN_FLIGHT`` at once, so the batch needs its rounds of
    requests, each allowed the longer of that and ``RAGQ_LLM_TIMEOUT_S``.
    """
    if not generate:
        return _pair(settings.task_base_s + settings.qa_s_per_question / 10 * questions)
    if settings.answer_backend == "openai":
        rounds = math.ceil(questions / max(1, settings.llm_max_in_flight))
        return _pair(settings.task_base_s + max(settings.qa_s_per_question, settings.llm_timeout_s) * rounds)
    return _pair(settings.task_base_s + settings.qa_s_per_question * questions)


def longest_hard_limit(settings: Settings) -> float:
    return max(ingest_limits(settings, settings.batch_bytes)[1],
               qa_limits(settings, settings.questions_per_batch)[1])


def check_visibility_timeout(settings: Settings) -> None:
    """Refuse a configuration whose visibility timeout is below a task's hard limit."""
    hard = longest_hard_limit(settings)
    if settings.visibility_timeout_s <= hard:
        raise ValueError(
            f"RAGQ_VISIBILITY_TIMEOUT_S={settings.visibility_timeout_s} must exceed the longest hard "
            f"time limit ({hard:.0f} s for a full batch); raise it or lower the per-batch limits"
        )
