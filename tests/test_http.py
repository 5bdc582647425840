"""The HTTP front door end to end: ``ragq serve`` as a real uvicorn process on a loopback
port, in front of a real worker (the module's Stack), driven over HTTP with httpx and
with the official ``openai`` client for ``/v1/embeddings``.
"""

from __future__ import annotations

import base64
import json
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest

from tests.conftest import REPO, Stack, terminate

pytestmark = pytest.mark.timeout(300)

TOKEN = "test-token-7f3a9c"
MAX_BODY = 64 * 1024
DOCS = [
    {"id": "disk-1", "title": "Cloud Disk", "product": "Cloud Disk Service", "url": "https://docs.example.com/disk",
     "content": "Cloud Disk Service provides persistent block storage volumes that attach to virtual machines."},
    {"id": "dns-1", "title": "Cloud DNS", "product": "Cloud DNS", "url": "https://docs.example.com/dns",
     "content": "Cloud DNS resolves domain names to IP addresses and manages records such as A, CNAME and MX."},
    {"title": "Object Storage pricing", "product": "Object Storage",
     "content": "Object Storage bills stored gigabytes per month, outbound traffic and the number of requests."},
]


@dataclass
class Server:
    base: str
    proc: subprocess.Popen
    log: Path

    def client(self, token: str | None = TOKEN, **kwargs: object) -> httpx.Client:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return httpx.Client(base_url=self.base, headers=headers, timeout=60.0, **kwargs)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(stack: Stack, **env: str) -> Server:
    """``ragq serve`` on a free loopback port with the stack's settings; waits until it answers."""
    port = free_port()
    log = stack.data_dir / f"serve-{port}.log"
    proc = subprocess.Popen(
        [sys.executable, "-m", "producer", "serve", "--host", "127.0.0.1", "--port", str(port),
         "--log-level", "warning"],
        cwd=REPO, env={**stack.env, **env}, stdout=log.open("ab"), stderr=subprocess.STDOUT, start_new_session=True,
    )
    server = Server(f"http://127.0.0.1:{port}", proc, log)
    deadline = time.monotonic() + 30
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"ragq serve exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(f"{server.base}/openapi.json", timeout=2).status_code == 200:
                return server
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            stop_server(server)
            raise RuntimeError(f"ragq serve not answering after 30s:\n{log.read_text()[-3000:]}")
        time.sleep(0.2)


def stop_server(server: Server) -> None:
    terminate(server.proc, 15)


@pytest.fixture(scope="module")
def server(stack: Stack) -> Iterator[Server]:
    s = start_server(stack, RAGQ_API_TOKEN=TOKEN, RAGQ_HTTP_MAX_BODY_BYTES=str(MAX_BODY))
    yield s
    stop_server(s)


@pytest.fixture(scope="module")
def http(server: Server) -> Iterator[httpx.Client]:
    with server.client() as client:
        yield client


def wait_job(http: httpx.Client, job_id: str, timeout: float = 90.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        response = http.get(f"/v1/jobs/{job_id}")
        assert response.status_code == 200, response.text
        job = response.json()
        if job["status"] not in ("queued", "in_progress"):
            return job
        assert time.monotonic() < deadline, f"job still {job['status']} after {timeout}s"
        time.sleep(0.2)


@pytest.fixture(scope="module")
def ingested(http: httpx.Client) -> dict:
    response = http.post("/v1/ingest", json=DOCS)
    assert response.status_code == 202, response.text
    job = response.json()
    assert response.headers["location"] == f"/v1/jobs/{job['id']}"
    assert (job["kind"], job["total"], job["meta"]["inputs"]) == ("ingest", 3, ["http"])
    return wait_job(http, job["id"])


# -- jobs -------------------------------------------------------------------------------------

def test_ingest_json_then_search(http: httpx.Client, ingested: dict) -> None:
    assert ingested["status"] == "completed", ingested
    assert (ingested["completed"], ingested["failed"]) == (3, 0)
    response = http.post("/v1/search", json={"query": "DNS records for a domain", "top_k": 2})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["top_k"] == 2 and len(body["hits"]) == 2
    assert body["hits"][0]["url"] == "https://docs.example.com/dns"
    assert set(body["hits"][0]) == {"url", "title", "product", "score", "text"}
    only = http.post("/v1/search", json={"query": "storage", "filter": {"product": "Object Storage"}}).json()
    assert [h["product"] for h in only["hits"]] == ["Object Storage"]


def test_job_status_results_and_cancel(http: httpx.Client, ingested: dict) -> None:
    job_id = ingested["id"]
    same = http.get(f"/v1/jobs/{job_id}").json()
    assert set(same) == set(ingested) and same["status"] == "completed"
    results = http.get(f"/v1/jobs/{job_id}/results")  # an ingest job has no result lines
    assert (results.status_code, results.text) == (200, "")
    assert results.headers["content-type"].startswith("application/x-ndjson")
    assert results.headers["x-ragq-job-status"] == "completed"
    assert http.post(f"/v1/jobs/{job_id}/cancel").status_code == 409
    for path in ("/v1/jobs/0123abcd", "/v1/jobs/0123abcd/results"):
        assert http.get(path).status_code == 404
    assert http.post("/v1/jobs/0123abcd/cancel").status_code == 404
    assert http.get("/v1/jobs/not:a-key").status_code == 422  # ids never reach Redis key syntax


def test_ingest_jsonl_and_cancel_queued_job(http: httpx.Client, ingested: dict) -> None:
    # Keep the single worker busy with an embedding request (~58 KB, ~2 s of work), so the
    # new job waits in the queue.
    texts = [f"{n} " + "storage volume snapshot " * 60 for n in range(40)]
    answers: list[httpx.Response] = []
    busy = threading.Thread(target=lambda: answers.append(
        http.post("/v1/embeddings", json={"model": "all-MiniLM-L6-v2", "input": texts})))
    busy.start()
    time.sleep(0.3)
    lines = b"".join(json.dumps({"content": f"Line {n} about load balancers.", "id": f"lb-{n}"}).encode() + b"\n"
                     for n in range(3))
    response = http.post("/v1/ingest", content=b"\n" + lines, headers={"content-type": "application/x-ndjson"})
    assert response.status_code == 202, response.text
    job_id = response.json()["id"]
    cancelled = http.post(f"/v1/jobs/{job_id}/cancel")
    busy.join(120)
    assert answers[0].status_code == 200, answers[0].text
    assert cancelled.status_code == 200, cancelled.text
    assert cancelled.json()["status"] == "cancelled"
    assert wait_job(http, job_id)["status"] == "cancelled"


def test_ingest_validation_names_the_field(http: httpx.Client) -> None:
    bad = http.post("/v1/ingest", json=[DOCS[0], {"content": 5}, {"title": "no content"}, {"content": "  "}])
    assert bad.status_code == 422
    locs = [tuple(e["loc"]) for e in bad.json()["detail"]]
    assert locs == [("body", 1, "content"), ("body", 2, "content"), ("body", 3, "content")]
    jsonl = http.post("/v1/ingest", content=b'{"content": "ok"}\n{"content": "x", "title": 3}\n{oops\n',
                      headers={"content-type": "application/x-ndjson"})
    assert jsonl.status_code == 422
    assert [e["loc"] for e in jsonl.json()["detail"]] == [["body", "line 2", "title"], ["body", "line 3"]]
    assert http.post("/v1/ingest", json={"content": "not in a list"}).status_code == 422
    assert http.post("/v1/ingest", json=[]).status_code == 422
    assert http.post("/v1/ingest", content=b"a,b", headers={"content-type": "text/csv"}).status_code == 415
    assert http.post("/v1/search", json={"query": "x", "top_k": 0}).json()["detail"][0]["loc"] == ["body", "top_k"]


def test_body_limit_413(http: httpx.Client) -> None:
    big = [{"content": "x" * (MAX_BODY + 1)}]
    assert http.post("/v1/ingest", json=big).status_code == 413

    def chunks() -> Iterator[bytes]:  # no Content-Length: the server counts as it reads
        yield b'[{"content": "'
        for _ in range(MAX_BODY // 4096 + 1):
            yield b"y" * 4096
        yield b'"}]'

    response = http.post("/v1/ingest", content=chunks(), headers={"content-type": "application/json"})
    assert response.status_code == 413
    assert response.json() == {"detail": "Content Too Large"}


def test_auth_and_no_secrets(server: Server, stack: Stack) -> None:
    with server.client(token=None) as anonymous:
        response = anonymous.get("/v1/jobs/abc")
        assert response.status_code == 401 and response.headers["www-authenticate"] == "Bearer"
        assert anonymous.post("/v1/ingest", json=DOCS).status_code == 401
        assert anonymous.get("/health").json() == {"status": "ok"}  # no details without the token
        assert anonymous.get("/openapi.json").status_code == 200
    with server.client(token="wrong-token") as wrong:
        assert wrong.post("/v1/search", json={"query": "dns"}).status_code == 401
    with server.client() as authed:
        texts = [authed.get("/health").text, authed.get("/openapi.json").text,
                 authed.get("/v1/jobs/abc").text, authed.post("/v1/search", json={"query": "x", "timeout": 0.001}).text]
    for text in texts:
        assert TOKEN not in text and stack.env["RAGQ_REDIS_URL"] not in text


@pytest.fixture(scope="module")
def lonely(stack: Stack) -> Iterator[Server]:
    """A server whose qa and interactive queues no worker consumes (no token)."""
    s = start_server(stack, RAGQ_QA_QUEUE="qa-nobody-consumes", RAGQ_INTERACTIVE_QUEUE="qa-nobody-consumes")
    yield s
    stop_server(s)


def test_health(http: httpx.Client, lonely: Server, stack: Stack) -> None:
    response = http.get("/health")
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["status"] == "ok"
    checks = body["checks"]
    assert checks["redis"] == {"ok": True}
    settings = stack.settings()
    assert checks["queues"]["ok"]
    assert checks["queues"][settings.ingest_queue]["workers"] and checks["queues"][settings.qa_queue]["workers"]
    assert checks["queues"][settings.interactive_queue]["workers"]
    assert checks["queues"][settings.store_queue]["workers"]  # the one process owns the embedded store too
    assert checks["store"]["ok"] and checks["store"]["collection"] == "test_docs"
    # No worker on the qa queue: unhealthy, and it says why.
    with lonely.client(token=None) as client:
        response = client.get("/health")
    assert response.status_code == 503
    checks = response.json()["checks"]
    assert checks["redis"]["ok"] and not checks["queues"]["ok"] and not checks["store"]["ok"]
    assert "qa-nobody-consumes" in checks["queues"]["error"]


def test_redis_down_is_503_fast_and_secret_free(stack: Stack) -> None:
    password = "hunter2-redis-password"
    down = start_server(stack, RAGQ_REDIS_URL=f"redis://:{password}@127.0.0.1:{free_port()}/0")
    try:
        with down.client(token=None) as client:
            started = time.monotonic()
            response = client.get("/health")
            assert time.monotonic() - started < 5
            assert response.status_code == 503
            assert not response.json()["checks"]["redis"]["ok"]
            assert password not in response.text
    finally:
        stop_server(down)


def test_no_worker_is_504(lonely: Server) -> None:
    with lonely.client(token=None) as client:
        response = client.post("/v1/search", json={"query": "dns", "timeout": 1})
    assert response.status_code == 504
    assert "no worker answered" in response.json()["detail"]


# -- questions --------------------------------------------------------------------------------------

def test_question_job_and_results(http: httpx.Client, ingested: dict) -> None:
    body = (b'{"custom_id": "q-dns", "question": "Which DNS records can I manage?", "top_k": 2}\n'
            b'\n'
            b'{"question": "How is object storage billed?", "filter": {"product": "Object Storage"}}\n')
    response = http.post("/v1/questions", content=body, headers={"content-type": "application/x-ndjson"})
    assert response.status_code == 202, response.text
    job = response.json()
    assert (job["kind"], job["total"]) == ("questions", 2)
    assert response.headers["location"] == f"/v1/jobs/{job['id']}"
    assert wait_job(http, job["id"])["status"] == "completed"
    results = http.get(f"/v1/jobs/{job['id']}/results")
    assert results.status_code == 200 and results.headers["x-ragq-job-finished"] == "true"
    lines = [json.loads(line) for line in results.text.splitlines()]
    assert [line["custom_id"] for line in lines] == ["q-dns", "3"]  # default id: the line number
    assert lines[0]["sources"][0]["url"] == "https://docs.example.com/dns" and len(lines[0]["sources"]) == 2
    assert [s["product"] for s in lines[1]["sources"]] == ["Object Storage"]
    assert all(line["answer"] is None and line["error"] is None for line in lines)  # the stack's LLM backend: none


def test_question_validation_names_the_line(http: httpx.Client) -> None:
    body = (b'{"custom_id": "a", "question": "ok?"}\n{"custom_id": "a", "question": "again?"}\n'
            b'{"question": "x", "top_k": 0}\n{"question": "   "}\n')
    response = http.post("/v1/questions", content=body, headers={"content-type": "application/x-ndjson"})
    assert response.status_code == 422
    assert [e["loc"] for e in response.json()["detail"]] == [
        ["body", "line 2", "custom_id"], ["body", "line 3", "top_k"], ["body", "line 4", "question"]]
    as_array = http.post("/v1/questions", json=[{"question": "a JSON array works too"}], params={"generate": "false"})
    assert as_array.status_code == 202 and as_array.json()["meta"]["generate"] is False


def test_answer(http: httpx.Client, ingested: dict, stack: Stack) -> None:
    response = http.post("/v1/answer", json={"question": "Which DNS records can I manage?", "top_k": 2})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["answer"] is None and body["model"] == "none"  # the stack's LLM backend: none
    assert [s["url"] for s in body["sources"]][0] == "https://docs.example.com/dns" and len(body["sources"]) == 2
    assert http.get(f"/v1/jobs/{body['job_id']}").json()["status"] == "completed"
    # max_tokens is the answer's length, apart from top_k (per-question effect: test_answering)
    assert http.post("/v1/answer", json={"question": "dns?", "top_k": 1, "max_tokens": 7}).status_code == 200
    refused = http.post("/v1/answer", json={"question": "dns?", "max_tokens": 4097})
    assert refused.status_code == 422 and refused.json()["detail"][0]["loc"] == ["body", "max_tokens"]
    assert http.post("/v1/answer", json={"question": "  "}).json()["detail"][0]["loc"] == ["body", "question"]


def test_waiting_question_job_and_answer_timeout(lonely: Server) -> None:
    with lonely.client(token=None) as client:
        job = client.post("/v1/questions", json=[{"question": "anyone there?"}]).json()
        partial = client.get(f"/v1/jobs/{job['id']}/results")
        assert (partial.status_code, partial.text) == (200, "")
        assert partial.headers["x-ragq-job-status"] == "queued" and partial.headers["x-ragq-job-finished"] == "false"
        assert client.post(f"/v1/jobs/{job['id']}/cancel").json()["status"] == "cancelled"
        response = client.post("/v1/answer", json={"question": "anyone there?", "timeout": 1})
    assert response.status_code == 504
    assert "no worker took the question" in response.json()["detail"]


# -- OpenAI-compatible embeddings -----------------------------------------------------------------

@pytest.fixture(scope="module")
def embedder(stack: Stack):
    from common.embedding import Embedder

    settings = stack.settings()
    return Embedder(settings.embed_model, "cpu", settings.embed_batch_tokens, threads=1)


def test_embeddings_with_the_openai_client(server: Server, stack: Stack, embedder) -> None:
    model = stack.settings().embed_model
    client = openai.OpenAI(base_url=f"{server.base}/v1", api_key=TOKEN, max_retries=0, timeout=60)
    texts = ["How do I attach a cloud disk?", "DNS record types", "对象存储如何计费"]
    expected = embedder.encode(texts)

    packed = client.embeddings.create(model=model, input=texts)  # the client asks for base64
    floats = client.embeddings.create(model="all-MiniLM-L6-v2", input=texts, encoding_format="float")
    for result in (packed, floats):
        assert [d.index for d in result.data] == [0, 1, 2]
        got = np.array([d.embedding for d in result.data], dtype=np.float32)
        np.testing.assert_allclose(got, expected, atol=1e-5)
        assert result.model == model
        assert result.usage.prompt_tokens == result.usage.total_tokens == sum(
            embedder.count_tokens(t) for t in texts)

    one = client.embeddings.create(model=model, input="DNS record types", encoding_format="float")
    np.testing.assert_allclose(one.data[0].embedding, expected[1], atol=1e-5)

    with pytest.raises(openai.UnprocessableEntityError):  # longer than the model's window: refused, not cut
        client.embeddings.create(model=model, input=["short", "word " * 600])
    with pytest.raises(openai.UnprocessableEntityError):
        client.embeddings.create(model="text-embedding-3-small", input="x")
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{server.base}/v1", api_key="nope", max_retries=0).embeddings.create(
            model=model, input="x")


def test_embeddings_raw_shape_and_concurrency(http: httpx.Client, embedder) -> None:
    texts = [f"question number {n} about cloud storage" for n in range(6)]
    results: dict[int, httpx.Response] = {}

    def call(n: int) -> None:
        results[n] = http.post("/v1/embeddings", json={"model": "all-MiniLM-L6-v2", "input": texts[n],
                                                       "encoding_format": "base64"})

    threads = [threading.Thread(target=call, args=(n,)) for n in range(len(texts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    expected = embedder.encode(texts)
    for n, response in sorted(results.items()):
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["object"] == "list" and body["data"][0]["object"] == "embedding"
        vector = np.frombuffer(base64.b64decode(body["data"][0]["embedding"]), dtype="<f4")
        np.testing.assert_allclose(vector, expected[n], atol=1e-5)
    too_many = http.post("/v1/embeddings", json={"model": "all-MiniLM-L6-v2", "input": ["x"] * 257})
    assert too_many.status_code == 422 and too_many.json()["detail"][0]["loc"][:2] == ["body", "input"]
    wrong_dims = http.post("/v1/embeddings", json={"model": "all-MiniLM-L6-v2", "input": "x", "dimensions": 8})
    assert wrong_dims.status_code == 422 and wrong_dims.json()["detail"][0]["loc"] == ["body", "dimensions"]


def test_server_never_loads_a_model() -> None:
    code = ("import sys; from producer.http import create_app; from common.config import Settings; "
            "create_app(Settings(_env_file=None)); "
            "print(sorted(m for m in ('torch', 'transformers', 'workers.tasks') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
