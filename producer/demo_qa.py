"""The question-answering part of ``make demo``: answer a sample, show sources, measure retrieval.

``run_qa_demo(client, corpus)`` (or ``run_qa_demo(repo_dir, corpus_dir)``, as
scripts/demo.py calls it, once for the English and once for the Chinese corpus) expects
a worker on the ``qa`` queue and an ingested corpus. It

1. answers a sample of ``questions-dev.txt`` as one question job (``ragq ask-file``)
   and prints a few answers with their numbered sources;
2. measures retrieval over every line of ``questions-dev.jsonl`` the way ``ragq eval``
   does (hit@1/3/5/10, MRR@10, nDCG@10 of each question's ``source_url``).

It only talks to the queue through :class:`producer.client.Client`, like any producer.
"""

from __future__ import annotations

import textwrap
import time
from pathlib import Path
from typing import Any

from common.config import Settings
from common.jobs import JobInfo
from producer.client import Client, Job

DEFAULT_CORPUS = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "jdcloud-en"


def run_qa_demo(
    client: Client | str | Path | None = None,
    corpus: str | Path | None = None,
    *,
    sample: int = 4,
    show: int = 3,
    top_k: int = 5,
    timeout: float = 1800.0,
) -> dict[str, Any]:
    """Answer ``sample`` dev questions (printing ``show`` of them) and print hit@``top_k``.

    ``client`` may be a :class:`Client`, or anything else (e.g. the repository path) to
    build one from the ``RAGQ_*`` settings. Returns the figures it printed.
    """
    if not isinstance(client, Client):
        client = Client(Settings())
    corpus = Path(corpus) if corpus else DEFAULT_CORPUS
    txt, jsonl = corpus / "questions-dev.txt", corpus / "questions-dev.jsonl"
    if not txt.is_file() or not jsonl.is_file():
        print(f"(no dev questions in {corpus}: skipping question answering)")
        return {}

    # 1. A sample of the plain-text question list, spread over its products.
    lines = [(n, line.strip()) for n, line in enumerate(txt.read_text(encoding="utf-8").splitlines(), 1) if line.strip()]
    step = max(1, len(lines) // max(1, sample))
    chosen = lines[::step][:sample]
    print(f"$ ragq ask-file questions.txt --output answers.jsonl   "
          f"({len(chosen)} questions of {txt.name}; Client.ask_many does the same)", flush=True)
    job = client.ask_many([{"custom_id": str(n), "question": q} for n, q in chosen])
    info = _wait(job, timeout)
    answers = job.answers()
    print(f"job {job.id}: {info.status}, {info.completed} answered, {info.failed} failed in {info.elapsed_s or 0:.1f} s")
    for a in answers[:show]:
        print(f"\nQ (line {a.custom_id}): {a.question}")
        if a.answer is not None:
            print(textwrap.fill(_clip(a.answer, 600), 100, initial_indent="A: ", subsequent_indent="   "))
        elif a.error is None:
            print("A: (none: the workers run retrieval only, RAGQ_LLM_BACKEND=none)")
        if a.error:
            print(f"   error: {a.error}")
        for s in a.sources[:3]:
            ref = f"[{s['ref']}]" if s.get("ref") else "   "
            print(f"   {ref} {s['title']} ({s['product']}, score {s['score']:.3f})\n       {s['url']}")
        if a.model and a.model != "none":
            print(f"   model {a.model}; retrieval {a.timings.get('retrieval_s', 0):.2f} s (batch), "
                  f"generation {a.timings.get('generation_s', 0):.2f} s")
    print(f"\nall answers: ragq results {job.id} --output answers.jsonl")

    # 2. Retrieval quality over the whole dev set (what `ragq eval` prints).
    print(f"\n$ ragq eval {jsonl.name}   (its 'query' field and source_url; Client.evaluate does the same)",
          flush=True)
    started = time.perf_counter()
    report = client.evaluate(jsonl, timeout=timeout)
    seconds = time.perf_counter() - started
    o = report.overall
    print(f"{o['n']} questions in {seconds:.1f} s: hit@1 {o['hit@1']:.3f}, hit@3 {o['hit@3']:.3f}, "
          f"hit@5 {o['hit@5']:.3f}, hit@10 {o['hit@10']:.3f}, MRR@10 {o['mrr@10']:.3f}, "
          f"nDCG@10 {o['ndcg@10']:.3f}")
    hit = o[f"hit@{top_k}"] if f"hit@{top_k}" in o else None
    return {"answer_job": job.id, "answered": info.completed, "failed": info.failed,
            "eval_job": report.meta.get("job_id"), f"hit@{top_k}": hit, "eval": o}


def _wait(job: Job, timeout: float) -> JobInfo:
    """Wait for ``job``, printing progress every few seconds (plain lines: demo output is a log)."""
    last = [0.0]

    def progress(info: JobInfo) -> None:
        now = time.monotonic()
        if now - last[0] >= 5.0 and not info.is_finished:
            last[0] = now
            print(f"   … {info.status}: {info.done} of {info.total} questions", flush=True)

    return job.wait(timeout, poll_s=0.25, on_progress=progress)


def _clip(text: str, limit: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"
