"""Benchmark: an OpenAI Batch API batch against the same questions through ``ragq ask-file``.

ragq runs as the README starts it: ``ragq worker`` (openai backend, answering through the
fixed-latency OpenAI-compatible endpoint of bench/qa.py, ``--latency`` seconds per chat
completion) and ``ragq serve`` on a loopback port. N questions (the dev questions, numbered
to make them distinct) are written twice: as chat-completion request lines for the batch,
and as ``{"custom_id", "question"}`` lines for ask-file.

* batch: the request file is uploaded (``POST /v1/files``, not timed); timed from
  ``POST /v1/batches`` until ``GET /v1/batches/{id}`` says ``completed`` (polled every
  0.2 s; the output and error files are written before that answer).
  Its job's own created-to-finished time is reported beside it, so the batch's overhead
  (HTTP, finalizing) shows apart from the workers' pace on a shared machine.
* ask-file: ``ragq ask-file FILE --wait`` as a subprocess; timed from the job record's
  ``created_at`` to its ``finished_at`` (the CLI's own start-up is not counted against it).

The sides alternate (batch first in even cycles, ask-file first in odd ones), at least
twice each, and best is compared with best: target ask-file / batch >= 0.95. Then the
output file (``GET /v1/files/{id}/content``, streamed to disk) is downloaded while the API
server's RSS is sampled every 10 ms; its peak (``VmHWM`` after resetting it through
``/proc/PID/clear_refs``) is reported beside its RSS before and the file's size.

    python bench/batch.py [--lines 10000] [--latency 0.2] [--in-flight 32] [--cycles 2] [--docs 100]

Uses its own key prefix, queues and temporary store; writes only under bench/results/.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.qa import CORPUS, RESULTS, Bench, LatencyServer, choose_docs, dev_questions  # noqa: E402


def write_inputs(directory: Path, n: int) -> tuple[Path, Path]:
    """The same N questions as batch request lines and as ask-file lines."""
    qs = [q["query"] for q in dev_questions()]
    questions = [f"{qs[i % len(qs)]} (#{i})" for i in range(n)]
    requests, asks = directory / "requests.jsonl", directory / "questions.jsonl"
    with requests.open("w") as r, asks.open("w") as a:
        for i, q in enumerate(questions):
            r.write(json.dumps({"custom_id": f"q{i}", "method": "POST", "url": "/v1/chat/completions",
                                "body": {"model": "latency-bench", "messages": [{"role": "user", "content": q}]}})
                    + "\n")
            a.write(json.dumps({"custom_id": f"q{i}", "question": q}) + "\n")
    return requests, asks


class Api:
    """``ragq serve`` on a free loopback port with the bench's settings."""

    def __init__(self, env: dict[str, str], log: Path) -> None:
        import socket

        import httpx

        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        self.proc = subprocess.Popen([sys.executable, "-m", "producer", "serve", "--port", str(port),
                                      "--log-level", "warning"], cwd=REPO, env=env, stdout=log.open("ab"),
                                     stderr=subprocess.STDOUT, start_new_session=True)
        self.http = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=600)
        deadline = time.monotonic() + 60
        while True:
            try:
                if self.http.get("/openapi.json").status_code == 200:
                    return
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline or self.proc.poll() is not None:
                sys.exit(f"ragq serve did not start; see {log}")
            time.sleep(0.2)

    def stop(self) -> None:
        self.http.close()
        self.proc.terminate()
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def run_batch(api: Api, bench: Bench, requests: Path, n: int) -> dict[str, Any]:
    with requests.open("rb") as handle:
        file_id = api.http.post("/v1/files", files={"file": ("requests.jsonl", handle)},
                                data={"purpose": "batch"}).raise_for_status().json()["id"]
    started = time.perf_counter()
    batch = api.http.post("/v1/batches", json={"input_file_id": file_id, "endpoint": "/v1/chat/completions",
                                               "completion_window": "24h"}).raise_for_status().json()
    while batch["status"] not in ("completed", "failed", "cancelled", "expired"):
        time.sleep(0.2)
        batch = api.http.get(f"/v1/batches/{batch['id']}").raise_for_status().json()
    seconds = time.perf_counter() - started
    counts = batch["request_counts"]
    assert batch["status"] == "completed" and counts == {"total": n, "completed": n, "failed": 0}, batch
    job = bench.client().job(batch["job_id"]).refresh()  # the job's own time: the rest is the batch's overhead
    return {"seconds": seconds, "job_s": job.finished_at - job.created_at, "batch_id": batch["id"],
            "output_file_id": batch["output_file_id"]}


def run_ask_file(bench: Bench, asks: Path, n: int) -> dict[str, Any]:
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "producer", "ask-file", str(asks), "--wait"], cwd=REPO,
                          env=bench.env, capture_output=True, text=True, timeout=7200)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        sys.exit(f"ragq ask-file failed ({done.returncode}):\n{done.stderr[-2000:]}")
    info = bench.client().job(done.stdout.strip().splitlines()[-1]).refresh()
    assert info.status == "completed" and info.completed == n, (info.status, info.completed, info.errors[:3])
    return {"seconds": info.finished_at - info.created_at, "cli_wall_s": wall, "job_id": info.id}


def _status_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def download_rss(api: Api, file_id: str, dest: Path) -> dict[str, Any]:
    """Stream the output file to disk while sampling the server's RSS; its peak over the download."""
    pid = api.proc.pid
    before = _status_kib(pid, "VmRSS")
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")  # resets VmHWM to the current RSS
        hwm_reset = True
    except OSError:
        hwm_reset = False
    peak = [before]
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], _status_kib(pid, "VmRSS"))
            stop.wait(0.01)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    started = time.perf_counter()
    size = 0
    with api.http.stream("GET", f"/v1/files/{file_id}/content") as response, dest.open("wb") as out:
        response.raise_for_status()
        for chunk in response.iter_bytes():
            out.write(chunk)
            size += len(chunk)
    seconds = time.perf_counter() - started
    stop.set()
    sampler.join()
    hwm = _status_kib(pid, "VmHWM")
    lines = sum(1 for _ in dest.open("rb"))
    return {"bytes": size, "lines": lines, "seconds": round(seconds, 3), "rss_before_mib": round(before / 1024, 1),
            "rss_peak_sampled_mib": round(peak[0] / 1024, 1),
            "vmhwm_mib": round(hwm / 1024, 1) if hwm_reset else None, "vmhwm_reset": hwm_reset}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lines", type=int, default=10_000, help="questions in the batch (and the ask-file job)")
    parser.add_argument("--latency", type=float, default=0.2, help="seconds per chat completion of the endpoint")
    parser.add_argument("--in-flight", type=int, default=32, help="RAGQ_LLM_MAX_IN_FLIGHT")
    parser.add_argument("--batch-size", type=int, default=64, help="RAGQ_QA_BATCH_SIZE")
    parser.add_argument("--cycles", type=int, default=2, help="alternations; each runs both sides once")
    parser.add_argument("--docs", default="100", help="'all' or N other pages besides the questions' source pages")
    parser.add_argument("--env", action="append", default=[], metavar="RAGQ_X=VALUE",
                        help="a setting for the benchmark's worker and server (repeatable)")
    args = parser.parse_args()
    if not (CORPUS / "manifest.jsonl").is_file():
        sys.exit(f"the benchmark needs the corpus at {CORPUS}")
    if args.cycles < 2:
        sys.exit("--cycles must be at least 2: each side runs at least twice, alternating")

    data_dir = Path(tempfile.mkdtemp(prefix="ragq-bench-batch-"))
    extra = dict(item.split("=", 1) for item in args.env)
    bench = Bench(data_dir, args.batch_size, extra)
    files, docs_note = choose_docs(args.docs)
    requests, asks = write_inputs(data_dir, args.lines)
    result: dict[str, Any] = {"lines": args.lines, "latency_s": args.latency, "in_flight": args.in_flight,
                              "batch_size": args.batch_size, "corpus": docs_note, "cpu_count": os.cpu_count(),
                              "env": extra}
    budget = (2 * args.cycles + 2) * args.lines + 200
    api: Api | None = None
    try:
        with LatencyServer(args.latency, max_requests=budget, lifetime_s=7200) as llm:
            bench.start(RAGQ_LLM_BACKEND="none")
            started = time.perf_counter()
            info = bench.client().ingest(files).wait(timeout=7200, poll_s=0.5)
            result["ingest"] = {"documents": info.completed, "chunks": info.chunks,
                                "seconds": round(time.perf_counter() - started, 1)}
            print(f"ingested {info.completed} pages ({info.chunks} chunks)", file=sys.stderr)
            bench.start(RAGQ_LLM_BACKEND="openai", RAGQ_LLM_BASE_URL=llm.base_url, RAGQ_LLM_MODEL="latency-bench",
                        RAGQ_LLM_MAX_IN_FLIGHT=str(args.in_flight), RAGQ_LLM_TIMEOUT_S="60",
                        RAGQ_LLM_MAX_RETRIES="0")
            api = Api(bench.env, data_dir / "serve.log")
            (data_dir / "warm").mkdir()
            warm_req, warm_ask = write_inputs(data_dir / "warm", 64)
            run_batch(api, bench, warm_req, 64)  # first-call costs (the server's imports, file store) paid here
            run_ask_file(bench, warm_ask, 64)
            batch_runs, ask_runs = [], []
            for cycle in range(args.cycles):
                order = ("batch", "ask") if cycle % 2 == 0 else ("ask", "batch")
                for side in order:
                    if side == "batch":
                        batch_runs.append(run_batch(api, bench, requests, args.lines))
                        print(f"cycle {cycle}: batch {batch_runs[-1]['seconds']:.1f} s", file=sys.stderr)
                    else:
                        ask_runs.append(run_ask_file(bench, asks, args.lines))
                        print(f"cycle {cycle}: ask-file {ask_runs[-1]['seconds']:.1f} s", file=sys.stderr)
            best_batch = min(batch_runs, key=lambda r: r["seconds"])
            best_ask = min(ask_runs, key=lambda r: r["seconds"])
            result["batch_runs_s"] = [round(r["seconds"], 3) for r in batch_runs]
            result["batch_job_runs_s"] = [round(r["job_s"], 3) for r in batch_runs]
            result["ask_file_runs_s"] = [round(r["seconds"], 3) for r in ask_runs]
            result["ask_file_cli_wall_s"] = [round(r["cli_wall_s"], 3) for r in ask_runs]
            result["ideal_s"] = round(args.lines * args.latency / args.in_flight, 3)
            result["ratio"] = best_ask["seconds"] / best_batch["seconds"]
            result["target"] = 0.95
            result["output_download"] = download_rss(api, best_batch["output_file_id"], data_dir / "output.jsonl")
            result["llm_requests"] = llm.requests
    finally:
        if api is not None:
            api.stop()
        bench.stop()
        try:
            bench.cleanup_redis()
        except Exception as exc:  # the figures are worth more than tidy keys
            print(f"note: could not delete the bench's Redis keys: {exc}", file=sys.stderr)
        shutil.rmtree(data_dir, ignore_errors=True)

    d = result["output_download"]
    print(f"\n{args.lines} lines, {args.latency} s per completion, {args.in_flight} in flight "
          f"(ideal {result['ideal_s']} s); {result['corpus']}; {result['cpu_count']} CPUs")
    print(f"batch    POST /v1/batches -> completed: runs {result['batch_runs_s']} s "
          f"(its job created -> finished {result['batch_job_runs_s']} s)")
    print(f"ask-file job created -> finished:       runs {result['ask_file_runs_s']} s "
          f"(CLI wall {result['ask_file_cli_wall_s']} s)")
    print(f"ratio ask-file / batch (best runs): {result['ratio']:.3f} (target >= 0.95)")
    print(f"output file {d['bytes'] / 2**20:.1f} MiB, {d['lines']} lines, in {d['seconds']} s: server RSS "
          f"{d['rss_before_mib']} MiB before, peak {d['rss_peak_sampled_mib']} MiB sampled"
          + (f", VmHWM {d['vmhwm_mib']} MiB" if d["vmhwm_reset"] else ""))
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"batch-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.write_text(json.dumps(result, indent=2))
    print(f"full results: {out.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
