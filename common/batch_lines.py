"""Lines of the OpenAI Batch API in and out of ragq's question-job format.

In: a request line ``{"custom_id", "method": "POST", "url": "/v1/chat/completions",
"body": {"model", "messages", ...}}`` becomes a question object: the last user message
is the question; ``top_k``/``filter`` in the body (or the batch's metadata) and
``max_completion_tokens``/``max_tokens`` carry over. The envelope is checked here, the
question itself by :class:`common.questions.QuestionReader` like any ``ask-file`` line.

Out: a result line becomes an output line ``{"id", "custom_id", "response":
{"status_code", "request_id", "body"}, "error"}``, the body in the chat-completion shape
plus ``sources``; a refused line or a failed answer becomes an error-file line.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from common.questions import LineRefused, was_refused

CHAT_ENDPOINT = "/v1/chat/completions"
#: Builds an answered line's response body from (result line, request id, created).
Respond = Callable[[Mapping[str, Any], str, int], dict[str, Any]]
_ROLES = {"system", "developer", "user", "assistant", "tool", "function"}


@dataclass(frozen=True)
class LineDefaults:
    """ragq options for every line of a batch (from its metadata); a line's body overrides them."""

    top_k: int | None = None
    filter: dict[str, Any] | None = None

    @classmethod
    def from_metadata(cls, metadata: Mapping[str, str] | None) -> LineDefaults:
        """``top_k`` (an integer) and ``filter`` (a JSON object) of a batch's metadata; ValueError names a bad one."""
        metadata = metadata or {}
        top_k = metadata.get("top_k")
        filter_ = metadata.get("filter")
        try:
            k = int(top_k) if top_k is not None else None
        except ValueError:
            raise ValueError(f"metadata top_k must be an integer, got {top_k!r}") from None
        try:
            f = json.loads(filter_) if filter_ is not None else None
        except json.JSONDecodeError as exc:
            raise ValueError(f"metadata filter must be a JSON object: {exc.msg}") from None
        if f is not None and not isinstance(f, dict):
            raise ValueError("metadata filter must be a JSON object")
        return cls(top_k=k, filter=f)


def chat_adapter(endpoint: str, defaults: LineDefaults) -> Any:
    """The :data:`~common.questions.LineAdapter` of a chat-completions batch."""

    def adapt(obj: Any) -> dict[str, Any]:
        return chat_question(obj, endpoint=endpoint, defaults=defaults)

    return adapt


def envelope(obj: Any, endpoint: str) -> tuple[str, Mapping[str, Any]]:
    """``(custom_id, body)`` of a request line of any endpoint; :class:`LineRefused` says what is wrong."""
    if not isinstance(obj, Mapping):
        raise LineRefused("expected a JSON object with custom_id, method, url and body")
    custom_id = obj.get("custom_id")
    if not isinstance(custom_id, str) or not custom_id.strip():
        raise LineRefused("field 'custom_id' must be a non-empty string")
    if obj.get("method") != "POST":
        raise LineRefused(f"field 'method' must be 'POST', got {obj.get('method')!r}", custom_id)
    if obj.get("url") != endpoint:
        raise LineRefused(f"field 'url' must be the batch's endpoint {endpoint!r}, got {obj.get('url')!r}", custom_id)
    body = obj.get("body")
    if not isinstance(body, Mapping):
        raise LineRefused("field 'body' must be an object", custom_id)
    return custom_id, body


def chat_question(obj: Any, *, endpoint: str = CHAT_ENDPOINT, defaults: LineDefaults = LineDefaults()) -> dict[str, Any]:
    """The question object of one request line; :class:`LineRefused` says why there is none."""
    custom_id, body = envelope(obj, endpoint)

    def refuse(reason: str) -> LineRefused:
        return LineRefused(reason, custom_id)

    if not isinstance(body.get("model"), str) or not body["model"]:
        raise refuse("body: field 'model' must be a non-empty string")
    if body.get("stream"):
        raise refuse("body: 'stream' is not supported in a batch")
    if body.get("n", 1) != 1:
        raise refuse("body: only n=1 is supported")
    question = _last_user_message(body.get("messages"), refuse)
    line: dict[str, Any] = {"custom_id": custom_id, "question": question}
    top_k = body.get("top_k", defaults.top_k)
    filter_ = body.get("filter", defaults.filter)
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    line.update({k: v for k, v in (("top_k", top_k), ("filter", filter_), ("max_tokens", max_tokens))
                 if v is not None})
    return line


def _last_user_message(messages: Any, refuse: Any) -> str:
    if not isinstance(messages, list) or not messages:
        raise refuse("body: field 'messages' must be a non-empty array")
    for n, message in enumerate(messages):
        if not isinstance(message, Mapping) or message.get("role") not in _ROLES:
            raise refuse(f"body: messages[{n}] must be an object with a role in {sorted(_ROLES)}")
    users = [m for m in messages if m["role"] == "user"]
    if not users:
        raise refuse("body: no message with role 'user' (its last one is the question)")
    content = users[-1].get("content")
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, Mapping) for p in content):
        texts = [p.get("text") for p in content if p.get("type") == "text"]
        if texts and all(isinstance(t, str) for t in texts) and len(texts) == len(content):
            return "\n".join(texts)
    raise refuse("body: the last user message's content must be a string or text parts")


def request_id(batch_id: str, index: int) -> str:
    """A stable id per output line: the same line reads the same in every rewrite of the file."""
    return f"batch_req_{uuid.uuid5(uuid.NAMESPACE_URL, f'{batch_id}/{index}').hex}"


def output_line(result: Mapping[str, Any], *, batch_id: str, index: int, created: int,
                respond: Respond | None = None) -> tuple[bool, dict[str, Any]]:
    """(ok, line): the output-file line of an answered request, else its error-file line.

    ``respond`` builds the response body of an answered line (default: a chat completion).
    """
    rid = request_id(batch_id, index)
    line: dict[str, Any] = {"id": rid, "custom_id": result.get("custom_id"), "response": None, "error": None}
    error = result.get("error")
    if error and was_refused(result):
        line["error"] = {"code": "invalid_request", "message": error}
        return False, line
    if error:
        status = int(result.get("status_code") or 500)
        line["response"] = {"status_code": status, "request_id": rid, "body": {"error": {
            "message": error, "type": "server_error" if status >= 500 else "invalid_request_error",
            "param": None, "code": None}}}
        return False, line
    body = (respond or chat_completion)(result, rid, created)
    line["response"] = {"status_code": 200, "request_id": rid, "body": body}
    return True, line


def chat_completion(result: Mapping[str, Any], rid: str, created: int) -> dict[str, Any]:
    """OpenAI's chat-completion object for one answer, plus ragq's ``sources`` and ``timings``."""
    usage = result.get("usage") or {}
    prompt = int(usage.get("prompt_tokens") or 0)
    completion = int(usage.get("completion_tokens") or 0)
    return {
        "id": f"chatcmpl-{rid.removeprefix('batch_req_')}",
        "object": "chat.completion",
        "created": created,
        "model": result.get("model") or "none",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": result.get("answer"), "refusal": None},
                     "finish_reason": "stop", "logprobs": None}],
        "usage": {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion},
        "sources": list(result.get("sources") or []),
        "timings": dict(result.get("timings") or {}),
    }
