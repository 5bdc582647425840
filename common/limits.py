"""Task time limits scaled to the size of the batch, and the checks that keep them sane.

A batch's soft limit raises inside the task (its items are then failed with the
reason); the hard limit kills the worker's pool process, whose message Celery then
requeues. Both grow with the work in the batch, and the broker's visibility timeout
must stay above every hard limit, or Redis would hand a still-running batch to a
second worker.
"""

from __future__ import annotations

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
    """(soft, hard) seconds for a batch of ``questions``."""
    per_question = settings.qa_s_per_question if generate else settings.qa_s_per_question / 10
    return _pair(settings.task_base_s + per_question * questions)


def longest_hard_limit(settings: Settings) -> float:
    return max(ingest_limits(settings, settings.batch_bytes)[1],
               qa_limits(settings, settings.qa_batch_size)[1])


def check_visibility_timeout(settings: Settings) -> None:
    """Refuse a configuration whose visibility timeout is below a task's hard limit."""
    hard = longest_hard_limit(settings)
    if settings.visibility_timeout_s <= hard:
        raise ValueError(
            f"RAGQ_VISIBILITY_TIMEOUT_S={settings.visibility_timeout_s} must exceed the longest hard "
            f"time limit ({hard:.0f} s for a full batch); raise it or lower the per-batch limits"
        )
