"""``ragq batches`` and ``ragq files``: the Batch API from the shell, without an HTTP server.

Registered on :data:`producer.cli.app` when imported. The commands use the same
:class:`~producer.batches.Batches` and file store (``RAGQ_DATA_DIR/files``) as
``ragq serve``, so a batch made here is listed by ``GET /v1/batches`` and the other way
round; underneath each batch is a question job, like ``ask-file``'s (`ragq status`,
`ragq results` work on its ``job_id``).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any, Optional

import typer
from rich.markup import escape
from rich.table import Table

from common.batches import FINAL
from common.config import Settings
from common.files import FileStore, FileTooLarge
from producer.batches import Batches, BatchFinished, BatchInvalid, BatchNotFound
from producer.cli import EXIT_JOB_FAILED, _client, _fail, _print_json, app, err, out
from producer.client import RagqError

batches_app = typer.Typer(help="OpenAI-style batches: run a file of chat-completion requests as one question job.",
                          no_args_is_help=True)
files_app = typer.Typer(help="Files of the Batch API (inputs and outputs), kept under RAGQ_DATA_DIR/files.",
                        no_args_is_help=True)
app.add_typer(batches_app, name="batches")
app.add_typer(files_app, name="files")


def _store() -> FileStore:
    return FileStore.from_settings(Settings())


def _batches() -> Batches:
    client = _client()
    return Batches(client, FileStore.from_settings(client.settings))


# -- files ----------------------------------------------------------------------------------

@files_app.command("upload")
def files_upload(
    path: Path = typer.Argument(..., exists=True, dir_okay=False, help="A JSONL file of request lines."),
    as_json: bool = typer.Option(False, "--json", help="Print the file object as JSON."),
) -> None:
    """Store a batch input file; prints its id."""
    try:
        with path.open("rb") as handle:
            meta = _store().save(handle, filename=path.name, purpose="batch")
    except FileTooLarge as exc:
        _fail(str(exc))
    if as_json:
        _print_json(meta.to_dict())
    else:
        out.print(meta.id, highlight=False)


@files_app.command("list")
def files_list(
    purpose: Optional[str] = typer.Option(None, help="Only files of this purpose (batch, batch_output)."),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Files, newest first."""
    files, _ = _store().list(purpose=purpose)
    if as_json:
        _print_json([f.to_dict() for f in files])
        return
    table = Table("id", "purpose", "bytes", "filename", "created")
    for f in files:
        table.add_row(f.id, f.purpose, str(f.bytes), escape(f.filename), _when(f.created_at))
    out.print(table)


@files_app.command("get")
def files_get(
    file_id: str = typer.Argument(...),
    content: bool = typer.Option(False, "--content", help="Write the file's content to stdout instead."),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """A file's metadata, or with --content its bytes."""
    store = _store()
    meta = store.get(file_id)
    chunks = store.iter_bytes(file_id) if content else None
    if meta is None or (content and chunks is None):
        _fail(f"file {file_id} not found (expired, deleted or never uploaded)")
    if chunks is not None:
        for chunk in chunks:
            sys.stdout.buffer.write(chunk)
        sys.stdout.flush()
    elif as_json:
        _print_json(meta.to_dict())
    else:
        out.print(f"{meta.id}  {meta.purpose}  {meta.bytes} bytes  {escape(meta.filename)}  "
                  f"created {_when(meta.created_at)}, expires {_when(meta.expires_at)}", highlight=False)


# -- batches --------------------------------------------------------------------------------

@batches_app.command("create")
def batches_create(
    input_file: str = typer.Argument(..., help="A file id from `ragq files upload`, or a JSONL path (uploaded first)."),
    endpoint: str = typer.Option("/v1/chat/completions", help="The endpoint every line calls."),
    metadata: Optional[list[str]] = typer.Option(None, "--metadata", "-m",
                                                 help="KEY=VALUE, repeatable; top_k and filter (JSON) apply to every line."),
    wait: bool = typer.Option(False, "--wait", help="Wait until the batch ends."),
    timeout: Optional[float] = typer.Option(None, help="With --wait: give up waiting after this many seconds."),
    as_json: bool = typer.Option(False, "--json", help="Print the batch object as JSON."),
    webhook_url: Optional[str] = typer.Option(None, "--webhook-url",
                                              help="Announce the batch's end here (batch.completed, ...); "
                                                   "default RAGQ_WEBHOOK_URL."),
) -> None:
    """Run a file of request lines as one batch; prints the batch id."""
    pairs: dict[str, str] = {}
    for item in metadata or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            _fail(f"--metadata takes KEY=VALUE, not {item!r}")
        pairs[key] = value
    batches = _batches()
    file_id = input_file
    if Path(input_file).is_file():
        with Path(input_file).open("rb") as handle:
            file_id = batches.files.save(handle, filename=Path(input_file).name, purpose="batch").id
    try:
        batch = batches.create(file_id, endpoint, "24h", pairs or None, webhook_url=webhook_url)
        if wait:
            batch = _wait(batches, batch["id"], timeout)
    except BatchInvalid as exc:
        _fail(f"{exc.param}: {exc}")
    except RagqError as exc:
        _fail(str(exc))
    _show(batch, as_json)
    if wait and batch["status"] != "completed":
        raise typer.Exit(EXIT_JOB_FAILED)


@batches_app.command("list")
def batches_list(
    limit: int = typer.Option(20, min=1, max=100),
    after: Optional[str] = typer.Option(None, help="The last id of the previous page."),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Batches, newest first."""
    found, more = _batches().list(after=after, limit=limit)
    if as_json:
        _print_json({"data": found, "has_more": more})
        return
    table = Table("id", "status", "done", "failed", "total", "created", "output file")
    for b in found:
        c = b["request_counts"]
        table.add_row(b["id"], b["status"], str(c["completed"]), str(c["failed"]), str(c["total"]),
                      _when(b["created_at"]), b["output_file_id"] or "")
    out.print(table)
    if more:
        err.print(f"more: --after {found[-1]['id']}", highlight=False)


@batches_app.command("show")
def batches_show(batch_id: str = typer.Argument(...), as_json: bool = typer.Option(False, "--json")) -> None:
    """A batch's status, counts and files (finalizing it if its job has ended)."""
    try:
        _show(_batches().get(batch_id), as_json)
    except BatchNotFound as exc:
        _fail(str(exc))


@batches_app.command("cancel")
def batches_cancel(batch_id: str = typer.Argument(...), as_json: bool = typer.Option(False, "--json")) -> None:
    """Cancel a running batch; the answers so far go to its output file."""
    try:
        _show(_batches().cancel(batch_id), as_json)
    except BatchNotFound as exc:
        _fail(str(exc))
    except BatchFinished as exc:
        _fail(str(exc), EXIT_JOB_FAILED)


def _wait(batches: Batches, batch_id: str, timeout: float | None) -> dict[str, Any]:
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        batch = batches.get(batch_id)
        if batch["status"] in FINAL:
            return batch
        if deadline is not None and time.monotonic() > deadline:
            raise RagqError(f"batch {batch_id} still {batch['status']} after {timeout:.0f}s")
        time.sleep(0.5)


def _show(batch: dict[str, Any], as_json: bool) -> None:
    if as_json:
        _print_json(batch)
        return
    out.print(batch["id"], highlight=False)
    c = batch["request_counts"]
    err.print(f"{batch['status']}: {c['completed']} completed, {c['failed']} failed of {c['total']} "
              f"(job {batch['job_id']})", highlight=False)
    for name in ("output_file_id", "error_file_id"):
        if batch.get(name):
            err.print(f"  {name.removesuffix('_id').replace('_', ' ')}: {batch[name]} "
                      f"(`ragq files get {batch[name]} --content`)", highlight=False)
    for e in (batch.get("errors") or {}).get("data", [])[:20]:
        err.print(f"  [red]✗[/red] line {e.get('line')}: {escape(e.get('message') or '')}", highlight=False)


def _when(ts: int | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts)) if ts else "-"
