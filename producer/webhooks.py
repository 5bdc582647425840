"""The webhook service: ended jobs become events in the outbox, and the outbox is sent.

Workers only push an ended job's id onto a list (in the script that ends it). This
service, run as a thread of ``ragq serve`` or as ``ragq webhooks``, turns each id into
its event: ``job.completed`` (also for ``completed_with_errors``), ``job.failed`` or
``job.cancelled``; a Batch API batch's job is finalized first (its output files written)
and announced as ``batch.completed`` / ``batch.failed`` / ``batch.cancelled`` /
``batch.expired`` instead. The event and the removal of the id are one transaction, and
event ids are derived from the job, so several services (API servers) may run at once.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

import redis

from common.files import FileStore
from common.jobs import JobInfo, JobRecord
from common.schemas import JobStatus
from common.webhooks import WebhookOutbox, WebhookSender, build_event
from producer.batches import Batches, BatchNotFound
from producer.client import Client

log = logging.getLogger("ragq.webhooks")

_JOB_EVENTS = {JobStatus.completed.value: "job.completed", JobStatus.completed_with_errors.value: "job.completed",
               JobStatus.failed.value: "job.failed", JobStatus.cancelled.value: "job.cancelled"}


class WebhookService:
    """Makes events of ended jobs and sends what is due; :meth:`run` loops until stopped."""

    def __init__(self, client: Client, files: FileStore, *, poll_s: float = 0.5) -> None:
        s = client.settings
        self.client = client
        self.batches = Batches(client, files)
        self.outbox = WebhookOutbox(client.redis, prefix=s.key_prefix, ttl=max(s.job_ttl_s, s.file_ttl_s))
        secret = s.webhook_secret.get_secret_value() if s.webhook_secret else None
        self.sender = WebhookSender(self.outbox, secret=secret or None, timeout_s=s.webhook_timeout_s,
                                    max_attempts=s.webhook_max_attempts, backoff_s=s.webhook_backoff_s)
        self.poll_s = poll_s

    def make_events(self) -> int:
        """Queue the events of ended jobs; a batch still cancelling waits for a later round."""
        prefix = self.client.settings.key_prefix
        made = 0
        for job_id in JobRecord.ended_ids(self.client.redis, prefix=prefix):
            record = self.client.job(job_id).record()
            info, url = record.info(max_errors=1), record.webhook_url()
            event = self._event(info) if url and info.status != JobStatus.not_found.value else None
            if event is False:
                continue  # not final yet
            pipe = self.client.redis.pipeline(transaction=True)
            if event and url:
                self.outbox.add(event, url, pipe=pipe)
                made += 1
            JobRecord.forget_ended(pipe, prefix=prefix, job_id=job_id)
            pipe.execute()
        return made

    def _event(self, info: JobInfo) -> dict[str, Any] | None | bool:
        """The job's event; False while its batch is not final yet, None when there is none to send."""
        batch_id = info.meta.get("batch_id")
        if not batch_id:
            created = int(info.finished_at or 0)
            return build_event(_JOB_EVENTS[info.status], {"id": info.id, "object": "job", "kind": info.kind,
                                                           "status": info.status}, subject=info.id, created_at=created)
        try:
            batch = self.batches.get(batch_id)  # finalizes it: its files exist before the event says so
        except BatchNotFound:
            return None
        status = batch["status"]
        if status not in ("completed", "failed", "cancelled", "expired"):
            return False
        ended = batch.get(f"{status}_at") or batch["created_at"]
        return build_event(f"batch.{status}", {"id": batch_id}, subject=batch_id, created_at=int(ended))

    def run_once(self) -> int:
        """One round: make events, send what is due; the number of deliveries accepted."""
        self.make_events()
        return self.sender.send_due()

    def run(self, stop: threading.Event) -> None:
        """Rounds until ``stop`` is set; a Redis outage is waited out, never raised."""
        while not stop.is_set():
            try:
                busy = self.run_once()
            except redis.RedisError as exc:
                log.warning("webhooks: Redis unavailable (%s); retrying", exc)
                busy = 0
            except Exception:
                log.exception("webhooks: round failed; retrying")
                busy = 0
            if not busy:
                stop.wait(self.poll_s)
        self.sender.close()


def start_thread(client: Client, files: FileStore) -> tuple[threading.Thread, threading.Event]:
    """The service as a daemon thread (``ragq serve``); set the event to stop it."""
    stop = threading.Event()
    thread = threading.Thread(target=WebhookService(client, files).run, args=(stop,), name="ragq-webhooks",
                              daemon=True)
    thread.start()
    return thread, stop
