"""``ragq serve``: run the HTTP API (:mod:`producer.http`) with uvicorn."""

from __future__ import annotations

import typer

from common.config import Settings
from producer.cli import app, err


@app.command()
def serve(
    host: str = typer.Option("127.0.0.1", help="Address to bind; 0.0.0.0 listens on every interface."),
    port: int = typer.Option(8000, min=0, max=65535, help="TCP port."),
    log_level: str = typer.Option("info", help="uvicorn log level."),
) -> None:
    """Serve the HTTP API (OpenAPI at /docs) in front of the same queue and workers."""
    import uvicorn

    from producer.http import create_app

    settings = Settings()
    has_token = bool(settings.api_token and settings.api_token.get_secret_value())
    if host not in ("127.0.0.1", "localhost", "::1") and not has_token:
        err.print("[yellow]note:[/yellow] listening beyond loopback without RAGQ_API_TOKEN: "
                  "anyone who can reach the port can queue jobs.", highlight=False)
    uvicorn.run(create_app(settings), host=host, port=port, log_level=log_level.lower(),
                proxy_headers=False, server_header=False)
