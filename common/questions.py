"""Read question lists, one question at a time, with per-line errors; shape answer lines.

Question jobs follow the OpenAI Batch API: one input line per request, one output line
per input line, matched by ``custom_id`` and written in input order. Accepted inputs:

* ``.jsonl``/``.ndjson``: one object per line,
  ``{"custom_id": "q1", "question": "...", "top_k": 5, "filter": {"product": "..."},
  "max_tokens": 128}``; ``custom_id`` defaults to the line number, ``top_k`` to the
  worker's ``RAGQ_TOP_K``, ``max_tokens`` (the answer's length) to ``RAGQ_LLM_MAX_TOKENS``;
  other fields are ignored.
* ``.txt`` (or no suffix): one question per non-blank line; ``custom_id`` is the line
  number.

A line that cannot be used (malformed JSON, no question, wrong types, ``top_k`` out of
range, a duplicate ``custom_id``) becomes a :class:`QuestionItem` carrying ``error``: it
keeps its place in the output, counts as failed, and the rest of the file still runs.

This module is imported by the producer, so it must not import torch or worker code.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from common.schemas import Source

JSONL_SUFFIXES = {".jsonl", ".ndjson"}
TEXT_SUFFIXES = {".txt", ""}
#: Retrieval depth a question may ask for (the CLI's ``--top-k`` has the same bound).
MAX_TOP_K = 100
#: Longest answer a question may ask for (``max_tokens``).
MAX_ANSWER_TOKENS = 4096
#: Payload field names a filter may use: plain identifiers, never JSON paths.
_FILTER_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_-]{0,63}")
#: Longer questions are refused: they are documents, not questions, and would blow the prompt.
MAX_QUESTION_CHARS = 8000
#: A JSONL line longer than this is refused without being parsed.
MAX_LINE_BYTES = 64 * 1024


class LineRefused(ValueError):
    """Raised by a line adapter (see :meth:`QuestionReader.read_lines`): the line keeps its place as an error."""

    def __init__(self, reason: str, custom_id: str | None = None) -> None:
        super().__init__(reason)
        self.custom_id = custom_id


#: Turns one parsed JSONL value of another format (a Batch API request) into a question object.
LineAdapter = Callable[[Any], Any]


class LineItem:
    """What every kind of input line has: a place (``item``), a ``custom_id`` and maybe an ``error``."""

    item: str
    custom_id: str
    error: str | None

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def label(self) -> str:
        """How the item is named in job errors: its line and, if it has one, its custom_id."""
        default = self.item.endswith((f":{self.custom_id}", f"[{self.custom_id}]"))
        return self.item if default or not self.custom_id else f"{self.item} (custom_id {self.custom_id})"


@dataclass
class QuestionItem(LineItem):
    """One input line as it travels to a worker (or, with ``error``, why it can't).

    ``index`` is the 0-based position among the job's inputs (output order); ``item`` names
    the input line in errors (``questions.jsonl:12``).
    """

    index: int
    item: str
    custom_id: str
    question: str = ""
    top_k: int | None = None
    filter: dict[str, Any] | None = None
    max_tokens: int | None = None
    error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> QuestionItem:
        return cls(**{k: data[k] for k in cls.__dataclass_fields__ if k in data})


@dataclass
class AnswerResult:
    """One output line: the answer to one question, or why there is none.

    ``sources`` are the retrieved documents, best first, one per document; ``ref`` on a
    source is its ``[n]`` number in the prompt (``None`` if it did not fit the context).
    ``timings``: ``retrieval_s`` is the wall time of the batch's shared embedding pass
    and vector queries, ``generation_s`` this answer's generation time.
    """

    custom_id: str
    question: str
    answer: str | None
    sources: list[dict[str, Any]] = field(default_factory=list)
    model: str | None = None
    timings: dict[str, float] = field(default_factory=dict)
    usage: dict[str, int | None] | None = None
    error: str | None = None
    job_id: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def urls(self) -> list[str]:
        return [s.get("url", "") for s in self.sources]

    def source_objects(self) -> list[Source]:
        return [Source(**{k: s.get(k) for k in Source.__dataclass_fields__}) for s in self.sources]

    @classmethod
    def from_line(cls, line: Mapping[str, Any], job_id: str | None = None) -> AnswerResult:
        values = {k: line[k] for k in cls.__dataclass_fields__ if k in line and k != "job_id"}
        values.setdefault("custom_id", "")
        values.setdefault("question", "")
        values.setdefault("answer", None)
        return cls(**values, job_id=job_id)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def answer_line(
    item: QuestionItem,
    *,
    answer: str | None,
    sources: list[dict[str, Any]],
    model: str | None,
    timings: Mapping[str, float] | None = None,
    usage: Mapping[str, int | None] | None = None,
    error: str | None = None,
) -> dict[str, Any]:
    """The output JSONL object for one input line (key order is the documented one)."""
    return {
        "custom_id": item.custom_id,
        "question": item.question,
        "answer": answer,
        "sources": sources,
        "model": model,
        "timings": dict(timings or {}),
        "usage": dict(usage) if usage else None,
        "error": error,
    }


def rejected_line(item: QuestionItem) -> dict[str, Any]:
    """The output line of an input line that was refused before any work was done."""
    return answer_line(item, answer=None, sources=[], model=None, error=f"{item.item}: {item.error}")


def was_refused(line: Mapping[str, Any]) -> bool:
    """Whether an output line is a :func:`rejected_line` (refused input) rather than a failed answer.

    Workers always name the model and time the retrieval of a question they took.
    """
    return bool(line.get("error")) and line.get("model") is None and not line.get("timings")


class QuestionReader:
    """Streams question items from files or objects; never holds the whole list."""

    def __init__(self, *, max_top_k: int = MAX_TOP_K, max_question_chars: int = MAX_QUESTION_CHARS) -> None:
        self.max_top_k = max_top_k
        self.max_question_chars = max_question_chars
        self._seen: dict[str, str] = {}  # custom_id -> the item that used it first
        self._index = 0

    # -- sources of questions ------------------------------------------------------------
    def read_file(self, path: str | Path) -> Iterator[QuestionItem]:
        """Items of one question file, in file order.

        The file is checked now, not on first iteration: ``ValueError`` for a type other
        than .jsonl/.ndjson/.txt, ``OSError`` when it is missing or unreadable.
        """
        path = Path(path)
        suffix = path.suffix.lower()
        if suffix not in JSONL_SUFFIXES | TEXT_SUFFIXES:
            raise ValueError(f"{path}: unsupported question file type {suffix}; use .jsonl (objects) or .txt (lines)")
        if path.is_dir():
            raise IsADirectoryError(f"{path}: is a directory, not a question file")
        handle = path.open("rb")  # FileNotFoundError / PermissionError name the path
        return self._read_handle(handle, str(path), suffix in JSONL_SUFFIXES)

    def _read_handle(self, handle: Any, name: str, jsonl: bool) -> Iterator[QuestionItem]:
        with handle:
            yield from self.read_lines(handle, name=name, jsonl=jsonl)

    def read_lines(self, lines: Iterable[bytes | str], *, name: str, jsonl: bool,
                   adapt: LineAdapter | None = None) -> Iterator[QuestionItem]:
        """Items of JSONL or text lines; ``adapt`` maps each parsed JSONL value of another
        format to a question object first (raising :class:`LineRefused` for a bad one)."""
        if not jsonl:
            for where, lineno, text, problem in decoded_lines(lines, name=name):
                yield (self._reject(where, str(lineno), problem) if problem
                       else self.from_object({"question": text}, where=where, default_id=str(lineno)))
            return
        for where, lineno, obj, problem in json_lines(lines, name=name):
            if problem:
                yield self._reject(where, str(lineno), problem)
                continue
            if adapt is not None:
                try:
                    obj = adapt(obj)
                except LineRefused as exc:
                    yield self._reject(where, exc.custom_id or str(lineno), str(exc))
                    continue
            yield self.from_object(obj, where=where, default_id=str(lineno))

    def read_objects(self, objects: Iterable[str | Mapping[str, Any]], *, name: str = "question") -> Iterator[QuestionItem]:
        """Items from Python values: strings are questions, mappings are JSONL-style objects.

        Default custom_ids are 1-based positions, as for a file's line numbers.
        """
        for n, obj in enumerate(objects, start=1):
            where = f"{name}[{n}]"
            if isinstance(obj, str):
                obj = {"question": obj}
            yield self.from_object(obj, where=where, default_id=str(n))

    # -- validation ------------------------------------------------------------------------
    def from_object(self, obj: Any, *, where: str, default_id: str) -> QuestionItem:
        """Validate one JSONL-style object; any problem becomes the item's ``error``."""
        if not isinstance(obj, Mapping):
            return self._reject(where, default_id, f"expected a JSON object, got {_json_type(obj)}")
        custom_id = obj.get("custom_id")
        if custom_id is None:
            custom_id = default_id
        elif isinstance(custom_id, bool) or not isinstance(custom_id, (str, int)):
            return self._reject(where, default_id, f"field 'custom_id' must be a string, got {_json_type(custom_id)}")
        custom_id = str(custom_id)
        if not custom_id.strip():
            return self._reject(where, default_id, "field 'custom_id' is empty")

        question = obj.get("question")
        if question is None:
            return self._reject(where, custom_id, "missing field 'question'")
        if not isinstance(question, str):
            return self._reject(where, custom_id, f"field 'question' must be a string, got {_json_type(question)}")
        question = question.strip()
        if not question:
            return self._reject(where, custom_id, "empty question")
        if len(question) > self.max_question_chars:
            return self._reject(where, custom_id,
                                f"question is {len(question)} characters, over the {self.max_question_chars} limit", question[:200] + "…")
        if "\x00" in question:
            return self._reject(where, custom_id, "question contains NUL characters")

        top_k = obj.get("top_k")
        if top_k is not None:
            if isinstance(top_k, bool) or not isinstance(top_k, int):
                if isinstance(top_k, float) and top_k.is_integer():
                    top_k = int(top_k)
                else:
                    return self._reject(where, custom_id, f"field 'top_k' must be an integer, got {_json_type(top_k)}", question)
            if not 1 <= top_k <= self.max_top_k:
                return self._reject(where, custom_id, f"field 'top_k' must be between 1 and {self.max_top_k}, got {top_k}", question)

        max_tokens = obj.get("max_tokens")
        if max_tokens is not None:
            if isinstance(max_tokens, bool) or not isinstance(max_tokens, int):
                return self._reject(where, custom_id, f"field 'max_tokens' must be an integer, got {_json_type(max_tokens)}", question)
            if not 1 <= max_tokens <= MAX_ANSWER_TOKENS:
                return self._reject(where, custom_id, f"field 'max_tokens' must be between 1 and {MAX_ANSWER_TOKENS}, got {max_tokens}", question)

        filter_ = obj.get("filter")
        if filter_ is not None:
            problem = check_filter(filter_)
            if problem:
                return self._reject(where, custom_id, problem, question)
            filter_ = {k: (list(v) if isinstance(v, (list, tuple)) else v) for k, v in filter_.items()} or None

        first = self._seen.get(custom_id)
        if first is not None:
            return self._reject(where, custom_id, f"duplicate custom_id {custom_id!r} (first used at {first})", question)
        self._seen[custom_id] = where
        return self._next(QuestionItem(index=0, item=where, custom_id=custom_id, question=question,
                                       top_k=top_k, filter=filter_, max_tokens=max_tokens))

    def _reject(self, where: str, custom_id: str, reason: str, question: str = "") -> QuestionItem:
        # A refused line keeps its place; its id is not reserved, so a later good line may use it.
        return self._next(QuestionItem(index=0, item=where, custom_id=custom_id, question=question, error=reason))

    def _next(self, item: QuestionItem) -> QuestionItem:
        item.index = self._index
        self._index += 1
        return item


def decoded_lines(lines: Iterable[bytes | str], *, name: str,
                  max_line_bytes: int = MAX_LINE_BYTES) -> Iterator[tuple[str, int, str, str | None]]:
    """``(where, lineno, text, problem)`` of each non-blank line: too long or not UTF-8 is a problem."""
    for lineno, raw in enumerate(lines, start=1):
        where = f"{name}:{lineno}"
        if isinstance(raw, bytes):
            if len(raw) > max_line_bytes:
                yield where, lineno, "", f"line is {len(raw)} bytes, over the {max_line_bytes}-byte limit"
                continue
            try:
                text = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
            except UnicodeDecodeError as exc:
                yield where, lineno, "", f"not valid UTF-8 (byte {exc.start})"
                continue
        else:
            text = raw.lstrip("\ufeff") if lineno == 1 else raw
        text = text.strip()
        if text:
            yield where, lineno, text, None


def json_lines(lines: Iterable[bytes | str], *, name: str,
               max_line_bytes: int = MAX_LINE_BYTES) -> Iterator[tuple[str, int, Any, str | None]]:
    """``(where, lineno, value, problem)`` of each non-blank JSONL line; malformed JSON is a problem."""
    for where, lineno, text, problem in decoded_lines(lines, name=name, max_line_bytes=max_line_bytes):
        if problem:
            yield where, lineno, None, problem
            continue
        try:
            yield where, lineno, json.loads(text), None
        except json.JSONDecodeError as exc:
            yield where, lineno, None, f"malformed JSON: {exc.msg} at column {exc.colno}"
        except RecursionError:
            yield where, lineno, None, "malformed JSON: nested too deeply"


def check_filter(value: Any) -> str | None:
    """Why ``value`` is not a usable payload filter, or ``None`` if it is.

    A filter maps payload fields (``product``, ``url``, ``title`` or a document's extra
    fields) to a string or integer, or to a non-empty list of them (any of).
    """
    if not isinstance(value, Mapping):
        return f"field 'filter' must be an object such as {{\"product\": \"...\"}}, got {_json_type(value)}"
    for key, v in value.items():
        if not isinstance(key, str) or not key:
            return "field 'filter' has an empty key"
        if not _FILTER_KEY.fullmatch(key):
            return f"filter key {key!r}: use a payload field name (letters, digits, '_', '-')"
        values = v if isinstance(v, (list, tuple)) else [v]
        if not values:
            return f"filter {key!r}: empty list"
        for one in values:
            if isinstance(one, bool) or not isinstance(one, (str, int)):
                return f"filter {key!r}: values must be strings or integers, got {_json_type(one)}"
        if len({type(one) for one in values}) > 1:
            return f"filter {key!r}: mixed strings and integers"
    return None


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    return {bool: "boolean", int: "number", float: "number", str: "string", list: "array", dict: "object"}.get(
        type(value), type(value).__name__
    )
