"""``ragq serve``: the HTTP front door to the same queue (FastAPI; OpenAPI at ``/openapi.json``).

The server is a producer like the CLI: it validates requests, enqueues jobs and sends
tasks by name through :class:`producer.client.Client`, and reads job records. It never
loads a model: search, answers and embeddings are computed by the workers, so a server
in front of GPU workers costs no GPU memory and starts in a second.

Errors carry real status codes and FastAPI's ``{"detail": ...}`` body: 401 without the
configured bearer token, 404 for an unknown job, 409 to cancel a finished job, 413 over
``RAGQ_HTTP_MAX_BODY_BYTES``, 415 for a body type other than JSON or JSONL, 422 for
invalid input (each ``detail[].loc`` names the field), 502 when a worker failed the
request, 503 when Redis or the broker is unreachable, 504 when no worker answered in time.
"""

from __future__ import annotations

import base64
import email.message
import hmac
import json
import logging
import re
from collections.abc import Callable
from typing import Annotated, Any, Literal, TypeVar

import numpy as np
import redis
from fastapi import APIRouter, Depends, FastAPI, HTTPException, Path, Query, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from kombu.exceptions import OperationalError
from pydantic import (
    BaseModel, ConfigDict, Field, StrictInt, StrictStr, StringConstraints, TypeAdapter, ValidationError,
    field_validator,
)

from common import tasknames
from common.config import Settings
from common.inputs import document_from_object
from common.jobs import JobInfo
from common.questions import MAX_ANSWER_TOKENS, MAX_QUESTION_CHARS, MAX_TOP_K, QuestionReader
from common.schemas import ItemError, JobStatus
from producer.client import Client, JobTimeout, RagqError, WorkerFailed, WorkerTimeout

log = logging.getLogger("ragq.http")

T = TypeVar("T")

#: Seconds ``/health`` waits for workers to answer a broadcast, and for the store check.
HEALTH_INSPECT_TIMEOUT_S = 1.0
HEALTH_STORE_TIMEOUT_S = 5.0
#: Validation errors listed in one 422 answer for an ingest body.
_MAX_REPORTED_ERRORS = 50

JSONL_TYPES = {"application/x-ndjson", "application/jsonl", "application/x-jsonlines",
               "application/jsonlines", "application/json-lines"}
JobId = Annotated[str, Path(pattern=r"^[A-Za-z0-9_.-]{1,128}$",
                            description="A job id returned by `POST /v1/ingest` or `POST /v1/questions`.")]


# -- request and response models --------------------------------------------------------

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


_DOCUMENT = TypeAdapter(Document)

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


_QUESTION = TypeAdapter(QuestionLine)


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


def _problem(description: str) -> dict[str, Any]:
    return {"model": Problem, "description": description}


#: Every /v1 route: the token, and the body limit (a too-large Content-Length is refused
#: before the route runs, whatever the route).
V1_RESPONSES: dict[int | str, dict[str, Any]] = {
    401: _problem("Missing or wrong bearer token."),
    413: {"description": "Request body over RAGQ_HTTP_MAX_BODY_BYTES (plain text when Content-Length announced it).",
          "content": {"application/json": {"schema": Problem.model_json_schema()},
                      "text/plain": {"schema": {"type": "string"}}}},
}
BODY_RESPONSES: dict[int | str, dict[str, Any]] = {400: _problem("The body could not be decoded.")}
WORKER_RESPONSES: dict[int | str, dict[str, Any]] = {
    502: _problem("A worker failed the request."),
    503: _problem("Redis or the broker is unreachable."),
    504: _problem("No worker answered within the timeout."),
}
STORE_RESPONSES: dict[int | str, dict[str, Any]] = {503: _problem("Redis is unreachable.")}
#: Declared by hand where FastAPI does not see a body model (hand-parsed JSONL/JSON bodies).
VALIDATION_RESPONSE: dict[int | str, dict[str, Any]] = {422: {
    "description": "Validation Error",
    "content": {"application/json": {"schema": {"$ref": "#/components/schemas/HTTPValidationError"}}},
}}
JOB_NOT_FOUND: dict[int | str, dict[str, Any]] = {404: _problem("No such job (expired or never created).")}


# -- the app ----------------------------------------------------------------------------

def create_app(settings: Settings | None = None, *, client: Client | None = None) -> FastAPI:
    """The FastAPI app of ``ragq serve``; ``client`` defaults to one built from ``settings``."""
    settings = settings or (client.settings if client else Settings())
    client = client or Client(settings)
    token = settings.api_token.get_secret_value() if settings.api_token else ""
    scrub = _scrubber(settings)
    # Short timeouts and no retries: /health and sorting out failures must answer fast.
    probe = redis.Redis.from_url(settings.redis_dsn, socket_connect_timeout=1.0, socket_timeout=2.0)

    app = FastAPI(
        title="ragq",
        version=_version(),
        summary="Queue documents and questions for GPU-pinned RAG workers; search, answer and embed through them.",
        max_body_size=settings.http_max_body_bytes,
    )
    authorize = _bearer_check(token)
    v1 = APIRouter(prefix="/v1", dependencies=[Depends(authorize)], responses=V1_RESPONSES)

    # -- jobs --------------------------------------------------------------------------
    @v1.post(
        "/ingest", status_code=202, response_model=JobInfo, tags=["jobs"],
        responses={**BODY_RESPONSES, 415: _problem("Body neither JSON nor JSONL."), **VALIDATION_RESPONSE,
                   **STORE_RESPONSES},
        openapi_extra=_documents_body(),
    )
    async def ingest(request: Request, response: Response) -> JobInfo:
        """Queue documents for embedding and upsert: a JSON array, or JSONL (one object per line).

        The whole body is validated first: any invalid document answers 422 naming it
        (``["body", 3, "content"]``, or ``["body", "line 4", ...]`` for JSONL) and nothing
        is queued. Returns the job (as ``ragq status --json`` prints it) with 202.
        """
        body = await request.body()  # bounded by max_body_size: 413 past it
        docs = await run_in_threadpool(_parse_documents, body, request.headers.get("content-type"))
        job = await run_in_threadpool(client.ingest_documents, docs, source="http")
        info = await run_in_threadpool(job.refresh)
        response.headers["Location"] = f"/v1/jobs/{job.id}"
        return info

    @v1.get("/jobs/{job_id}", response_model=JobInfo, tags=["jobs"], responses={**JOB_NOT_FOUND, **STORE_RESPONSES})
    def get_job(job_id: JobId) -> JobInfo:
        """A job's status, counts, throughput and per-item errors."""
        return _existing(client, job_id)

    @v1.get(
        "/jobs/{job_id}/results", tags=["jobs"], response_class=StreamingResponse,
        responses={200: {"description": "One JSON object per line, in input order.",
                         "content": {"application/x-ndjson": {"schema": {"type": "string"}}}},
                   **JOB_NOT_FOUND, **STORE_RESPONSES},
    )
    def job_results(job_id: JobId) -> StreamingResponse:
        """Stream the result lines finished so far as JSONL (partial while the job runs).

        ``X-Ragq-Job-Status`` tells whether more may come; ingest jobs have no result lines.
        """
        info = _existing(client, job_id)
        lines = list(client.job(job_id).results())
        return StreamingResponse(
            (json.dumps(line, ensure_ascii=False) + "\n" for line in lines),
            media_type="application/x-ndjson",
            headers={"X-Ragq-Job-Status": info.status, "X-Ragq-Job-Finished": str(info.is_finished).lower()},
        )

    @v1.post("/jobs/{job_id}/cancel", response_model=JobInfo, tags=["jobs"],
             responses={**JOB_NOT_FOUND, 409: _problem("The job had already finished."), **STORE_RESPONSES})
    def cancel_job(job_id: JobId) -> JobInfo:
        """Cancel a queued or running job: workers skip its remaining batches."""
        job = client.job(job_id)
        if not job.cancel():
            info = _existing(client, job_id)
            raise HTTPException(409, f"job {job_id} already finished ({info.status})")
        return job.refresh()

    @v1.post(
        "/questions", status_code=202, response_model=JobInfo, tags=["jobs"],
        responses={**BODY_RESPONSES, 415: _problem("Body neither JSONL nor JSON."), **VALIDATION_RESPONSE,
                   **STORE_RESPONSES},
        openapi_extra=_lines_body("QuestionLine"),
    )
    async def questions(
        request: Request,
        response: Response,
        generate: Annotated[bool, Query(description="false: a retrieval-only job (sources, no answers).")] = True,
    ) -> JobInfo:
        """Queue a question job: JSONL (one question object per line) or a JSON array of them.

        Like ingest, the body is validated first and any invalid line answers 422 naming
        it. Answers come from ``GET /v1/jobs/{id}/results``, one line per question, in order.
        """
        body = await request.body()
        lines = await run_in_threadpool(_parse_questions, body, request.headers.get("content-type"))
        job = await run_in_threadpool(client.ask_many, lines, generate=generate)
        info = await run_in_threadpool(job.refresh)
        response.headers["Location"] = f"/v1/jobs/{job.id}"
        return info

    # -- synchronous requests through the workers -------------------------------------------
    @v1.post("/answer", response_model=AnswerResponse, tags=["retrieval"],
             responses={**BODY_RESPONSES, **WORKER_RESPONSES,
                        502: _problem("A worker or the LLM failed this answer (sources in the job's results).")})
    def answer(body: AnswerRequest) -> AnswerResponse:
        """Retrieve and generate one answer through the workers, waiting up to ``timeout``.

        ``top_k`` (documents retrieved) and ``max_tokens`` (length of the answer) are separate.
        """
        line: dict[str, Any] = {"custom_id": "1", "question": body.question}
        line.update({k: v for k, v in (("top_k", body.top_k), ("filter", body.filter),
                                       ("max_tokens", body.max_tokens)) if v})
        problems = _question_errors(QuestionReader())(line, ("body",))
        if problems:
            raise RequestValidationError(problems)
        job = client.ask_many([line], generate=body.generate)
        try:
            job.wait(body.timeout, poll_s=0.1)
        except JobTimeout:
            job.cancel()
            taken = job.refresh().started_at is not None
            raise WorkerTimeout(
                f"no answer within {body.timeout:g}s (job {job.id} cancelled)" if taken else
                f"no worker took the question within {body.timeout:g}s: is one running on the "
                f"{settings.qa_queue!r} queue?") from None
        answers = job.answers()
        if not answers or answers[0].error:
            reason = answers[0].error if answers else "no answer line"
            raise HTTPException(502, scrub(f"the answer failed: {reason} (job {job.id})")[:1000])
        result = answers[0]
        return AnswerResponse(
            question=result.question, answer=result.answer, model=result.model, timings=result.timings,
            usage=result.usage, job_id=job.id,
            sources=[AnswerSource(**{k: s.get(k) for k in AnswerSource.model_fields}) for s in result.sources],
        )

    @v1.post("/search", response_model=SearchResponse, tags=["retrieval"],
             responses={**BODY_RESPONSES, **WORKER_RESPONSES})
    def search(body: SearchRequest) -> SearchResponse:
        """Retrieve the ``top_k`` best-matching distinct documents, through a worker."""
        rows = _from_worker(scrub, probe, client.search, body.query, top_k=body.top_k,
                            filter=body.filter or None, timeout=body.timeout)
        hits = [Hit(**source.__dict__) for source in (rows[0] if rows else [])]
        return SearchResponse(query=body.query, top_k=body.top_k, hits=hits)

    @v1.post("/embeddings", response_model=EmbeddingsResponse, tags=["openai"],
             responses={**BODY_RESPONSES, **WORKER_RESPONSES})
    def embeddings(body: EmbeddingsRequest) -> EmbeddingsResponse:
        """OpenAI-compatible embeddings computed by the workers' model (mean-pooled, L2-normalised).

        An input longer than the model's window is refused (422 naming its index), never cut.
        """
        if not _serves_model(settings.embed_model, body.model):
            raise _invalid(["body", "model"], f"model {body.model!r} is not served here; use {settings.embed_model!r}")
        texts = [body.input] if isinstance(body.input, str) else list(body.input)
        out = _from_worker(scrub, probe, client.embed, texts, timeout=60.0)
        if out["too_long"]:
            single = isinstance(body.input, str)
            raise RequestValidationError([
                {"type": "string_too_long", "loc": ("body", "input") if single else ("body", "input", i),
                 "msg": f"input is {out['tokens'][i]} tokens, over the model's window of {out['window']}"}
                for i in out["too_long"][:_MAX_REPORTED_ERRORS]
            ])
        if body.dimensions is not None and body.dimensions != out["dimension"]:
            raise _invalid(["body", "dimensions"], f"the model's vectors have {out['dimension']} dimensions")
        data = [Embedding(index=i, embedding=_encode_vector(v, body.encoding_format))
                for i, v in enumerate(out["embeddings"])]
        used = sum(out["tokens"])
        return EmbeddingsResponse(data=data, model=settings.embed_model,
                                  usage=EmbeddingsUsage(prompt_tokens=used, total_tokens=used))

    app.include_router(v1)

    # -- health ------------------------------------------------------------------------------
    @app.get("/health", response_model=Health, tags=["health"],
             responses={503: {"model": Health, "description": "Something is unavailable; see checks."}})
    def health(request: Request) -> JSONResponse:
        """Redis, the vector store (through a worker) and a consumer on each queue: 200 or 503.

        Details are given to callers with the token (or to anyone when no token is set).
        """
        checks = _health_checks(client, settings, scrub, probe)
        ok = all(check["ok"] for check in checks.values())
        shown = checks if _authorized(request, token) else None
        body = Health(status="ok" if ok else "unavailable", checks=shown)
        return JSONResponse(body.model_dump(exclude_none=True), status_code=200 if ok else 503)

    _install_error_handlers(app, scrub)
    _document_bodies(app)
    return app


# -- helpers ------------------------------------------------------------------------------------

def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("ragq")
    except PackageNotFoundError:
        return "0"


def _bearer_check(token: str) -> Callable[..., None]:
    """A dependency that requires ``Authorization: Bearer <token>`` when a token is set."""
    scheme = HTTPBearer(auto_error=False, description="The server's RAGQ_API_TOKEN, when it sets one.")
    expected = token.encode("utf-8")

    def require_token(credentials: HTTPAuthorizationCredentials | None = Depends(scheme)) -> None:
        if not expected:
            return
        given = credentials.credentials.encode("utf-8") if credentials else b""
        if not hmac.compare_digest(given, expected):  # constant time in the token's content
            raise HTTPException(401, "missing or wrong bearer token", headers={"WWW-Authenticate": "Bearer"})

    return require_token


def _authorized(request: Request, token: str) -> bool:
    if not token:
        return True
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode("utf-8"), token.encode("utf-8"))


def _scrubber(settings: Settings) -> Callable[[str], str]:
    """Replace every configured secret in a message with ``***`` before it leaves the server."""
    from urllib.parse import urlsplit

    secrets = [s.get_secret_value() for s in (settings.api_token, settings.qdrant_api_key, settings.llm_api_key) if s]
    password = urlsplit(settings.redis_dsn).password
    secrets += [settings.redis_dsn] + ([password] if password else [])
    secrets = sorted({s for s in secrets if s}, key=len, reverse=True)

    def scrub(text: str) -> str:
        for secret in secrets:
            text = text.replace(secret, "***")
        return text

    return scrub


def _install_error_handlers(app: FastAPI, scrub: Callable[[str], str]) -> None:
    def answer(status: int, message: str) -> JSONResponse:
        return JSONResponse({"detail": scrub(message)}, status_code=status)

    @app.exception_handler(WorkerTimeout)
    async def _timeout(_: Request, exc: WorkerTimeout) -> JSONResponse:
        return answer(504, str(exc))

    @app.exception_handler(RagqError)
    async def _unavailable(_: Request, exc: RagqError) -> JSONResponse:
        return answer(503, str(exc))

    @app.exception_handler(redis.RedisError)
    async def _redis(_: Request, exc: redis.RedisError) -> JSONResponse:
        log.warning("Redis error: %s", scrub(str(exc)))
        return answer(503, f"Redis is unavailable ({type(exc).__name__})")

    @app.exception_handler(OperationalError)
    async def _broker(_: Request, exc: OperationalError) -> JSONResponse:
        log.warning("broker error: %s", scrub(str(exc)))
        return answer(503, "the message broker is unavailable")


def _from_worker(
    scrub: Callable[[str], str], probe: redis.Redis, call: Callable[..., T], *args: Any, **kwargs: Any
) -> T:
    """Run a synchronous worker request: a failure inside the worker becomes a 502, one
    because Redis went away (Celery raises a bare RuntimeError then) a 503."""
    try:
        return call(*args, **kwargs)
    except WorkerFailed as exc:
        log.warning("worker request failed: %s", scrub(str(exc)))
        raise HTTPException(502, scrub(str(exc))[:600]) from None
    except (RagqError, redis.RedisError, OperationalError):
        raise
    except Exception as exc:  # raised by Celery (e.g. Redis gone mid-request)
        log.warning("worker request failed: %s: %s", type(exc).__name__, scrub(str(exc)))
        if not _answers(probe):
            raise HTTPException(503, "Redis is unavailable") from None
        raise HTTPException(502, f"the worker failed: {type(exc).__name__}: {scrub(str(exc))[:500]}") from None


def _answers(probe: redis.Redis) -> bool:
    try:
        return bool(probe.ping())
    except redis.RedisError:
        return False


def _existing(client: Client, job_id: str) -> JobInfo:
    info = client.job(job_id).refresh()
    if info.status == JobStatus.not_found.value:
        raise HTTPException(404, f"job {job_id} not found (expired or never created)")
    return info


def _invalid(loc: list[str | int], msg: str) -> RequestValidationError:
    return RequestValidationError([{"type": "value_error", "loc": tuple(loc), "msg": msg}])


def _serves_model(served: str, asked: str) -> bool:
    """The configured model, by its full name or its last path component."""
    names = {served.lower(), served.rstrip("/").rsplit("/", 1)[-1].lower()}
    return asked.lower() in names


def _encode_vector(vector: list[float], encoding: str) -> list[float] | str:
    if encoding == "base64":
        return base64.b64encode(np.asarray(vector, dtype="<f4").tobytes()).decode("ascii")
    return vector


# -- ingest bodies ---------------------------------------------------------------------------------

def _documents_body() -> dict[str, Any]:
    return _lines_body("Document")


def _lines_body(model: str) -> dict[str, Any]:
    """A body of many objects: JSONL (one per line) or a JSON array; both are described as arrays."""
    schema = {"type": "array", "minItems": 1, "items": {"$ref": f"#/components/schemas/{model}"}}
    return {"requestBody": {"required": True, "content": {
        "application/json": {"schema": schema},
        "application/x-ndjson": {"schema": schema, "description": f"JSONL: one {model} object per line."},
    }}}


def _document_bodies(app: FastAPI) -> None:
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


def _parse_documents(body: bytes, content_type: str | None) -> list[Any]:
    """The documents of an ingest body, or a 422 that names every invalid one."""
    return [obj for _, obj in _parse_body(body, content_type, _document_errors, what="documents")]


def _parse_body(body: bytes, content_type: str | None, check: Check, *, what: str) -> list[Located]:
    """A JSON array or JSONL body, each value checked; one 422 lists every problem in body order."""
    kind = _body_kind(content_type, body)
    try:
        text = body.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise _invalid(["body"], f"the body is not valid UTF-8 (byte {exc.start})") from None
    if kind == "json":
        try:
            data = json.loads(text)
        except (json.JSONDecodeError, RecursionError) as exc:
            raise _json_error(exc, ("body",)) from None
        if not isinstance(data, list):
            raise _invalid(["body"], f"expected a JSON array of {what} (send JSONL as application/x-ndjson)")
        located: list[Located] = [(("body", n), obj) for n, obj in enumerate(data)]
    else:
        located = [(("body", f"line {lineno}"), line) for lineno, line in enumerate(text.splitlines(), start=1)
                   if line.strip()]
    if not located:
        raise _invalid(["body"], f"no {what}")
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
        if len(errors) >= _MAX_REPORTED_ERRORS:
            break
        values.append((loc, obj))
    if errors:
        raise RequestValidationError(errors[:_MAX_REPORTED_ERRORS])
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


def _parse_questions(body: bytes, content_type: str | None) -> list[Any]:
    """The question objects of a body, each with its custom_id (default: its line number)."""
    located = _parse_body(body, content_type, _question_errors(QuestionReader()), what="questions")
    return [{**obj, "custom_id": _default_id(loc) if obj.get("custom_id") is None else obj["custom_id"]}
            for loc, obj in located]


def _default_id(loc: tuple[Any, ...]) -> str:
    where = loc[-1]
    return str(where + 1) if isinstance(where, int) else str(where).removeprefix("line ")


_QUESTION_FIELD = re.compile(r"(?:field|filter) '(\w+)'|(question|custom_id)")


def _question_errors(reader: QuestionReader) -> Check:
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


# -- health ------------------------------------------------------------------------------------------

def _health_checks(
    client: Client, settings: Settings, scrub: Callable[[str], str], probe: redis.Redis
) -> dict[str, dict[str, Any]]:
    checks: dict[str, dict[str, Any]] = {}
    try:
        probe.ping()
        checks["redis"] = {"ok": True}
    except redis.RedisError as exc:
        checks["redis"] = {"ok": False, "error": scrub(f"{type(exc).__name__}: {exc}")}
        checks["queues"] = {"ok": False, "error": "not checked: Redis is unreachable"}
        checks["store"] = {"ok": False, "error": "not checked: Redis is unreachable"}
        return checks

    # with the embedded store, its owner consumes the store queue; searches need it too
    queues = (settings.ingest_queue, settings.qa_queue) + (() if settings.qdrant_url else (settings.store_queue,))
    consumers = _consumers(client, queues)
    missing = [q for q in queues if not consumers.get(q)]
    checks["queues"] = {
        "ok": not missing,
        **{q: {"workers": consumers.get(q, []), "waiting": depth} for q, depth in client.queue_depths().items()},
    }
    if missing:
        checks["queues"]["error"] = f"no worker consumes {', '.join(repr(q) for q in missing)}"
    if not consumers.get(settings.qa_queue):
        checks["store"] = {"ok": False, "error": f"not checked: no worker consumes {settings.qa_queue!r}"}
        return checks
    try:
        info = client.store_info(timeout=HEALTH_STORE_TIMEOUT_S)
        checks["store"] = {"ok": True, "collection": info.get("name"), "points": info.get("points"),
                           "model": info.get("model"), "backend": info.get("backend")}
    except Exception as exc:  # a timeout, or the store failing inside the worker
        checks["store"] = {"ok": False, "error": scrub(f"{type(exc).__name__}: {exc}")[:500]}
    return checks


def _consumers(client: Client, queues: tuple[str, ...]) -> dict[str, list[str]]:
    """Workers consuming each queue, from a broadcast with a short timeout."""
    try:
        replies = client.celery.control.inspect(timeout=HEALTH_INSPECT_TIMEOUT_S).active_queues() or {}
    except Exception as exc:  # the broker went away between the ping and the broadcast
        log.warning("inspect failed: %s", type(exc).__name__)
        return {}
    found: dict[str, list[str]] = {q: [] for q in queues}
    for worker, consumed in sorted(replies.items()):
        for queue in consumed or []:
            if queue.get("name") in found:
                found[queue["name"]].append(worker)
    return found
