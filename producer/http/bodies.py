"""Bodies of many objects (``POST /v1/ingest``, ``POST /v1/questions``): a JSON array or JSONL.

Parsed by hand (FastAPI sees no body model) and validated whole: each value against its
model, then by the same checks the CLI's readers apply (:func:`common.inputs.document_from_object`,
:class:`common.questions.QuestionReader`), so one invalid value answers a 422 naming it.
"""

from __future__ import annotations

import email.message
import json
import re
from collections.abc import Callable
from typing import Any, Literal

from fastapi import FastAPI, HTTPException
from fastapi.exceptions import RequestValidationError
from pydantic import TypeAdapter, ValidationError

from common.inputs import document_from_object
from common.questions import QuestionReader
from common.schemas import ItemError
from producer.http.schemas import Document, QuestionLine

#: Validation errors listed in one 422 answer.
MAX_REPORTED_ERRORS = 50

JSONL_TYPES = {"application/x-ndjson", "application/jsonl", "application/x-jsonlines",
               "application/jsonlines", "application/json-lines"}

_DOCUMENT = TypeAdapter(Document)
_QUESTION = TypeAdapter(QuestionLine)


def invalid(loc: list[str | int], msg: str) -> RequestValidationError:
    return RequestValidationError([{"type": "value_error", "loc": tuple(loc), "msg": msg}])


def documents_body() -> dict[str, Any]:
    return lines_body("Document")


def lines_body(model: str) -> dict[str, Any]:
    """A body of many objects: JSONL (one per line) or a JSON array; both are described as arrays."""
    schema = {"type": "array", "minItems": 1, "items": {"$ref": f"#/components/schemas/{model}"}}
    return {"requestBody": {"required": True, "content": {
        "application/json": {"schema": schema},
        "application/x-ndjson": {"schema": schema, "description": f"JSONL: one {model} object per line."},
    }}}


def document_bodies(app: FastAPI) -> None:
    """Publish the models that hand-parsed bodies refer to in the OpenAPI document."""
    build = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema:
            return app.openapi_schema
        schema = build()
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        for model in (Document, QuestionLine):
            model_schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
            components.update(model_schema.pop("$defs", {}))
            components[model.__name__] = model_schema
        return schema

    app.openapi = openapi  # type: ignore[method-assign]


def _body_kind(content_type: str | None, body: bytes) -> Literal["json", "jsonl"]:
    if not content_type:
        return "json" if body.lstrip()[:1] == b"[" else "jsonl"
    message = email.message.Message()
    message["content-type"] = content_type
    kind = message.get_content_type()
    if kind == "application/json" or kind.endswith("+json"):
        return "json"
    if kind in JSONL_TYPES:
        return "jsonl"
    raise HTTPException(415, f"send application/json (an array) or application/x-ndjson (JSONL), not {kind}")


Located = tuple[tuple[Any, ...], Any]  # (("body", 3) or ("body", "line 4"), the parsed value)
Check = Callable[[Any, tuple[Any, ...]], list[dict[str, Any]]]


def parse_documents(body: bytes, content_type: str | None) -> list[Any]:
    """The documents of an ingest body, or a 422 that names every invalid one."""
    return [obj for _, obj in _parse_body(body, content_type, _document_errors, what="documents")]


def _parse_body(body: bytes, content_type: str | None, check: Check, *, what: str) -> list[Located]:
    """A JSON array or JSONL body, each value checked; one 422 lists every problem in body order."""
    kind = _body_kind(content_type, body)
    try:
        text = body.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise invalid(["body"], f"the body is not valid UTF-8 (byte {exc.start})") from None
    if kind == "json":
        try:
            data = json.loads(text)
        except (json.JSONDecodeError, RecursionError) as exc:
            raise _json_error(exc, ("body",)) from None
        if not isinstance(data, list):
            raise invalid(["body"], f"expected a JSON array of {what} (send JSONL as application/x-ndjson)")
        located: list[Located] = [(("body", n), obj) for n, obj in enumerate(data)]
    else:
        located = [(("body", f"line {lineno}"), line) for lineno, line in enumerate(text.splitlines(), start=1)
                   if line.strip()]
    if not located:
        raise invalid(["body"], f"no {what}")
    values: list[Located] = []
    errors: list[dict[str, Any]] = []
    for loc, obj in located:
        if kind == "jsonl":
            try:
                obj = json.loads(obj)
            except (json.JSONDecodeError, RecursionError) as exc:
                errors.extend(_json_error(exc, loc).errors())
                continue
        errors.extend(check(obj, loc))
        if len(errors) >= MAX_REPORTED_ERRORS:
            break
        values.append((loc, obj))
    if errors:
        raise RequestValidationError(errors[:MAX_REPORTED_ERRORS])
    return values


def _json_error(exc: Exception, loc: tuple[Any, ...]) -> RequestValidationError:
    reason = exc.msg if isinstance(exc, json.JSONDecodeError) else "nested too deeply"
    where = f" (column {exc.colno})" if isinstance(exc, json.JSONDecodeError) else ""
    return RequestValidationError([{"type": "json_invalid", "loc": loc, "msg": f"JSON decode error: {reason}{where}"}])


_FIELD = re.compile(r"field '(\w+)'")


def _document_errors(obj: Any, loc: tuple[Any, ...]) -> list[dict[str, Any]]:
    """Schema errors first (FastAPI's shape), then ragq's own checks (blank content, NUL)."""
    try:
        _DOCUMENT.validate_python(obj)
    except ValidationError as exc:
        return [{"type": e["type"], "loc": (*loc, *e["loc"]), "msg": e["msg"]}
                for e in exc.errors(include_url=False, include_input=False)]
    event = document_from_object(obj, item="", default_key="")
    if isinstance(event, ItemError):
        match = _FIELD.search(event.reason)
        field = match.group(1) if match else "content"
        return [{"type": "value_error", "loc": (*loc, field), "msg": event.reason}]
    return []


def parse_questions(body: bytes, content_type: str | None) -> list[Any]:
    """The question objects of a body, each with its custom_id (default: its line number)."""
    located = _parse_body(body, content_type, question_errors(QuestionReader()), what="questions")
    return [{**obj, "custom_id": _default_id(loc) if obj.get("custom_id") is None else obj["custom_id"]}
            for loc, obj in located]


def _default_id(loc: tuple[Any, ...]) -> str:
    where = loc[-1]
    return str(where + 1) if isinstance(where, int) else str(where).removeprefix("line ")


_QUESTION_FIELD = re.compile(r"(?:field|filter) '(\w+)'|(question|custom_id)")


def question_errors(reader: QuestionReader) -> Check:
    """Schema errors first, then the question format's own checks (duplicate ids, blank questions)."""

    def check(obj: Any, loc: tuple[Any, ...]) -> list[dict[str, Any]]:
        try:
            _QUESTION.validate_python(obj)
        except ValidationError as exc:
            return [{"type": e["type"], "loc": (*loc, *e["loc"]), "msg": e["msg"]}
                    for e in exc.errors(include_url=False, include_input=False)]
        item = reader.from_object(obj, where=str(loc), default_id=_default_id(loc))
        if item.error:
            match = _QUESTION_FIELD.search(item.error)
            field = "filter" if item.error.startswith("filter") else (match and (match.group(1) or match.group(2)))
            return [{"type": "value_error", "loc": (*loc, field) if field else loc, "msg": item.error}]
        return []

    return check
