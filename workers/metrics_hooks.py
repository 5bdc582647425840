"""Celery signal receivers that write a worker's metrics to Redis (``common.metrics``).

Glue only: the recording, the keys and the reading are in ``common/metrics.py``; the
device a process reports comes from ``common/devices.py``, which never initialises CUDA,
because ``worker_ready`` and ``worker_shutdown`` run in the Celery main process, which
forks every pool process.
"""

from __future__ import annotations

import os
import socket
import time
from typing import Any

from celery import signals

from common import metrics
from common.config import Settings
from common.devices import device_info

_TASK_STATES = {"SUCCESS": "succeeded", "FAILURE": "failed", "RETRY": "retried"}


class _WorkerHooks:
    """Flush the buffer after each task, and register the worker at start (one per process)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._store: metrics.MetricsStore | None = None
        self._pid = 0

    def store(self) -> metrics.MetricsStore:
        if self._store is None or self._pid != os.getpid():  # a fresh client after fork
            from common.runtime import redis_client

            self._store = metrics.MetricsStore(redis_client(self.settings), prefix=self.settings.key_prefix,
                                               ttl=self.settings.job_ttl_s)
            self._pid = os.getpid()
        return self._store

    def on_ready(self, sender: Any = None, **_: Any) -> None:
        try:
            queues = ",".join(sorted(sender.app.amqp.queues.consume_from or {}))
            pool = type(sender.pool).__module__.rsplit(".", 1)[-1] if getattr(sender, "pool", None) else ""
            info = {**device_info(self.settings), "host": socket.gethostname(), "queues": queues,
                    "pool": pool, "pid": os.getpid(), "state": "online", "started_at": repr(time.time())}
            self.store().flush(sender.hostname, info=info)
        except Exception:
            pass

    def on_postrun(self, task: Any = None, state: str | None = None, **_: Any) -> None:
        try:
            request = task.request
            worker = request.hostname or socket.gethostname()
            queue = (request.delivery_info or {}).get("routing_key") or "unknown"
            counters, stages = metrics.take_pending()
            tasks = {(queue, _TASK_STATES.get(state or "", (state or "unknown").lower())): 1}
            self.store().flush(worker, counters, stages, tasks, info=device_info(self.settings))
        except Exception:
            pass

    def on_shutdown(self, sender: Any = None, **_: Any) -> None:
        """``sender`` is the WorkController (main process), which has ``hostname`` too."""
        try:
            self.store().flush(sender.hostname, info={"state": "offline", "stopped_at": repr(time.time())})
        except Exception:
            pass


_installed = False


def install_worker_hooks(settings: Settings) -> None:
    """Flush metrics after every task and register the worker at start; call once per worker."""
    global _installed
    if _installed:
        return
    hooks = _WorkerHooks(settings)
    signals.worker_ready.connect(hooks.on_ready, weak=False)
    signals.task_postrun.connect(hooks.on_postrun, weak=False)
    signals.worker_shutdown.connect(hooks.on_shutdown, weak=False)
    _installed = True
