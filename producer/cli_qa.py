"""``ragq ask``, ``ask-file``, ``results``, ``cancel`` and ``eval``: question answering from the shell.

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
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from common.evaluation import CUTOFF, METRICS, Comparison, EvalReport, compare, load_report
from common.jobs import JobInfo
from common.priorities import PRIORITY_HELP
from common.questions import MAX_TOP_K, AnswerResult
from common.schemas import JobKind, JobStatus
from producer.cli import (
    EXIT_JOB_FAILED,
    EXIT_SETUP,
    WEBHOOK_OPTION,
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
from producer.client import Client, JobTimeout, RagqError


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
    webhook_url: Optional[str] = WEBHOOK_OPTION,
    priority: Optional[int] = typer.Option(None, "--priority", help=PRIORITY_HELP),
) -> None:
    """Queue a file of questions; prints the job id (answers: `ragq results <job-id>`)."""
    client = _client()
    try:
        job = client.ask_file(path, generate=not retrieval_only, webhook_url=webhook_url, priority=priority)
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


@app.command("eval")
def eval_(
    path: Path = typer.Argument(..., help="Question lines (.jsonl) that name their answer's page: "
                                          "{\"id\", \"query\" or \"question\", \"source_url\" (a url or a list), "
                                          "\"product\"}, e.g. questions-dev.jsonl."),
    top_k: int = typer.Option(CUTOFF, "--top-k", "-k", min=CUTOFF, max=MAX_TOP_K,
                              help=f"Distinct documents retrieved per question "
                                   f"(at least {CUTOFF}: the metrics look {CUTOFF} deep)."),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON on stdout."),
    output: Optional[str] = typer.Option(None, "--output", "-o", help="Also write the report (JSON) here, "
                                                                      "for a later --compare."),
    previous: Optional[Path] = typer.Option(None, "--compare", help="A report written before (--output or --json): "
                                                                    "show each figure's change against it."),
    timeout: Optional[float] = typer.Option(None, help="Give up (and cancel the job) after this many seconds."),
) -> None:
    """Measure retrieval through the queue: hit@1/3/5/10, MRR@10, nDCG@10, per product and overall.

    The questions run as one retrieval-only job on the workers. Bad lines are reported
    with their line number and the rest is measured; exit code 1 if any line failed.
    """
    before: EvalReport | None = None
    if previous is not None:
        try:
            before = load_report(previous)
        except (OSError, ValueError) as exc:
            _fail(f"--compare: {exc}")
    client = _client()
    try:
        with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                      TimeElapsedColumn(), console=err, transient=True) as progress:
            task = progress.add_task("evaluating", total=None)

            def update(info: JobInfo) -> None:
                progress.update(task, description=info.status, completed=info.done, total=info.total or None)

            report = client.evaluate(path, top_k=top_k, timeout=timeout, on_progress=update)
    except JobTimeout as exc:
        _fail(str(exc), EXIT_JOB_FAILED)
    except RagqError as exc:
        _fail(str(exc), EXIT_SETUP)
    comparison = compare(report, before, previous_name=str(previous)) if before is not None else None
    data = report.to_dict()
    if output:
        _write_json_atomically(Path(output), data)
    if as_json:
        _print_json({**data, "comparison": comparison.to_dict()} if comparison else data)
    else:
        out.print(_eval_table(report, comparison))
    _eval_messages(report, comparison, output)
    raise typer.Exit(EXIT_JOB_FAILED if report.errors else 0)


_HEADERS = {"n": "n", **{m: m.replace("mrr", "MRR").replace("ndcg", "nDCG") for m in METRICS}}


def _eval_table(report: EvalReport, comparison: Comparison | None) -> Table:
    """Rows: products, then overall; columns: n and each metric (with its change, when comparing)."""
    title = f"retrieval quality, top_k {report.top_k}"
    if comparison is not None:
        title += f", change against {comparison.previous}"
    table = Table(title=escape(title), title_justify="left")
    table.add_column("product")
    for key in ("n", *METRICS):
        table.add_column(_HEADERS[key], justify="right")
    rows = list(report.products.items())
    for n, (name, row) in enumerate([*rows, ("overall", report.overall)]):
        deltas = None
        if comparison is not None:
            deltas = comparison.overall if name == "overall" and n == len(rows) else comparison.products.get(name)
        cells = [_cell(key, row.get(key), deltas.get(key) if deltas else None, comparison is not None)
                 for key in ("n", *METRICS)]
        label = "[bold]overall[/bold]" if n == len(rows) else escape(name)
        table.add_row(label, *cells, end_section=n == len(rows) - 1)
    return table


def _cell(key: str, value: Any, delta: float | None, comparing: bool) -> str:
    """A figure; when comparing, its change below it (two lines: a table of deltas fits 80 columns)."""
    if value is None:
        return "–"
    text = str(value) if key == "n" else f"{value:.3f}"
    if not comparing:
        return text
    if delta is None:
        return f"{text}\n[dim]new[/dim]"
    if abs(delta) < (0.5 if key == "n" else 0.0005):
        return f"{text}\n[dim]±0[/dim]"
    colour = "green" if delta > 0 else "red"
    change = f"{delta:+d}" if key == "n" else f"{delta:+.3f}"
    return f"{text}\n[{colour}]{change}[/{colour}]"


def _eval_messages(report: EvalReport, comparison: Comparison | None, output: str | None) -> None:
    """The errors and a summary, on stderr (stdout holds the table or the JSON)."""
    for e in report.errors[:20]:
        err.print(f"  [red]✗[/red] {escape(e.item)}: {escape(e.reason)}", highlight=False)
    if len(report.errors) > 20:
        err.print(f"  … and {len(report.errors) - 20} more (--json lists them all)", highlight=False)
    meta = report.meta
    summary = f"evaluated {report.overall['n']} questions"
    if report.errors:
        summary += f", {len(report.errors)} lines not evaluated"
    if meta.get("job_id"):
        summary += f"; job {meta['job_id']} in {meta.get('elapsed_s') or 0:.1f}s"
    if meta.get("model"):
        summary += f", model {meta['model']}"
    err.print(escape(summary), highlight=False)
    if not report.overall["n"] and not report.errors:
        err.print("[yellow]no questions in the file[/yellow]")
    if comparison is not None and not comparison.same_questions:
        err.print(f"[yellow]note:[/yellow] the questions differ from {escape(comparison.previous)}'s "
                  f"({comparison.added_questions} new, {comparison.removed_questions} gone): "
                  "changes mix the system and the test set", highlight=False)
    if output:
        err.print(f"wrote the report to {escape(output)}", highlight=False)


def _write_json_atomically(target: Path, data: Any) -> None:
    """Write beside the target and rename, so a reader never sees half a file."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(json.dumps(data, ensure_ascii=False, indent=2) + "\n")
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


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
