"""`make demo`: the main job end to end on the embedded defaults.

Starts a worker, ingests a sample of the JD Cloud English docs (or, without
../shared/data, this project's own Markdown), runs a few searches through the queue,
answers questions when the QA feature is present, prints throughput, and stops the
worker it started. Every step is a real `ragq` command, printed before it runs.
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
CORPUS = REPO.parent / "shared" / "data" / "jdcloud-en"
SAMPLE_DOCS = int(os.environ.get("DEMO_DOCS", "300"))
RAGQ = [sys.executable, "-m", "producer"]
# SmolLM2 on a CPU: short answers keep the demo to a minute or two
os.environ.setdefault("RAGQ_LLM_MAX_TOKENS", "96")


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


def sample_files() -> tuple[list[Path], list[dict]]:
    """FAQ source pages first (so searches can find them), then a spread of the rest."""
    if not (CORPUS / "manifest.jsonl").is_file():
        print(f"(no corpus at {CORPUS}: using this project's own Markdown instead)")
        files = sorted(p for p in [REPO / "README.md", *REPO.glob("docs/*.md")] if p.is_file())
        return files, []
    manifest = [json.loads(line) for line in (CORPUS / "manifest.jsonl").open()]
    questions = [json.loads(line) for line in (CORPUS / "questions-dev.jsonl").open()]
    sources = {q["source_url"] for q in questions}
    first = [m for m in manifest if m["url"] in sources]
    rest = [m for m in manifest if m["url"] not in sources]
    stride = max(1, len(rest) // max(1, SAMPLE_DOCS - len(first)))
    chosen = (first + rest[::stride])[: max(SAMPLE_DOCS, len(first))]
    return [CORPUS / m["file"] for m in chosen], questions


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


def main() -> int:
    files, questions = sample_files()
    say("Starting a worker (one process per GPU, or one on the CPU)")
    worker = start_worker(REPO / ".ragq" / "demo-worker.log")
    try:
        say(f"Ingesting {len(files)} documents")
        result = ragq("ingest", *map(str, files), "--wait", "--json", capture=True)
        job = json.loads(result.stdout)
        ragq("status", job["id"])
        say("The collection")
        ragq("info")
        say("Searching through the queue")
        for q in (questions[::40] or [{"query": "How do I start a worker?"}])[:4]:
            ragq("search", q["query"], "--top-k", "3")
            if "source_url" in q:
                print(f"   (FAQ source page: {q['source_url']})")
        try:
            from producer.demo_qa import run_qa_demo
        except ImportError:
            run_qa_demo = None
        if run_qa_demo is not None:
            say("Answering questions")
            run_qa_demo(REPO, CORPUS)
        say("Throughput")
        t = job["throughput"]
        print(f"ingest: {job['completed']} documents, {job['chunks']} chunks, {job['tokens']} tokens in "
              f"{job['elapsed_s']:.1f} s = {t['items_per_s']:.1f} docs/s, {t['tokens_per_s']:.0f} tokens/s")
    finally:
        stop_worker(worker)
    return 0


if __name__ == "__main__":
    sys.exit(main())
