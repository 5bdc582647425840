"""Batch API lines for ``/v1/embeddings``: read them, embed them in a worker, write them out.

In: ``{"custom_id", "method": "POST", "url": "/v1/embeddings", "body": {"model", "input",
"encoding_format"?, "dimensions"?}}``, checked as OpenAI checks it (the envelope by
:func:`common.batch_lines.envelope`, then the body; ``model`` must be the one the workers
serve). A bad line becomes an :class:`EmbedItem` with ``error``: it keeps its place and goes
to the error file. In the worker, :func:`embed_items` embeds every input of a message in one
pass (no prefix, as ``/v1/embeddings``); an input longer than the model's window fails its
line (never cut). Vectors are stored as base64 float32, a third of JSON floats' size.

This module is imported by the producer: no torch here (the embedder is passed in).
"""

from __future__ import annotations

import base64
import sys
import time
from array import array
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

from common.batch_lines import envelope
from common.jobs import BatchOutcome
from common.questions import LineItem, LineRefused, json_lines
from common.schemas import ItemError

EMBEDDINGS_ENDPOINT = "/v1/embeddings"
#: OpenAI's bound on the inputs of one embeddings request.
MAX_INPUTS = 2048
#: A line's characters in all (its inputs); a message of several lines is bounded the same way.
MAX_LINE_BYTES = 1_000_000


def serves_model(served: str, asked: str) -> bool:
    """Whether ``asked`` names the configured model, by its full name or its last path component."""
    names = {served.lower(), served.rstrip("/").rsplit("/", 1)[-1].lower()}
    return asked.lower() in names


@dataclass
class EmbedItem(LineItem):
    """One embeddings line as it travels to a worker (or, with ``error``, why it can't)."""

    index: int
    item: str
    custom_id: str
    input: list[str] = field(default_factory=list)
    encoding_format: str = "float"
    error: str | None = None

    @property
    def chars(self) -> int:
        return sum(map(len, self.input))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> EmbedItem:
        return cls(**{k: data[k] for k in cls.__dataclass_fields__ if k in data})


class EmbedLineReader:
    """Streams embeddings lines into items; custom_ids must be unique, as OpenAI requires."""

    def __init__(self, served_model: str) -> None:
        self.served_model = served_model
        self._seen: dict[str, str] = {}
        self._index = 0

    def read_lines(self, lines: Iterable[bytes | str], *, name: str,
                   endpoint: str = EMBEDDINGS_ENDPOINT) -> Iterator[EmbedItem]:
        for where, lineno, obj, problem in json_lines(lines, name=name, max_line_bytes=MAX_LINE_BYTES):
            custom_id = str(lineno)
            try:
                if problem:
                    raise LineRefused(problem)
                custom_id, body = envelope(obj, endpoint)
                inputs, encoding = self._body(body)
                first = self._seen.get(custom_id)
                if first is not None:
                    raise LineRefused(f"duplicate custom_id {custom_id!r} (first used at {first})")
            except LineRefused as exc:
                yield self._next(EmbedItem(0, where, exc.custom_id or custom_id, error=str(exc)))
                continue
            self._seen[custom_id] = where
            yield self._next(EmbedItem(0, where, custom_id, inputs, encoding))

    def _body(self, body: Mapping[str, Any]) -> tuple[list[str], str]:
        model = body.get("model")
        if not isinstance(model, str) or not serves_model(self.served_model, model):
            raise LineRefused(f"body: model {model!r} is not served here; use {self.served_model!r}")
        raw = body.get("input")
        inputs = [raw] if isinstance(raw, str) else raw
        if not isinstance(inputs, list) or not inputs or not all(isinstance(t, str) for t in inputs):
            raise LineRefused("body: 'input' must be a string or a non-empty array of strings "
                              "(token arrays are not supported)")
        if len(inputs) > MAX_INPUTS:
            raise LineRefused(f"body: 'input' has {len(inputs)} items, over the limit of {MAX_INPUTS}")
        for n, text in enumerate(inputs):
            if not text.strip():
                raise LineRefused(f"body: input[{n}] is empty")
            if "\x00" in text:
                raise LineRefused(f"body: input[{n}] contains NUL characters")
        encoding = body.get("encoding_format", "float")
        if encoding not in ("float", "base64"):
            raise LineRefused(f"body: 'encoding_format' must be 'float' or 'base64', got {encoding!r}")
        if body.get("dimensions") is not None:
            raise LineRefused("body: 'dimensions' is not supported (the model's vectors have a fixed size)")
        return list(inputs), encoding

    def _next(self, item: EmbedItem) -> EmbedItem:
        item.index = self._index
        self._index += 1
        return item


# -- in the worker ---------------------------------------------------------------------------

class TextEmbedder(Protocol):
    max_tokens: int

    @property
    def special_tokens(self) -> int: ...

    def count_tokens(self, text: str) -> int: ...

    def encode(self, texts: Sequence[str], normalize: bool = True) -> Any: ...


@dataclass
class EmbeddedBatch:
    lines: list[dict[str, Any]]
    outcome: BatchOutcome


def refused_line(item: EmbedItem) -> dict[str, Any]:
    """The result line of a line refused before any work (no model, no timings: see ``was_refused``)."""
    return {"custom_id": item.custom_id, "model": None, "vectors": [], "usage": None, "timings": {},
            "error": f"{item.item}: {item.error}"}


def embed_items(embedder: TextEmbedder, items: Sequence[EmbedItem], *, model: str) -> EmbeddedBatch:
    """Embed every input of the valid items in one pass; one result line per item, in order."""
    started = time.perf_counter()
    window = embedder.max_tokens - embedder.special_tokens
    outcome = BatchOutcome()
    counts: dict[int, list[int]] = {}
    problems: dict[int, str] = {}
    for n, item in enumerate(items):
        if not item.ok:
            continue
        counts[n] = [embedder.count_tokens(text) for text in item.input]
        long = [i for i, c in enumerate(counts[n]) if c > window]
        if long:
            problems[n] = (f"input[{long[0]}] is {counts[n][long[0]]} tokens, over the model's window of {window}"
                           + (f" ({len(long)} inputs in all)" if len(long) > 1 else ""))
    texts = [t for n, item in enumerate(items) if n in counts and n not in problems for t in item.input]
    vectors = embedder.encode(texts) if texts else None
    seconds = round(time.perf_counter() - started, 4)
    lines, row = [], 0
    for n, item in enumerate(items):
        if not item.ok:
            lines.append(refused_line(item))
            continue
        tokens = sum(counts[n])
        line: dict[str, Any] = {"custom_id": item.custom_id, "model": model, "vectors": [],
                                "encoding_format": item.encoding_format,
                                "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
                                "timings": {"embedding_s": seconds}, "error": problems.get(n)}
        if n in problems:
            line["status_code"] = 400
            outcome.failed += 1
            outcome.errors.append(ItemError(item.label, problems[n]))
        else:
            assert vectors is not None
            block = vectors[row:row + len(item.input)]
            row += len(item.input)
            line["vectors"] = [base64.b64encode(v.astype("<f4").tobytes()).decode("ascii") for v in block]
            outcome.completed += 1
            outcome.tokens += tokens
        lines.append(line)
    outcome.seconds = time.perf_counter() - started
    return EmbeddedBatch(lines, outcome)


def failed_items(items: Sequence[EmbedItem], reason: str, *, model: str) -> EmbeddedBatch:
    """Every valid line of a message failed for one reason (a crash, the time limit)."""
    outcome = BatchOutcome()
    lines = []
    for item in items:
        if not item.ok:
            lines.append(refused_line(item))
            continue
        lines.append({"custom_id": item.custom_id, "model": model, "vectors": [], "usage": None,
                      "timings": {"embedding_s": 0.0}, "error": reason})
        outcome.failed += 1
        outcome.errors.append(ItemError(item.label, reason))
    return EmbeddedBatch(lines, outcome)


# -- out ---------------------------------------------------------------------------------------

def embedding_response(result: Mapping[str, Any], rid: str = "", created: int = 0) -> dict[str, Any]:
    """OpenAI's embeddings response body for one answered line (a :data:`~common.batch_lines.Respond`)."""
    usage = result.get("usage") or {}
    floats = result.get("encoding_format", "float") == "float"
    data = [{"object": "embedding", "index": i, "embedding": _floats(v) if floats else v}
            for i, v in enumerate(result.get("vectors") or [])]
    return {"object": "list", "data": data, "model": result.get("model"),
            "usage": {"prompt_tokens": int(usage.get("prompt_tokens") or 0),
                      "total_tokens": int(usage.get("total_tokens") or 0)}}


def _floats(encoded: str) -> list[float]:
    values = array("f", base64.b64decode(encoded))  # stored little-endian float32
    if sys.byteorder == "big":
        values.byteswap()
    return values.tolist()


def pack(items: Iterable[EmbedItem], *, max_chars: int, max_lines: int) -> Iterator[list[EmbedItem]]:
    """Consecutive items in messages of at most ``max_lines`` lines and about ``max_chars`` characters."""
    group: list[EmbedItem] = []
    held = 0
    for item in items:
        if group and (len(group) >= max_lines or held + item.chars > max_chars):
            yield group
            group, held = [], 0
        group.append(item)
        held += item.chars
    if group:
        yield group
