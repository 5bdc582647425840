"""Job priorities and the Redis lists a queue's messages wait in.

Interactive work (``ragq ask``, ``ragq search``, ``/v1/answer``, ``/v1/search``,
``/v1/embeddings``, single-document ingests) goes to its own queue, served by a process
of its own (``workers/launcher.py``), and is sent at the broker's top priority, so a
process that also serves bulk queues takes it before any bulk batch.

Bulk jobs carry a priority from :data:`MIN_PRIORITY` (1, served last) to
:data:`MAX_PRIORITY` (9, served first), :data:`DEFAULT_PRIORITY` (5) when not given.
kombu's Redis transport keeps one list per queue and priority step and pops the lists
of a lower broker number first (0 is the highest there), so a job's priority maps to
broker number ``10 - priority`` and interactive work to 0. Only this module knows that
mapping and the lists' names; ``workers/celeryconfig.py`` gives kombu the same steps.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

MIN_PRIORITY = 1
MAX_PRIORITY = 9
DEFAULT_PRIORITY = 5
#: The broker priority of interactive work: above every bulk job's.
INTERACTIVE = 0
#: kombu's priority steps (one Redis list per queue and step) and its list-name separator.
PRIORITY_STEPS: tuple[int, ...] = tuple(range(10))
SEP = "\x06\x16"

PRIORITY_HELP = (f"Bulk job priority, {MIN_PRIORITY} (served last) to {MAX_PRIORITY} (served first); "
                 f"default {DEFAULT_PRIORITY}. Interactive requests always go first.")


def check_priority(value: Any) -> int:
    """``value`` as a bulk priority; ValueError naming the range otherwise (CLI and HTTP alike)."""
    if value is None:
        return DEFAULT_PRIORITY
    if isinstance(value, bool) or not isinstance(value, int) or not MIN_PRIORITY <= value <= MAX_PRIORITY:
        raise ValueError(f"priority must be an integer from {MIN_PRIORITY} (served last) to "
                         f"{MAX_PRIORITY} (served first), got {value!r}")
    return value


def broker_priority(priority: int) -> int:
    """The message priority kombu's Redis transport orders by (lower first) for a bulk priority."""
    return MAX_PRIORITY + 1 - check_priority(priority)


def queue_keys(queue: str) -> list[str]:
    """The Redis lists holding ``queue``'s waiting messages, the first popped first."""
    return [queue if step == 0 else f"{queue}{SEP}{step}" for step in PRIORITY_STEPS]


def queue_depths(redis: Any, queues: Iterable[str]) -> dict[str, int]:
    """Messages waiting per queue, every priority list counted, in one round trip."""
    names = list(dict.fromkeys(queues))
    pipe = redis.pipeline(transaction=False)
    for queue in names:
        for key in queue_keys(queue):
            pipe.llen(key)
    sizes = pipe.execute()
    n = len(PRIORITY_STEPS)
    return {queue: sum(int(s) for s in sizes[i * n:(i + 1) * n]) for i, queue in enumerate(names)}
