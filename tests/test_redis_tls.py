"""Redis over TLS (``rediss://``) with a password: producer, broker, result backend and
job records all go through a TLS-only redis-server whose certificate is verified."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import redis

from tests.conftest import Stack
from tests.faults import RedisServer

PASSWORD = "tls-test-redis-password-8c1e"


@pytest.fixture
def tls_redis(tmp_path: Path):
    if not shutil.which("openssl"):
        pytest.skip("openssl is needed to make the test certificate")
    server = RedisServer(tmp_path / "redis", PASSWORD, tls=True)
    try:
        server.start()
    except RuntimeError as exc:
        if "tls" in str(exc).lower():
            pytest.skip(f"this redis-server has no TLS support: {exc}")
        raise
    yield server
    server.stop()


def test_everything_runs_over_tls_with_a_verified_certificate(tls_redis: RedisServer, tmp_path: Path) -> None:
    plain = redis.Redis(host="127.0.0.1", port=tls_redis.port, password=PASSWORD, socket_connect_timeout=2,
                        socket_timeout=2)
    with pytest.raises(redis.RedisError):
        plain.ping()  # the port speaks TLS only: nothing travels in the clear

    docs = tmp_path / "docs.jsonl"
    docs.write_text("".join(json.dumps(d) + "\n" for d in [
        {"id": "tls", "title": "TLS", "content": "ragq talks to Redis over TLS when the URL starts with rediss."},
        {"id": "aof", "title": "AOF", "content": "Redis keeps queued batches across restarts with appendonly."},
        {"id": "flower", "title": "Flower", "content": "Flower shows the workers' task throughput."},
    ]))
    stack = Stack(tls_redis.url, tmp_path / "stack")
    stack.start_worker()
    try:
        job_id = stack.cli("ingest", str(docs), "--wait", check=True).stdout.split()[0]
        status = json.loads(stack.cli("status", job_id, "--json", check=True).stdout)
        assert (status["status"], status["completed"], status["failed"]) == ("completed", 3, 0)
        hits = json.loads(stack.cli("search", "encrypted TLS connection to Redis", "--json", check=True).stdout)
        assert hits[0]["title"] == "TLS"
        config = stack.cli("config", "--json", check=True).stdout
    finally:
        stack.stop_worker()
    assert json.loads(config)["redis_url"].startswith("rediss://:***@127.0.0.1")
    assert PASSWORD not in config and PASSWORD not in stack.log_text()
    assert tls_redis.client().exists(f"{stack.settings().key_prefix}:job:{job_id}")
