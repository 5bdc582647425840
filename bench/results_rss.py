"""Benchmark: peak memory of ``ragq results`` exporting a large question job.

Writes ``--questions`` result lines (shaped like real answer lines: a question, an answer
and five sources with their text) straight into a job record through JobRecord's own API
(``create``, ``add_items``, ``save_results``, ``finish_batch``, ``seal``), the way workers
store them, without running the questions through a worker. Then runs
``ragq results JOB --output FILE`` as a subprocess, once per ``--code`` tree (default:
this checkout), and reports each run's peak RSS (``ru_maxrss`` of the child, read in a
wrapper process that runs nothing else) and wall time.

    python bench/results_rss.py [--questions 100000] [--code /path/to/other/checkout ...]

Uses its own key prefix in ``RAGQ_REDIS_URL``'s database and deletes its keys at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

#: Runs one command and prints its peak RSS in KiB (Linux ru_maxrss) on the last line of stderr.
_MEASURE = ("import resource, subprocess, sys; rc = subprocess.run(sys.argv[1:]).returncode; "
            "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, file=sys.stderr); sys.exit(rc)")


def result_line(n: int) -> dict:
    """One output line of about 1.3 KB, the shape ``answer_batch`` stores."""
    text = f"Cloud DNS resolves domain names for question {n} and manages A, CNAME and MX records. " * 2
    return {
        "custom_id": str(n), "question": f"Which DNS records can I manage in zone {n}?",
        "answer": f"You can manage A, AAAA, CNAME, MX and TXT records [1]. (answer {n})",
        "sources": [{"url": f"https://docs.example.com/dns/{n % 97}/{k}", "title": "Cloud DNS records",
                     "product": "Cloud DNS", "score": round(0.9 - k / 10, 3), "text": text[:200], "ref": k + 1}
                    for k in range(5)],
        "model": "bench-model", "timings": {"retrieval_s": 0.012, "generation_s": 0.8},
        "usage": {"prompt_tokens": 512, "completion_tokens": 32, "total_tokens": 544}, "error": None,
    }


def write_job(settings, questions: int, batch_size: int) -> str:
    """A finished question job of ``questions`` lines, written through JobRecord."""
    from common.jobs import BatchOutcome, JobRecord
    from common.runtime import redis_client
    from common.schemas import JobKind

    client = redis_client(settings)
    record = JobRecord.create(client, JobKind.questions, meta={"inputs": ["bench"], "batch_size": batch_size},
                              prefix=settings.key_prefix, ttl=3600)
    batches = (questions + batch_size - 1) // batch_size
    record.add_items(items=questions, batches=batches)
    for batch in range(batches):
        first = batch * batch_size
        lines = [result_line(n) for n in range(first, min(questions, first + batch_size))]
        record.save_results(batch, lines)
        record.finish_batch(batch, BatchOutcome(completed=len(lines)))
    record.seal()
    return record.id


def export(code: Path, env: dict[str, str], job_id: str, output: Path) -> dict:
    """``ragq results JOB --output FILE`` with ``code`` on PYTHONPATH: peak RSS, seconds, lines."""
    command = [sys.executable, "-c", _MEASURE, sys.executable, "-m", "producer", "results", job_id,
               "--output", str(output)]
    started = time.perf_counter()
    done = subprocess.run(command, cwd=code, env={**env, "PYTHONPATH": str(code)}, capture_output=True, text=True,
                          timeout=1800)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"ragq results failed with {done.returncode}:\n{done.stderr[-2000:]}")
    peak_kib = int(done.stderr.strip().splitlines()[-1])
    with output.open("rb") as handle:
        lines = sum(1 for _ in handle)
    return {"code": str(code), "peak_rss_mib": round(peak_kib / 1024, 1), "seconds": round(seconds, 2),
            "lines": lines, "bytes": output.stat().st_size}


def main() -> int:
    from common.config import Settings

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--questions", type=int, default=100_000)
    parser.add_argument("--batch-size", type=int, default=16, help="lines per stored batch (RAGQ_QA_BATCH_SIZE)")
    parser.add_argument("--code", type=Path, action="append", default=[],
                        help="a ragq tree to run `ragq results` from (repeat to compare); default this one")
    parser.add_argument("--output", type=Path, default=None, help="also write the figures here (JSON)")
    args = parser.parse_args()

    prefix = f"ragq-bench-rss-{uuid.uuid4().hex[:8]}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAGQ_") or k == "RAGQ_REDIS_URL"}
    env["RAGQ_KEY_PREFIX"] = prefix
    settings = Settings(_env_file=None, key_prefix=prefix,
                        **({"redis_url": env["RAGQ_REDIS_URL"]} if "RAGQ_REDIS_URL" in env else {}))
    started = time.perf_counter()
    job_id = write_job(settings, args.questions, args.batch_size)
    figures = {"questions": args.questions, "batch_size": args.batch_size, "job": job_id,
               "write_s": round(time.perf_counter() - started, 1), "runs": []}
    try:
        with tempfile.TemporaryDirectory(prefix="ragq-rss-") as tmp:
            for n, code in enumerate(args.code or [REPO]):
                run = export(code.resolve(), env, job_id, Path(tmp) / f"answers-{n}.jsonl")
                assert run["lines"] == args.questions, run
                figures["runs"].append(run)
                print(json.dumps(run), flush=True)
    finally:
        from common.runtime import redis_client

        client = redis_client(settings)
        for key in list(client.scan_iter(match=f"{prefix}:*", count=1000)):
            client.delete(key)
    print(json.dumps(figures, indent=2))
    if args.output:
        args.output.write_text(json.dumps(figures, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
