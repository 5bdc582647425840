"""``ragq serve``: the HTTP front door to the same queue (FastAPI; OpenAPI at ``/openapi.json``).

The server is a producer like the CLI: it validates requests, enqueues jobs and sends
tasks by name through :class:`producer.client.Client`, and reads job records. It never
loads a model: search, answers and embeddings are computed by the workers, so a server
in front of GPU workers costs no GPU memory and starts in a second.

Errors carry real status codes and FastAPI's ``{"detail": ...}`` body: 401 without the
configured bearer token, 404 for an unknown job, 409 to cancel a finished job, 413 over
``RAGQ_HTTP_MAX_BODY_BYTES``, 415 for a body type other than JSON or JSONL, 422 for
invalid input (each ``detail[].loc`` names the field), 502 when a worker failed the
request, 503 when Redis or the broker is unreachable, 504 when no worker answered in time.

Layout: :mod:`~producer.http.app` assembles the app; :mod:`~producer.http.auth` checks
the token before any body is read; :mod:`~producer.http.schemas` holds the models and
:mod:`~producer.http.bodies` the JSON/JSONL body parsing; routes by area in
:mod:`~producer.http.routes_jobs` and :mod:`~producer.http.routes_workers`; requests
through the workers are awaited on Redis notifications (:mod:`~producer.http.notify`,
:mod:`~producer.http.calls`), never by a thread polling; :mod:`~producer.http.health`
caches ``/health``.
"""

from producer.http.app import create_app

__all__ = ["create_app"]
