"""common.answering in process: the real embedding model and embedded store, scripted generators.

The generators here are stand-ins with known behaviour (echo, fail on cue), so the test
can check what the pipeline does around them: one embedding pass, one query per
(top_k, filter) group, prompts with numbered sources, per-item errors, output order.
Real generators run end to end in test_qa_e2e.py.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
import time
from pathlib import Path

import pytest

from common.answering import Answerer, UnavailableGenerator, failed_batch
from common.config import MINILM_MODEL, Settings
from common.embedding import Embedder
from common.generators import Conversation, Generation, Generator, NoneGenerator
from common.ingest import Ingestor
from common.prompts import EN_NO_HITS
from common.questions import QuestionItem, QuestionReader
from common.retrieval import Retriever
from common.schemas import DocumentItem
from common.vectorstore import VectorStore, open_store

DOCS = [
    ("mq-retention", "Message Queue", "Message retention",
     "Messages in the message queue are kept on the server for 3 days by default, up to 7 days."),
    ("mq-limits", "Message Queue", "Message size limits",
     "A single message may be at most 256 KB. Larger payloads should go to object storage."),
    ("cdn-cache", "CDN", "Cache rules",
     "CDN cache rules decide how long edge nodes keep static files before asking the origin again."),
    ("cdn-https", "CDN", "HTTPS certificates",
     "Upload an SSL certificate to serve your CDN domain over HTTPS."),
    ("vpc-subnet", "VPC", "Subnets",
     "A subnet is a range of IP addresses in a virtual private cloud; each VM lives in one subnet."),
]


class Scripted(Generator):
    """Answers "answer to: <question line>", fails questions containing 'FAIL'; records calls."""

    model_name = "scripted-1"

    def __init__(self) -> None:
        self.calls: list[list[Conversation]] = []
        self.max_tokens: list[int | None] = []

    def generate(self, conversations: Sequence[Conversation], *, max_tokens: int | None = None,
                 temperature: float | None = None) -> list[Generation]:
        self.calls.append(list(conversations))
        self.max_tokens.append(max_tokens)
        out = []
        for c in conversations:
            question = c[-1]["content"].splitlines()[0]
            if "FAIL" in question:
                out.append(Generation(None, self.model_name, 0.01, error="HTTP 503: overloaded"))
            else:
                out.append(Generation(f"answer to: {question}", self.model_name, 0.02,
                                      prompt_tokens=50, completion_tokens=5))
        return out


class Broken(Generator):
    model_name = "broken"

    def generate(self, conversations: Sequence[Conversation], *, max_tokens: int | None = None,
                 temperature: float | None = None) -> list[Generation]:
        raise KeyError("boom")


@pytest.fixture(scope="module")
def embedder() -> Embedder:
    return Embedder(MINILM_MODEL, "cpu")


@pytest.fixture(scope="module")
def store(embedder: Embedder, tmp_path_factory: pytest.TempPathFactory) -> Iterator[VectorStore]:
    settings = Settings(_env_file=None, data_dir=tmp_path_factory.mktemp("answering"), collection="qa_unit")
    with open_store(settings) as s:
        docs = [DocumentItem(key=k, item=k, content=text, title=title, product=product, url=f"https://docs/{k}",
                             version=DocumentItem.version_of(text, title, product, f"https://docs/{k}", {}))
                for k, product, title, text in DOCS]
        outcome = Ingestor(embedder, s).ingest(docs)
        assert outcome.completed == len(DOCS)
        yield s


class Counting:
    """Wraps a method and counts its calls (on this instance only)."""

    def __init__(self, obj: object, name: str, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls: list[tuple] = []
        original = getattr(obj, name)

        def wrapper(*args: object, **kwargs: object) -> object:
            self.calls.append((args, kwargs))
            return original(*args, **kwargs)

        monkeypatch.setattr(obj, name, wrapper)


def items(*objects: str | dict) -> list[QuestionItem]:
    return list(QuestionReader().read_objects(objects))


def test_batch_is_one_encode_one_query_per_group_one_generate(
    embedder: Embedder, store: VectorStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    encode = Counting(embedder, "encode", monkeypatch)
    search = Counting(store, "search", monkeypatch)
    gen = Scripted()
    batch = items(
        "How long are messages kept on the server?",
        {"question": "How do I serve my CDN domain over HTTPS?", "filter": {"product": "CDN"}},
        {"question": "What is the maximum message size?", "top_k": 2},
        {"question": "How long do edge nodes cache files?", "filter": {"product": "CDN"}},
        "What is a subnet?",
    )
    result = Answerer(Retriever(embedder, store), gen, top_k=3).answer(batch)

    assert len(encode.calls) == 1 and len(encode.calls[0][0][0]) == 5
    # groups: (3, no filter) x2, (3, CDN) x2, (2, no filter) x1
    assert sorted(len(c[0][0]) for c in search.calls) == [1, 2, 2]
    assert len(gen.calls) == 1 and len(gen.calls[0]) == 5

    lines = result.lines
    assert [line["custom_id"] for line in lines] == ["1", "2", "3", "4", "5"]
    assert lines[0]["sources"][0]["url"] == "https://docs/mq-retention"
    assert lines[0]["answer"] == "answer to: Question: How long are messages kept on the server?"
    assert all(s["product"] == "CDN" for s in lines[1]["sources"] + lines[3]["sources"])
    assert len(lines[2]["sources"]) == 2 and len(lines[0]["sources"]) == 3
    for line in lines:
        urls = [s["url"] for s in line["sources"]]
        assert len(urls) == len(set(urls)), "one source per document"
        scores = [s["score"] for s in line["sources"]]
        assert scores == sorted(scores, reverse=True)
        assert set(line["sources"][0]) == {"url", "title", "product", "score", "text", "ref"}
        assert [s["ref"] for s in line["sources"]] == list(range(1, len(line["sources"]) + 1))
        assert line["model"] == "scripted-1" and line["error"] is None
        assert line["usage"] == {"prompt_tokens": 50, "completion_tokens": 5}
        assert line["timings"]["retrieval_s"] > 0 and line["timings"]["generation_s"] == 0.02
    # The prompt numbers the sources the way the line reports them.
    prompt = gen.calls[0][0][-1]["content"]
    assert "[1] Message retention (https://docs/mq-retention)" in prompt
    assert (result.outcome.completed, result.outcome.failed, result.outcome.tokens) == (5, 0, 25)


def test_generation_errors_are_per_question_and_keep_sources(embedder: Embedder, store: VectorStore) -> None:
    batch = items("FAIL: how long are messages kept?", "What is a subnet?",
                  {"custom_id": "x", "question": "FAIL again, CDN cache?"})
    result = Answerer(Retriever(embedder, store), Scripted(), top_k=2).answer(batch)
    first, second, third = result.lines
    assert (first["answer"], first["error"]) == (None, "HTTP 503: overloaded")
    assert first["sources"] and first["sources"][0]["url"] == "https://docs/mq-retention"
    assert second["error"] is None and second["answer"]
    assert third["error"] == "HTTP 503: overloaded" and third["sources"]
    o = result.outcome
    assert (o.completed, o.failed) == (1, 2)
    assert [(e.item, e.reason) for e in o.errors] == [("question[1]", "HTTP 503: overloaded"),
                                                      ("question[3] (custom_id x)", "HTTP 503: overloaded")]


def test_refused_lines_keep_their_place_and_are_not_counted(embedder: Embedder, store: VectorStore) -> None:
    batch = items("What is a subnet?", {"question": 3}, "How big may a message be?")
    result = Answerer(Retriever(embedder, store), Scripted()).answer(batch)
    assert [line["custom_id"] for line in result.lines] == ["1", "2", "3"]
    assert result.lines[1]["error"] == "question[2]: field 'question' must be a string, got number"
    assert (result.outcome.completed, result.outcome.failed) == (2, 0)


def test_no_hits_is_said_in_the_prompt(embedder: Embedder, store: VectorStore) -> None:
    gen = Scripted()
    batch = items({"question": "What is a subnet?", "filter": {"product": "No Such Product"}})
    line = Answerer(Retriever(embedder, store), gen).answer(batch).lines[0]
    assert line["sources"] == [] and line["error"] is None
    system = gen.calls[0][0][0]["content"]
    assert EN_NO_HITS in system


def test_chinese_question_gets_the_chinese_template(embedder: Embedder, store: VectorStore) -> None:
    gen = Scripted()
    Answerer(Retriever(embedder, store), gen).answer(items("消息在服务器上保存多久?"))
    assert gen.calls[0][0][0]["content"].startswith("你是一个云技术专家, 使用以下检索到的Context 回答问题。用中文回答问题。")
    gen = Scripted()
    Answerer(Retriever(embedder, store), gen, prompt_lang="en").answer(items("消息在服务器上保存多久?"))
    assert gen.calls[0][0][0]["content"].startswith("You are a cloud technology expert.")


def test_retrieval_only(embedder: Embedder, store: VectorStore) -> None:
    for answerer, kwargs in [(Answerer(Retriever(embedder, store), NoneGenerator()), {}),
                             (Answerer(Retriever(embedder, store), Scripted()), {"generate": False})]:
        line = answerer.answer(items("What is a subnet?"), **kwargs).lines[0]
        assert (line["answer"], line["model"], line["error"], line["usage"]) == (None, "none", None, None)
        assert line["sources"][0]["url"] == "https://docs/vpc-subnet"
        assert all(s["ref"] is None for s in line["sources"])


def test_a_generator_that_raises_or_cannot_start_fails_each_question(embedder: Embedder, store: VectorStore) -> None:
    result = Answerer(Retriever(embedder, store), Broken()).answer(items("What is a subnet?", "CDN cache?"))
    assert [line["error"] for line in result.lines] == ["generation failed: KeyError: 'boom'"] * 2
    assert all(line["sources"] for line in result.lines)
    assert result.outcome.failed == 2
    reason = "could not start the local generator: FileNotFoundError: no model"
    line = Answerer(Retriever(embedder, store), UnavailableGenerator(reason)).answer(items("What is a subnet?")).lines[0]
    assert line["error"] == reason and line["sources"]


def test_failed_batch_names_every_question() -> None:
    batch = items("a?", {"question": 1}, "b?")
    result = failed_batch(batch, "vector store unavailable after 3 attempts: refused")
    assert [line["error"] for line in result.lines] == [
        "vector store unavailable after 3 attempts: refused",
        "question[2]: field 'question' must be a string, got number",
        "vector store unavailable after 3 attempts: refused"]
    assert (result.outcome.completed, result.outcome.failed, len(result.outcome.errors)) == (0, 2, 2)


def test_empty_collection_answers_with_no_sources(embedder: Embedder, tmp_path: Path) -> None:
    settings = Settings(_env_file=None, data_dir=tmp_path, collection="empty")
    with open_store(settings) as empty:
        line = Answerer(Retriever(embedder, empty), Scripted()).answer(items("What is a subnet?")).lines[0]
    assert line["sources"] == [] and line["answer"] and line["error"] is None


def test_each_question_gets_the_answer_length_it_asked_for(embedder: Embedder, store: VectorStore) -> None:
    gen = Scripted()
    batch = items({"question": "What is a subnet?", "max_tokens": 8},
                  "How long are messages kept on the server?",
                  {"question": "How do I serve my CDN domain over HTTPS?", "max_tokens": 8})
    lines = Answerer(Retriever(embedder, store), gen, top_k=2).answer(batch).lines
    calls = {limit: [c[-1]["content"].splitlines()[0] for c in convs]
             for limit, convs in zip(gen.max_tokens, gen.calls)}
    assert calls == {8: ["Question: What is a subnet?", "Question: How do I serve my CDN domain over HTTPS?"],
                     None: ["Question: How long are messages kept on the server?"]}
    assert [line["custom_id"] for line in lines] == ["1", "2", "3"]
    assert all(line["answer"] and line["error"] is None for line in lines)


# --- pipelined batches against an HTTP endpoint ------------------------------------------


def test_a_batch_for_an_endpoint_is_pipelined_in_order_exactly_once(
    embedder: Embedder, store: VectorStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    from common.generators import OpenAIGenerator
    from tests.faults import FakeLLM

    retriever = Retriever(embedder, store)
    retrieved_at: list[float] = []
    run = retriever.run

    def timed_run(queries):  # when each group's retrieval finished
        try:
            # a retrieval as slow as a loaded store's: tiny groups otherwise all finish within
            # the milliseconds the first HTTP request takes to go out, pipelined or not
            time.sleep(0.15)
            return run(queries)
        finally:
            retrieved_at.append(time.monotonic())

    monkeypatch.setattr(retriever, "run", timed_run)
    topics = ["messages kept", "message size", "CDN cache", "HTTPS on CDN", "a subnet"]
    questions = [f"Q{n}: what about {topics[n % 5]}?" for n in range(10)]
    questions[6] += " BAD"
    with FakeLLM(delay_s=0.3, fail_when="BAD") as server:
        gen = OpenAIGenerator(base_url=server.base_url, model="fake-model", max_in_flight=4, max_retries=0)
        try:
            result = Answerer(retriever, gen, top_k=2, pipeline=3).answer(items(*questions))
        finally:
            gen.close()
        first_request = min(r["at"] for r in server.requests)
        assert [server.posts_of(f"Q{n}:") for n in range(10)] == [1] * 10, "each question sent exactly once"
        assert server.max_in_flight <= 4
    assert len(retrieved_at) == 4, "groups of 3, 3, 3, 1"
    # The first group's requests were out before the last group was retrieved.
    assert first_request < retrieved_at[-1]
    lines = result.lines
    assert [line["question"] for line in lines] == questions
    for n, line in enumerate(lines):
        assert len(line["sources"]) == 2, "retrieval kept for every question"
        if n == 6:
            assert (line["answer"], line["error"]) == (None, "HTTP 400: scripted failure 400")
        else:
            assert line["error"] is None and line["answer"] == f"echo: Question: {questions[n]}"
    assert (result.outcome.completed, result.outcome.failed) == (9, 1)
