"""`make demo`: the main job end to end on the embedded defaults.

Starts a worker, ingests a sample of the JD Cloud English and Chinese docs (or, without
../shared/data, this project's own Markdown), runs a few searches through the queue,
answers English and Chinese questions (extractive answers: no LLM needed), measures
retrieval like `ragq eval`, prints throughput, says how to plug in an LLM, and stops
the worker it started. Every step is a real `ragq` command, printed before it runs.
`DEMO_LANGS=cn` (`make demo-zh`) runs the Chinese half alone.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DATA = REPO.parent / "shared" / "data"
CORPUS = DATA / "jdcloud-en"
LANGS = [lang for lang in os.environ.get("DEMO_LANGS", "en,cn").split(",") if lang]
SAMPLE_DOCS = int(os.environ.get("DEMO_DOCS", "300"))
RAGQ = [sys.executable, "-m", "producer"]
# a local LLM on a CPU (RAGQ_LLM_MODEL=...): short answers keep the demo to minutes
os.environ.setdefault("RAGQ_LLM_MAX_TOKENS", "96")
QUERIES = {"en": "How do I detach a cloud disk?", "cn": "如何卸载云硬盘？"}
LLM_HINT = """\
Answers above are extractive: the sentences of the sources that best answer the question,
quoted with their [n], since no LLM is configured. To generate answers with an LLM,
point the workers at any OpenAI-compatible endpoint (vLLM, mistral.rs, llama.cpp, OpenAI):

    RAGQ_LLM_BASE_URL=http://localhost:8000/v1 RAGQ_LLM_MODEL=Qwen/Qwen2-7B-Instruct ragq worker

or load one in the worker (RAGQ_LLM_BACKEND=local RAGQ_LLM_MODEL=<HF id, directory or .gguf>).
Chinese questions then get the original demo's Chinese prompt (你是一个云技术专家, ...)."""


def say(text: str) -> None:
    print(f"\n\033[1m== {text}\033[0m", flush=True)


def ragq(*args: str, check: bool = True, capture: bool = False) -> subprocess.CompletedProcess:
    shown = " ".join(a if len(a) < 60 else a[:57] + "..." for a in args[:6])
    print(f"$ ragq {shown}{' ...' if len(args) > 6 else ''}", flush=True)
    # stdout is captured for --json; stderr (progress bars, summaries) shows as it happens
    result = subprocess.run([*RAGQ, *args], cwd=REPO, text=True, stdout=subprocess.PIPE if capture else None)
    if check and result.returncode not in (0, 1):
        sys.exit(f"ragq {args[0]} failed with exit code {result.returncode}")
    return result


def sample_files(corpus: Path) -> tuple[list[Path], list[dict]]:
    """FAQ source pages first (so searches can find them), then a spread of the rest."""
    manifest = [json.loads(line) for line in (corpus / "manifest.jsonl").open(encoding="utf-8")]
    questions = [json.loads(line) for line in (corpus / "questions-dev.jsonl").open(encoding="utf-8")]
    sources = {q["source_url"] for q in questions}
    first = [m for m in manifest if m["url"] in sources]
    rest = [m for m in manifest if m["url"] not in sources]
    stride = max(1, len(rest) // max(1, SAMPLE_DOCS - len(first)))
    chosen = (first + rest[::stride])[: max(SAMPLE_DOCS, len(first))]
    return [corpus / m["file"] for m in chosen], questions


def start_worker(log_path: Path) -> subprocess.Popen:
    log_path.parent.mkdir(parents=True, exist_ok=True)
    print(f"$ ragq worker --gpus all   (log: {log_path.relative_to(REPO)})", flush=True)
    proc = subprocess.Popen([*RAGQ, "worker", "--gpus", "all"], cwd=REPO, stdout=log_path.open("wb"),
                            stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            sys.exit(f"the worker exited ({proc.returncode}); see {log_path}")
        probe = subprocess.run([*RAGQ, "info", "--timeout", "5"], cwd=REPO, capture_output=True, text=True)
        if probe.returncode == 0:
            return proc
    sys.exit(f"the worker did not answer within 180 s; see {log_path}")


def stop_worker(proc: subprocess.Popen) -> None:
    say("Stopping the worker")
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
    print("worker stopped", flush=True)


def corpora() -> list[tuple[str, Path | None]]:
    """(language, corpus folder) to demo; without ../shared/data, this project's Markdown."""
    found = [(lang, DATA / f"jdcloud-{lang}") for lang in LANGS if (DATA / f"jdcloud-{lang}" / "manifest.jsonl").is_file()]
    if not found:
        print(f"(no corpus in {DATA}: using this project's own Markdown instead)")
        return [("en", None)]
    return found


def main() -> int:
    from producer.demo_qa import run_qa_demo

    say("Starting a worker (one process per GPU, or one on the CPU)")
    worker = start_worker(REPO / ".ragq" / "demo-worker.log")
    jobs = []
    try:
        for lang, corpus in corpora():
            if corpus is None:
                files = sorted(p for p in [REPO / "README.md", *REPO.glob("docs/*.md")] if p.is_file())
                questions: list[dict] = []
            else:
                files, questions = sample_files(corpus)
            say(f"Ingesting {len(files)} documents ({corpus.name if corpus else 'this project'})")
            result = ragq("ingest", *map(str, files), "--wait", "--json", capture=True)
            job = json.loads(result.stdout)
            jobs.append(job)
            ragq("status", job["id"])
            say("The collection")
            ragq("info")
            say("Searching through the queue (hybrid: dense + BM25)")
            for q in [*questions[::60][:2], {"query": QUERIES[lang]}]:
                ragq("search", q["query"], "--top-k", "3")
                if "source_url" in q:
                    print(f"   (FAQ source page: {q['source_url']})")
            if corpus is not None:
                say(f"Answering {'Chinese' if lang == 'cn' else 'English'} questions")
                run_qa_demo(REPO, corpus)
        say("Plugging in an LLM")
        print(LLM_HINT)
        say("Throughput")
        for job in jobs:
            t = job["throughput"]
            print(f"ingest: {job['completed']} documents, {job['chunks']} chunks, {job['tokens']} tokens in "
                  f"{job['elapsed_s']:.1f} s = {t['items_per_s']:.1f} docs/s, {t['tokens_per_s']:.0f} tokens/s")
    finally:
        stop_worker(worker)
    return 0


if __name__ == "__main__":
    sys.exit(main())
