"""``ragq``: the command line. Each command is a thin call into :mod:`producer.client`.

Data goes to stdout (``--json`` prints one JSON document), messages and progress to
stderr; a failed job exits non-zero.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from common.config import Settings
from common.deletion import DeleteSelector
from common.priorities import PRIORITY_HELP
from common.jobs import JobInfo
from common.schemas import JobStatus
from producer.client import Client, Job, RagqError

app = typer.Typer(
    name="ragq",
    help="ragq: queue documents and questions for GPU-pinned RAG workers (Redis + Celery + Qdrant).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
out = Console()
err = Console(stderr=True)

#: Exit codes: 0 ok, 1 the job failed or had errors, 2 usage or setup problem.
EXIT_JOB_FAILED = 1
EXIT_SETUP = 2


def _client() -> Client:
    return Client(Settings())


def _print_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, ensure_ascii=False, indent=2) + "\n")


def _fail(message: str, code: int = EXIT_SETUP) -> None:
    err.print(f"[red]error:[/red] {message}", highlight=False)
    raise typer.Exit(code)


def _exit_code(info: JobInfo) -> int:
    return 0 if info.status == JobStatus.completed.value else EXIT_JOB_FAILED


def _summary(info: JobInfo) -> None:
    colour = {"completed": "green", "completed_with_errors": "yellow"}.get(info.status, "red")
    err.print(f"job [bold]{info.id}[/bold]: [{colour}]{info.status}[/{colour}]", highlight=False)
    line = f"  {info.completed} completed, {info.failed} failed of {info.total} items"
    if info.kind == "ingest":
        line += f" ({info.skipped} unchanged, skipped); {info.chunks} chunks, {info.tokens} tokens"
    elif info.kind == "delete":
        line = f"  {info.completed} documents deleted ({info.chunks} chunks), {info.failed} failed"
    elif info.kind == "reindex":
        target, switched = info.meta.get("target"), info.meta.get("switched")
        line = (f"  {info.completed} documents rebuilt into {target} ({info.chunks} chunks), {info.failed} failed; "
                + (f"searches now use {target} (was {info.meta.get('previous')}; "
                   "`ragq reindex --drop-old` deletes it)" if switched else "not switched"))
    err.print(line, highlight=False)
    if info.elapsed_s:
        t = info.throughput
        rates = f"{t.get('items_per_s', 0):.1f} items/s"
        if info.kind == "ingest":
            rates += f", {t.get('chunks_per_s', 0):.1f} chunks/s, {t.get('tokens_per_s', 0):.0f} tokens/s"
        elif info.tokens:
            rates += f", {t.get('tokens_per_s', 0):.0f} generated tokens/s"
        err.print(f"  {info.elapsed_s:.1f}s: {rates}", highlight=False)
    if info.reason:
        err.print(f"  reason: {info.reason}", highlight=False)
    for e in info.errors[:20]:
        err.print(f"  [red]✗[/red] {e['item']}: {e['reason']}", highlight=False)
    if len(info.errors) > 20:
        err.print(f"  … and {len(info.errors) - 20} more (ragq status {info.id} --json)", highlight=False)


def _wait_with_progress(client: Client, job_id: str, timeout: float | None) -> JobInfo:
    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TextColumn("{task.fields[detail]}"), TimeElapsedColumn(), console=err,
                  transient=False) as progress:
        task = progress.add_task("waiting", total=None, detail="")

        def update(info: JobInfo) -> None:
            detail = f"{info.chunks} chunks" if info.kind == "ingest" else ""
            if info.failed:
                detail += f", {info.failed} failed"
            progress.update(task, description=info.status, completed=info.done,
                            total=info.total or None, detail=detail)

        return client.job(job_id).wait(timeout, on_progress=update)


WEBHOOK_OPTION = typer.Option(None, "--webhook-url",
                              help="Announce the job's end here (job.completed / job.failed / job.cancelled); "
                                   "default RAGQ_WEBHOOK_URL.")
#: Checked by the client (common/priorities.py), as for the HTTP API.
PRIORITY_OPTION = typer.Option(None, "--priority", help=PRIORITY_HELP + " A job of one document is interactive.")


@app.command()
def ingest(
    paths: list[Path] = typer.Argument(..., help="Files (.json, .jsonl, .md, .txt) or directories (walked recursively)."),
    wait: bool = typer.Option(False, "--wait", help="Wait for the job, with a progress bar, then print a summary."),
    timeout: Optional[float] = typer.Option(None, help="With --wait: give up after this many seconds."),
    as_json: bool = typer.Option(False, "--json", help="Print the job as JSON on stdout."),
    webhook_url: Optional[str] = WEBHOOK_OPTION,
    force: bool = typer.Option(False, "--force", help="Re-embed documents even if unchanged since stored."),
    source: Optional[str] = typer.Option(None, "--source", help="Name the documents' source [default: each path given, resolved]."),
    sync: bool = typer.Option(False, "--sync", help="Wait, then delete the source's stored documents this run did not "
                                                    "send (only if it completed without errors)."),
    priority: Optional[int] = PRIORITY_OPTION,
) -> None:
    """Queue documents for embedding and upsert; prints the job id."""
    client = _client()
    try:
        job = client.ingest(paths, source=source, force=force, sync=sync, webhook_url=webhook_url,
                            priority=priority)
    except RagqError as exc:
        _fail(str(exc))
    if sync:
        _sync(client, job.id, timeout, as_json)
    if not wait:
        info = job.refresh()
        if as_json:
            _print_json(info.to_dict())
        else:
            out.print(job.id, highlight=False)
            err.print(f"queued {info.total} documents in {info.batches_total} batches; "
                      f"follow with `ragq status {job.id}`", highlight=False)
        return
    try:
        info = _wait_with_progress(client, job.id, timeout)
    except RagqError as exc:
        _fail(str(exc), EXIT_JOB_FAILED)
    _show(info, as_json)
    raise typer.Exit(_exit_code(info))


def _show(info: JobInfo, as_json: bool, summary: bool = True) -> None:
    """A job as ``--json`` prints it, or its id on stdout and (if ``summary``) its summary on stderr."""
    if as_json:
        _print_json(info.to_dict())
    else:
        out.print(info.id, highlight=False)
        if summary:
            _summary(info)


def _sync(client: Client, job_id: str, timeout: Optional[float], as_json: bool) -> None:
    """``ingest --sync``: wait for the ingest, then delete the stale documents and wait for that."""
    try:
        info = _wait_with_progress(client, job_id, timeout)
        _show(info, as_json)
        if info.status != JobStatus.completed.value:
            err.print("sync: the ingest did not complete cleanly; nothing deleted", highlight=False)
            raise typer.Exit(EXIT_JOB_FAILED)
        deleted = _wait_with_progress(client, client.delete_stale(job_id).id, timeout)
    except RagqError as exc:
        _fail(str(exc), EXIT_JOB_FAILED)
    _show(deleted, as_json)
    raise typer.Exit(_exit_code(deleted))


def _submit_and_show(client: Client, submit: Callable[[], Job], *, wait: bool, timeout: float | None,
                     as_json: bool) -> None:
    """Queue a job, then print it at once or, with ``--wait``, after it ends (exit code by outcome)."""
    try:
        job = submit()
        info = _wait_with_progress(client, job.id, timeout) if wait else job.refresh()
    except RagqError as exc:
        _fail(str(exc), EXIT_JOB_FAILED)
    _show(info, as_json, summary=wait)
    if wait:
        raise typer.Exit(_exit_code(info))


@app.command()
def delete(
    key: Optional[str] = typer.Option(None, "--key", help="A document key (its id, url or resolved path)."),
    url: Optional[str] = typer.Option(None, "--url", help="Documents with this url."),
    product: Optional[str] = typer.Option(None, "--product", help="Documents of this product."),
    where: Optional[str] = typer.Option(None, "--filter", help='A payload filter as JSON: {"field": value or [values]}.'),
    wait: bool = typer.Option(False, "--wait", help="Wait for the job, then print a summary."),
    timeout: Optional[float] = typer.Option(None, help="With --wait: give up after this many seconds."),
    as_json: bool = typer.Option(False, "--json", help="Print the job as JSON on stdout."),
) -> None:
    """Delete documents (all their chunks) by key, url, product or payload filter; a job with counts."""
    try:
        extra = json.loads(where) if where is not None else None
        selector = DeleteSelector.of(doc_key=key, url=url, product=product, filter=extra)
    except ValueError as exc:  # json.JSONDecodeError is one
        _fail(f"invalid selector: {exc}")
    client = _client()
    _submit_and_show(client, lambda: client.delete(selector), wait=wait, timeout=timeout, as_json=as_json)


@app.command()
def reindex(
    model: Optional[str] = typer.Option(None, "--model", help="The embedding model to re-index to (an HF id or path)."),
    chunk_tokens: Optional[int] = typer.Option(None, "--chunk-tokens", help="Tokens per chunk (default RAGQ_CHUNK_TOKENS)."),
    chunk_overlap: Optional[int] = typer.Option(None, "--chunk-overlap", help="Overlap tokens (default RAGQ_CHUNK_OVERLAP)."),
    drop_old: bool = typer.Option(False, "--drop-old", help="Delete the collections a re-index switched away from."),
    wait: bool = typer.Option(False, "--wait", help="Wait for the job (and the switch), then print a summary."),
    timeout: Optional[float] = typer.Option(None, help="With --wait: give up after this many seconds."),
    as_json: bool = typer.Option(False, "--json", help="Print the job as JSON on stdout."),
) -> None:
    """Rebuild the collection with another model or chunking beside the live one; searches
    keep answering from the old one and move to the new one in one step when it is done."""
    client = _client()
    if drop_old:
        if model or chunk_tokens or chunk_overlap is not None:
            _fail("--drop-old takes no other options")
        try:
            done = client.drop_old_collections()
        except RagqError as exc:
            _fail(str(exc), EXIT_JOB_FAILED)
        if as_json:
            _print_json(done)
        else:
            err.print(f"live: {done['live']}; dropped: {', '.join(done['dropped']) or 'nothing'}", highlight=False)
        return
    settings = client.settings
    if not model and chunk_tokens is None and chunk_overlap is None:
        _fail("say what to re-index to: --model and/or --chunk-tokens / --chunk-overlap")
    _submit_and_show(client, lambda: client.reindex(model or settings.embed_model, chunk_tokens=chunk_tokens,
                                                    chunk_overlap=chunk_overlap),
                     wait=wait, timeout=timeout, as_json=as_json)


@app.command()
def status(
    job_id: str = typer.Argument(..., help="A job id printed by `ragq ingest` or `ragq ask-file`."),
    as_json: bool = typer.Option(False, "--json", help="Print the job as JSON on stdout."),
    wait: bool = typer.Option(False, "--wait", help="Wait until the job finishes."),
) -> None:
    """Show a job's status, counts, throughput and per-item errors."""
    client = _client()
    info = _wait_with_progress(client, job_id, None) if wait else client.job(job_id).refresh()
    if as_json:
        _print_json(info.to_dict())
    elif info.status == JobStatus.not_found.value:
        _fail(f"job {job_id} not found (expired or never created)")
    else:
        _summary(info)
    if info.status == JobStatus.not_found.value:
        raise typer.Exit(EXIT_SETUP)
    if info.is_finished and info.status != JobStatus.completed.value:
        raise typer.Exit(EXIT_JOB_FAILED)


@app.command()
def info(
    as_json: bool = typer.Option(False, "--json", help="Print as JSON on stdout."),
    timeout: float = typer.Option(30.0, help="Seconds to wait for a worker to answer."),
) -> None:
    """Show the collection (points, dimension, model) and the queues."""
    client = _client()
    try:
        store = client.store_info(timeout=timeout)
    except RagqError as exc:
        _fail(str(exc))
    data = {"collection": store, "queues": client.queue_depths()}
    if as_json:
        _print_json(data)
        return
    table = Table(show_header=False, box=None)
    for key in ("name", "points", "dimension", "distance", "model", "query_prefix", "document_prefix",
                "hybrid", "retrieval", "backend", "location"):
        value = store.get(key)
        table.add_row(key, repr(value) if key.endswith("_prefix") and value is not None else str(value))
    for queue, depth in data["queues"].items():
        table.add_row(f"queue {queue}", f"{depth} waiting")
    out.print(table)


@app.command()
def optimize(
    timeout: float = typer.Option(1800.0, help="Seconds to wait for the index to be built."),
) -> None:
    """Build the embedded store's vector index now (the owner also does it when idle after large ingests)."""
    client = _client()
    try:
        result = client.optimize(timeout=timeout)
    except RagqError as exc:
        _fail(str(exc))
    if result.get("backend") != "embedded":
        out.print("a Qdrant server builds its index on its own; nothing to do")
        return
    verb = "built" if result.get("changed") else "already up to date"
    out.print(f"index {verb}: {result.get('points')} points, {result.get('seconds')} s")


@app.command()
def search(
    query: str = typer.Argument(..., help="The text to search for."),
    top_k: int = typer.Option(5, "--top-k", "-k", min=1, max=100, help="Distinct documents to return."),
    product: Optional[str] = typer.Option(None, help="Only documents of this product."),
    as_json: bool = typer.Option(False, "--json", help="Print the hits as JSON on stdout."),
    timeout: float = typer.Option(60.0, help="Seconds to wait for a worker to answer."),
) -> None:
    """Retrieve the best-matching documents, through the queue and a worker."""
    client = _client()
    try:
        rows = client.search(query, top_k=top_k, filter={"product": product} if product else None, timeout=timeout)
    except RagqError as exc:
        _fail(str(exc))
    hits = rows[0] if rows else []
    if as_json:
        _print_json([h.__dict__ for h in hits])
        return
    if not hits:
        err.print("no matching documents (is anything ingested? see `ragq info`)")
    for rank, hit in enumerate(hits, start=1):
        out.print(f"[bold]{rank}. {hit.title}[/bold]  [dim]{hit.score:.3f}  {hit.product}[/dim]", highlight=False)
        out.print(f"   {hit.url}", highlight=False)
        snippet = " ".join(hit.text.split())[:200]
        out.print(f"   [dim]{snippet}[/dim]", highlight=False)


@app.command()
def worker(
    queues: Optional[str] = typer.Option(
        None, help="Comma-separated queues to consume [default: RAGQ_INGEST_QUEUE,RAGQ_QA_QUEUE, i.e. ingest,qa]."),
    gpus: str = typer.Option("all", help="'all', 'none' (CPU) or GPU indices such as '0,2': one process per GPU."),
    processes: int = typer.Option(
        1, min=1, help="Worker processes per GPU (or on the CPU, sharing its cores)."),
    store_owner: bool = typer.Option(
        True, help="Embedded store only: this launch owns the store (one process consumes RAGQ_STORE_QUEUE). "
                   "Use --no-store-owner for further launches on the same host."),
    pool: str = typer.Option("prefork", help="Celery pool of each process (prefork: crash-isolated, time limits enforced)."),
    concurrency: int = typer.Option(
        1, min=1, help="Batches each process runs at once; above 1 needs --pool threads (the slots share the "
                       "model and the LLM in-flight budget: one batch retrieves while another generates)."),
    interactive_threads: int = typer.Option(
        2, min=0, help="Threads of the extra process per GPU (or on the CPU) that serves only RAGQ_INTERACTIVE_QUEUE "
                       "(asks, searches, embeddings, one-document ingests); 0 = no such process, the bulk processes "
                       "take interactive work first when their running batch ends."),
    loglevel: str = typer.Option("INFO", help="Celery log level."),
    drain_timeout: Optional[float] = typer.Option(
        None, help="On SIGTERM, seconds to let running batches finish before requeueing them [default: wait]."),
) -> None:
    """Start pinned worker processes (per GPU, or on the CPU) and supervise them.

    A launch that serves the ingest or qa queue also serves the interactive queue. With
    the embedded store (no RAGQ_QDRANT_URL) and more than one process, an extra process
    owns the store and the others send it their writes and searches.
    """
    from workers.launcher import Supervisor, plan_workers, select_gpus

    settings = Settings()
    queues = queues or f"{settings.ingest_queue},{settings.qa_queue}"
    try:
        chosen = select_gpus(gpus)
    except ValueError as exc:
        _fail(str(exc))
    names = [q.strip() for q in queues.split(",") if q.strip()]
    owner_queue = settings.store_queue if store_owner and not settings.qdrant_url else None
    serves = {settings.ingest_queue, settings.qa_queue, settings.interactive_queue} & set(names)
    try:
        specs = plan_workers(names, chosen, processes=processes, store_queue=owner_queue, pool=pool,
                             interactive_queue=settings.interactive_queue if serves else None,
                             interactive_threads=interactive_threads, concurrency=concurrency, loglevel=loglevel)
    except ValueError as exc:
        _fail(str(exc))
    raise typer.Exit(Supervisor(specs, drain_timeout_s=drain_timeout).run())


@app.command()
def config(as_json: bool = typer.Option(False, "--json", help="Print as JSON on stdout.")) -> None:
    """Print the effective settings (RAGQ_* variables and .env), secrets masked."""
    values = Settings().masked()
    if as_json:
        _print_json(values)
        return
    table = Table(show_header=False, box=None)
    for key, value in values.items():
        table.add_row(f"RAGQ_{key.upper()}", "" if value is None else str(value))
    out.print(table)


#: Command groups that live in their own modules; each registers on ``app`` when imported.
_COMMAND_MODULES: tuple[str, ...] = ("producer.cli_qa", "producer.cli_http", "producer.cli_ops",
                                     "producer.cli_batches", "producer.cli_webhooks")


def main() -> None:
    import importlib

    for name in _COMMAND_MODULES:
        importlib.import_module(name)
    app()


if __name__ == "__main__":  # run through the real module so command modules share its app
    from producer.cli import main as _main

    _main()
