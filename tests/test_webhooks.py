"""Webhooks end to end: a real receiver on loopback verifies each delivery's Standard Webhooks
signature with its own implementation (hmac + base64 here, not ragq's), and records it.

``ragq serve`` (its webhook thread) delivers the events of jobs run by a real worker:
ingest and question jobs, a failed job, batches completed and cancelled; a receiver that
fails twice gets the same webhook-id three times. The outbox and sender are also driven
directly against real Redis for the lease and the give-up path.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import openai
import pytest
import redis

from common.config import Settings
from common.webhooks import WebhookOutbox, WebhookSender, build_event, verify
from tests.conftest import Stack
from tests.test_http import DOCS, TOKEN, Server, start_server, stop_server, wait_job

pytestmark = pytest.mark.timeout(300)

SECRET = "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()
OPENAI = openai.OpenAI(api_key="unused", base_url="http://127.0.0.1:9/v1")


def openai_accepts(headers: dict[str, str], body: bytes) -> bool:
    """The official ``openai`` client's own webhook verification (Standard Webhooks) agrees."""
    try:
        OPENAI.webhooks.verify_signature(body, headers, secret=SECRET)
    except openai.InvalidWebhookSignatureError:
        return False
    return True


def independent_signature_ok(headers: dict[str, str], body: bytes) -> bool:
    """The receiver's check, written from the Standard Webhooks spec alone."""
    key = base64.b64decode(SECRET.split("_", 1)[1])
    content = f"{headers['webhook-id']}.{headers['webhook-timestamp']}.".encode() + body
    expected = base64.b64encode(hmac.new(key, content, hashlib.sha256).digest()).decode()
    fresh = abs(time.time() - int(headers["webhook-timestamp"])) < 300
    return fresh and any(sig == f"v1,{expected}" for sig in headers.get("webhook-signature", "").split(" "))


@dataclass
class Received:
    path: str
    headers: dict[str, str]
    body: bytes
    signed_ok: bool
    answered: int

    @property
    def event(self) -> dict:
        return json.loads(self.body)


@dataclass
class Receiver:
    """``/ok`` accepts; ``/flaky`` answers 500 to the first two attempts of each webhook-id; ``/down`` always 503."""

    server: ThreadingHTTPServer
    got: list[Received] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def events(self, type_: str, subject: str) -> list[Received]:
        with self.lock:
            return [r for r in self.got if r.event["type"] == type_ and r.event["data"]["id"] == subject]

    def wait_for(self, type_: str, subject: str, *, accepted: bool = True, timeout: float = 90.0) -> list[Received]:
        deadline = time.monotonic() + timeout
        while True:
            found = self.events(type_, subject)
            if found and (not accepted or found[-1].answered == 200):
                return found
            assert time.monotonic() < deadline, f"no {type_} event for {subject}; got {[r.event for r in self.got]}"
            time.sleep(0.1)


def start_receiver() -> Receiver:
    receiver: Receiver

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 (http.server's name)
            body = self.rfile.read(int(self.headers["content-length"]))
            headers = {k.lower(): v for k, v in self.headers.items()}
            signed_ok = independent_signature_ok(headers, body) and openai_accepts(headers, body)
            with receiver.lock:
                tries = sum(1 for r in receiver.got if r.headers["webhook-id"] == headers["webhook-id"])
                status = {"/ok": 200, "/flaky": 500 if tries < 2 else 200, "/down": 503}.get(self.path, 404)
                if not signed_ok:
                    status = 401
                receiver.got.append(Received(self.path, headers, body, signed_ok, status))
            self.send_response(status)
            self.send_header("content-length", "0")
            self.end_headers()

        def log_message(self, *_: object) -> None:
            pass

    receiver = Receiver(ThreadingHTTPServer(("127.0.0.1", 0), Handler))
    threading.Thread(target=receiver.server.serve_forever, daemon=True).start()
    return receiver


@pytest.fixture(scope="module")
def receiver() -> Iterator[Receiver]:
    r = start_receiver()
    yield r
    r.server.shutdown()


@pytest.fixture(scope="module")
def api(stack: Stack, receiver: Receiver) -> Iterator[Server]:
    server = start_server(stack, RAGQ_API_TOKEN=TOKEN, RAGQ_WEBHOOK_URL=f"{receiver.base}/ok",
                          RAGQ_WEBHOOK_SECRET=SECRET, RAGQ_WEBHOOK_BACKOFF_S="0.2")
    yield server
    stop_server(server)


@pytest.fixture(scope="module")
def http(api: Server) -> Iterator[httpx.Client]:
    with api.client() as client:
        yield client


def assert_event(got: Received, type_: str, subject: str) -> None:
    event = got.event
    assert got.signed_ok, got.headers
    assert set(event) == {"id", "object", "created_at", "type", "data"}
    assert (event["object"], event["type"], event["data"]["id"]) == ("event", type_, subject)
    assert event["id"].startswith("evt_") and got.headers["webhook-id"] == event["id"]
    assert abs(event["created_at"] - time.time()) < 300


def test_ingest_job_completed_event(http: httpx.Client, receiver: Receiver) -> None:
    response = http.post("/v1/ingest", json=DOCS)
    assert response.status_code == 202, response.text
    job = wait_job(http, response.json()["id"])
    assert job["status"] == "completed"
    got = receiver.wait_for("job.completed", job["id"])
    assert_event(got[-1], "job.completed", job["id"])
    assert got[-1].path == "/ok" and got[-1].event["data"] == {"id": job["id"], "object": "job", "kind": "ingest",
                                                               "status": "completed"}
    assert len(got) == 1


def test_question_job_retried_with_the_same_id(api: Server, stack: Stack, receiver: Receiver,
                                               tmp_path: Path) -> None:
    questions = tmp_path / "q.txt"
    questions.write_text("What does Cloud DNS resolve?\nHow is Object Storage billed?\n")
    env_stack = stack.cli("ask-file", str(questions), "--webhook-url", f"{receiver.base}/flaky", check=True)
    job_id = env_stack.stdout.strip()
    got = receiver.wait_for("job.completed", job_id)
    assert [r.answered for r in got] == [500, 500, 200]
    assert {r.headers["webhook-id"] for r in got} == {got[0].event["id"]}
    assert all(r.body == got[0].body and r.path == "/flaky" and r.signed_ok for r in got)
    assert got[0].event["data"]["kind"] == "questions"


def test_failed_job_event(api: Server, stack: Stack, receiver: Receiver, tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"content": \n{"title": "no content"}\n')
    result = stack.cli("ingest", "--webhook-url", f"{receiver.base}/ok", str(bad))
    job_id = result.stdout.strip()
    got = receiver.wait_for("job.failed", job_id)
    assert_event(got[-1], "job.failed", job_id)
    assert got[-1].event["data"]["status"] == "failed"


def test_bad_webhook_url_is_refused(http: httpx.Client, stack: Stack) -> None:
    response = http.post("/v1/ingest", params={"webhook_url": "ftp://example.com/x"}, json=DOCS)
    assert response.status_code == 422 and "webhook_url" in str(response.json()["detail"][0]["loc"])
    result = stack.cli("ingest", "--webhook-url", "not a url", str(Path(__file__)))
    assert result.returncode != 0 and "webhook URL" in result.stderr


def _upload(http: httpx.Client, lines: list[dict]) -> str:
    content = "".join(json.dumps(line) + "\n" for line in lines).encode()
    response = http.post("/v1/files", files={"file": ("in.jsonl", content)}, data={"purpose": "batch"})
    assert response.status_code == 200, response.text
    return response.json()["id"]


def _chat(n: int) -> dict:
    return {"custom_id": f"r{n}", "method": "POST", "url": "/v1/chat/completions",
            "body": {"model": "ragq", "messages": [{"role": "user", "content": f"What is Cloud DNS? ({n})"}]}}


def test_batch_completed_event_after_its_files(http: httpx.Client, receiver: Receiver) -> None:
    file_id = _upload(http, [_chat(n) for n in range(3)])
    batch = http.post("/v1/batches", json={"input_file_id": file_id, "endpoint": "/v1/chat/completions",
                                           "completion_window": "24h"}).json()
    got = receiver.wait_for("batch.completed", batch["id"])
    assert_event(got[-1], "batch.completed", batch["id"])
    assert got[-1].event["data"] == {"id": batch["id"]}
    typed = OPENAI.webhooks.unwrap(got[-1].body, got[-1].headers, secret=SECRET)  # OpenAI's own event model
    assert (typed.type, typed.data.id, typed.id) == ("batch.completed", batch["id"], got[-1].event["id"])
    # the event came after the batch was finalized: its output is there, nothing is written any more
    final = http.get(f"/v1/batches/{batch['id']}").json()
    assert final["status"] == "completed" and final["output_file_id"]
    assert http.get(f"/v1/files/{final['output_file_id']}/content").text.count("\n") == 3
    assert not receiver.events("job.completed", batch["job_id"])  # a batch's job is announced as the batch


def test_batch_cancelled_event(http: httpx.Client, receiver: Receiver) -> None:
    file_id = _upload(http, [_chat(n) for n in range(1500)])
    batch = http.post("/v1/batches", json={"input_file_id": file_id, "endpoint": "/v1/chat/completions",
                                           "completion_window": "24h", "webhook_url": f"{receiver.base}/flaky"}).json()
    cancelled = http.post(f"/v1/batches/{batch['id']}/cancel")
    assert cancelled.status_code == 200, cancelled.text
    got = receiver.wait_for("batch.cancelled", batch["id"], timeout=180)
    assert [r.answered for r in got] == [500, 500, 200] and len({r.headers["webhook-id"] for r in got}) == 1
    assert_event(got[-1], "batch.cancelled", batch["id"])
    assert http.get(f"/v1/batches/{batch['id']}").json()["status"] == "cancelled"


def test_bad_batch_webhook_url_is_refused(http: httpx.Client) -> None:
    file_id = _upload(http, [_chat(0)])
    response = http.post("/v1/batches", json={"input_file_id": file_id, "endpoint": "/v1/chat/completions",
                                              "completion_window": "24h", "webhook_url": "mailto:x@y"})
    assert response.status_code == 422 and "webhook_url" in str(response.json()["detail"][0]["loc"])


# -- the outbox and sender on their own, against real Redis ------------------------------------

@pytest.fixture
def outbox(redis_url: str) -> Iterator[WebhookOutbox]:
    prefix = f"ragq-test-wh-{secrets.token_hex(3)}"
    client = redis.Redis.from_url(redis_url)
    yield WebhookOutbox(client, prefix=prefix, ttl=600)
    for key in client.scan_iter(f"{prefix}:*"):
        client.delete(key)


def test_unaccepted_delivery_is_leased_then_sent_again(outbox: WebhookOutbox, receiver: Receiver) -> None:
    event = build_event("job.completed", {"id": "lease-1"}, subject="lease-1", created_at=int(time.time()))
    outbox.add(event, f"{receiver.base}/ok")
    outbox.add(event, f"{receiver.base}/ok")  # the same event again: still one delivery
    first = outbox.claim(lease_s=0.3)
    assert [d.id for d in first] == [event["id"]]
    assert outbox.claim(lease_s=0.3) == []  # leased to the first claimer (a sender that then died)
    time.sleep(0.4)
    sender = WebhookSender(outbox, secret=SECRET, backoff_s=0.05)
    assert sender.send_due() == 1 and outbox.pending() == 0
    got = receiver.events("job.completed", "lease-1")
    assert len(got) == 1 and got[0].headers["webhook-id"] == event["id"] and got[0].signed_ok


def test_delivery_gives_up_after_max_attempts(outbox: WebhookOutbox, receiver: Receiver) -> None:
    event = build_event("job.failed", {"id": "dead-1"}, subject="dead-1", created_at=int(time.time()))
    outbox.add(event, f"{receiver.base}/down")
    sender = WebhookSender(outbox, secret=SECRET, max_attempts=3, backoff_s=0.05)
    deadline = time.monotonic() + 10
    while outbox.pending() and time.monotonic() < deadline:
        sender.send_due()
        time.sleep(0.05)
    dead = outbox.dead()
    assert [(d.id, d.attempts) for d in dead] == [(event["id"], 3)] and "HTTP 503" in (dead[0].last_error or "")
    assert len(receiver.events("job.failed", "dead-1")) == 3


def test_signature_verification_and_secret_format() -> None:
    body = b'{"id":"evt_1"}'
    now = int(time.time())
    from common.webhooks import headers

    signed = headers(SECRET, "evt_1", now, body)
    assert independent_signature_ok(signed, body) and verify(SECRET, signed, body)
    assert not verify(SECRET, signed, body + b" ")
    assert not verify(SECRET, {**signed, "webhook-id": "evt_2"}, body)
    assert not verify(SECRET, headers(SECRET, "evt_1", now - 3600, body), body)  # stale timestamp
    with pytest.raises(ValueError, match="whsec_") as refused:
        Settings(_env_file=None, webhook_secret="plain-secret")
    assert "plain-secret" not in str(refused.value)  # the refused value may be a real secret
    assert Settings(_env_file=None, webhook_secret=SECRET).masked()["webhook_secret"] == "**********"
