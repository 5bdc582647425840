"""``ragq ask``, ``ask-file``, ``results`` and ``cancel``: question answering from the shell.

Registered on :data:`producer.cli.app` when imported (see ``_COMMAND_MODULES``). As
everywhere in the CLI, data goes to stdout (answers, JSONL, job ids) and messages to
stderr; exit codes are those of :mod:`producer.cli` (0 ok, 1 job failed or had errors,
2 usage or setup problem).
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Optional, TextIO

import typer
from rich.markup import escape

from common.questions import MAX_TOP_K, AnswerResult
from common.schemas import JobKind, JobStatus
from producer.cli import (
    EXIT_JOB_FAILED,
    _client,
    _exit_code,
    _fail,
    _print_json,
    _summary,
    _wait_with_progress,
    app,
    err,
    out,
)
from producer.client import Client, RagqError


@app.command()
def ask(
    question: str = typer.Argument(..., help="The question, in quotes."),
    top_k: Optional[int] = typer.Option(None, "--top-k", "-k", min=1, max=MAX_TOP_K,
                                        help="Distinct documents to retrieve (default RAGQ_TOP_K)."),
    product: Optional[str] = typer.Option(None, help="Only use documents of this product."),
    as_json: bool = typer.Option(False, "--json", help="Print the answer line as JSON on stdout."),
    timeout: float = typer.Option(300.0, help="Seconds to wait for the answer."),
) -> None:
    """Answer one question from the ingested documents; waits, prints the answer and its sources."""
    client = _client()
    try:
        result = client.ask(question, top_k=top_k, filter={"product": product} if product else None, timeout=timeout)
    except RagqError as exc:
        _fail(str(exc))
    if as_json:
        _print_json(result.to_dict())
    else:
        _print_answer(result)
    raise typer.Exit(0 if result.ok else EXIT_JOB_FAILED)


def _print_answer(result: AnswerResult) -> None:
    if result.answer is not None:
        out.print(escape(result.answer), highlight=False)
    elif result.error is None:
        err.print("[dim](no answer generated: retrieval only)[/dim]")
    if result.error:
        err.print(f"[red]error:[/red] {escape(result.error)}", highlight=False)
    if not result.sources:
        err.print("no matching documents (is anything ingested? see `ragq info`)")
        return
    out.print()
    out.print("[bold]Sources[/bold]")
    for rank, s in enumerate(result.sources, start=1):
        ref = f"[{s['ref']}]" if s.get("ref") else "   "
        title = s.get("title") or s.get("url") or "untitled"
        out.print(f"{escape(ref)} {escape(title)}  [dim]{s.get('score', 0):.3f}  {escape(s.get('product') or '')}[/dim]",
                  highlight=False)
        if s.get("url"):
            out.print(f"    {escape(s['url'])}", highlight=False)
    if result.model and result.model != "none":
        err.print(f"[dim]model {escape(result.model)}, "
                  f"{result.timings.get('retrieval_s', 0):.2f}s retrieval, "
                  f"{result.timings.get('generation_s', 0):.2f}s generation[/dim]", highlight=False)


@app.command("ask-file")
def ask_file(
    path: Path = typer.Argument(..., help="Questions: .jsonl ({\"custom_id\", \"question\", \"top_k\"?, "
                                          "\"filter\"?, \"max_tokens\"?}) or .txt (one per line)."),
    wait: bool = typer.Option(False, "--wait", help="Wait for the job, with a progress bar, then print a summary."),
    output: Optional[str] = typer.Option(None, "--output", "-o",
                                         help="Wait, then write the answers as JSONL here ('-' for stdout)."),
    timeout: Optional[float] = typer.Option(None, help="With --wait/--output: give up after this many seconds."),
    retrieval_only: bool = typer.Option(False, "--retrieval-only",
                                        help="Retrieve sources but generate no answers (e.g. to evaluate retrieval)."),
    as_json: bool = typer.Option(False, "--json", help="Print the job as JSON on stdout."),
) -> None:
    """Queue a file of questions; prints the job id (answers: `ragq results <job-id>`)."""
    client = _client()
    try:
        job = client.ask_file(path, generate=not retrieval_only)
    except RagqError as exc:
        _fail(str(exc))
    if not (wait or output):
        info = job.refresh()
        if as_json:
            _print_json(info.to_dict())
        else:
            out.print(job.id, highlight=False)
            refused = f" ({info.failed} refused: see `ragq status {job.id}`)" if info.failed else ""
            err.print(f"queued {info.total} questions in {info.batches_total} batches{refused}; follow with "
                      f"`ragq status {job.id}`, export with `ragq results {job.id} --output answers.jsonl`",
                      highlight=False)
        return
    try:
        info = _wait_with_progress(client, job.id, timeout)
    except RagqError as exc:
        _fail(f"{exc}; the job goes on: `ragq results {job.id}` exports what is done", EXIT_JOB_FAILED)
    if output:
        written = _export(client, job.id, output)
        err.print(f"wrote {written} answers to {'stdout' if output == '-' else output}", highlight=False)
    if as_json and output != "-":
        _print_json(info.to_dict())
    elif output != "-":
        out.print(job.id, highlight=False)
    _summary(info)
    raise typer.Exit(_exit_code(info))


@app.command()
def results(
    job_id: str = typer.Argument(..., help="A job id printed by `ragq ask-file`."),
    output: str = typer.Option("-", "--output", "-o", help="Write the JSONL here instead of stdout."),
) -> None:
    """Export a question job's answers as JSONL, in input order: partial while it runs, whole after."""
    client = _client()
    info = client.job(job_id).refresh()
    if info.status == JobStatus.not_found.value:
        _fail(f"job {job_id} not found (expired or never created)")
    if info.kind != JobKind.questions.value:
        _fail(f"job {job_id} is an {info.kind} job; only question jobs have results")
    written = _export(client, job_id, output)
    where = "stdout" if output == "-" else output
    if info.is_finished:
        note = f"job {info.status}"
    else:
        note = f"job {info.status}: partial, {info.done} of {info.total} done so far"
    err.print(f"wrote {written} of {info.total} answers to {where} ({note})", highlight=False)
    if info.is_finished and info.status != JobStatus.completed.value:
        raise typer.Exit(EXIT_JOB_FAILED)


@app.command()
def cancel(job_id: str = typer.Argument(..., help="The job to cancel (question or ingest).")) -> None:
    """Cancel a job: workers skip its remaining batches; answers already stored are kept."""
    client = _client()
    job = client.job(job_id)
    if job.cancel():
        info = job.refresh()
        err.print(f"cancelled job {job_id}: {info.done} of {info.total} items done; the batch running now "
                  "finishes, the rest are skipped", highlight=False)
        return
    info = job.refresh()
    if info.status == JobStatus.not_found.value:
        _fail(f"job {job_id} not found (expired or never created)")
    _fail(f"job {job_id} is already {info.status}; nothing to cancel", EXIT_JOB_FAILED)


def _export(client: Client, job_id: str, output: str) -> int:
    """Write the stored answer lines of ``job_id`` as JSONL; returns how many."""
    lines = client.job(job_id).results()
    if output == "-":
        return _write_lines(lines, sys.stdout)
    target = Path(output)
    target.parent.mkdir(parents=True, exist_ok=True)
    # Write beside the target and rename, so a reader never sees half a file.
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            count = _write_lines(lines, handle)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return count


def _write_lines(lines: Iterable[dict[str, Any]], handle: TextIO) -> int:
    count = 0
    for line in lines:
        handle.write(json.dumps(line, ensure_ascii=False) + "\n")
        count += 1
    handle.flush()
    return count
