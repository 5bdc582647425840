"""Benchmark: ``ragq ask`` latency on an idle worker and while a bulk question job runs.

A real ``ragq worker`` as the README starts it (a bulk process, its interactive process
and the embedded store's owner; ``--interactive-threads`` passed on) answers through an
OpenAI-compatible loopback endpoint that sleeps ``--latency`` seconds per completion
(``bench/qa.py``'s server). First ``--asks`` sequential ``client.ask`` calls (the path
``ragq ask`` takes) on the idle worker, then a ``--bulk``-question job is queued and the
same asks run again while it does; p50 and p95 of both and their ratio are printed
(target: p95 while busy <= 2x idle). The bulk job is cancelled once the asks are done
(``--finish`` lets it run to its end); the batches it finished meanwhile show it ran.

    python bench/interactive.py [--latency 1.0] [--asks 40] [--bulk 5000] [--docs 200]
                                [--interactive-threads 2] [--finish]

Own queue names, key prefix and temporary store; writes only bench/results/interactive.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.qa import RESULTS, Bench, LatencyServer, choose_docs, dev_questions  # noqa: E402


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def summary(latencies: list[float]) -> dict:
    return {"asks": len(latencies), "p50_s": round(percentile(latencies, 0.5), 3),
            "p95_s": round(percentile(latencies, 0.95), 3), "max_s": round(max(latencies), 3),
            "mean_s": round(statistics.fmean(latencies), 3)}


def asks(client, questions: list[str], gap_s: float) -> list[float]:
    """Sequential asks, as a user typing ``ragq ask`` again and again; seconds each."""
    seconds = []
    for question in questions:
        started = time.perf_counter()
        answer = client.ask(question, timeout=300)
        seconds.append(time.perf_counter() - started)
        if not answer.ok:
            raise SystemExit(f"an ask failed: {answer.error}")
        time.sleep(gap_s)
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--latency", type=float, default=1.0, help="seconds per chat completion")
    parser.add_argument("--asks", type=int, default=40)
    parser.add_argument("--gap", type=float, default=0.5, help="seconds between two asks")
    parser.add_argument("--bulk", type=int, default=5000, help="questions of the bulk job")
    parser.add_argument("--docs", default="200", help="pages to ingest: all or N (bench/qa.py's choice)")
    parser.add_argument("--interactive-threads", type=int, default=2, help="passed to ragq worker")
    parser.add_argument("--finish", action="store_true", help="let the bulk job run to its end")
    args = parser.parse_args()

    qs = [q["query"] for q in dev_questions()]
    interactive = [qs[i % len(qs)] for i in range(args.asks)]
    bulk = [{"custom_id": f"b{i}", "question": qs[i % len(qs)] + f" ({i})"} for i in range(args.bulk)]
    files, note = choose_docs(args.docs)
    with tempfile.TemporaryDirectory(prefix="ragq-bench-interactive-") as tmp, \
            LatencyServer(args.latency, lifetime_s=7200) as server:
        bench = Bench(Path(tmp), batch_size=16)
        try:
            bench.start(worker_args=("--interactive-threads", str(args.interactive_threads)),
                        RAGQ_LLM_BACKEND="openai", RAGQ_LLM_BASE_URL=server.base_url,
                        RAGQ_LLM_MODEL="latency-bench", RAGQ_LLM_MAX_IN_FLIGHT="32",
                        RAGQ_LLM_TIMEOUT_S=str(max(30.0, 10 * args.latency)))
            client = bench.client()
            info = client.ingest([str(f) for f in files]).wait(timeout=3600)
            print(f"ingested {info.completed} pages ({note}) in {info.elapsed_s:.1f}s", file=sys.stderr)
            asks(client, interactive[:3], 0)  # warm both paths
            idle = asks(client, interactive, args.gap)
            print(f"idle: {summary(idle)}", file=sys.stderr)

            job = client.ask_many(bulk)
            while not job.refresh().batches_done:
                time.sleep(0.05)
            started = time.perf_counter()
            busy = asks(client, interactive, args.gap)
            during = job.refresh()
            window_s = time.perf_counter() - started
            if during.is_finished:
                raise SystemExit("the bulk job ended before the asks did: raise --bulk")
            if args.finish:
                final = job.wait(timeout=7200)
                bulk_s = final.elapsed_s
            else:
                job.cancel()
                bulk_s = None
        finally:
            bench.stop()
            bench.cleanup_redis()
    result = {
        "latency_s": args.latency, "interactive_threads": args.interactive_threads, "docs": note,
        "bulk_questions": args.bulk, "idle": summary(idle), "busy": summary(busy),
        "p95_ratio": round(percentile(busy, 0.95) / percentile(idle, 0.95), 3),
        "p50_ratio": round(percentile(busy, 0.5) / percentile(idle, 0.5), 3),
        "bulk_batches_done_during_asks": during.batches_done, "bulk_batches_total": during.batches_total,
        "bulk_questions_per_s_during_asks": round(during.completed / (during.elapsed_s or 1), 2),
        "asks_window_s": round(window_s, 1), "bulk_elapsed_s": bulk_s, "target_p95_ratio": 2.0,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "interactive.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    print(f"p95 busy/idle = {result['p95_ratio']:.2f} (target <= 2), p50 busy/idle = {result['p50_ratio']:.2f}")


if __name__ == "__main__":
    main()
