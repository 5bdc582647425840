"""``ragq webhooks``: deliver job and batch events without an HTTP server, or inspect them."""

from __future__ import annotations

import signal
import threading
from typing import Any

import typer

from common.files import FileStore
from common.webhooks import new_secret
from producer.cli import _client, _print_json, app, err, out


@app.command()
def webhooks(
    dead: bool = typer.Option(False, "--dead", help="List deliveries that used up their attempts, then exit."),
    secret: bool = typer.Option(False, "--new-secret", help="Print a new whsec_ secret for RAGQ_WEBHOOK_SECRET."),
) -> None:
    """Send webhook events until stopped (what `ragq serve` also does in a thread).

    Run it where no API server runs; several senders may run at once (a delivery is
    leased to one of them, and an event keeps its id on every attempt).
    """
    if secret:
        out.print(new_secret(), highlight=False)
        return
    from producer.webhooks import WebhookService

    client = _client()
    service = WebhookService(client, FileStore.from_settings(client.settings))
    if dead:
        _print_json([{"id": d.id, "url": d.url, "attempts": d.attempts, "last_error": d.last_error}
                     for d in service.outbox.dead()])
        return
    stop = threading.Event()

    def _stop(*_: Any) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    err.print(f"sending webhooks ({service.outbox.pending()} pending); Ctrl-C stops", highlight=False)
    service.run(stop)
