"""Benchmark: question answering through the queue.

(a) Bulk QA against an OpenAI-compatible endpoint with a fixed per-request latency.
    The latency is injected by a loopback server in this file that sleeps ``--latency``
    seconds in every chat completion before answering (no model behind it). A real
    ``ragq worker`` (openai backend, ``RAGQ_LLM_MAX_IN_FLIGHT=32``) answers N questions;
    the time from the first enqueue until the job is finished is compared with the ideal
    ``N * latency / in_flight`` (target: ideal / measured >= 0.9).
(b) Retrieval-only throughput: the same worker with ``RAGQ_LLM_BACKEND=none`` answers N
    questions (sources only); questions/s from the first enqueue to the job's end,
    against an in-process loop over the same store, model and batch size that only
    embeds and searches (target: >= 0.9 of it).
(c) hit@1/3/5 of the source page over ``questions-dev.jsonl`` (its ``query`` field):
    the rank of ``source_url`` among the distinct pages a retrieval-only job returns,
    with the default embedding model (target: hit@5 >= 0.90).

    python bench/qa.py [--docs all|N] [--latency 1.0] [--in-flight 32] [--parts abc]

The store holds the source pages of the dev questions plus the rest of the corpus
(``--docs all``, the default) or a sample of N other pages taken at an even stride. The
benchmark uses its own queue names, key prefix and temporary store, so it never touches
a running deployment; it writes only under bench/results/.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
CORPUS = REPO.parent / "shared" / "data" / "jdcloud-en"
RESULTS = REPO / "bench" / "results"


# --- an OpenAI-compatible endpoint with a fixed latency ---------------------------------


class LatencyServer:
    """Loopback ``/v1/models`` and ``/v1/chat/completions`` that answer after ``latency_s``.

    Bounded: it serves at most ``max_requests`` completions and stops by itself after
    ``lifetime_s`` seconds (or when the ``with`` block ends). It records the peak number
    of completions in progress at once, to show the worker really had that many in flight.
    """

    def __init__(self, latency_s: float, *, max_requests: int = 100_000, lifetime_s: float = 1800.0) -> None:
        self.latency_s = latency_s
        self.max_requests = max_requests
        self.lifetime_s = lifetime_s
        self.requests = 0
        self.active = 0
        self.peak = 0
        self.spans: list[tuple[float, float]] = []  # (start, end) of each completion, perf_counter
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None

    @property
    def base_url(self) -> str:
        assert self._server is not None
        return f"http://127.0.0.1:{self._server.server_address[1]}/v1"

    def __enter__(self) -> LatencyServer:
        owner = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, as a real server
            # TCP_NODELAY, as uvicorn (vLLM), llama.cpp's server and others set it: without it the
            # body, written after the headers, waits for the client's delayed ACK (~40 ms a request)
            disable_nagle_algorithm = True

            def log_message(self, *_: Any) -> None:
                pass

            def _send(self, status: int, body: dict) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:  # noqa: N802
                if self.path.rstrip("/").endswith("/models"):
                    self._send(200, {"object": "list", "data": [{"id": "latency-bench", "object": "model",
                                                                 "created": 0, "owned_by": "bench"}]})
                else:
                    self._send(404, {"error": {"message": "not found"}})

            def do_POST(self) -> None:  # noqa: N802
                length = int(self.headers.get("Content-Length") or 0)
                body = json.loads(self.rfile.read(length) or b"{}")
                if not self.path.rstrip("/").endswith("/chat/completions"):
                    self._send(404, {"error": {"message": "not found"}})
                    return
                with owner._lock:
                    if owner.requests >= owner.max_requests:
                        over = True
                    else:
                        over = False
                        owner.requests += 1
                        owner.active += 1
                        owner.peak = max(owner.peak, owner.active)
                if over:
                    self._send(503, {"error": {"message": "request budget of the bench server spent"}})
                    return
                began = time.perf_counter()
                try:
                    time.sleep(owner.latency_s)
                finally:
                    with owner._lock:
                        owner.active -= 1
                        owner.spans.append((began, time.perf_counter()))
                question = body.get("messages", [{}])[-1].get("content", "")[:40]
                self._send(200, {
                    "id": "chatcmpl-bench", "object": "chat.completion", "created": int(time.time()),
                    "model": "latency-bench",
                    "choices": [{"index": 0, "finish_reason": "stop",
                                 "message": {"role": "assistant", "content": f"An answer to {question!r} [1]."}}],
                    "usage": {"prompt_tokens": 100, "completion_tokens": 10, "total_tokens": 110},
                })

        class Server(ThreadingHTTPServer):
            daemon_threads = True
            request_queue_size = 256  # many concurrent connects must not overflow the backlog

        self._server = Server(("127.0.0.1", 0), Handler)
        threading.Thread(target=self._server.serve_forever, name="latency-server", daemon=True).start()
        self._timer = threading.Timer(self.lifetime_s, self._server.shutdown)
        self._timer.daemon = True
        self._timer.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._timer.cancel()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()


# --- a worker of our own ------------------------------------------------------------------


class Bench:
    def __init__(self, data_dir: Path, batch_size: int, extra_env: dict[str, str] | None = None) -> None:
        tag = uuid.uuid4().hex[:8]
        self.tag = tag
        self.data_dir = data_dir
        self.base_env = {k: v for k, v in os.environ.items() if not k.startswith("RAGQ_") or k == "RAGQ_REDIS_URL"}
        self.base_env.update({
            "RAGQ_DATA_DIR": str(data_dir), "RAGQ_KEY_PREFIX": f"ragq-bench-{tag}", "RAGQ_DEVICE": "cpu",
            "RAGQ_INGEST_QUEUE": f"bench-ingest-{tag}", "RAGQ_QA_QUEUE": f"bench-qa-{tag}",
            "RAGQ_STORE_QUEUE": f"bench-store-{tag}", "RAGQ_INTERACTIVE_QUEUE": f"bench-interactive-{tag}",
            "RAGQ_COLLECTION": "bench", "RAGQ_QA_BATCH_SIZE": str(batch_size), "RAGQ_TOP_K": "5",
            "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1",
            # batches of 64 questions with generation have a hard limit of ~2,600 s
            "RAGQ_VISIBILITY_TIMEOUT_S": "7200",
        })
        self.base_env.update(extra_env or {})
        self.worker: subprocess.Popen | None = None
        self.env: dict[str, str] = dict(self.base_env)

    def settings(self):
        from common.config import Settings

        values = {k.removeprefix("RAGQ_").lower(): v for k, v in self.env.items() if k.startswith("RAGQ_")}
        return Settings(_env_file=None, **values)

    def client(self):
        from producer.client import Client

        return Client(self.settings())

    def start(self, *, threads: int = 0, worker_args: tuple[str, ...] = (), **env: str) -> None:
        """``ragq worker`` (one prefork process running one batch at a time, plus its
        interactive process; ``worker_args`` passed on), or with ``threads``
        ``ragq worker --pool threads --concurrency threads``: one process running that many
        batches at once."""
        self.stop()
        self.env = {**self.base_env, **env}
        queues = f"{self.env['RAGQ_INGEST_QUEUE']},{self.env['RAGQ_QA_QUEUE']}"
        log = (self.data_dir / "worker.log").open("ab")
        argv = [sys.executable, "-m", "producer", "worker", "--gpus", "none", "--queues", queues, *worker_args]
        if threads:  # one process running that many batches at once, sharing its model and LLM client
            argv += ["--pool", "threads", "--concurrency", str(threads)]
        self.worker = subprocess.Popen(argv, cwd=REPO, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                       start_new_session=True)
        client = self.client()
        deadline = time.monotonic() + 300
        while True:  # ready: the model is loaded and the store open
            try:
                client.store_info(timeout=5)
                break
            except Exception:
                if time.monotonic() > deadline or self.worker.poll() is not None:
                    sys.exit(f"the worker did not start; see {self.data_dir / 'worker.log'}")
        # One small warm-up job, so a first-call cost is not charged to a measurement.
        client.ask_many(["warm-up question"], generate=True).wait(timeout=120)

    def stop(self) -> None:
        if self.worker is None or self.worker.poll() is not None:
            return
        self.worker.send_signal(signal.SIGTERM)
        try:
            self.worker.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(self.worker.pid, signal.SIGKILL)
            self.worker.wait(10)
        self.worker = None

    def cleanup_redis(self) -> None:
        client = self.client()
        prefix = self.base_env["RAGQ_KEY_PREFIX"]
        keys = list(client.redis.scan_iter(match=f"{prefix}:*", count=1000))
        from common.priorities import queue_keys

        keys += [key for name in ("INGEST", "QA", "STORE", "INTERACTIVE")
                 for key in queue_keys(self.base_env[f"RAGQ_{name}_QUEUE"])]
        for start in range(0, len(keys), 500):
            client.redis.delete(*keys[start:start + 500])


def choose_docs(spec: str) -> tuple[list[Path], str]:
    manifest = [json.loads(line) for line in (CORPUS / "manifest.jsonl").open()]
    sources = {json.loads(line)["source_url"] for line in (CORPUS / "questions-dev.jsonl").open()}
    if spec == "all":
        chosen = manifest
        note = f"whole corpus: {len(manifest)} pages"
    else:
        others = [m for m in manifest if m["url"] not in sources]
        stride = max(1, len(others) // int(spec))
        sample = others[::stride][: int(spec)]
        chosen = [m for m in manifest if m["url"] in sources] + sample
        note = (f"{len(chosen)} pages: the {len(sources)} source pages of the dev questions and "
                f"{len(sample)} others (every {stride}th page of the rest)")
    return [CORPUS / m["file"] for m in chosen], note


def dev_questions() -> list[dict]:
    return [json.loads(line) for line in (CORPUS / "questions-dev.jsonl").open()]


def timed_job(bench: Bench, questions: list[str], *, generate: bool) -> tuple[float, Any, list[dict]]:
    client = bench.client()
    objects = [{"custom_id": f"q{i}", "question": q} for i, q in enumerate(questions)]
    started = time.perf_counter()
    job = client.ask_many(objects, generate=generate)
    info = job.wait(timeout=3600, poll_s=0.02)
    seconds = time.perf_counter() - started
    return seconds, info, list(job.results())


# --- the three parts ---------------------------------------------------------------------------


def part_c(bench: Bench) -> dict:
    qs = dev_questions()
    _, info, lines = timed_job(bench, [q["query"] for q in qs], generate=False)
    assert info.status == "completed", info.errors[:3]
    ranks = []
    for q, line in zip(qs, lines):
        urls = [s["url"] for s in line["sources"]]
        ranks.append(urls.index(q["source_url"]) + 1 if q["source_url"] in urls else None)
    hit = {k: sum(1 for r in ranks if r is not None and r <= k) / len(qs) for k in (1, 3, 5)}
    return {"questions": len(qs), "hit@1": hit[1], "hit@3": hit[3], "hit@5": hit[5], "target_hit@5": 0.90,
            "misses@5": [q["query"] for q, r in zip(qs, ranks) if r is None][:20]}


def part_b(bench: Bench, n: int, repeats: int, cycles: int = 2) -> dict:
    """Queue runs, then in-process runs, ``cycles`` times over, so both sides see the
    machine's load swings (the embedded store has one owner at a time, so the worker is
    stopped for the in-process loop). Each side is warmed up first with an untimed quarter
    of the questions: a fresh process's first batches pay for kernel and page-cache warm-up."""
    from common.embedding import Embedder

    qs = [q["query"] for q in dev_questions()]
    questions = [qs[i % len(qs)] + ("" if i < len(qs) else f" ({i // len(qs)})") for i in range(n)]
    warm = questions[: max(1, n // 4)]
    s = bench.settings()
    embedder = Embedder(s.embed_model, s.device, s.embed_batch_tokens, s.torch_threads)
    piped, local = [], []
    for cycle in range(cycles):
        if cycle:
            bench.start(RAGQ_LLM_BACKEND="none")
        timed_job(bench, warm, generate=False)
        for _ in range(repeats):
            seconds, info, lines = timed_job(bench, questions, generate=False)
            assert info.status == "completed" and len(lines) == n, (info.status, len(lines))
            piped.append(seconds)
        bench.stop()
        local.extend(in_process_retrieval(embedder, s, questions, warm, repeats))
    bench.start(RAGQ_LLM_BACKEND="none")

    def side(runs: list[float]) -> dict:
        return {"questions": n, "runs_s": [round(r, 3) for r in runs], "best_s": round(min(runs), 3),
                "median_s": round(sorted(runs)[len(runs) // 2], 3), "questions_per_s": n / min(runs)}

    return {"batch_size": s.qa_batch_size, "pipeline": side(piped), "in_process": side(local),
            "ratio": min(local) / min(piped), "ratio_of_medians": side(local)["median_s"] / side(piped)["median_s"],
            "target": 0.9}


def in_process_retrieval(embedder: Any, s: Any, questions: list[str], warm: list[str], repeats: int) -> list[float]:
    """Seconds to embed + distinct-document search ``questions`` in worker-sized batches."""
    from common.vectorstore import open_store

    def loop(texts: list[str]) -> float:
        started = time.perf_counter()
        for start in range(0, len(texts), s.qa_batch_size):
            vectors = embedder.encode(texts[start:start + s.qa_batch_size])
            store.search(vectors, top_k=s.top_k, distinct_docs=True)
        return time.perf_counter() - started

    with open_store(s) as store:
        loop(warm)
        return [loop(questions) for _ in range(repeats)]


def part_a(bench: Bench, n: int, latency: float, in_flight: int, batch_size: int, concurrent_batches: int = 1,
           repeats: int = 1) -> dict:
    """With ``concurrent_batches`` > 1 the worker runs that many batches at once (a threads
    pool); its one client shares the ``in_flight`` budget between them (the server must
    never see more, and the peak is checked): one batch's retrieval then overlaps
    another's generation."""
    qs = [q["query"] for q in dev_questions()]
    questions = [qs[i % len(qs)] + f" (#{i})" for i in range(n)]
    budget = repeats * n + 100  # the warm-up question and some slack
    with LatencyServer(latency, max_requests=budget, lifetime_s=max(600.0, 4 * budget * latency / in_flight)) as server:
        bench.start(threads=concurrent_batches if concurrent_batches > 1 else 0,
                    RAGQ_LLM_BACKEND="openai", RAGQ_LLM_BASE_URL=server.base_url, RAGQ_LLM_MODEL="latency-bench",
                    RAGQ_LLM_MAX_IN_FLIGHT=str(in_flight), RAGQ_LLM_TIMEOUT_S=str(max(30.0, 10 * latency)),
                    RAGQ_LLM_MAX_RETRIES="0", RAGQ_QA_BATCH_SIZE=str(batch_size))
        runs, timelines = [], []
        for _ in range(repeats):
            before, spans_before = server.requests, len(server.spans)
            server.peak = 0
            began = time.perf_counter()
            seconds, info, lines = timed_job(bench, questions, generate=True)
            requests = server.requests - before
            peak = server.peak
            assert info.status == "completed", (info.status, info.errors[:3])
            assert len(lines) == n and all(line["answer"] for line in lines) and requests == n
            assert peak <= in_flight, f"the server saw {peak} requests at once, above the budget of {in_flight}"
            timelines.append(timeline(server.spans[spans_before:], began, seconds, in_flight))
            runs.append(seconds)
        used_batch = bench.settings().questions_per_batch  # 0 asks for ragq's default: the size it chose
    seconds = min(runs)
    best = timelines[runs.index(seconds)]
    ideal = n * latency / in_flight
    return {"questions": n, "latency_s": latency, "in_flight": in_flight, "batch_size": used_batch,
            "concurrent_batches": concurrent_batches, "requests": requests,
            "peak_in_flight": peak, "runs_s": [round(r, 3) for r in runs], "measured_s": round(seconds, 3),
            "ideal_s": round(ideal, 3), "efficiency": ideal / seconds, "target": 0.9, "timeline": best}


def timeline(spans: list[tuple[float, float]], began: float, seconds: float, in_flight: int) -> dict:
    """Where a run's time went: before the first request, between the first request and
    the last answer (with the endpoint's slots' use), after the last answer."""
    first, last = min(b for b, _ in spans), max(e for _, e in spans)
    busy = sum(e - b for b, e in spans)
    return {"to_first_request_s": round(first - began, 3), "requests_span_s": round(last - first, 3),
            "slot_use_in_span": round(busy / (in_flight * (last - first)), 3),
            "last_answer_to_done_s": round(began + seconds - last, 3)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--docs", default="all", help="'all' or N other pages besides the questions' source pages")
    parser.add_argument("--parts", default="abc", help="which parts to run (a, b, c)")
    parser.add_argument("--latency", default="1,2", help="(a) seconds per chat completion; a comma list runs each")
    parser.add_argument("--in-flight", type=int, default=32, help="(a) RAGQ_LLM_MAX_IN_FLIGHT")
    parser.add_argument("--questions-a", type=int, default=512, help="(a) questions in the bulk job")
    parser.add_argument("--batch-a", type=int, default=0,
                        help="(a) RAGQ_QA_BATCH_SIZE; 0 (default) = ragq's own default, 8 rounds of the budget")
    parser.add_argument("--overlap", type=int, default=2,
                        help="(a) also run with this many batches at once per worker (threads pool), "
                             "sharing the in-flight budget; 1 = skip")
    parser.add_argument("--questions-b", type=int, default=1024, help="(b) questions in the retrieval-only job")
    parser.add_argument("--batch-size", type=int, default=64, help="(b, c) RAGQ_QA_BATCH_SIZE, same in-process")
    parser.add_argument("--repeats", type=int, default=3,
                        help="(a) runs per setting, (b) runs per side; the best counts (other tenants of a "
                             "shared machine make single runs noisy), all are in the JSON")
    parser.add_argument("--env", action="append", default=[], metavar="RAGQ_X=VALUE",
                        help="a setting for the benchmark's workers, e.g. RAGQ_CHUNK_TOKENS=128 (repeatable)")
    parser.add_argument("--data-dir", type=Path, default=None,
                        help="keep the store here (reused when it already holds the pages)")
    args = parser.parse_args()
    if not (CORPUS / "manifest.jsonl").is_file():
        sys.exit(f"the benchmark needs the corpus at {CORPUS}")

    data_dir = args.data_dir or Path(tempfile.mkdtemp(prefix="ragq-bench-qa-"))
    data_dir.mkdir(parents=True, exist_ok=True)
    extra = dict(item.split("=", 1) for item in args.env)
    bench = Bench(data_dir, args.batch_size, extra)
    files, docs_note = choose_docs(args.docs)
    result: dict[str, Any] = {"corpus": docs_note, "cpu_count": os.cpu_count(), "env": extra, "parts": {}}
    try:
        bench.start(RAGQ_LLM_BACKEND="none")
        stored = bench.client().store_info()
        if stored.get("points", 0) == 0:
            started = time.perf_counter()
            info = bench.client().ingest(files).wait(timeout=7200, poll_s=0.5)
            result["ingest"] = {"documents": info.completed, "failed": info.failed, "chunks": info.chunks,
                                "seconds": round(time.perf_counter() - started, 1)}
            print(f"ingested {info.completed} pages ({info.chunks} chunks) in {result['ingest']['seconds']} s",
                  file=sys.stderr)
        else:
            print(f"reusing the store in {data_dir}: {stored['points']} points", file=sys.stderr)
        if "c" in args.parts:
            result["parts"]["c"] = part_c(bench)
            print(f"(c) hit@5 {result['parts']['c']['hit@5']:.3f}", file=sys.stderr)
        if "b" in args.parts:
            result["parts"]["b"] = part_b(bench, args.questions_b, args.repeats)
            print(f"(b) ratio {result['parts']['b']['ratio']:.3f}", file=sys.stderr)
        if "a" in args.parts:
            runs = result["parts"]["a"] = []
            for latency in (float(x) for x in args.latency.split(",")):
                for concurrent in sorted({1, max(1, args.overlap)}):
                    runs.append(part_a(bench, args.questions_a, latency, args.in_flight, args.batch_a,
                                       concurrent_batches=concurrent, repeats=args.repeats))
                    print(f"(a) latency {latency} s, {concurrent} batch(es) at once: efficiency "
                          f"{runs[-1]['efficiency']:.3f}", file=sys.stderr)
    finally:
        bench.stop()
        try:
            bench.cleanup_redis()
        except Exception as exc:  # the figures are worth more than tidy keys
            print(f"note: could not delete the bench's Redis keys: {exc}", file=sys.stderr)
        if args.data_dir is None:
            shutil.rmtree(data_dir, ignore_errors=True)

    print_table(result)
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"qa-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.write_text(json.dumps(result, indent=2))
    print(f"\nfull results: {out.relative_to(REPO)}")
    return 0


def print_table(result: dict) -> None:
    parts = result["parts"]
    print(f"\nstore: {result['corpus']}; {result['cpu_count']} CPUs")
    print(f"{'part':<5} {'measure':<52} {'value':>12} {'target':>8}")
    print("-" * 80)
    for a in parts.get("a", []):
        how = (f"batches of {a['batch_size']}, 1 at a time" if a["concurrent_batches"] == 1 else
               f"batches of {a['batch_size']}, {a['concurrent_batches']} at once")
        print(f"{'a':<5} {str(a['questions']) + ' q, ' + str(a['latency_s']) + ' s/request, ' + how:<52}"
              f" {a['measured_s']:>10.2f} s {'':>8}")
        runs = ", ".join(f"{r:.1f}" for r in a["runs_s"])
        print(f"{'':<5} {'(best of runs: ' + runs + ' s)':<52}")
        print(f"{'':<5} {'ideal N*latency/' + str(a['in_flight']):<52} {a['ideal_s']:>10.2f} s")
        print(f"{'':<5} {'peak requests in flight seen by the server':<52} {a['peak_in_flight']:>12}")
        if "timeline" in a:
            t = a["timeline"]
            print(f"{'':<5} {'enqueue -> first request':<52} {t['to_first_request_s']:>10.2f} s")
            print(f"{'':<5} {'first request -> last answer (slots in use)':<52} {t['requests_span_s']:>10.2f} s"
                  f" {t['slot_use_in_span']:>7.1%}")
            print(f"{'':<5} {'last answer -> job finished, seen by the poller':<52} {t['last_answer_to_done_s']:>10.2f} s")
        print(f"{'':<5} {'efficiency = ideal / measured':<52} {a['efficiency']:>12.3f} {'>= 0.9':>8}")
    if "b" in parts:
        b = parts["b"]
        print(f"{'b':<5} {'retrieval-only via queue (' + str(b['pipeline']['questions']) + ' q, batch ' + str(b['batch_size']) + ')':<52}"
              f" {b['pipeline']['questions_per_s']:>8.1f} q/s")
        print(f"{'':<5} {'in-process embed+search loop':<52} {b['in_process']['questions_per_s']:>8.1f} q/s")
        print(f"{'':<5} {'ratio queue / in-process (best runs)':<52} {b['ratio']:>12.3f} {'>= 0.9':>8}")
        print(f"{'':<5} {'ratio of the median runs':<52} {b['ratio_of_medians']:>12.3f}")
    if "c" in parts:
        c = parts["c"]
        print(f"{'c':<5} {'hit@1 (' + str(c['questions']) + ' dev questions, query field)':<52} {c['hit@1']:>12.3f}")
        print(f"{'':<5} {'hit@3':<52} {c['hit@3']:>12.3f}")
        print(f"{'':<5} {'hit@5':<52} {c['hit@5']:>12.3f} {'>= 0.90':>8}")


if __name__ == "__main__":
    sys.exit(main())
