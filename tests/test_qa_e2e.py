"""Question answering end to end: ``ragq`` CLI -> Redis -> a real worker -> store + LLM.

One small slice of the corpus is ingested once into one embedded store; the module then
swaps the worker on that store between generator backends (the store allows one process
at a time): the default local SmolLM2 model, an OpenAI-compatible endpoint that is not
there, and a real llama.cpp server (when llama-cpp-python is installed).
Generation is kept short (a few tokens, a small context): the point is the pipeline,
not the quality of a 135M model's answers.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from common.generators import default_local_model_path
from common.jobs import JobRecord
from common.priorities import queue_keys
from producer.client import Client, RagqError
from producer.demo_qa import run_qa_demo
from tests.conftest import Stack, copy_docs, require_corpus
from tests.llm_server import SKIP_REASON, free_port, llama_cpp_available, start_llama_server

pytestmark = pytest.mark.timeout(600)

#: Products whose pages are all ingested (filters are checked against them) ...
FULL_PRODUCTS = ("Billing", "Account Assets")
#: ... and products whose dev questions' source pages are ingested.
SOURCE_PRODUCTS = ("Anti-DDoS Pro", "Direct Connection", "Cloud Physical Server", "Cloud Marketplace",
                   "TiDB Service", "Endpoint Security", "Domain Name Service")
DISTRACTOR_STRIDE = 120

#: Short, greedy generation: tests check the pipeline, not the answers' quality.
LOCAL = {"RAGQ_LLM_BACKEND": "local", "RAGQ_LLM_MAX_TOKENS": "6", "RAGQ_LLM_TEMPERATURE": "0",
         "RAGQ_CONTEXT_TOKENS": "64", "RAGQ_TOP_K": "3", "RAGQ_QA_BATCH_SIZE": "10"}


class QAEnv:
    """One store (data dir + collection), served by one worker at a time."""

    def __init__(self, redis_url: str, data_dir: Path) -> None:
        self.redis_url = redis_url
        self.data_dir = data_dir
        self.stack: Stack | None = None
        self.backend: tuple | None = None
        self.slice: dict = {}

    def use(self, **env: str) -> Stack:
        key = tuple(sorted(env.items()))
        if self.stack is not None and self.backend == key:
            return self.stack
        self.stop()
        stack = Stack(self.redis_url, self.data_dir, **env)
        stack.start_worker(timeout=240)
        self.stack, self.backend = stack, key
        return stack

    def stop(self) -> None:
        if self.stack is not None:
            self.stack.stop_worker()
            self.stack = None


@pytest.fixture(scope="module")
def qa(redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[QAEnv]:
    corpus = require_corpus()
    manifest = [json.loads(line) for line in (corpus / "manifest.jsonl").open()]
    questions = [json.loads(line) for line in (corpus / "questions-dev.jsonl").open()]
    sources = {q["source_url"] for q in questions if q["product"] in SOURCE_PRODUCTS}
    chosen = [m for i, m in enumerate(manifest)
              if m["product"] in FULL_PRODUCTS or m["url"] in sources or i % DISTRACTOR_STRIDE == 0]
    root = copy_docs([corpus / m["file"] for m in chosen], tmp_path_factory.mktemp("qa-slice"))
    env = QAEnv(redis_url, tmp_path_factory.mktemp("qa-store"))
    stack = env.use(**LOCAL)
    job = json.loads(stack.cli("ingest", str(root), "--wait", "--json", check=True).stdout)
    assert job["status"] == "completed" and job["completed"] == len(chosen)
    env.slice = {
        "ingest_job": job["id"],
        "docs": chosen,
        "products": {m["product"] for m in chosen},
        "questions": [q for q in questions if q["product"] in FULL_PRODUCTS + SOURCE_PRODUCTS],
    }
    yield env
    env.stop()


def client(stack: Stack) -> Client:
    return Client(stack.settings())


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def assert_distinct_documents(line: dict) -> None:
    urls = [s["url"] for s in line["sources"]]
    assert len(urls) == len(set(urls)), f"a page appears twice in {urls}"


# --- the default local model ------------------------------------------------------------


def test_ask_answers_with_sources(qa: QAEnv) -> None:
    stack = qa.use(**LOCAL)
    q = next(q for q in qa.slice["questions"] if q["product"] == "Anti-DDoS Pro")
    result = stack.cli("ask", q["query"], "--json", timeout=300)
    assert result.returncode == 0, result.stderr
    line = json.loads(result.stdout)
    assert line["error"] is None
    assert isinstance(line["answer"], str) and line["answer"].strip()
    assert line["model"] == default_local_model_path().stem
    assert q["source_url"] in [s["url"] for s in line["sources"]]
    assert len(line["sources"]) == 3 and line["sources"][0]["ref"] == 1
    assert_distinct_documents(line)
    assert line["usage"]["completion_tokens"] <= 6
    assert line["timings"]["generation_s"] > 0 and line["timings"]["retrieval_s"] > 0
    # The plain output: the answer on stdout, then the numbered sources.
    plain = stack.cli("ask", q["query"], "--top-k", "2", timeout=300)
    assert plain.returncode == 0, plain.stderr
    assert "Sources" in plain.stdout and q["source_url"] in plain.stdout


def bulk_file(qa: QAEnv, path: Path, n: int) -> list[dict]:
    """``n`` questions with custom_ids, some filtered or with top_k, and two bad lines."""
    qs = qa.slice["questions"][:n]
    assert len(qs) == n
    lines: list[dict | str] = []
    for i, q in enumerate(qs):
        obj: dict = {"custom_id": q["id"], "question": q["query"]}
        if i % 7 == 3:
            obj["filter"] = {"product": "Billing"}
        if i % 11 == 5:
            obj["top_k"] = 2
        lines.append(obj)
    lines.insert(4, "{this is not json")
    lines.insert(20, {"custom_id": "no-question", "top_k": 3})
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines), encoding="utf-8")
    return [x if isinstance(x, dict) else {} for x in lines]


def test_bulk_job_partial_results_then_all_in_input_order(qa: QAEnv, tmp_path: Path) -> None:
    stack = qa.use(**LOCAL)
    inputs = bulk_file(qa, tmp_path / "questions.jsonl", 52)
    total = len(inputs)  # 54 lines: 52 questions and 2 bad lines
    submitted = stack.cli("ask-file", str(tmp_path / "questions.jsonl"), check=True)
    job_id = submitted.stdout.strip()
    assert f"queued 54 questions in 6 batches (2 refused: see `ragq status {job_id}`)" in " ".join(submitted.stderr.split())

    job = client(stack).job(job_id)
    seen: list[tuple[str, int]] = []
    partial_cli = None
    deadline = time.monotonic() + 400
    while True:
        info = job.refresh()
        n = len(list(job.results()))
        seen.append((info.status, n))
        if partial_cli is None and 0 < n < total and not info.is_finished:
            partial_cli = stack.cli("results", job_id)  # `ragq results` mid-run: what is done so far
        if info.is_finished:
            break
        assert time.monotonic() < deadline, f"job still {info.status} with {n}/{total} results"
        time.sleep(0.2)

    counts = [n for _, n in seen]
    assert counts == sorted(counts), "stored results never shrink"
    assert any(0 < n < total for status, n in seen if status == "in_progress"), seen
    assert partial_cli is not None
    partial_lines = [json.loads(x) for x in partial_cli.stdout.splitlines()]
    if "partial" in " ".join(partial_cli.stderr.split()):
        assert partial_cli.returncode == 0 and 0 < len(partial_lines) < total
    else:  # the job ended while the command started up: then it exported everything
        assert len(partial_lines) == total

    assert info.status == "completed_with_errors"
    assert (info.total, info.completed, info.failed) == (total, 52, 2)
    out = tmp_path / "answers.jsonl"
    exported = stack.cli("results", job_id, "--output", str(out))
    assert exported.returncode == 1  # the job had errors (the two bad lines)
    lines = read_jsonl(out)
    assert len(lines) == total
    expected_ids = [x.get("custom_id") for x in inputs]
    expected_ids[4] = "5"  # a line that isn't JSON gets its line number
    assert [line["custom_id"] for line in lines] == expected_ids
    assert partial_lines == lines[:len(partial_lines)]
    assert lines[4]["error"].endswith("questions.jsonl:5: malformed JSON: Expecting property name enclosed "
                                      "in double quotes at column 2")
    assert lines[20]["error"].endswith("questions.jsonl:21: missing field 'question'")
    for x, line in zip(inputs, lines):
        if not x.get("question"):
            continue
        assert line["question"] == x["question"] and line["error"] is None
        assert isinstance(line["answer"], str) and line["model"]
        assert set(line) == {"custom_id", "question", "answer", "sources", "model", "timings", "usage", "error"}
        assert len(line["sources"]) == x.get("top_k", 3)
        assert_distinct_documents(line)
        if x.get("filter"):
            assert {s["product"] for s in line["sources"]} == {"Billing"}
    assert {s["product"] for line in lines for s in line["sources"]} > {"Billing"}


def test_cancel_stops_remaining_batches_and_keeps_partial_results(qa: QAEnv, tmp_path: Path) -> None:
    stack = qa.use(**LOCAL)
    path = tmp_path / "questions.txt"
    path.write_text("".join(q["query"] + "\n" for q in qa.slice["questions"][:50]), encoding="utf-8")
    job_id = stack.cli("ask-file", str(path), check=True).stdout.strip()
    api = client(stack)
    job = api.job(job_id)
    deadline = time.monotonic() + 300
    while not list(job.results()):
        assert time.monotonic() < deadline and not job.refresh().is_finished
        time.sleep(0.1)
    cancelled = stack.cli("cancel", job_id)
    assert cancelled.returncode == 0, cancelled.stderr
    assert f"cancelled job {job_id}" in " ".join(cancelled.stderr.split())

    # The single worker takes messages in order: once it answers this request, every
    # batch of the job has been either finished (the one running at the cancel) or skipped.
    api.store_info(timeout=300)
    info = job.refresh()
    lines = list(job.results())
    assert info.status == "cancelled"
    assert 10 <= len(lines) <= 20 < 50, "the running batch finishes, the rest are skipped"
    assert len(lines) == info.done == info.batches_done * 10
    assert [line["custom_id"] for line in lines] == [str(n) for n in range(1, len(lines) + 1)]
    assert all(line["answer"] and line["error"] is None for line in lines)
    time.sleep(1.0)
    assert len(list(job.results())) == len(lines), "nothing more arrives after the cancel"

    again = stack.cli("cancel", job_id)
    assert again.returncode == 1 and "already cancelled" in " ".join(again.stderr.split())
    exported = stack.cli("results", job_id)
    assert exported.returncode == 1 and len(exported.stdout.splitlines()) == len(lines)


def test_demo_answers_a_sample_and_measures_hit_at_5(qa: QAEnv, capsys: pytest.CaptureFixture) -> None:
    stack = qa.use(**LOCAL)
    figures = run_qa_demo(client(stack), require_corpus(), sample=3, show=2)
    printed = capsys.readouterr().out
    assert (figures["answered"], figures["failed"]) == (3, 0)
    assert printed.count("\nQ (line ") == 2 and printed.count("\nA: ") == 2
    assert "https://docs.jdcloud.com/" in printed
    # Only some questions' source pages are in the store (and a few distractors that may
    # be other questions' sources): those questions should find them.
    in_store = len(qa.slice["questions"])
    assert 0.8 * in_store / 168 <= figures["hit@5"] <= (in_store + 10) / 168
    assert f"hit@5 {figures['hit@5']:.3f}" in printed


def test_results_and_cancel_refuse_what_they_cannot_do(qa: QAEnv) -> None:
    stack = qa.use(**LOCAL)
    def run(*args: str) -> tuple[int, str]:
        result = stack.cli(*args)
        return result.returncode, " ".join(result.stderr.split())  # Rich wraps long lines

    code, text = run("results", qa.slice["ingest_job"])
    assert code == 2 and "is an ingest job; only question jobs have results" in text
    code, text = run("results", "no-such-job")
    assert code == 2 and "job no-such-job not found" in text
    assert run("cancel", "no-such-job")[0] == 2
    code, text = run("ask-file", "questions.csv")
    assert code == 2 and "unsupported question file type .csv" in text
    code, text = run("ask", "   ")
    assert code == 2 and "invalid question: empty question" in text


def test_ask_without_a_worker_says_so(redis_url: str, tmp_path: Path) -> None:
    # A queue nobody consumes: the question is never taken, and the job is cancelled.
    settings = Stack(redis_url, tmp_path).settings(interactive_queue="qa-nobody-listens")
    api = Client(settings)
    with pytest.raises(RagqError, match="no worker took the question within 1s: is one running on the "
                                        "'qa-nobody-listens' queue"):
        api.ask("Anyone there?", timeout=1)
    job_id = JobRecord.recent(api.redis, prefix=settings.key_prefix, limit=1)[0]
    assert api.job(job_id).status().value == "cancelled"
    api.redis.delete(*queue_keys("qa-nobody-listens"))


# --- an OpenAI-compatible endpoint that is not there -----------------------------------


def test_unreachable_endpoint_gives_per_question_errors_and_sources(qa: QAEnv, tmp_path: Path) -> None:
    port = free_port()  # bound then closed: nothing listens there
    base_url = f"http://127.0.0.1:{port}/v1"
    stack = qa.use(RAGQ_LLM_BACKEND="openai", RAGQ_LLM_BASE_URL=base_url, RAGQ_LLM_MODEL="smollm2",
                   RAGQ_LLM_TIMEOUT_S="2", RAGQ_LLM_MAX_RETRIES="1", RAGQ_TOP_K="3")
    path = tmp_path / "q.jsonl"
    qs = qa.slice["questions"][:6]
    path.write_text("".join(json.dumps({"custom_id": f"c{i}", "question": q["query"]}) + "\n"
                            for i, q in enumerate(qs)), encoding="utf-8")
    out = tmp_path / "answers.jsonl"
    result = stack.cli("ask-file", str(path), "--output", str(out), "--json", timeout=120)
    assert result.returncode == 1, result.stderr
    info = json.loads(result.stdout)
    assert (info["status"], info["total"], info["completed"], info["failed"]) == ("failed", 6, 0, 6)
    reason = f"connection refused to {base_url} after 2 attempts"
    assert [(e["item"], e["reason"]) for e in info["errors"]] == [
        (f"{path}:{i + 1} (custom_id c{i})", reason) for i in range(6)]
    lines = read_jsonl(out)
    assert [line["custom_id"] for line in lines] == [f"c{i}" for i in range(6)]
    for line in lines:
        assert (line["answer"], line["error"], line["model"]) == (None, reason, "smollm2")
        assert len(line["sources"]) == 3, "retrieval still ran"

    # `ragq ask` reports the error, exits non-zero, and still honours the product filter.
    asked = stack.cli("ask", "How do I get an invoice for my bill?", "--product", "Billing", "--json")
    assert asked.returncode == 1
    line = json.loads(asked.stdout)
    assert line["error"] == reason
    assert line["sources"] and {s["product"] for s in line["sources"]} == {"Billing"}


# --- a real OpenAI-compatible server: llama.cpp with the same SmolLM2 GGUF ---------------


@pytest.mark.skipif(not llama_cpp_available(), reason=SKIP_REASON)
def test_openai_backend_against_llama_cpp_server(qa: QAEnv, tmp_path: Path) -> None:
    with start_llama_server(default_local_model_path(), n_ctx=2048) as base_url:
        stack = qa.use(RAGQ_LLM_BACKEND="openai", RAGQ_LLM_BASE_URL=base_url, RAGQ_LLM_MAX_TOKENS="12",
                       RAGQ_LLM_TEMPERATURE="0", RAGQ_CONTEXT_TOKENS="200", RAGQ_TOP_K="3",
                       RAGQ_LLM_TIMEOUT_S="60")
        q = next(q for q in qa.slice["questions"] if q["product"] == "Direct Connection")
        result = stack.cli("ask", q["query"], "--json", timeout=180)
        assert result.returncode == 0, result.stderr
        line = json.loads(result.stdout)
        assert line["error"] is None and line["answer"].strip()
        assert line["model"] and line["model"] != "none"
        assert 0 < line["usage"]["completion_tokens"] <= 12
        assert q["source_url"] in [s["url"] for s in line["sources"]]

        path = tmp_path / "q.txt"
        path.write_text("".join(q["query"] + "\n" for q in qa.slice["questions"][:4]), encoding="utf-8")
        out = tmp_path / "a.jsonl"
        done = stack.cli("ask-file", str(path), "--output", str(out), timeout=180)
        assert done.returncode == 0, done.stderr
        lines = read_jsonl(out)
        assert [line["custom_id"] for line in lines] == ["1", "2", "3", "4"]
        assert all(line["answer"] and line["error"] is None and line["sources"] for line in lines)
    qa.stop()  # the worker's endpoint is gone with the server
