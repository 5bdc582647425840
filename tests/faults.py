"""Fault-injection helpers: process trees from /proc, a private redis-server, a
controllable OpenAI-compatible server, and the waits the fault tests share.

Everything here is loopback-only and bounded: servers run on 127.0.0.1, threads are
daemons, every wait has a deadline and says what it was waiting for when it fails.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable
from functools import lru_cache
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, TypeVar

import redis

from common.config import Settings
from common.jobs import JobRecord
from tests.conftest import REPO, Stack, terminate

T = TypeVar("T")


# --- waiting ------------------------------------------------------------------------------


def wait_for(check: Callable[[], T], timeout: float, what: str, *, poll_s: float = 0.05,
             on_timeout: Callable[[], str] | None = None) -> T:
    """Poll ``check()`` until it returns something truthy; fail naming ``what`` after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            detail = on_timeout() if on_timeout else ""
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}\n{detail}")
        time.sleep(poll_s)


# --- process trees (/proc, no psutil) -------------------------------------------------------


def _stat(pid: int) -> list[str] | None:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text.rsplit(")", 1)[1].split()  # [state, ppid, pgrp, ...]


def alive(pid: int) -> bool:
    """Running and not a zombie."""
    fields = _stat(pid)
    return fields is not None and fields[0] != "Z"


def children(pid: int) -> list[int]:
    """Live direct children of ``pid``."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            fields = _stat(int(entry))
            if fields is not None and int(fields[1]) == pid and fields[0] != "Z":
                found.append(int(entry))
    return sorted(found)


def celery_main(stack: Stack) -> int:
    """The Celery main process under the stack's ``ragq worker`` launcher."""
    assert stack.proc is not None and stack.proc.poll() is None, "the launcher is not running"
    return wait_for(lambda: (children(stack.proc.pid) or [None])[0], 30, "the Celery main process",
                    on_timeout=lambda: stack.log_text()[-3000:])


def pool_child(stack: Stack, timeout: float = 60.0) -> int:
    """The prefork pool process (grandchild of the launcher) that runs the batches."""
    main = celery_main(stack)
    return wait_for(lambda: (children(main) or [None])[0], timeout, "a pool process",
                    on_timeout=lambda: stack.log_text()[-3000:])


def worker_tree(stack: Stack) -> list[int]:
    """Launcher, Celery main and pool process ids."""
    assert stack.proc is not None
    main = celery_main(stack)
    return [stack.proc.pid, main, *children(main)]


def start_worker_unprobed(stack: Stack, timeout: float = 120.0) -> None:
    """Start the stack's worker and wait for Celery's ``ready.`` line in its log.

    ``Stack.start_worker`` probes with a store-info task, which cannot succeed when the
    store is meant to be unreachable; this waits for the consumer to be up instead.
    """
    stack.data_dir.mkdir(parents=True, exist_ok=True)
    before = stack.log_text().count(" ready.")
    queues = f"{stack.env_vars['RAGQ_INGEST_QUEUE']},{stack.env_vars['RAGQ_QA_QUEUE']}"
    log = stack.log_path.open("ab")
    stack.proc = subprocess.Popen(
        [sys.executable, "-m", "producer", "worker", "--gpus", "none", "--queues", queues, "--interactive-threads", "0",
         "--loglevel", "INFO"],
        cwd=REPO, env=stack.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )

    def ready() -> bool:
        if stack.proc.poll() is not None:
            raise AssertionError(f"worker exited with {stack.proc.returncode}:\n{stack.log_text()[-4000:]}")
        return stack.log_text().count(" ready.") > before

    wait_for(ready, timeout, "the worker's ready line", poll_s=0.2, on_timeout=lambda: stack.log_text()[-3000:])


def kill_worker_tree(stack: Stack) -> list[int]:
    """SIGKILL launcher, Celery main and pool process at once (the machine died)."""
    assert stack.proc is not None
    tree = worker_tree(stack)
    os.killpg(stack.proc.pid, signal.SIGKILL)  # the launcher's session/group ...
    for pid in tree:  # ... and the Celery worker's own group
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    stack.proc.wait(10)
    wait_for(lambda: not any(alive(p) for p in tree), 15, "the killed worker processes to go")
    return tree


# --- job records --------------------------------------------------------------------------


def record(stack: Stack, job_id: str, client: redis.Redis | None = None) -> JobRecord:
    settings = stack.settings()
    conn = client or redis.Redis.from_url(settings.redis_dsn, decode_responses=True)
    return JobRecord(conn, job_id, prefix=settings.key_prefix, ttl=settings.job_ttl_s)


def attempts(rec: JobRecord) -> dict[int, int]:
    """Deliveries per batch, as ``JobRecord.begin_attempt`` counts them."""
    return rec.attempts()


def recorded_batches(rec: JobRecord) -> set[int]:
    return {int(b) for b in rec.redis.smembers(rec.keys[1])}


def running_batch(rec: JobRecord) -> int | None:
    """A batch that a worker has begun and not yet recorded, if any."""
    started = attempts(rec)
    done = recorded_batches(rec)
    pending = [b for b in started if b not in done]
    return min(pending) if pending else None


class BatchWatch:
    """Follows a job's deliveries by polling its attempt counts, to know which batch a
    worker began last (a retried batch waiting on its countdown is begun and unrecorded
    too, so "begun and unrecorded" alone does not say which batch is running)."""

    def __init__(self, rec: JobRecord) -> None:
        self.rec = rec
        self.seen: dict[int, int] = {}
        self.last: int | None = None

    def running(self) -> int | None:
        """The batch begun last, if it is not recorded yet (poll often: every ~10 ms)."""
        now = attempts(self.rec)
        changed = [b for b, n in now.items() if n > self.seen.get(b, 0)]
        if changed:
            self.last = max(changed)
        self.seen = now
        return self.last if self.last is not None and self.last not in recorded_batches(self.rec) else None


def wait_finished(rec: JobRecord, timeout: float, stack: Stack | None = None):
    def done():
        info = rec.info()
        return info if info.is_finished else None

    return wait_for(done, timeout, f"job {rec.id} to finish", poll_s=0.1,
                    on_timeout=lambda: f"{rec.info()}\n{stack.log_text()[-3000:] if stack else ''}")


# --- the chunks an undisturbed run stores --------------------------------------------------


@lru_cache(maxsize=2)
def _embedder(model: str):
    from common.embedding import Embedder

    return Embedder(model, "cpu", threads=1)


def planned_batches(settings: Settings, paths: Iterable[str | Path]):
    """The producer's batches for ``paths`` (same reader, same packing)."""
    from common.batching import pack_batches
    from common.inputs import InputReader
    from common.schemas import DocumentItem

    reader = InputReader(max_document_bytes=settings.max_document_bytes, follow_symlinks=settings.follow_symlinks)
    docs = (e for e in reader.read_sources([str(p) for p in paths]) if isinstance(e, DocumentItem))
    return list(pack_batches(docs, settings.batch_bytes))


def expected_chunks(settings: Settings, batches) -> int:
    """Chunks the worker makes of ``batches``: the same tokenizer and chunker, no embedding."""
    from common.ingest import make_chunker

    embedder = _embedder(settings.embed_model)
    chunker = make_chunker(embedder, settings.chunk_tokens, settings.chunk_overlap)
    return sum(len(chunker.split(item.content)) for batch in batches for item in batch.items)


# --- a private redis-server ---------------------------------------------------------------


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class RedisServer:
    """A redis-server of our own: loopback, a free port, AOF fsynced on every write,
    a password, its files in ``directory``. ``shutdown()`` then ``start()`` restarts
    it on the same port and directory, as an operator's restart would. With ``tls``
    it only speaks TLS, with a self-signed certificate made in ``directory`` (``ca``)."""

    def __init__(self, directory: Path, password: str, port: int | None = None, *, tls: bool = False) -> None:
        self.binary = shutil.which("redis-server")
        if self.binary is None:
            raise RuntimeError("redis-server is not on PATH")
        self.directory = directory
        self.password = password
        self.port = port or free_port()
        self.proc: subprocess.Popen | None = None
        self.log_path = directory / "redis.log"
        directory.mkdir(parents=True, exist_ok=True)
        self.tls = tls
        self.ca = directory / "cert.pem"
        if tls:
            subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                            "-keyout", str(directory / "key.pem"), "-out", str(self.ca), "-subj", "/CN=127.0.0.1",
                            "-addext", "subjectAltName=IP:127.0.0.1"], check=True, capture_output=True)

    @property
    def url(self) -> str:
        if self.tls:  # the certificate is verified against our CA, as production should
            return (f"rediss://:{self.password}@127.0.0.1:{self.port}/0"
                    f"?ssl_cert_reqs=required&ssl_ca_certs={self.ca}")
        return f"redis://:{self.password}@127.0.0.1:{self.port}/0"

    def client(self) -> redis.Redis:
        tls = {"ssl": True, "ssl_ca_certs": str(self.ca), "ssl_cert_reqs": "required"} if self.tls else {}
        return redis.Redis(host="127.0.0.1", port=self.port, password=self.password, decode_responses=True,
                           socket_connect_timeout=2, socket_timeout=5, **tls)

    def start(self, timeout: float = 20.0) -> None:
        port = (["--port", "0", "--tls-port", str(self.port), "--tls-cert-file", str(self.ca),
                 "--tls-key-file", str(self.directory / "key.pem"), "--tls-auth-clients", "no"]
                if self.tls else ["--port", str(self.port)])
        args = [self.binary, *port, "--bind", "127.0.0.1", "--dir", str(self.directory),
                "--appendonly", "yes", "--appendfsync", "always", "--save", "", "--requirepass", self.password,
                "--logfile", str(self.log_path), "--daemonize", "no", "--protected-mode", "yes"]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                     start_new_session=True)

        def up() -> bool:
            if self.proc.poll() is not None:
                raise RuntimeError(f"redis-server exited with {self.proc.returncode}: {self.log_tail()}")
            try:
                return bool(self.client().ping())
            except redis.RedisError:
                return False

        wait_for(up, timeout, f"redis-server on port {self.port}", poll_s=0.05, on_timeout=self.log_tail)

    def shutdown(self) -> None:
        """``SHUTDOWN``: the AOF is fsynced and kept (no RDB: ``--save ""``)."""
        try:
            self.client().shutdown()
        except redis.ConnectionError:
            pass  # the server closes the connection as it exits
        if self.proc is not None:
            self.proc.wait(20)

    def stop(self) -> None:
        if self.proc is not None:
            terminate(self.proc)

    def log_tail(self) -> str:
        return self.log_path.read_text(errors="replace")[-2000:] if self.log_path.exists() else ""

    def dump_everything(self) -> str:
        """Every key and value in the server, as text (for secret scans)."""
        conn = redis.Redis(host="127.0.0.1", port=self.port, password=self.password, decode_responses=False)
        out: list[str] = []
        for db in range(16):
            conn.execute_command("SELECT", db)
            for key in conn.scan_iter(count=1000):
                kind = conn.type(key).decode()
                if kind == "string":
                    value: Any = conn.get(key)
                elif kind == "hash":
                    value = conn.hgetall(key)
                elif kind == "list":
                    value = conn.lrange(key, 0, -1)
                elif kind == "set":
                    value = conn.smembers(key)
                elif kind == "zset":
                    value = conn.zrange(key, 0, -1, withscores=True)
                else:
                    value = conn.dump(key)
                out.append(f"{key!r} {value!r}")
        conn.close()
        return "\n".join(out)


# --- a controllable OpenAI-compatible server ----------------------------------------------


class FakeLLM:
    """POST /v1/chat/completions on loopback, scriptable while it runs.

    ``delay_s`` holds each answer back; ``statuses`` are answered in order before the
    200s (settable while it runs); ``max_in_flight`` is the most requests it held at once; ``stop()`` closes the port (connection refused) and ``start()`` reopens it on
    the same port. A 200 echoes the question (the last line of the user message), and
    every request is recorded, so a test can count how often each question was sent.
    Handler threads are daemons and sleep in small steps, so teardown never waits long.

    ``rate_limit=(per_s, burst)`` makes it a rate-limited provider: a token bucket refilled
    at ``per_s`` requests a second holding at most ``burst``; a request that finds it empty
    is answered 429 at once (``Retry-After: retry_after``, OpenAI's error body and
    ``x-ratelimit-*`` headers) and takes nothing from it. ``requests`` records each one's
    status and arrival time.
    """

    def __init__(self, delay_s: float = 0.0, statuses: list[int] | None = None, *,
                 keep_alive: bool = False, fail_when: str | None = None,
                 rate_limit: tuple[float, float] | None = None, retry_after: str = "1") -> None:
        self.delay_s = delay_s
        self.statuses: list[int] = list(statuses or [])
        #: HTTP/1.1 keep-alive, as real servers: then ``connections`` counts the client's
        #: TCP connections (HTTP/1.0, the default here, closes each after one request).
        self.keep_alive = keep_alive
        self.connections: set[tuple[str, int]] = set()
        #: A request whose question contains this gets a 400 (never retried).
        self.fail_when = fail_when
        self.requests: list[dict[str, Any]] = []
        self.in_flight = 0
        self.max_in_flight = 0
        self.auth: set[str] = set()
        self.echo_auth = False
        self.rate_limit = rate_limit
        self.retry_after = retry_after
        self._bucket = (rate_limit[1] if rate_limit else 0.0, time.monotonic())
        self.port = free_port()
        self._lock = threading.Lock()
        self._closing = threading.Event()
        self.server: ThreadingHTTPServer | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def start(self) -> FakeLLM:
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1" if fake.keep_alive else "HTTP/1.0"

            def log_message(self, *args: object) -> None:
                pass

            def do_GET(self) -> None:
                with fake._lock:
                    fake.connections.add(self.client_address)
                fake._reply(self, 200, {"object": "list", "data": [
                    {"id": "fake-model", "object": "model", "created": 0, "owned_by": "test"}]})

            def do_POST(self) -> None:
                fake._chat(self)

        ThreadingHTTPServer.allow_reuse_address = True
        self._closing.clear()
        self.server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True).start()
        return self

    def stop(self) -> None:
        if self.server is not None:
            self._closing.set()
            self.server.shutdown()
            self.server.server_close()
            self.server = None

    def __enter__(self) -> FakeLLM:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def posts(self) -> int:
        with self._lock:
            return len(self.requests)

    def posts_of(self, question: str) -> int:
        with self._lock:
            return sum(1 for r in self.requests if question in r["content"])

    def statuses_seen(self, status: int) -> list[float]:
        """Arrival times of the requests answered ``status``."""
        with self._lock:
            return [r["at"] for r in self.requests if r["status"] == status]

    def _take(self, now: float) -> bool:
        """One request from the bucket, if it holds one (call under the lock)."""
        assert self.rate_limit is not None
        per_s, burst = self.rate_limit
        level, then = self._bucket
        level = min(burst, level + (now - then) * per_s)
        if level < 1:
            self._bucket = (level, now)
            return False
        self._bucket = (level - 1, now)
        return True

    def _chat(self, handler: BaseHTTPRequestHandler) -> None:
        body = json.loads(handler.rfile.read(int(handler.headers["Content-Length"])))
        content = body["messages"][-1]["content"]
        with self._lock:
            now = time.monotonic()
            status = self.statuses.pop(0) if self.statuses else 200
            if self.fail_when is not None and self.fail_when in content:
                status = 400
            if status == 200 and self.rate_limit is not None and not self._take(now):
                status = 429
            self.connections.add(handler.client_address)
            self.requests.append({"content": content, "status": status, "at": now})
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
            self.auth.add(handler.headers.get("Authorization", ""))
        if status == 429 and self.rate_limit is not None:
            try:  # a provider refuses at once, before any work
                self._reply(handler, 429, {"error": {
                    "message": "Rate limit reached for requests", "type": "requests", "code": "rate_limit_exceeded"}},
                    headers={"Retry-After": self.retry_after, "x-ratelimit-remaining-requests": "0",
                             "x-ratelimit-reset-requests": f"{1 / self.rate_limit[0]:.3f}s"})
            finally:
                with self._lock:
                    self.in_flight -= 1
            return
        try:
            deadline = time.monotonic() + self.delay_s
            while time.monotonic() < deadline and not self._closing.is_set():
                time.sleep(0.02)
            if status != 200:
                # like some servers, echo the credentials back in the error (a leak test)
                message = f"scripted failure {status}"
                if self.echo_auth:
                    message += f" for {handler.headers.get('Authorization', '')}"
                self._reply(handler, status, {"error": {"message": message, "type": "server_error"}})
                return
            answer = "echo: " + content.strip().splitlines()[0][:200]  # "Question: ..."
            self._reply(handler, 200, {
                "id": "chatcmpl-fake", "object": "chat.completion", "created": 0, "model": body["model"],
                "choices": [{"index": 0, "message": {"role": "assistant", "content": answer}, "finish_reason": "stop"}],
                "usage": {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10},
            })
        finally:
            with self._lock:
                self.in_flight -= 1

    @staticmethod
    def _reply(handler: BaseHTTPRequestHandler, status: int, payload: object,
               headers: dict[str, str] | None = None) -> None:
        data = json.dumps(payload).encode()
        try:
            handler.send_response(status)
            for name, value in (headers or {}).items():
                handler.send_header(name, value)
            handler.send_header("Content-Type", "application/json")
            handler.send_header("Content-Length", str(len(data)))
            handler.end_headers()
            handler.wfile.write(data)
        except OSError:
            pass  # the client gave up (timeouts) or the worker was killed


# --- summaries -------------------------------------------------------------------------------


def report(name: str, **figures: object) -> None:
    """One line per fault with what it cost, shown under ``pytest -s``."""
    parts = ", ".join(f"{k}={v:.1f}" if isinstance(v, float) else f"{k}={v}" for k, v in figures.items())
    print(f"\nFAULT {name}: {parts}", flush=True)
