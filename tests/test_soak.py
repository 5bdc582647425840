"""The bounded soak: 20,000 small documents and 2,000 questions through two embedding
worker processes that share one embedded store, then exact counts and no errors.

Topology (what ``ragq worker --gpus none --processes 2`` starts with the embedded store):
two worker processes consume the ingest and question queues and embed; a third,
``store@host``, owns the store and answers their writes and searches over the store
queue (``common/remote_store.py``). The question job starts while the ingest job is a
quarter done, so reads and writes go through the owner interleaved.

Documents are the English JD Cloud pages cut into paragraph-sized pieces (the Chinese
pages fill up to 20,000); questions are the 168 real FAQ queries plus page titles.
Generation is a loopback OpenAI-compatible server that answers at once, so the test
measures ragq, not a model. Run alone: ``pytest -m soak -s`` prints the figures.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pytest

from common.metrics import MetricsStore
from common.vectorstore import EdgeStore
from tests.conftest import SHARED_DATA, Stack, require_corpus
from tests.faults import FakeLLM, attempts, expected_chunks, planned_batches, record, report, wait_finished, wait_for

pytestmark = [pytest.mark.fault, pytest.mark.soak, pytest.mark.timeout(2400)]

DOCUMENTS = 20_000
QUESTIONS = 2_000


def pieces(text: str, limit: int) -> list[str]:
    """Paragraphs of ``text``, longer ones cut at a sentence end before ``limit`` chars."""
    out = []
    for paragraph in re.split(r"\n\s*\n", text):
        rest = " ".join(paragraph.split())
        while rest:
            if len(rest) <= limit:
                piece, rest = rest, ""
            else:
                cut = max(rest.rfind(". ", 0, limit), rest.rfind("。", 0, limit))
                cut = cut + 1 if cut > limit // 4 else limit
                piece, rest = rest[:cut].strip(), rest[cut:].strip()
            out.append(piece)
    return out


def small_documents(n: int) -> list[dict[str, str]]:
    docs: list[dict[str, str]] = []
    seen: set[str] = set()
    for corpus, limit in (("jdcloud-en", 400), ("jdcloud-cn", 200)):
        for path in sorted((SHARED_DATA / corpus / "docs").glob("*/*.json")):
            page = json.loads(path.read_text(encoding="utf-8"))
            for i, text in enumerate(pieces(page["content"], limit)):
                if len(text) >= 40 and text not in seen:
                    seen.add(text)
                    docs.append({"id": f"{page['url']}#{i}", "content": text, "title": page["title"],
                                 "product": page["product"], "url": page["url"]})
                    if len(docs) == n:
                        return docs
    raise AssertionError(f"the corpora give only {len(docs)} pieces, {n} wanted")


def question_list(n: int) -> list[str]:
    en = SHARED_DATA / "jdcloud-en"
    questions = [json.loads(line)["query"] for line in (en / "questions-dev.jsonl").open(encoding="utf-8")]
    for corpus in ("jdcloud-en", "jdcloud-cn"):
        for line in (SHARED_DATA / corpus / "manifest.jsonl").open(encoding="utf-8"):
            page = json.loads(line)
            questions.append(f"{page['product']}: {page['title']}")
    unique = list(dict.fromkeys(q.strip() for q in questions if q.strip()))
    assert len(unique) >= n, f"only {len(unique)} distinct questions"
    return unique[:n]


def test_soak_20000_documents_and_2000_questions_through_two_workers(redis_url: str, tmp_path: Path) -> None:
    require_corpus()
    docs_path = tmp_path / "docs.jsonl"
    docs = small_documents(DOCUMENTS)
    docs_path.write_text("".join(json.dumps(d, ensure_ascii=False) + "\n" for d in docs), encoding="utf-8")
    questions = question_list(QUESTIONS)

    with FakeLLM() as llm:
        stack = Stack(redis_url, tmp_path / "stack", RAGQ_LLM_BACKEND="openai", RAGQ_LLM_BASE_URL=llm.base_url,
                      RAGQ_LLM_MODEL="fake-model", RAGQ_BATCH_BYTES="100000")
        settings = stack.settings()
        batches = planned_batches(settings, [docs_path])
        want_chunks = expected_chunks(settings, batches)
        stack.start_worker(processes=2, timeout=300)
        try:
            from producer.client import Client

            client = Client(settings)
            started = time.monotonic()
            ingest = client.ingest([docs_path])
            rec = record(stack, ingest.id)
            wait_for(lambda: rec.info().batches_done >= len(batches) // 4, 1200, "a quarter of the ingest batches",
                     poll_s=0.5, on_timeout=lambda: stack.log_text()[-3000:])
            qa_started = time.monotonic()
            qa = client.ask_many(questions)
            qa_rec = record(stack, qa.id)
            info = wait_finished(rec, 1800, stack)
            ingest_s = time.monotonic() - started
            qa_info = wait_finished(qa_rec, 900, stack)
            qa_s = time.monotonic() - qa_started
            answers = list(qa.answers())
            snapshot = MetricsStore(client.redis, prefix=settings.key_prefix).snapshot()
            store_info = client.store_info()
        finally:
            stack.stop_worker(timeout=120)
        log = stack.log_text()

    # The ingest job: every document once, nothing failed, the store holds exactly its chunks.
    assert (info.status, info.completed, info.failed, info.errors) == ("completed", DOCUMENTS, 0, [])
    assert info.batches_done == info.batches_total == len(batches)
    assert info.chunks == want_chunks and store_info["points"] == want_chunks
    assert set(attempts(rec).values()) == {1}, "an undisturbed run delivered a batch twice"

    # The question job: each question answered once, in order, with sources.
    assert (qa_info.status, qa_info.completed, qa_info.failed, qa_info.errors) == ("completed", QUESTIONS, 0, [])
    assert [a.question for a in answers] == questions
    assert all(a.answer and a.answer.startswith("echo: ") and a.sources and not a.error for a in answers)
    assert len(llm.requests) == QUESTIONS and {r["status"] for r in llm.requests} == {200}

    # Work was shared: both embedding processes ingested and answered; the owner only stored.
    embedders = {name: w for name, w in snapshot.workers.items() if not name.startswith("store@")}
    owners = {name: w for name, w in snapshot.workers.items() if name.startswith("store@")}
    assert len(embedders) == 2 and len(owners) == 1, sorted(snapshot.workers)
    docs_by_worker = {name: w.counters.get("documents", 0) for name, w in embedders.items()}
    questions_by_worker = {name: w.counters.get("questions", 0) for name, w in embedders.items()}
    assert sum(docs_by_worker.values()) == DOCUMENTS and min(docs_by_worker.values()) > 0
    assert sum(questions_by_worker.values()) == QUESTIONS and min(questions_by_worker.values()) > 0
    owner = next(iter(owners.values()))
    store_calls = sum(n for (queue, state), n in owner.tasks.items() if state == "succeeded")
    assert store_calls >= 2 * len(batches) + -(-QUESTIONS // settings.questions_per_batch)
    assert not any(state == "failed" for w in snapshot.workers.values() for (_, state) in w.tasks)

    # No errors anywhere in the workers' log.
    problems = [line for line in log.splitlines() if "ERROR" in line or "Traceback" in line or "WARNING/" in line]
    assert not problems, "\n".join(problems[:20])

    # Every document is in the store under its own key, once per chunk.
    with EdgeStore(settings.store_dir / settings.collection, settings.collection) as store:
        keys = [p["doc_key"] for p in store.scroll_payloads(limit=want_chunks + 1)]
    assert len(keys) == want_chunks and set(keys) == {d["id"] for d in docs}

    upsert = owner.stages.get("upsert")
    report("soak", documents=DOCUMENTS, chunks=want_chunks, tokens=info.tokens, batches=len(batches),
           ingest_s=ingest_s, tokens_per_s=info.tokens / ingest_s, questions=QUESTIONS, qa_s=qa_s,
           questions_per_s=QUESTIONS / qa_s, docs_by_worker=sorted(docs_by_worker.values()),
           questions_by_worker=sorted(questions_by_worker.values()), store_calls=store_calls,
           owner_upsert_s=upsert.sum if upsert else 0.0)
