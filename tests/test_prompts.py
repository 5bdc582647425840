"""Prompt building: template and language choice, context budget, numbering, no hits."""

from __future__ import annotations

import re

import pytest

from common.prompts import (
    EN_INSTRUCTION,
    ZH_INSTRUCTION,
    PromptSource,
    approx_tokens,
    build_messages,
    detect_language,
)

DEMO_INSTRUCTION = "你是一个云技术专家, 使用以下检索到的Context 回答问题。用中文回答问题。"


def source(n: int, text: str = "Some text about the cloud.", score: float = 1.0) -> PromptSource:
    return PromptSource(
        title=f"Doc {n}", url=f"https://docs.example.com/{n}", product="ecs", text=text, score=score
    )


def count_words(text: str) -> int:
    """A token counter for tests: whitespace-separated words."""
    return len(text.split())


@pytest.mark.parametrize(
    ("text", "lang"),
    [
        ("如何创建云服务器?", "zh"),
        ("如何配置 Kubernetes Ingress 控制器?", "zh"),
        ("What is 云原生?", "zh"),
        ("How do I create a cloud server?", "en"),
        ("Explain the 云 service quota limits for ECS instances", "en"),
        ("", "en"),
        ("12345 ???", "en"),
        ("Why？", "en"),  # fullwidth punctuation alone doesn't make a text Chinese
    ],
)
def test_detect_language(text: str, lang: str) -> None:
    assert detect_language(text) == lang


def test_chinese_question_gets_the_demo_template_verbatim() -> None:
    messages, used = build_messages("如何创建云服务器?", [source(1)])
    assert [m["role"] for m in messages] == ["system", "user"]
    assert ZH_INSTRUCTION == DEMO_INSTRUCTION
    assert messages[0]["content"].startswith(DEMO_INSTRUCTION)
    user = messages[1]["content"]
    assert user.startswith("Question: 如何创建云服务器?\nContext: [1] Doc 1 (https://docs.example.com/1)\n")
    assert "Some text about the cloud." in user
    assert used == [0]


def test_english_question_gets_the_english_template() -> None:
    messages, used = build_messages("How do I create a cloud server?", [source(1)])
    assert messages[0]["content"].startswith(EN_INSTRUCTION)
    assert "Answer in English." in messages[0]["content"]
    assert "中文" not in messages[0]["content"]
    assert messages[1]["content"].startswith("Question: How do I create a cloud server?\nContext: [1] Doc 1")
    assert used == [0]


def test_explicit_language_overrides_detection() -> None:
    zh, _ = build_messages("How do I create a cloud server?", [source(1)], lang="zh")
    en, _ = build_messages("如何创建云服务器?", [source(1)], lang="en")
    assert zh[0]["content"].startswith(DEMO_INSTRUCTION)
    assert en[0]["content"].startswith(EN_INSTRUCTION)
    with pytest.raises(ValueError, match="lang"):
        build_messages("hi", [], lang="fr")


def test_budget_drops_sources_that_do_not_fit_and_numbering_follows_used() -> None:
    sources = [
        source(0, "alpha " * 20),   # header 4 words + 20 = 24
        source(1, "bravo " * 200),  # too long once the first is in: dropped
        source(2, "charlie " * 10),  # fits after the first
        source(3, "delta " * 30),   # no longer fits
    ]
    messages, used = build_messages(
        "What is in the docs?", sources, context_tokens=60, count_tokens=count_words
    )
    user = messages[1]["content"]
    assert used == [0, 2]
    assert re.findall(r"^(?:Context: )?\[(\d+)\] Doc (\d+)", user, flags=re.M) == [("1", "0"), ("2", "2")]
    assert "bravo" not in user and "delta" not in user
    # Source [n] is sources[used[n - 1]].
    for n, index in enumerate(used, 1):
        assert f"[{n}] {sources[index].title} ({sources[index].url})" in user


def test_only_the_first_source_is_truncated_to_fit() -> None:
    sources = [source(0, "word " * 1000), source(1, "short text")]
    messages, used = build_messages("Question?", sources, context_tokens=50, count_tokens=count_words)
    context = messages[1]["content"].split("Context: ", 1)[1]
    assert used == [0]
    assert count_words(context) <= 50
    assert context.startswith("[1] Doc 0") and context.endswith("…")
    # A long *later* source is dropped, never truncated.
    sources = [source(0, "short text"), source(1, "word " * 1000)]
    messages, used = build_messages("Question?", sources, context_tokens=50, count_tokens=count_words)
    assert used == [0]
    assert "word" not in messages[1]["content"]


def test_default_token_count_is_a_cheap_approximation() -> None:
    assert approx_tokens("abcd" * 10) == 10
    assert approx_tokens("云服务器") == 4
    text = "x" * 8000  # ~2000 tokens
    messages, used = build_messages("Question?", [source(0, text), source(1, text)], context_tokens=1500)
    assert used == [0]  # the first is truncated to fit, the second dropped
    context = messages[1]["content"].split("Context: ", 1)[1]
    assert 1400 < approx_tokens(context) <= 1500


@pytest.mark.parametrize(
    ("question", "marker"), [("How do I resize a disk?", "don't know"), ("如何扩容云盘?", "无法回答")]
)
def test_no_hits_prompt_says_so(question: str, marker: str) -> None:
    messages, used = build_messages(question, [])
    assert used == []
    system, user = messages[0]["content"], messages[1]["content"]
    assert marker in system
    assert "[1]" not in user
    if marker == "don't know":
        assert "No documents were found" in system and "(no documents found)" in user
    else:
        assert system.startswith(DEMO_INSTRUCTION) and "没有检索到" in user


def test_sources_too_big_for_any_budget_count_as_no_hits() -> None:
    messages, used = build_messages("Question?", [source(0)], context_tokens=2, count_tokens=count_words)
    assert used == []
    assert "No documents were found" in messages[0]["content"]
