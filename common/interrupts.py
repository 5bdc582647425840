"""Exceptions that end a batch at once, wherever they land.

A task's soft time limit is raised by the worker's signal handler in whatever line the
task is running: inside a store call, a chunker, a generator. It is an ``Exception``,
so the handlers that turn a backend failure into a retried ``StoreError`` or a
per-item error would swallow it and carry on until the hard limit kills the process.
Those handlers let the types registered here through. ``common`` never imports
Celery, so the worker registers Celery's exception (``workers/tasks.py``).
"""

from __future__ import annotations

_types: tuple[type[BaseException], ...] = ()


def register(*types: type[BaseException]) -> None:
    """Let ``types`` pass through every handler in ``common`` that could swallow them."""
    global _types
    _types = tuple(dict.fromkeys((*_types, *types)))


def interrupts() -> tuple[type[BaseException], ...]:
    """The registered types, for an ``except interrupts(): raise`` ahead of a broad handler."""
    return _types
