"""Retrieval quality: hit@k, MRR@10 and nDCG@10 of question lines that name their source page.

Users need a number before they change a model, a chunk size or a retrieval mode. An
evaluation line is a question line (``questions-dev.jsonl`` shape) that also says which
page answers it::

    {"id": "jdq-1", "question": "...", "query": "Billing: ...", "source_url": "https://...",
     "product": "Billing"}

The text asked is ``query`` when present, else ``question``; ``source_url`` is a url or
a list of urls (any of them is relevant). Other fields (``answer_text``, ``top_k``,
``filter``, ...) are ignored, so every question is ranked the same way. A line that
cannot be used becomes an :class:`EvalError` naming its line and the reason, and the
rest still runs (the project's rule: one bad item never sinks a job).

This module is pure: parsing, metrics, aggregation, reports and comparisons. Running
the questions through the queue is :meth:`producer.client.Client.evaluate`; it must
import neither Celery nor torch.
"""

from __future__ import annotations

import json
import math
from collections.abc import Collection, Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from common.questions import MAX_LINE_BYTES, QuestionReader

#: The cut-offs of hit@k; the deepest one is also the depth of MRR and nDCG.
HIT_KS: tuple[int, ...] = (1, 3, 5, 10)
#: Depth of MRR@10 and nDCG@10 (and the least ``top_k`` an evaluation retrieves).
CUTOFF = 10
#: Metric names in table order; a report's metric rows use these keys (plus ``n``).
METRICS: tuple[str, ...] = (*(f"hit@{k}" for k in HIT_KS), f"mrr@{CUTOFF}", f"ndcg@{CUTOFF}")
#: The product of lines that name none.
NO_PRODUCT = "(none)"
#: Bumped when the report's shape changes incompatibly; ``load_report`` refuses others.
REPORT_VERSION = 1


# --- inputs ---------------------------------------------------------------------------


@dataclass(frozen=True)
class EvalQuestion:
    """One usable evaluation line: what to ask and which urls count as its answer."""

    line: int  # 1-based line number in the input (position for Python objects)
    item: str  # how errors name it: "questions.jsonl:12"
    id: str  # the line's ``id``, else its line number
    question: str  # the text asked: ``query`` if present, else ``question``
    relevant: tuple[str, ...]  # distinct, in the order given
    product: str = NO_PRODUCT


@dataclass(frozen=True)
class EvalError:
    """A line that was not evaluated (bad input, or its retrieval failed), and why."""

    line: int
    item: str
    reason: str
    id: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def read_eval_file(path: str | Path) -> Iterator[EvalQuestion | EvalError]:
    """Parse an evaluation file (JSONL). ``OSError`` if it cannot be opened, now, not on first use."""
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"{path}: is a directory, not a question file")
    handle = path.open("rb")
    return _read_handle(handle, str(path))


def _read_handle(handle: Any, name: str) -> Iterator[EvalQuestion | EvalError]:
    with handle:
        yield from read_eval_lines(handle, name=name)


def read_eval_lines(
    lines: Iterable[bytes | str | Mapping[str, Any]], *, name: str = "questions"
) -> Iterator[EvalQuestion | EvalError]:
    """Parse evaluation lines: JSON text (``str``/``bytes``) or already-parsed objects.

    Blank lines are skipped but still counted, so line numbers match the file. The text
    asked is validated by :class:`common.questions.QuestionReader`, the same rules as a
    question job's (length, NUL characters), so an evaluation refuses what a job would.
    """
    reader = QuestionReader()
    seen: dict[str, int] = {}
    for lineno, raw in enumerate(lines, start=1):
        where = f"{name}:{lineno}"
        if isinstance(raw, Mapping):
            parsed: Any = raw
        else:
            text = _decode(raw, lineno)
            if isinstance(text, EvalError):
                yield EvalError(lineno, where, text.reason)
                continue
            if not text:
                continue
            try:
                parsed = json.loads(text)
            except json.JSONDecodeError as exc:
                yield EvalError(lineno, where, f"malformed JSON: {exc.msg} at column {exc.colno}")
                continue
            except RecursionError:
                yield EvalError(lineno, where, "malformed JSON: nested too deeply")
                continue
        result = parse_eval_object(parsed, line=lineno, item=where, reader=reader)
        if isinstance(result, EvalQuestion):
            first = seen.get(result.id)
            if first is not None:
                result = EvalError(lineno, where, f"duplicate id {result.id!r} (first used at line {first})", result.id)
            else:
                seen[result.id] = lineno
        yield result


def _decode(raw: bytes | str, lineno: int) -> str | EvalError:
    """One line as stripped text (a BOM on the first line dropped), or why it is unreadable."""
    if isinstance(raw, bytes):
        if len(raw) > MAX_LINE_BYTES:
            return EvalError(lineno, "", f"line is {len(raw)} bytes, over the {MAX_LINE_BYTES}-byte limit")
        try:
            raw = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
        except UnicodeDecodeError as exc:
            return EvalError(lineno, "", f"not valid UTF-8 (byte {exc.start})")
    elif lineno == 1:
        raw = raw.lstrip("\ufeff")
    return raw.strip()


def parse_eval_object(
    obj: Any, *, line: int, item: str, reader: QuestionReader | None = None
) -> EvalQuestion | EvalError:
    """Validate one evaluation object; any problem is an :class:`EvalError` with the reason."""
    if not isinstance(obj, Mapping):
        return EvalError(line, item, f"expected a JSON object, got {_json_type(obj)}")
    qid = obj.get("id")
    if qid is None:
        qid = str(line)
    elif isinstance(qid, bool) or not isinstance(qid, (str, int)) or not str(qid).strip():
        return EvalError(line, item, "field 'id' must be a non-empty string" if isinstance(qid, str)
                         else f"field 'id' must be a string, got {_json_type(qid)}")
    qid = str(qid)

    field_name = "query" if obj.get("query") is not None else "question"
    text = obj.get(field_name)
    if text is None:
        return EvalError(line, item, "missing field 'question' (or 'query')", qid)
    if not isinstance(text, str):
        return EvalError(line, item, f"field '{field_name}' must be a string, got {_json_type(text)}", qid)
    if not text.strip():
        return EvalError(line, item, f"empty {field_name}", qid)
    # The same checks a question job applies (length, NUL), so an eval never sends what a job refuses.
    checked = (reader or QuestionReader()).from_object({"custom_id": str(line), "question": text},
                                                      where=item, default_id=str(line))
    if checked.error:
        return EvalError(line, item, checked.error, qid)

    relevant = _relevant_urls(obj.get("source_url"))
    if isinstance(relevant, str):
        return EvalError(line, item, relevant, qid)

    product = obj.get("product")
    if product is not None and not isinstance(product, str):
        return EvalError(line, item, f"field 'product' must be a string, got {_json_type(product)}", qid)
    return EvalQuestion(line=line, item=item, id=qid, question=checked.question, relevant=relevant,
                        product=(product or "").strip() or NO_PRODUCT)


def _relevant_urls(value: Any) -> tuple[str, ...] | str:
    """The distinct relevant urls of ``source_url``, or why it is unusable."""
    if value is None:
        return "missing field 'source_url' (the page that answers the question)"
    values = value if isinstance(value, list) else [value]
    if not values:
        return "field 'source_url' is an empty list"
    urls: list[str] = []
    for v in values:
        if not isinstance(v, str):
            return f"field 'source_url' must be a string or a list of strings, got {_json_type(v)}"
        if not v.strip():
            return "field 'source_url' has an empty url"
        if v.strip() not in urls:
            urls.append(v.strip())
    return tuple(urls)


# --- metrics --------------------------------------------------------------------------


@dataclass(frozen=True)
class RankMetrics:
    """The figures of one ranking against its relevant set.

    ``first_rank`` is the 1-based rank of the first relevant url anywhere in the
    retrieved list (``None`` if absent); the metrics themselves stop at :data:`CUTOFF`.
    """

    first_rank: int | None
    hits: dict[int, float]  # k -> 1.0 if a relevant url is within the first k, else 0.0
    mrr: float
    ndcg: float

    def as_row(self) -> dict[str, float]:
        return {**{f"hit@{k}": v for k, v in self.hits.items()}, f"mrr@{CUTOFF}": self.mrr, f"ndcg@{CUTOFF}": self.ndcg}


def rank_metrics(retrieved: Sequence[str], relevant: Collection[str], *,
                 ks: Sequence[int] = HIT_KS, cutoff: int = CUTOFF) -> RankMetrics:
    """hit@k, MRR@cutoff and nDCG@cutoff (binary relevance) of one ranking.

    DCG = sum over ranks i = 1..cutoff of rel_i / log2(i + 1); the ideal DCG puts
    min(#relevant, cutoff) relevant urls first. A url retrieved again at a lower rank
    (two documents with one url) earns nothing the second time: a page counts once, so
    nDCG stays within [0, 1] and positions stay those the user was shown.
    """
    relevant = set(relevant)
    seen: set[str] = set()
    gains: list[int] = []
    for url in retrieved:
        gains.append(1 if url in relevant and url not in seen else 0)
        seen.add(url)
    first = next((i for i, g in enumerate(gains, start=1) if g), None)
    hits = {k: 1.0 if first is not None and first <= k else 0.0 for k in ks}
    mrr = 1.0 / first if first is not None and first <= cutoff else 0.0
    dcg = sum(g / math.log2(i + 1) for i, g in enumerate(gains[:cutoff], start=1))
    idcg = sum(1.0 / math.log2(i + 1) for i in range(1, min(len(relevant), cutoff) + 1))
    return RankMetrics(first_rank=first, hits=hits, mrr=mrr, ndcg=dcg / idcg if idcg else 0.0)


@dataclass
class QuestionResult:
    """One evaluated question: its ranking, the rank of its first relevant url, its figures."""

    line: int
    id: str
    question: str
    product: str
    relevant: list[str]
    retrieved: list[str]
    first_rank: int | None
    metrics: dict[str, float]

    @classmethod
    def of(cls, q: EvalQuestion, retrieved: Sequence[str]) -> QuestionResult:
        m = rank_metrics(retrieved, q.relevant)
        return cls(line=q.line, id=q.id, question=q.question, product=q.product, relevant=list(q.relevant),
                   retrieved=list(retrieved), first_rank=m.first_rank, metrics=m.as_row())

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> QuestionResult:
        return cls(**{k: data[k] for k in cls.__dataclass_fields__ if k in data})


def aggregate(results: Iterable[QuestionResult]) -> dict[str, Any]:
    """Mean of each metric with the question count ``n``; metrics are ``None`` when n is 0."""
    results = list(results)
    n = len(results)
    row: dict[str, Any] = {"n": n}
    for name in METRICS:
        row[name] = sum(r.metrics[name] for r in results) / n if n else None
    return row


def per_product(results: Iterable[QuestionResult]) -> dict[str, dict[str, Any]]:
    """:func:`aggregate` per product, products sorted by name and ``(none)`` last."""
    groups: dict[str, list[QuestionResult]] = {}
    for r in results:
        groups.setdefault(r.product, []).append(r)
    order = sorted(groups, key=lambda p: (p == NO_PRODUCT, p.casefold(), p))
    return {p: aggregate(groups[p]) for p in order}


# --- reports --------------------------------------------------------------------------


@dataclass
class EvalReport:
    """An evaluation's outcome: overall and per-product figures, every question, every error.

    ``to_dict`` is the ``ragq eval --json`` document and the file ``--compare`` reads back.
    ``meta`` says what was measured (collection, model, job id), so two reports can be told apart.
    """

    source: str
    top_k: int
    overall: dict[str, Any]
    products: dict[str, dict[str, Any]]
    questions: list[QuestionResult] = field(default_factory=list)
    errors: list[EvalError] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)
    version: int = REPORT_VERSION

    @property
    def ok(self) -> bool:
        return not self.errors

    @classmethod
    def build(cls, source: str, top_k: int, questions: Iterable[QuestionResult],
              errors: Iterable[EvalError] = (), meta: Mapping[str, Any] | None = None) -> EvalReport:
        """Aggregate evaluated questions (in line order) and errors into a report."""
        results = sorted(questions, key=lambda r: r.line)
        return cls(source=source, top_k=top_k, overall=aggregate(results), products=per_product(results),
                   questions=results, errors=sorted(errors, key=lambda e: e.line), meta=dict(meta or {}))

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "source": self.source,
            "top_k": self.top_k,
            "metrics": list(METRICS),
            "overall": self.overall,
            "products": self.products,
            "errors": [e.to_dict() for e in self.errors],
            "questions": [q.to_dict() for q in self.questions],
            "meta": self.meta,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> EvalReport:
        if not isinstance(data, Mapping) or not isinstance(data.get("overall"), Mapping):
            raise ValueError("not a ragq eval report (no 'overall' figures)")
        version = data.get("version", REPORT_VERSION)
        if version != REPORT_VERSION:
            raise ValueError(f"eval report version {version}; this ragq reads version {REPORT_VERSION}")
        return cls(
            source=str(data.get("source", "")),
            top_k=int(data.get("top_k", 0)),
            overall=dict(data["overall"]),
            products={str(k): dict(v) for k, v in (data.get("products") or {}).items()},
            questions=[QuestionResult.from_dict(q) for q in data.get("questions") or []],
            errors=[EvalError(**{k: e.get(k) for k in EvalError.__dataclass_fields__ if k in e})
                    for e in data.get("errors") or []],
            meta=dict(data.get("meta") or {}),
        )


def load_report(path: str | Path) -> EvalReport:
    """Read a report written by ``ragq eval --output`` (or ``--json``). ``ValueError`` if it is not one."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not JSON ({exc.msg} at line {exc.lineno})") from None
    try:
        return EvalReport.from_dict(data)
    except (ValueError, TypeError, KeyError) as exc:
        raise ValueError(f"{path}: {exc}") from None


# --- comparisons ----------------------------------------------------------------------


@dataclass
class Comparison:
    """Deltas (current minus previous) per metric, overall and per product.

    A product present in only one report has ``None`` deltas (nothing to compare).
    ``same_questions`` says whether both reports evaluated the same question ids: if
    not, a delta mixes a change of system with a change of test set.
    """

    previous: str
    overall: dict[str, float | None]
    products: dict[str, dict[str, float | None]]
    same_questions: bool
    added_questions: int = 0
    removed_questions: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _row_delta(current: Mapping[str, Any] | None, previous: Mapping[str, Any] | None) -> dict[str, float | None]:
    deltas: dict[str, float | None] = {}
    for name in ("n", *METRICS):
        a = current.get(name) if current else None
        b = previous.get(name) if previous else None
        deltas[name] = None if a is None or b is None else a - b
    return deltas


def compare(current: EvalReport, previous: EvalReport, *, previous_name: str = "") -> Comparison:
    """How ``current`` differs from ``previous``: per metric, overall and per product."""
    products = list(current.products) + [p for p in previous.products if p not in current.products]
    now = {q.id for q in current.questions}
    before = {q.id for q in previous.questions}
    return Comparison(
        previous=previous_name or previous.source,
        overall=_row_delta(current.overall, previous.overall),
        products={p: _row_delta(current.products.get(p), previous.products.get(p)) for p in products},
        same_questions=now == before,
        added_questions=len(now - before),
        removed_questions=len(before - now),
    )


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    return {bool: "boolean", int: "number", float: "number", str: "string", list: "array", dict: "object"}.get(
        type(value), type(value).__name__
    )
