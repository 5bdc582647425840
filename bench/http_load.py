"""Benchmark: ``ragq serve`` under a bounded loopback load while a bulk job runs.

A real worker (openai backend against a loopback endpoint that answers every chat
completion after ``--latency`` seconds) works through a bulk question job; meanwhile
``--answers`` concurrent ``POST /v1/answer`` requests (retrieval only by default, so the
single worker gets through them) queue behind it, and two pollers measure
``GET /v1/jobs/{bulk id}`` and ``GET /health`` until every answer is back. Reported per
route: requests, status codes, p50/p99 latency. Targets: no 5xx, ``/health`` always 200,
p99 of ``/v1/jobs/{id}`` under 200 ms.

    python bench/http_load.py [--answers 200] [--bulk 128] [--latency 1.0] [--generate]

Traffic goes to 127.0.0.1 only, bounded in count (``--answers``) and time
(``--deadline``). The benchmark uses its own queue names, key prefix and temporary store.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


@dataclass
class RouteStats:
    """Latencies and status codes of one route."""

    latencies: list[float] = field(default_factory=list)
    codes: Counter[int] = field(default_factory=Counter)

    def add(self, seconds: float, code: int) -> None:
        self.latencies.append(seconds)
        self.codes[code] += 1

    @property
    def server_errors(self) -> int:
        return sum(n for code, n in self.codes.items() if code >= 500)

    def quantile(self, q: float) -> float | None:
        if not self.latencies:
            return None
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]

    def to_dict(self) -> dict[str, Any]:
        p50, p99 = self.quantile(0.50), self.quantile(0.99)
        return {"requests": len(self.latencies), "codes": dict(sorted(self.codes.items())),
                "p50_ms": round(p50 * 1000, 1) if p50 is not None else None,
                "p99_ms": round(p99 * 1000, 1) if p99 is not None else None,
                "max_ms": round(max(self.latencies) * 1000, 1) if self.latencies else None}


@dataclass
class LoadReport:
    answer: RouteStats = field(default_factory=RouteStats)
    job: RouteStats = field(default_factory=RouteStats)
    health: RouteStats = field(default_factory=RouteStats)
    seconds: float = 0.0
    errors: Counter[str] = field(default_factory=Counter)  # transport errors (timeouts, resets)

    def to_dict(self) -> dict[str, Any]:
        return {"seconds": round(self.seconds, 2), "transport_errors": dict(self.errors),
                "/v1/answer": self.answer.to_dict(), "/v1/jobs/{id}": self.job.to_dict(),
                "/health": self.health.to_dict()}


async def run_load(
    base: str,
    token: str | None,
    *,
    answers: int,
    job_id: str,
    question: str = "Which DNS records can I manage?",
    generate: bool = False,
    deadline_s: float = 120.0,
    job_every_s: float = 0.05,
    health_every_s: float = 0.25,
) -> LoadReport:
    """``answers`` concurrent answers, polling the job and /health until they are all back.

    Bounded: loopback only, ``answers`` requests plus the pollers, and nothing is sent
    after ``deadline_s`` (requests still open then are abandoned, counted as transport errors).
    """
    import httpx

    if urlsplit(base).hostname not in ("127.0.0.1", "localhost", "::1"):
        raise ValueError(f"the load goes to loopback only, not {base}")
    report = LoadReport()
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    limits = httpx.Limits(max_connections=answers + 8, max_keepalive_connections=answers + 8)
    started = time.perf_counter()
    stop_at = time.monotonic() + deadline_s
    async with httpx.AsyncClient(base_url=base, headers=headers, limits=limits, timeout=deadline_s) as http:

        async def timed(stats: RouteStats, method: str, path: str, **kwargs: Any) -> None:
            t0 = time.perf_counter()
            try:
                response = await http.request(method, path, **kwargs)
            except httpx.HTTPError as exc:
                report.errors[f"{path.split('/')[2] if path.startswith('/v1') else path}:{type(exc).__name__}"] += 1
                return
            stats.add(time.perf_counter() - t0, response.status_code)

        async def poll(stats: RouteStats, path: str, every: float, done: asyncio.Event) -> None:
            while not done.is_set() and time.monotonic() < stop_at:
                await timed(stats, "GET", path)
                try:
                    await asyncio.wait_for(done.wait(), every)
                except asyncio.TimeoutError:
                    pass

        body = {"question": question, "generate": generate, "timeout": deadline_s}
        done = asyncio.Event()
        pollers = [asyncio.create_task(poll(report.job, f"/v1/jobs/{job_id}", job_every_s, done)),
                   asyncio.create_task(poll(report.health, "/health", health_every_s, done))]
        calls = [asyncio.create_task(timed(report.answer, "POST", "/v1/answer", json=body)) for _ in range(answers)]
        try:
            await asyncio.wait_for(asyncio.gather(*calls), max(1.0, stop_at - time.monotonic()))
        except asyncio.TimeoutError:
            report.errors["answer:deadline"] += sum(1 for c in calls if not c.done())
        finally:
            done.set()
            for task in calls:
                task.cancel()
            await asyncio.gather(*pollers, *calls, return_exceptions=True)
    report.seconds = time.perf_counter() - started
    return report


# --- the stand-alone benchmark --------------------------------------------------------------


DOCS = [
    {"id": "dns-1", "title": "Cloud DNS", "product": "Cloud DNS", "url": "https://docs.example.com/dns",
     "content": "Cloud DNS resolves domain names to IP addresses and manages records such as A, CNAME and MX."},
    {"id": "disk-1", "title": "Cloud Disk", "product": "Cloud Disk Service", "url": "https://docs.example.com/disk",
     "content": "Cloud Disk Service provides persistent block storage volumes that attach to virtual machines."},
]


def _serve(env: dict[str, str], port: int, log: Path) -> subprocess.Popen:
    import httpx

    proc = subprocess.Popen([sys.executable, "-m", "producer", "serve", "--host", "127.0.0.1", "--port", str(port),
                             "--log-level", "warning"], cwd=REPO, env=env, stdout=log.open("ab"),
                            stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/openapi.json", timeout=2).status_code == 200:
                return proc
        except httpx.TransportError:
            time.sleep(0.2)
    proc.kill()
    sys.exit(f"ragq serve did not start; see {log}")


def main() -> int:
    import httpx

    from bench.qa import Bench, LatencyServer
    from tests.test_http import free_port

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--answers", type=int, default=200, help="concurrent POST /v1/answer requests")
    parser.add_argument("--bulk", type=int, default=128, help="questions in the bulk job (generated)")
    parser.add_argument("--batch", type=int, default=16, help="RAGQ_QA_BATCH_SIZE")
    parser.add_argument("--latency", type=float, default=1.0, help="seconds per chat completion")
    parser.add_argument("--generate", action="store_true", help="the answers generate too (default: retrieval only)")
    parser.add_argument("--deadline", type=float, default=300.0, help="seconds before the load gives up")
    parser.add_argument("--output", type=Path, default=None, help="also write the figures here (JSON)")
    args = parser.parse_args()

    token = "bench-token"
    with tempfile.TemporaryDirectory(prefix="ragq-http-load-") as tmp, \
            LatencyServer(args.latency, max_requests=args.bulk + args.answers + 16, lifetime_s=args.deadline + 600) as llm:
        bench = Bench(Path(tmp), args.batch, {"RAGQ_LLM_BACKEND": "openai", "RAGQ_LLM_BASE_URL": llm.base_url,
                                              "RAGQ_LLM_MODEL": "latency-bench", "RAGQ_API_TOKEN": token})
        bench.start()
        server = None
        try:
            client = bench.client()
            client.ingest_documents(DOCS, source="bench").wait(timeout=120)
            port = free_port()
            server = _serve(bench.env, port, Path(tmp) / "serve.log")
            base = f"http://127.0.0.1:{port}"
            bulk = httpx.post(f"{base}/v1/questions", headers={"Authorization": f"Bearer {token}"},
                              json=[{"question": f"bulk question {n} about DNS"} for n in range(args.bulk)],
                              timeout=60).json()
            report = asyncio.run(run_load(base, token, answers=args.answers, job_id=bulk["id"],
                                          generate=args.generate, deadline_s=args.deadline))
            figures = {"answers": args.answers, "bulk_questions": args.bulk, "latency_s": args.latency,
                       "generate": args.generate, "bulk_status_after": client.job(bulk["id"]).refresh().status,
                       **report.to_dict()}
        finally:
            if server is not None:
                server.terminate()
                server.wait(15)
            bench.stop()
            bench.cleanup_redis()
    print(json.dumps(figures, indent=2))
    if args.output:
        args.output.write_text(json.dumps(figures, indent=2) + "\n")
    ok = (report.answer.server_errors + report.job.server_errors + report.health.server_errors == 0
          and set(report.health.codes) <= {200} and (report.job.quantile(0.99) or 0) < 0.2 and not report.errors)
    return 0 if ok else 1


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
