"""Reading question lists: JSONL objects and text lines, per-line errors, output lines."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from common.questions import (
    MAX_LINE_BYTES,
    MAX_QUESTION_CHARS,
    AnswerResult,
    QuestionItem,
    QuestionReader,
    answer_line,
    check_filter,
    rejected_line,
)


def read(path: Path) -> list[QuestionItem]:
    return list(QuestionReader().read_file(path))


def write(tmp_path: Path, name: str, text: str | bytes) -> Path:
    path = tmp_path / name
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


def test_jsonl_fields_and_defaults(tmp_path: Path) -> None:
    path = write(tmp_path, "q.jsonl", "\n".join([
        json.dumps({"custom_id": "q-a", "question": "  How long are messages kept?  ", "top_k": 3,
                    "filter": {"product": "Message Queue"}}),
        "",
        json.dumps({"question": "No id here", "extra": "ignored", "method": "POST"}),
        json.dumps({"custom_id": 7, "question": "Integer id", "top_k": 4.0, "filter": {"product": ["A", "B"]}}),
    ]) + "\n")
    items = read(path)
    assert [i.ok for i in items] == [True, True, True]
    a, b, c = items
    assert (a.index, a.item, a.custom_id, a.question, a.top_k, a.filter) == (
        0, f"{path}:1", "q-a", "How long are messages kept?", 3, {"product": "Message Queue"})
    # A missing custom_id is the line number (blank lines still count as lines).
    assert (b.index, b.item, b.custom_id, b.top_k, b.filter) == (1, f"{path}:3", "3", None, None)
    assert (c.custom_id, c.top_k, c.filter) == ("7", 4, {"product": ["A", "B"]})


def test_text_lines_are_questions_numbered_by_line(tmp_path: Path) -> None:
    path = write(tmp_path, "q.txt", "\ufeffFirst question?\r\n\r\n   \nSecond: with {braces} and \"quotes\"\nThird")
    items = read(path)
    assert [(i.index, i.custom_id, i.question) for i in items] == [
        (0, "1", "First question?"), (1, "4", 'Second: with {braces} and "quotes"'), (2, "5", "Third")]
    assert all(i.ok and i.top_k is None and i.filter is None for i in items)
    # A text line that happens to look like JSON is still just a question.
    assert read(write(tmp_path, "j.txt", '{"question": "x"}\n'))[0].question == '{"question": "x"}'


@pytest.mark.parametrize(
    ("line", "reason"),
    [
        ("{not json", "malformed JSON: Expecting property name enclosed in double quotes at column 2"),
        ('["a list"]', "expected a JSON object, got array"),
        ('"a string"', "expected a JSON object, got string"),
        ('{"custom_id": "x"}', "missing field 'question'"),
        ('{"question": null}', "missing field 'question'"),
        ('{"question": 42}', "field 'question' must be a string, got number"),
        ('{"question": ["a"]}', "field 'question' must be a string, got array"),
        ('{"question": "   "}', "empty question"),
        ('{"question": "q", "custom_id": {"a": 1}}', "field 'custom_id' must be a string, got object"),
        ('{"question": "q", "custom_id": true}', "field 'custom_id' must be a string, got boolean"),
        ('{"question": "q", "custom_id": ""}', "field 'custom_id' is empty"),
        ('{"question": "q", "top_k": "5"}', "field 'top_k' must be an integer, got string"),
        ('{"question": "q", "top_k": 2.5}', "field 'top_k' must be an integer, got number"),
        ('{"question": "q", "top_k": true}', "field 'top_k' must be an integer, got boolean"),
        ('{"question": "q", "top_k": 0}', "field 'top_k' must be between 1 and 100, got 0"),
        ('{"question": "q", "top_k": -3}', "field 'top_k' must be between 1 and 100, got -3"),
        ('{"question": "q", "top_k": 101}', "field 'top_k' must be between 1 and 100, got 101"),
        ('{"question": "q", "filter": "CDN"}',
         "field 'filter' must be an object such as {\"product\": \"...\"}, got string"),
        ('{"question": "q", "filter": {"product": 1.5}}', "filter 'product': values must be strings or integers, got number"),
        ('{"question": "q", "filter": {"product": true}}', "filter 'product': values must be strings or integers, got boolean"),
        ('{"question": "q", "filter": {"product": []}}', "filter 'product': empty list"),
        ('{"question": "q", "filter": {"product": ["a", 1]}}', "filter 'product': mixed strings and integers"),
        ('{"question": "q\\u0000"}', "question contains NUL characters"),
    ],
)
def test_bad_jsonl_line_is_an_item_error_naming_line_and_reason(tmp_path: Path, line: str, reason: str) -> None:
    good = json.dumps({"custom_id": "ok", "question": "fine"})
    path = write(tmp_path, "q.jsonl", f"{good}\n{line}\n{good.replace('ok', 'ok2')}\n")
    items = read(path)
    assert [i.ok for i in items] == [True, False, True]
    bad = items[1]
    assert (bad.index, bad.item, bad.error) == (1, f"{path}:2", reason)
    out = rejected_line(bad)
    assert out["error"] == f"{path}:2: {reason}"
    assert (out["answer"], out["sources"]) == (None, [])


def test_duplicate_custom_id_is_refused_and_first_kept(tmp_path: Path) -> None:
    path = write(tmp_path, "q.jsonl", "\n".join(json.dumps(o) for o in [
        {"custom_id": "a", "question": "one"},
        {"custom_id": "a", "question": "two"},
        {"question": "three"},  # default id "3"
        {"custom_id": "3", "question": "four"},
    ]))
    items = read(path)
    assert [(i.custom_id, i.ok) for i in items] == [("a", True), ("a", False), ("3", True), ("3", False)]
    assert items[1].error == f"duplicate custom_id 'a' (first used at {path}:1)"
    assert items[1].question == "two"  # kept in the error line so the user sees which one
    assert items[1].label == f"{path}:2 (custom_id a)"
    assert items[2].label == f"{path}:3"  # a default id is not repeated in the label


def test_limits_on_line_and_question_size(tmp_path: Path) -> None:
    long_q = "x" * (MAX_QUESTION_CHARS + 1)
    huge = json.dumps({"question": "y" * MAX_LINE_BYTES})
    path = write(tmp_path, "q.jsonl", f'{{"question": "{long_q}"}}\n{huge}\n{{"question": "ok"}}\n')
    a, b, c = read(path)
    assert a.error == f"question is {MAX_QUESTION_CHARS + 1} characters, over the {MAX_QUESTION_CHARS} limit"
    assert b.error is not None and b.error.startswith("line is ") and "byte limit" in b.error
    assert c.ok
    assert read(write(tmp_path, "l.txt", long_q + "\nshort\n"))[0].error == a.error


def test_invalid_utf8_line_fails_alone(tmp_path: Path) -> None:
    path = write(tmp_path, "q.txt", b"good one\nbad \xff\xfe line\nanother\n")
    items = read(path)
    assert [i.ok for i in items] == [True, False, True]
    assert items[1].error == "not valid UTF-8 (byte 4)"


def test_whole_file_problems_raise_before_reading(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unsupported question file type .csv"):
        QuestionReader().read_file(write(tmp_path, "q.csv", "a,b\n"))
    with pytest.raises(FileNotFoundError):
        QuestionReader().read_file(tmp_path / "missing.jsonl")
    with pytest.raises(IsADirectoryError):
        QuestionReader().read_file(tmp_path)


def test_reading_is_streamed(tmp_path: Path) -> None:
    path = write(tmp_path, "q.txt", "".join(f"question {n}\n" for n in range(100_000)))
    stream = QuestionReader().read_file(path)
    first = next(iter(stream))
    assert (first.index, first.question) == (0, "question 0")
    assert sum(1 for _ in stream) == 99_999


def test_objects_and_strings_from_python() -> None:
    items = list(QuestionReader().read_objects(["plain", {"custom_id": "k", "question": "obj", "top_k": 2}, {"q": 1}]))
    assert [(i.item, i.custom_id, i.ok) for i in items] == [("question[1]", "1", True), ("question[2]", "k", True),
                                                             ("question[3]", "3", False)]
    assert items[2].error == "missing field 'question'"


def test_item_round_trips_through_a_task_message() -> None:
    item = QuestionItem(index=4, item="f.jsonl:5", custom_id="c", question="q?", top_k=3, filter={"product": "X"})
    assert QuestionItem.from_dict(json.loads(json.dumps(item.to_dict()))) == item


def test_answer_line_has_the_documented_keys_in_order() -> None:
    item = QuestionItem(index=0, item="f:1", custom_id="c1", question="q?")
    source = {"url": "u", "title": "t", "product": "p", "score": 0.5, "text": "x", "ref": 1}
    line = answer_line(item, answer="a [1]", sources=[source], model="m",
                       timings={"retrieval_s": 0.1, "generation_s": 0.2}, usage={"prompt_tokens": 3, "completion_tokens": 2})
    assert list(line) == ["custom_id", "question", "answer", "sources", "model", "timings", "usage", "error"]
    result = AnswerResult.from_line(line, job_id="j")
    assert (result.ok, result.urls, result.job_id, result.answer) == (True, ["u"], "j", "a [1]")
    assert result.source_objects()[0].title == "t"


def test_check_filter() -> None:
    assert check_filter({"product": "CDN"}) is None
    assert check_filter({"product": ["CDN", "VPC"], "year": 2018}) is None
    assert check_filter({"": "x"}) == "field 'filter' has an empty key"


def test_max_tokens_and_filter_keys_are_checked() -> None:
    got = list(QuestionReader().read_objects([
        {"question": "a", "max_tokens": 32},
        {"question": "b", "max_tokens": 0},
        {"question": "c", "max_tokens": "64"},
        {"question": "d", "filter": {"payload.nested[0]": "x"}},
        {"question": "e", "filter": {"product_line": "CDN"}},
    ]))
    assert got[0].ok and got[0].max_tokens == 32
    assert got[1].error == "field 'max_tokens' must be between 1 and 4096, got 0"
    assert got[2].error == "field 'max_tokens' must be an integer, got string"
    assert got[3].error == "filter key 'payload.nested[0]': use a payload field name (letters, digits, '_', '-')"
    assert got[4].ok and got[4].filter == {"product_line": "CDN"}
