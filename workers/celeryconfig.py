"""Celery settings derived from :class:`common.config.Settings` (lowercase, Celery 4+ names)."""

from __future__ import annotations

from typing import Any

from common import priorities, tasknames
from common.config import Settings


def build_config(settings: Settings) -> dict[str, Any]:
    """The Celery configuration for producers and workers alike.

    JSON only (a pickled message is refused), late acks with reject-on-lost so a killed
    worker's batch is redelivered, one message prefetched at a time because batches are
    long, and a visibility timeout longer than the hard time limit of any task.

    A batch past its hard limit is requeued, not acked: Celery kills its pool process
    before the task can record anything, so an ack would leave the job in progress for
    ever. Redelivery counts an attempt (``JobRecord.begin_attempt``), so a batch that
    always overruns still ends after ``RAGQ_MAX_TASK_ATTEMPTS`` with the reason.

    Every queue has one Redis list per priority step (``common/priorities.py``); a
    consumer pops the top step of all its queues first. A worker's store calls inherit
    the priority of the task they serve, so the store's owner takes an ask's search
    before a bulk batch's.
    """
    transport = {
        "visibility_timeout": settings.visibility_timeout_s,
        # look for messages whose visibility ran out every ~10 s, not kombu's ~100 s, so
        # a batch of a worker killed outright comes back soon after its timeout
        "unacked_restore_throttle": 1,
        "health_check_interval": 30,
        "socket_keepalive": True,
        "priority_steps": list(priorities.PRIORITY_STEPS),
        "sep": priorities.SEP,
    }
    return {
        "broker_url": settings.redis_dsn,
        "result_backend": settings.redis_dsn,
        "broker_transport_options": transport,
        "result_backend_transport_options": {"retry_policy": {"timeout": 10.0}},
        "broker_connection_retry_on_startup": True,
        "broker_connection_max_retries": None,
        "task_serializer": "json",
        "result_serializer": "json",
        "accept_content": ["json"],
        "result_accept_content": ["json"],
        "result_expires": settings.job_ttl_s,
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "task_acks_on_failure": True,
        "task_acks_on_timeout": False,  # Celery 5.7+: reject(requeue=True) at the hard limit
        "worker_prefetch_multiplier": 1,
        "task_inherit_parent_priority": True,
        "task_soft_time_limit": settings.task_soft_time_limit_s,
        "task_time_limit": settings.task_time_limit_s,
        "task_track_started": True,
        # Off on purpose: Celery's task-sent event carries saferepr(args), not the message's
        # argsrepr, so every 1 MB ingest batch went out a second time over Redis pub/sub and
        # its documents showed on Flower's task pages. Flower sees tasks from task-received
        # on, whose args are the short argsrepr; queue depth is in `ragq top` and /metrics.
        "task_send_sent_event": False,
        "worker_send_task_events": True,
        "worker_hijack_root_logger": False,
        "task_default_queue": settings.ingest_queue,
        "task_routes": {
            tasknames.INGEST_BATCH: {"queue": settings.ingest_queue},
            tasknames.DELETE_DOCUMENTS: {"queue": settings.ingest_queue},
            tasknames.ANSWER_BATCH: {"queue": settings.qa_queue},
            # synchronous requests somebody waits for: interactive (sent at the top priority)
            tasknames.SEARCH: {"queue": settings.interactive_queue},
            tasknames.STORE_INFO: {"queue": settings.interactive_queue},
            tasknames.EMBED: {"queue": settings.interactive_queue},
            tasknames.STORE_OPTIMIZE: {"queue": settings.qa_queue},  # builds an index: minutes
            tasknames.EMBED_BATCH: {"queue": settings.qa_queue},
            tasknames.STORE_CALL: {"queue": settings.store_queue},
            tasknames.REINDEX_PLAN: {"queue": settings.interactive_queue},  # `ragq reindex` waits for it
            tasknames.REINDEX_BATCH: {"queue": settings.ingest_queue},
            tasknames.REINDEX_DROP_OLD: {"queue": settings.interactive_queue},
        },
    }
