"""OpenAI's Batch API on ragq, end to end: ``ragq serve`` as a real process in front of a real
worker whose answers come from a loopback OpenAI-compatible LLM (tests/faults.py FakeLLM),
driven with httpx and with the official ``openai`` client unchanged.
"""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest
import redis
from openai.types.chat import ChatCompletion

from common.batches import BatchRecord
from tests.conftest import Stack
from tests.faults import FakeLLM
from tests.test_http import DOCS, TOKEN, Server, start_server, stop_server, wait_job

pytestmark = pytest.mark.timeout(300)

FILE_LIMIT = 256 * 1024
FINAL = {"completed", "failed", "cancelled", "expired"}


@pytest.fixture(scope="module")
def fake() -> Iterator[FakeLLM]:
    with FakeLLM() as llm:
        yield llm


@pytest.fixture(scope="module")
def stack(redis_url: str, tmp_path_factory: pytest.TempPathFactory, fake: FakeLLM) -> Iterator[Stack]:
    """A worker that generates through the fake LLM (answers are "echo: <first prompt line>")."""
    s = Stack(redis_url, tmp_path_factory.mktemp("batch"), RAGQ_LLM_BACKEND="openai",
              RAGQ_LLM_BASE_URL=fake.base_url, RAGQ_LLM_MODEL="fake-model", RAGQ_LLM_TIMEOUT_S="10",
              RAGQ_QA_BATCH_SIZE="16")  # the cancel tests count on several task batches
    s.start_worker()
    yield s
    s.stop_worker()


@pytest.fixture(scope="module")
def server(stack: Stack) -> Iterator[Server]:
    s = start_server(stack, RAGQ_API_TOKEN=TOKEN, RAGQ_HTTP_MAX_BODY_BYTES=str(64 * 1024),
                     RAGQ_FILE_MAX_BYTES=str(FILE_LIMIT))
    yield s
    stop_server(s)


@pytest.fixture(scope="module")
def http(server: Server) -> Iterator[httpx.Client]:
    with server.client() as client:
        yield client


@pytest.fixture(scope="module")
def ingested(http: httpx.Client) -> dict:
    response = http.post("/v1/ingest", json=DOCS)
    assert response.status_code == 202, response.text
    return wait_job(http, response.json()["id"])


@pytest.fixture(scope="module")
def oai(server: Server) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=f"{server.base}/v1", api_key=TOKEN, max_retries=0, timeout=60) as client:
        yield client


def chat(custom_id: str, question: str, **body: object) -> dict:
    return {"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions",
            "body": {"model": "gpt-4o-mini", "messages": [{"role": "system", "content": "Be brief."},
                                                          {"role": "user", "content": question}], **body}}


def jsonl(lines: list[object]) -> bytes:
    return b"".join((line if isinstance(line, bytes) else json.dumps(line).encode()) + b"\n" for line in lines)


def poll(oai: openai.OpenAI, batch_id: str, timeout: float = 120.0) -> openai.types.Batch:
    deadline = time.monotonic() + timeout
    while True:
        batch = oai.batches.retrieve(batch_id)
        if batch.status in FINAL:
            return batch
        assert time.monotonic() < deadline, f"batch still {batch.status} after {timeout}s"
        time.sleep(0.3)


def lines_of(oai: openai.OpenAI, file_id: str) -> list[dict]:
    return [json.loads(line) for line in oai.files.content(file_id).text.splitlines()]


def upload(http: httpx.Client, content: bytes, name: str = "in.jsonl", purpose: str = "batch") -> httpx.Response:
    return http.post("/v1/files", files={"file": (name, content, "application/jsonl")}, data={"purpose": purpose})


# -- files ------------------------------------------------------------------------------------

def test_files_upload_get_content_list_delete(http: httpx.Client) -> None:
    content = b"".join(json.dumps({"n": i}).encode() + b"\n" for i in range(2000))  # over the 64 KiB body limit
    response = upload(http, content)
    assert response.status_code == 200, response.text
    meta = response.json()
    assert (meta["object"], meta["bytes"], meta["filename"], meta["purpose"]) == ("file", len(content), "in.jsonl",
                                                                                  "batch")
    assert meta["expires_at"] > meta["created_at"]
    assert http.get(f"/v1/files/{meta['id']}").json() == meta
    assert http.get(f"/v1/files/{meta['id']}/content").content == content
    listed = http.get("/v1/files", params={"purpose": "batch"}).json()
    assert listed["object"] == "list" and meta["id"] in [f["id"] for f in listed["data"]]
    assert http.delete(f"/v1/files/{meta['id']}").json() == {"id": meta["id"], "object": "file", "deleted": True}
    for call in (http.get(f"/v1/files/{meta['id']}"), http.get(f"/v1/files/{meta['id']}/content"),
                 http.delete(f"/v1/files/{meta['id']}")):
        assert call.status_code == 404


def test_file_limits_and_purpose(http: httpx.Client, server: Server) -> None:
    assert upload(http, b"x" * (FILE_LIMIT + 1)).status_code == 413
    refused = upload(http, b"{}\n", purpose="fine-tune")
    assert refused.status_code == 422 and refused.json()["detail"][0]["loc"] == ["body", "purpose"]
    with server.client(token=None) as anonymous:
        assert upload(anonymous, b"{}\n").status_code == 401


# -- batches with the official client ---------------------------------------------------------

def test_official_client_upload_batch_poll_download(oai: openai.OpenAI, ingested: dict, tmp_path: Path) -> None:
    assert ingested["status"] == "completed"
    good = [chat("dns", "How are domain names resolved?"),
            chat("disk", [{"type": "text", "text": "What attaches to"}, {"type": "text", "text": "virtual machines?"}],
                 top_k=3, max_completion_tokens=64),
            chat("obj", "What does storage cost?", filter={"product": "Object Storage"})]
    bad = [{**chat("wrong-url", "Anything?"), "url": "/v1/completions"},
           b'{"custom_id": "broken", ',
           chat("dns", "A duplicate custom_id"),
           {"custom_id": "no-user", "method": "POST", "url": "/v1/chat/completions",
            "body": {"model": "m", "messages": [{"role": "system", "content": "hi"}]}}]
    path = tmp_path / "requests.jsonl"
    path.write_bytes(jsonl([good[0], bad[0], good[1], bad[1], bad[2], good[2], bad[3]]))
    uploaded = oai.files.create(file=path.open("rb"), purpose="batch")
    assert (uploaded.purpose, uploaded.bytes, uploaded.filename) == ("batch", path.stat().st_size, "requests.jsonl")

    created = oai.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions",
                                 completion_window="24h", metadata={"top_k": "2", "team": "docs"})
    assert created.status in ("validating", "in_progress", "finalizing", "completed"), created
    assert created.metadata == {"top_k": "2", "team": "docs"} and created.input_file_id == uploaded.id
    batch = poll(oai, created.id)
    assert batch.status == "completed", batch
    assert (batch.request_counts.total, batch.request_counts.completed, batch.request_counts.failed) == (7, 3, 4)
    assert batch.created_at <= batch.in_progress_at <= batch.finalizing_at <= batch.completed_at
    assert batch.errors is None and batch.failed_at is None

    output = lines_of(oai, batch.output_file_id)
    assert [line["custom_id"] for line in output] == ["dns", "disk", "obj"]  # input order
    by_id = {line["custom_id"]: line for line in output}
    for line in output:
        assert line["id"].startswith("batch_req_") and line["error"] is None
        assert line["response"]["status_code"] == 200
        completion = ChatCompletion.model_validate(line["response"]["body"])
        assert completion.choices[0].message.content.startswith("echo: ")
        assert completion.model == "fake-model" and completion.usage.total_tokens == 10
    assert by_id["dns"]["response"]["body"]["sources"][0]["url"] == "https://docs.example.com/dns"
    assert len(by_id["dns"]["response"]["body"]["sources"]) == 2  # top_k from the batch's metadata
    assert len(by_id["disk"]["response"]["body"]["sources"]) == 3  # the line's own top_k wins
    assert {s["product"] for s in by_id["obj"]["response"]["body"]["sources"]} == {"Object Storage"}

    errors = lines_of(oai, batch.error_file_id)
    assert [line["custom_id"] for line in errors] == ["wrong-url", "4", "dns", "no-user"]
    assert all(line["response"] is None and line["error"]["code"] == "invalid_request" for line in errors)
    reasons = [line["error"]["message"] for line in errors]
    assert "url" in reasons[0] and "malformed JSON" in reasons[1] and "duplicate custom_id" in reasons[2]
    assert "role 'user'" in reasons[3] and reasons[1].startswith(f"{uploaded.id}:4:")

    assert oai.files.retrieve(batch.output_file_id).purpose == "batch_output"
    listed = oai.batches.list(limit=100)
    assert created.id in [b.id for b in listed.data]
    again = oai.batches.retrieve(created.id)  # finalized once: the same files every time
    assert (again.output_file_id, again.error_file_id) == (batch.output_file_id, batch.error_file_id)


def embed(custom_id: str, inputs: object, **body: object) -> dict:
    return {"custom_id": custom_id, "method": "POST", "url": "/v1/embeddings",
            "body": {"model": "all-MiniLM-L6-v2", "input": inputs, **body}}


def test_official_client_embeddings_batch(oai: openai.OpenAI, tmp_path: Path) -> None:
    """/v1/embeddings lines run on the workers' model: the vectors /v1/embeddings gives, bad lines refused."""
    texts = ["Cloud DNS resolves domain names.", "Block storage for virtual machines.", "云硬盘挂载到云主机。"]
    lines = [embed("one", texts[0]), embed("many", texts[1:], encoding_format="base64"),
             embed("wrong-model", "x", model="text-embedding-3-small"), embed("tokens", [[1, 2, 3]]),
             embed("too-long", ["fine", "word " * 600]), embed("one", "a duplicate custom_id"),
             b'{"custom_id": "broken"', embed("dims", "x", dimensions=8)]
    path = tmp_path / "embeddings.jsonl"
    path.write_bytes(jsonl(lines))
    uploaded = oai.files.create(file=path.open("rb"), purpose="batch")
    batch = poll(oai, oai.batches.create(input_file_id=uploaded.id, endpoint="/v1/embeddings",
                                         completion_window="24h").id)
    assert batch.status == "completed" and batch.endpoint == "/v1/embeddings", batch
    assert (batch.request_counts.total, batch.request_counts.completed, batch.request_counts.failed) == (8, 2, 6)

    direct = oai.embeddings.create(model="all-MiniLM-L6-v2", input=texts)
    output = {line["custom_id"]: line for line in lines_of(oai, batch.output_file_id)}
    assert list(output) == ["one", "many"]
    one = output["one"]["response"]
    assert one["status_code"] == 200 and one["body"]["object"] == "list" and one["body"]["model"].endswith("MiniLM-L6-v2")
    assert one["body"]["usage"]["prompt_tokens"] > 0
    assert np.allclose(one["body"]["data"][0]["embedding"], direct.data[0].embedding, atol=1e-5)
    many = output["many"]["response"]["body"]["data"]
    assert [d["index"] for d in many] == [0, 1]
    for got, want in zip(many, direct.data[1:]):
        vector = np.frombuffer(base64.b64decode(got["embedding"]), dtype="<f4")
        assert vector.shape == (384,) and np.allclose(vector, want.embedding, atol=1e-5)

    errors = {line["custom_id"]: line for line in lines_of(oai, batch.error_file_id)}
    assert set(errors) == {"wrong-model", "tokens", "too-long", "one", "7", "dims"}
    assert errors["too-long"]["response"]["status_code"] == 400  # the worker found it over the window
    assert "input[1]" in errors["too-long"]["response"]["body"]["error"]["message"]
    refused = {k: v["error"]["message"] for k, v in errors.items() if k != "too-long"}
    assert all(errors[k]["error"]["code"] == "invalid_request" for k in refused)
    assert "not served here" in refused["wrong-model"] and "token arrays" in refused["tokens"]
    assert "duplicate custom_id" in refused["one"] and "malformed JSON" in refused["7"]
    assert "dimensions" in refused["dims"]


def test_official_client_cancels_a_running_batch(oai: openai.OpenAI, fake: FakeLLM, ingested: dict) -> None:
    questions = [chat(f"q{i}", f"Question number {i} about DNS records?") for i in range(160)]  # 10 task batches
    uploaded = oai.files.create(file=("many.jsonl", jsonl(questions)), purpose="batch")
    fake.delay_s = 1.0  # each task batch takes a second: the batch is still running when cancelled
    try:
        created = oai.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions",
                                     completion_window="24h")
        cancelling = oai.batches.cancel(created.id)
        assert cancelling.status in ("cancelling", "cancelled") and cancelling.cancelling_at
        batch = poll(oai, created.id)
    finally:
        fake.delay_s = 0.0
    assert batch.status == "cancelled" and batch.cancelled_at >= batch.cancelling_at
    done = batch.request_counts.completed
    assert batch.request_counts.total == 160 and done < 160
    output = lines_of(oai, batch.output_file_id) if batch.output_file_id else []
    assert len(output) == done  # the answers finished before the cancel are kept
    numbers = [int(line["custom_id"].removeprefix("q")) for line in output]
    assert numbers == sorted(numbers) and set(numbers) <= set(range(160))  # input order, each once
    assert all(line["response"]["status_code"] == 200 for line in output)
    with pytest.raises(openai.ConflictError):
        oai.batches.cancel(created.id)


# -- batches over plain HTTP: refusals and failures ------------------------------------------

def test_batch_create_refusals(http: httpx.Client) -> None:
    file_id = upload(http, jsonl([chat("a", "Anything?")])).json()["id"]
    cases = [({"input_file_id": "file-000000000000000000000000"}, "input_file_id"),
             ({"input_file_id": file_id, "metadata": {"top_k": "many"}}, "metadata"),
             ({"input_file_id": file_id, "endpoint": "/v1/completions"}, "endpoint"),
             ({"input_file_id": file_id, "completion_window": "1h"}, "completion_window")]
    for extra, field in cases:
        response = http.post("/v1/batches", json={"endpoint": "/v1/chat/completions", **extra})
        assert response.status_code == 422, response.text
        assert field in response.json()["detail"][0]["loc"], response.text
    assert http.get("/v1/batches/batch_nope").status_code == 404
    assert http.post("/v1/batches/batch_nope/cancel").status_code == 404


def test_a_batch_whose_every_line_is_refused_fails_naming_the_lines(http: httpx.Client, oai: openai.OpenAI) -> None:
    file_id = upload(http, jsonl([b"not json", {"custom_id": "x", "method": "GET"}])).json()["id"]
    created = http.post("/v1/batches", json={"input_file_id": file_id, "endpoint": "/v1/chat/completions",
                                             "completion_window": "24h"})
    assert created.status_code == 200, created.text
    batch = poll(oai, created.json()["id"])
    assert batch.status == "failed" and batch.failed_at and batch.output_file_id is None
    assert [e.line for e in batch.errors.data] == [1, 2]
    assert all(e.code == "invalid_request" for e in batch.errors.data)
    assert len(lines_of(oai, batch.error_file_id)) == 2
    empty = upload(http, b"\n").json()["id"]
    batch = poll(oai, http.post("/v1/batches", json={"input_file_id": empty,
                                                     "endpoint": "/v1/chat/completions"}).json()["id"])
    assert batch.status == "failed" and batch.errors.data[0].code == "empty_file"


def test_a_batch_past_its_window_expires_keeping_what_is_done(oai: openai.OpenAI, fake: FakeLLM, stack: Stack,
                                                              ingested: dict) -> None:
    uploaded = oai.files.create(file=("slow.jsonl", jsonl([chat(f"s{i}", f"Slow question {i}?")
                                                           for i in range(64)])), purpose="batch")
    fake.delay_s = 1.0
    try:
        created = oai.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions",
                                     completion_window="24h")
        settings = stack.settings()
        client = redis.Redis.from_url(settings.redis_dsn)
        BatchRecord(client, created.id, prefix=settings.key_prefix).update(expires_at=int(time.time()) - 1)
        batch = poll(oai, created.id)
    finally:
        fake.delay_s = 0.0
    assert batch.status == "expired" and batch.expired_at and batch.cancelled_at is None
    assert batch.request_counts.completed < 64


# -- the CLI: same batches, same files, same job model ----------------------------------------

def test_cli_files_and_batches(stack: Stack, http: httpx.Client, fake: FakeLLM, ingested: dict,
                               tmp_path: Path) -> None:
    path = tmp_path / "cli.jsonl"
    path.write_bytes(jsonl([chat("c1", "How are domain names resolved?"), chat("c2", "What attaches to machines?"),
                            {**chat("c3", "Wrong endpoint"), "url": "/v1/embeddings"}]))
    file_id = stack.cli("files", "upload", str(path), check=True).stdout.strip()
    assert http.get(f"/v1/files/{file_id}").json()["bytes"] == path.stat().st_size  # the server's store
    done = stack.cli("batches", "create", file_id, "--wait", "--json", "-m", "top_k=1", timeout=120)
    assert done.returncode == 0, done.stderr
    batch = json.loads(done.stdout)
    assert batch["status"] == "completed" and batch["request_counts"] == {"total": 3, "completed": 2, "failed": 1}
    assert http.get(f"/v1/batches/{batch['id']}").json()["output_file_id"] == batch["output_file_id"]
    output = stack.cli("files", "get", batch["output_file_id"], "--content", check=True).stdout
    lines = [json.loads(line) for line in output.splitlines()]
    assert [line["custom_id"] for line in lines] == ["c1", "c2"]
    assert all(len(line["response"]["body"]["sources"]) == 1 for line in lines)
    job = stack.cli("status", batch["job_id"], "--json").stdout  # a question job like ask-file's
    assert json.loads(job)["kind"] == "questions"
    listed = json.loads(stack.cli("batches", "list", "--json", check=True).stdout)
    assert batch["id"] in [b["id"] for b in listed["data"]]
    assert stack.cli("batches", "cancel", batch["id"]).returncode == 1  # already completed
    assert "completed" in stack.cli("batches", "show", batch["id"], check=True).stderr
    files = json.loads(stack.cli("files", "list", "--json", "--purpose", "batch_output", check=True).stdout)
    assert batch["output_file_id"] in [f["id"] for f in files]

    many = tmp_path / "many.jsonl"
    many.write_bytes(jsonl([chat(f"m{i}", f"Question {i}?") for i in range(96)]))
    fake.delay_s = 1.0
    try:
        created = json.loads(stack.cli("batches", "create", str(many), "--json", check=True).stdout)
        cancelled = json.loads(stack.cli("batches", "cancel", created["id"], "--json", check=True).stdout)
    finally:
        fake.delay_s = 0.0
    assert cancelled["status"] in ("cancelling", "cancelled") and cancelled["request_counts"]["total"] == 96
