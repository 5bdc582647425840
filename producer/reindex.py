"""Submit a re-index job: plan it on a worker, then one batch per page of documents.

The producer never opens the store (with the embedded store only its owner may), so a
worker lists the live collection's documents and names the target (``ragq.reindex_plan``);
the job's batches are pages of those keys plus a last one, the switch, which the page
that ends last runs once the target holds every document (see ``workers/tasks.py``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from common import tasknames
from common.jobs import JobRecord
from common.limits import ingest_limits
from common.reindex import Plan, Recipe
from common.schemas import JobKind

if TYPE_CHECKING:
    from producer.client import Client, Job


def submit_reindex(client: Client, recipe: Recipe, *, job_id: str | None = None,
                   plan_timeout_s: float = 120.0) -> Job:
    """Queue the re-index of ``RAGQ_COLLECTION`` to ``recipe``; returns at once after planning."""
    from producer.client import Job, RagqError, WorkerRequest, _enqueuing

    if recipe.chunk_tokens is not None and recipe.chunk_tokens < 16:
        raise RagqError(f"--chunk-tokens must be at least 16, got {recipe.chunk_tokens}")
    if recipe.chunk_overlap is not None and recipe.chunk_overlap < 0:
        raise RagqError(f"--chunk-overlap must be 0 or more, got {recipe.chunk_overlap}")
    settings = client.settings
    client.ping()
    plan = Plan.from_dict(client._call(
        WorkerRequest(tasknames.REINDEX_PLAN, (recipe.to_dict(),), "(plan)", "reindex plan"), plan_timeout_s))
    if not plan.keys:
        raise RagqError(f"collection {plan.source!r} holds no documents: nothing to re-index "
                        f"(set RAGQ_EMBED_MODEL={recipe.embed_model} and ingest)")
    pages = plan.pages(settings.reindex_page_documents)
    record = JobRecord.create(
        client.redis, JobKind.reindex, meta={"collection": settings.collection, **plan.to_dict(),
                                             "model": recipe.embed_model, "batches": len(pages) + 1},
        prefix=settings.key_prefix, ttl=settings.job_ttl_s, job_id=job_id, webhook_url=client.webhook_for(None))
    soft, hard = ingest_limits(settings, settings.batch_bytes)
    with _enqueuing(record):
        record.add_items(items=len(plan.keys), batches=len(pages) + 1)  # + the switch
        for n, keys in enumerate(pages):
            client.celery.send_task(
                tasknames.REINDEX_BATCH, args=(record.id, n, keys, plan.to_dict()),
                argsrepr=f"({record.id!r}, batch={n}, documents={len(keys)})",
                soft_time_limit=soft, time_limit=hard, ignore_result=True)
    return Job(record.id, client)


def drop_old(client: Client, timeout_s: float = 600.0) -> dict[str, Any]:
    """Delete the collections of ``RAGQ_COLLECTION`` that the pointer no longer names."""
    from producer.client import WorkerRequest

    return client._call(WorkerRequest(tasknames.REINDEX_DROP_OLD, (), None, "reindex --drop-old"), timeout_s)
