"""Request and response models of the HTTP API, and the error responses each route declares.

Kept apart from the routes so the OpenAPI document's shapes live in one place; the
limits come from :mod:`common.questions` and :mod:`common.tasknames`, the same ones the
CLI and the workers apply.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import Path
from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr, StringConstraints, field_validator

from common import tasknames
from common.questions import MAX_ANSWER_TOKENS, MAX_QUESTION_CHARS, MAX_TOP_K

JobId = Annotated[str, Path(pattern=r"^[A-Za-z0-9_.-]{1,128}$",
                            description="A job id returned by `POST /v1/ingest` or `POST /v1/questions`.")]


class Document(BaseModel):
    """One document in the corpus format; fields beyond these are kept as payload."""

    model_config = ConfigDict(extra="allow", json_schema_extra={"examples": [{
        "content": "Cloud Disk Service provides block storage for instances.", "title": "Cloud Disk",
        "product": "Cloud Disk Service", "url": "https://docs.example.com/disk/overview"}]})

    content: str = Field(min_length=1, description="The text to chunk, embed and store (not blank).")
    title: str | None = None
    product: str | None = Field(None, description="Searches can be restricted to one product.")
    url: str | None = Field(None, description="Also the document's key when it has no `id`.")
    id: str | int | None = Field(None, description="Stable key: sending the same id again replaces the document.")




Text = Annotated[str, StringConstraints(min_length=1)]
Int64 = Annotated[StrictInt, Field(ge=-(2**63), le=2**63 - 1)]
FilterValue = StrictStr | Int64 | Annotated[list[StrictStr], Field(min_length=1)] | Annotated[
    list[Int64], Field(min_length=1)]
FieldName = Annotated[str, StringConstraints(pattern=r"^[A-Za-z_][A-Za-z0-9_]{0,63}$")]
Filter = Annotated[dict[FieldName, FilterValue], Field(
    max_length=16,
    description='Exact match on payload fields, e.g. {"product": "Cloud DNS"}; a list matches any of its values.')]


class Hit(BaseModel):
    url: str
    title: str
    product: str
    score: float
    text: str


class SearchRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    query: Annotated[str, StringConstraints(min_length=1, max_length=10_000)]
    top_k: int = Field(5, ge=1, le=100, description="Distinct documents to return.")
    filter: Filter | None = None
    timeout: float = Field(30.0, gt=0, le=300, description="Seconds to wait for a worker; 504 after that.")


class DeleteRequest(BaseModel):
    """Which documents ``DELETE /v1/documents`` deletes: every condition must hold.

    Values are checked by :class:`common.deletion.DeleteSelector`, as for ``ragq delete``.
    """

    model_config = ConfigDict(extra="forbid")

    doc_key: str | list[str] | None = Field(None, description="Document keys (id, url or resolved path).")
    url: str | list[str] | None = None
    product: str | list[str] | None = None
    filter: dict[str, Any] | None = Field(None, description="Payload field -> value (str or int) or list of values.")


class SearchResponse(BaseModel):
    query: str
    top_k: int
    hits: list[Hit]


class QuestionLine(BaseModel):
    """One line of a question job (the format of `ragq ask-file`); other fields are ignored."""

    model_config = ConfigDict(extra="allow", json_schema_extra={"examples": [{
        "custom_id": "q1", "question": "How do I resize a cloud disk?", "top_k": 5,
        "filter": {"product": "Cloud Disk Service"}}]})

    custom_id: StrictStr | Int64 | None = Field(
        None, description="Echoed on the result line; unique in the job. Defaults to the line number "
                          "(the 1-based position in a JSON array).")
    question: Annotated[str, StringConstraints(min_length=1, max_length=MAX_QUESTION_CHARS)]
    top_k: int | None = Field(None, ge=1, le=MAX_TOP_K, description="Documents retrieved (default RAGQ_TOP_K).")
    max_tokens: int | None = Field(None, ge=1, le=MAX_ANSWER_TOKENS,
                                   description="Most tokens in this answer (default RAGQ_LLM_MAX_TOKENS).")
    filter: Filter | None = None




class AnswerRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    question: Annotated[str, StringConstraints(min_length=1, max_length=MAX_QUESTION_CHARS)]
    top_k: int | None = Field(None, ge=1, le=MAX_TOP_K,
                              description="Documents retrieved for the prompt (default RAGQ_TOP_K).")
    max_tokens: int | None = Field(None, ge=1, le=MAX_ANSWER_TOKENS, description=(
        "Most tokens to generate for this answer (default RAGQ_LLM_MAX_TOKENS)."))
    filter: Filter | None = None
    generate: bool = Field(True, description="false: retrieval only (sources, `answer` null).")
    timeout: float = Field(120.0, gt=0, le=600, description="Seconds to wait for the answer; 504 after that.")


class AnswerSource(Hit):
    ref: int | None = Field(None, description="Its [n] in the prompt; null if it did not fit the context.")


class AnswerResponse(BaseModel):
    question: str
    answer: str | None = Field(description="null for a retrieval-only request or the `none` LLM backend.")
    sources: list[AnswerSource]
    model: str | None
    timings: dict[str, float]
    usage: dict[str, int | None] | None
    job_id: str


class EmbeddingsRequest(BaseModel):
    """OpenAI's embeddings request (token-array inputs are not supported)."""

    input: Text | Annotated[list[Text], Field(min_length=1, max_length=tasknames.EMBED_MAX_INPUTS)] = Field(
        description=f"A string or a list of up to {tasknames.EMBED_MAX_INPUTS} strings (not empty), "
                    f"{tasknames.EMBED_MAX_CHARS} characters in all; each must fit the model's window.")
    model: str = Field(description="The embedding model the workers serve (`RAGQ_EMBED_MODEL`).")
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(None, ge=1, description="Must equal the model's dimension if given.")
    user: str | None = None

    @field_validator("input")
    @classmethod
    def _bounded(cls, value: str | list[str]) -> str | list[str]:
        size = len(value) if isinstance(value, str) else sum(map(len, value))
        if size > tasknames.EMBED_MAX_CHARS:
            raise ValueError(f"inputs hold {size} characters in all, over the limit of {tasknames.EMBED_MAX_CHARS}")
        return value


class Embedding(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str = Field(description="Floats, or base64 of little-endian float32 values.")


class EmbeddingsUsage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class EmbeddingsResponse(BaseModel):
    object: Literal["list"] = "list"
    data: list[Embedding]
    model: str
    usage: EmbeddingsUsage


class Health(BaseModel):
    status: Literal["ok", "unavailable"]
    checks: dict[str, Any] | None = Field(
        None, description="redis, store and queues; left out for callers without the token.")


class Problem(BaseModel):
    detail: Any



def problem(description: str) -> dict[str, Any]:
    return {"model": Problem, "description": description}


#: Every /v1 route: the token, and the body limit (a too-large Content-Length is refused
#: before the route runs, whatever the route).
V1_RESPONSES: dict[int | str, dict[str, Any]] = {
    401: problem("Missing or wrong bearer token."),
    413: {"description": "Request body over RAGQ_HTTP_MAX_BODY_BYTES (plain text when Content-Length announced it).",
          "content": {"application/json": {"schema": Problem.model_json_schema()},
                      "text/plain": {"schema": {"type": "string"}}}},
}
BODY_RESPONSES: dict[int | str, dict[str, Any]] = {400: problem("The body could not be decoded.")}
WORKER_RESPONSES: dict[int | str, dict[str, Any]] = {
    502: problem("A worker failed the request."),
    503: problem("Redis or the broker is unreachable."),
    504: problem("No worker answered within the timeout."),
}
STORE_RESPONSES: dict[int | str, dict[str, Any]] = {503: problem("Redis is unreachable.")}
#: Declared by hand where FastAPI does not see a body model (hand-parsed JSONL/JSON bodies).
VALIDATION_RESPONSE: dict[int | str, dict[str, Any]] = {422: {
    "description": "Validation Error",
    "content": {"application/json": {"schema": {"$ref": "#/components/schemas/HTTPValidationError"}}},
}}
JOB_NOT_FOUND: dict[int | str, dict[str, Any]] = {404: problem("No such job (expired or never created).")}

