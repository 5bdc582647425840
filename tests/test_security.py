"""Security properties, shown against a real worker on a private, password-protected
redis-server: pickled messages are refused, secrets appear nowhere (CLI output, job
records, results, worker log, anything in Redis, the AOF on disk), ingestion stays
inside its roots unless RAGQ_FOLLOW_SYMLINKS=true, and no ingest message is larger
than RAGQ_BATCH_BYTES.
"""

from __future__ import annotations

import base64
import builtins
import json
import os
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from common import tasknames
from common.jobs import JobRecord
from common.priorities import queue_depths, queue_keys
from common.schemas import JobKind
from producer.client import Client
from tests.conftest import Stack
from tests.faults import FakeLLM, RedisServer, attempts, report, wait_for

pytestmark = [pytest.mark.fault, pytest.mark.timeout(300)]

SECRETS = {
    "redis password": "redis-secret-5b8d0c",
    "RAGQ_LLM_API_KEY": "sk-llm-secret-9e2a71",
    "RAGQ_QDRANT_API_KEY": "qdrant-secret-13f0aa",
    "RAGQ_API_TOKEN": "api-token-secret-c4d2",
}


class Secure:
    def __init__(self, server: RedisServer, stack: Stack, fake: FakeLLM) -> None:
        self.server = server
        self.stack = stack
        self.fake = fake
        self.client = Client(stack.settings())


@pytest.fixture(scope="module")
def secure(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Secure]:
    base = tmp_path_factory.mktemp("security")
    server = RedisServer(base / "redis", SECRETS["redis password"])
    server.start()
    fake = FakeLLM().start()
    stack = Stack(server.url, base / "store", RAGQ_LLM_BACKEND="openai", RAGQ_LLM_BASE_URL=fake.base_url,
                  RAGQ_LLM_MODEL="fake-model", RAGQ_LLM_API_KEY=SECRETS["RAGQ_LLM_API_KEY"],
                  RAGQ_LLM_MAX_RETRIES="1", RAGQ_QDRANT_API_KEY=SECRETS["RAGQ_QDRANT_API_KEY"],
                  RAGQ_API_TOKEN=SECRETS["RAGQ_API_TOKEN"], RAGQ_TOP_K="2")
    try:
        stack.start_worker()
        yield Secure(server, stack, fake)
    finally:
        stack.stop_worker()
        fake.stop()
        server.stop()


# --- pickle -------------------------------------------------------------------------------------


class _Payload:
    """Unpickling this creates ``path``: proof that a pickle was loaded."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self):
        return builtins.open, (self.path, "w")


def test_pickle_message_is_refused(secure: Secure, tmp_path: Path) -> None:
    """A task message serialised with pickle, sent to the ingest queue, is never loaded:
    the worker logs that it refuses untrusted content, the job is untouched, the worker
    goes on serving."""
    settings = secure.stack.settings()
    record = JobRecord.create(secure.client.redis, JobKind.ingest, prefix=settings.key_prefix, ttl=settings.job_ttl_s)
    record.add_items(items=1, batches=1)
    record.seal()
    marker = tmp_path / "unpickled"
    secure.client.celery.send_task(tasknames.INGEST_BATCH, args=(record.id, 0, [_Payload(marker)]),
                                   serializer="pickle")
    sent = time.monotonic()
    wait_for(lambda: "Refusing to deserialize untrusted content of type pickle" in secure.stack.log_text(), 60,
             "the worker to refuse the pickle", on_timeout=lambda: secure.stack.log_text()[-3000:])
    secure.client.search("after the pickle", timeout=60)  # still serving
    assert not marker.exists(), "the pickle was loaded"
    info = record.info()
    assert (info.status, info.batches_done, info.completed, info.failed) == ("queued", 0, 0, 0)
    assert attempts(record) == {}  # no task body ever ran for it
    assert queue_depths(secure.client.redis, [settings.ingest_queue])[settings.ingest_queue] == 0  # dropped, not requeued forever
    assert secure.stack.proc.poll() is None
    report("pickle-refused", refused_within_s=time.monotonic() - sent, job_status=info.status)


# --- secrets ------------------------------------------------------------------------------------


def _aof_text(server: RedisServer) -> str:
    files = [p for p in server.directory.rglob("*") if p.is_file() and "appendonly" in p.name]
    assert files, "no AOF files"
    return "\n".join(p.read_bytes().decode("utf-8", "replace") for p in files)


def test_secrets_appear_nowhere(secure: Secure, tmp_path: Path) -> None:
    """Run an ingest job, a question job, a failing question job (the LLM server echoes
    the bearer token in its 401) and every read-out command; then search every output,
    the worker log, every key and value in Redis and the AOF files for each secret."""
    stack, fake = secure.stack, secure.fake
    docs = tmp_path / "docs"
    docs.mkdir()
    for n in range(3):
        (docs / f"page{n}.md").write_text(f"# Page {n}\nBilling for cloud disks, page {n}.\n")
    outputs: dict[str, str] = {}
    ingest = stack.cli("ingest", str(docs), "--wait", "--json", check=True)
    outputs["ragq ingest"] = ingest.stdout + ingest.stderr
    job_id = json.loads(ingest.stdout)["id"]

    questions = tmp_path / "q.jsonl"
    questions.write_text("".join(json.dumps({"custom_id": f"s{i}", "question": f"How is billing done {i}?"}) + "\n"
                                 for i in range(2)))
    asked = stack.cli("ask-file", str(questions), "--output", str(tmp_path / "a.jsonl"), "--json", check=True)
    outputs["ragq ask-file"] = asked.stdout + asked.stderr + (tmp_path / "a.jsonl").read_text()
    assert json.loads(asked.stdout)["completed"] == 2

    fake.echo_auth = True
    fake.statuses[:] = [401]
    refused = stack.cli("ask", "Which key do you use?", "--json")
    fake.echo_auth = False
    outputs["ragq ask (401)"] = refused.stdout + refused.stderr
    line = json.loads(refused.stdout)
    assert line["error"].startswith("HTTP 401: scripted failure 401 for Bearer ***"), line["error"]

    for args in (("config",), ("config", "--json"), ("status", job_id, "--json"), ("info", "--json"),
                 ("results", json.loads(asked.stdout)["id"])):
        result = stack.cli(*args)
        outputs["ragq " + " ".join(args)] = result.stdout + result.stderr
    outputs["worker log"] = stack.log_text()
    outputs["redis keys and values"] = secure.server.dump_everything()
    outputs["AOF files"] = _aof_text(secure.server)
    assert job_id in outputs["AOF files"]  # the scan does see what is stored

    leaks = [(name, where) for name, secret in SECRETS.items() for where, text in outputs.items() if secret in text]
    assert not leaks, f"secrets leaked: {leaks}"
    assert fake.auth == {f"Bearer {SECRETS['RAGQ_LLM_API_KEY']}"}  # the key was really used
    config = json.loads(outputs["ragq config --json"])
    assert config["redis_url"].startswith("redis://:***@127.0.0.1:")
    assert config["llm_api_key"] == config["qdrant_api_key"] == config["api_token"] == "**********"
    report("secrets", places_scanned=len(outputs), bytes_scanned=sum(map(len, outputs.values())), leaks=0)


# --- symlinks out of the roots ------------------------------------------------------------------


def _queued_bodies(client: Client, queue: str) -> list[bytes]:
    """The task bodies waiting on ``queue``, decoded from kombu's Redis envelopes."""
    bodies = []
    for raw in (raw for key in queue_keys(queue) for raw in client.redis.lrange(key, 0, -1)):
        envelope = json.loads(raw)
        body = envelope["body"]
        if envelope["properties"].get("body_encoding") == "base64":
            body = base64.b64decode(body)
        bodies.append(body if isinstance(body, bytes) else body.encode("utf-8"))
    return bodies


def _documents(bodies: list[bytes]) -> list[dict]:
    return [doc for body in bodies for doc in json.loads(body)[0][2]]


def _nobody_queue(secure: Secure, **changes: object) -> tuple[Client, str]:
    """A producer whose ingest queue (and interactive one, for one-document jobs) no worker
    consumes, so its messages can be read."""
    queue = f"nobody-{uuid.uuid4().hex[:8]}"
    return Client(secure.stack.settings(ingest_queue=queue, interactive_queue=queue, **changes)), queue


def test_ingestion_stays_inside_its_roots_unless_told(secure: Secure, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.md").write_text("# Outside\nNot to be ingested.\n")
    root = tmp_path / "root"
    (root / "sub").mkdir(parents=True)
    (root / "inside.md").write_text("# Inside\nTo be ingested.\n")
    os.symlink(outside / "secret.md", root / "file-link.md")
    os.symlink(outside, root / "sub" / "dir-link")
    os.symlink("../../outside/secret.md", root / "sub" / "relative-link.md")
    os.symlink(root / "inside.md", root / "sub" / "inside-link.md")

    client, queue = _nobody_queue(secure)
    job = client.ingest([root])
    sent = {d["item"] for d in _documents(_queued_bodies(client, queue))}
    # sub/inside-link.md names inside.md, which is read once (files are keyed by resolved path)
    assert sent == {str(root / "inside.md")}
    errors = {e["item"]: e["reason"] for e in job.refresh().errors}
    assert errors == {str(root / "file-link.md"): "symlink points outside the input root; not followed",
                      str(root / "sub" / "relative-link.md"): "symlink points outside the input root; not followed"}
    client.redis.delete(*queue_keys(queue))
    job.cancel()

    follow, queue = _nobody_queue(secure, follow_symlinks=True)
    job = follow.ingest([root])
    sent_follow = {d["item"] for d in _documents(_queued_bodies(follow, queue))}
    # the three links all name outside/secret.md: it is read once, by the first link walked
    assert sent_follow == sent | {str(root / "file-link.md")}
    follow.redis.delete(*queue_keys(queue))
    job.cancel()
    report("symlinks", followed_by_default=0, refused=len(errors), followed_when_told=len(sent_follow) - len(sent))  # distinct files


# --- message size -------------------------------------------------------------------------------


def test_no_ingest_message_is_larger_than_batch_bytes(secure: Secure, tmp_path: Path) -> None:
    """Read the raw messages in Redis before any worker takes them: every task body
    (what the worker decodes) is at most RAGQ_BATCH_BYTES, for ASCII, for CJK text
    (JSON escapes it on the wire), for many small documents packed tightly, and for a
    large document with a long title split into segments."""
    limit = 20_000
    root = tmp_path / "docs"
    root.mkdir()
    rows = [{"id": f"small-{n}", "content": f"small page {n} " + "about cloud billing " * (n % 40 + 1)}
            for n in range(300)]
    (root / "small.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (root / "cjk.jsonl").write_text("".join(json.dumps({"id": f"cjk-{n}", "content": "云硬盘快照计费说明。" * (n + 5)},
                                                       ensure_ascii=False) + "\n" for n in range(60)), encoding="utf-8")
    (root / "big.json").write_text(json.dumps({"id": "big", "title": "T" * 3000, "content": "word " * 40_000}))
    (root / "big-cjk.json").write_text(json.dumps({"id": "big-cjk", "content": "按配置计费的云主机。\n" * 8000},
                                                  ensure_ascii=False), encoding="utf-8")
    client, queue = _nobody_queue(secure, batch_bytes=limit)
    job = client.ingest([root])
    bodies = _queued_bodies(client, queue)
    client.redis.delete(*queue_keys(queue))
    job.cancel()
    assert len(bodies) == job.refresh().batches_total > 10
    sizes = sorted(len(b) for b in bodies)
    over = [s for s in sizes if s > limit]
    report("message-size", batch_bytes=limit, messages=len(sizes), largest_body=sizes[-1], over_limit=len(over))
    assert not over, f"{len(over)} of {len(sizes)} message bodies exceed RAGQ_BATCH_BYTES={limit}: largest {sizes[-1]}"
