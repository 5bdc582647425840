"""``/v1/answer``, ``/v1/search`` and ``/v1/embeddings``: synchronous requests through the workers.

Each is an ``async`` route that awaits its outcome (:mod:`producer.http.calls`), so
any number of slow answers wait without taking the threadpool from the other routes.
"""

from __future__ import annotations

import base64
from typing import Any

import numpy as np
from fastapi import APIRouter
from fastapi.exceptions import RequestValidationError

from common.embed_lines import serves_model
from common.questions import QuestionReader
from producer.http.bodies import MAX_REPORTED_ERRORS, invalid, question_errors
from producer.http.context import Context
from producer.http.schemas import (
    BODY_RESPONSES,
    WORKER_RESPONSES,
    AnswerRequest,
    AnswerResponse,
    AnswerSource,
    Embedding,
    EmbeddingsRequest,
    EmbeddingsResponse,
    EmbeddingsUsage,
    Hit,
    SearchRequest,
    SearchResponse,
    problem,
)


def workers_router(ctx: Context) -> APIRouter:
    client, calls, settings = ctx.client, ctx.calls, ctx.settings
    router = APIRouter()

    @router.post("/answer", response_model=AnswerResponse, tags=["retrieval"],
                 responses={**BODY_RESPONSES, **WORKER_RESPONSES,
                            502: problem("A worker or the LLM failed this answer (sources in the job's results).")})
    async def answer(body: AnswerRequest) -> AnswerResponse:
        """Retrieve and generate one answer through the workers, waiting up to ``timeout``.

        ``top_k`` (documents retrieved) and ``max_tokens`` (length of the answer) are separate.
        """
        line: dict[str, Any] = {"custom_id": "1", "question": body.question}
        line.update({k: v for k, v in (("top_k", body.top_k), ("filter", body.filter),
                                       ("max_tokens", body.max_tokens)) if v})
        problems = question_errors(QuestionReader())(line, ("body",))
        if problems:
            raise RequestValidationError(problems)
        result = await calls.answer(line, generate=body.generate, timeout=body.timeout)
        return AnswerResponse(
            question=result.question, answer=result.answer, model=result.model, timings=result.timings,
            usage=result.usage, job_id=result.job_id,
            sources=[AnswerSource(**{k: s.get(k) for k in AnswerSource.model_fields}) for s in result.sources],
        )

    @router.post("/search", response_model=SearchResponse, tags=["retrieval"],
                 responses={**BODY_RESPONSES, **WORKER_RESPONSES})
    async def search(body: SearchRequest) -> SearchResponse:
        """Retrieve the ``top_k`` best-matching distinct documents, through a worker."""
        request = client.search_request(body.query, top_k=body.top_k, filter=body.filter or None)
        rows = await calls.call(request, body.timeout)
        hits = [Hit(**hit) for hit in (rows[0] if rows else [])]
        return SearchResponse(query=body.query, top_k=body.top_k, hits=hits)

    @router.post("/embeddings", response_model=EmbeddingsResponse, tags=["openai"],
                 responses={**BODY_RESPONSES, **WORKER_RESPONSES})
    async def embeddings(body: EmbeddingsRequest) -> EmbeddingsResponse:
        """OpenAI-compatible embeddings computed by the workers' model (mean-pooled, L2-normalised).

        An input longer than the model's window is refused (422 naming its index), never cut.
        """
        if not serves_model(settings.embed_model, body.model):
            raise invalid(["body", "model"], f"model {body.model!r} is not served here; use {settings.embed_model!r}")
        texts = [body.input] if isinstance(body.input, str) else list(body.input)
        out = await calls.call(client.embed_request(texts), 60.0)
        if out["too_long"]:
            single = isinstance(body.input, str)
            raise RequestValidationError([
                {"type": "string_too_long", "loc": ("body", "input") if single else ("body", "input", i),
                 "msg": f"input is {out['tokens'][i]} tokens, over the model's window of {out['window']}"}
                for i in out["too_long"][:MAX_REPORTED_ERRORS]
            ])
        if body.dimensions is not None and body.dimensions != out["dimension"]:
            raise invalid(["body", "dimensions"], f"the model's vectors have {out['dimension']} dimensions")
        data = [Embedding(index=i, embedding=_encode_vector(v, body.encoding_format))
                for i, v in enumerate(out["embeddings"])]
        used = sum(out["tokens"])
        return EmbeddingsResponse(data=data, model=settings.embed_model,
                                  usage=EmbeddingsUsage(prompt_tokens=used, total_tokens=used))

    return router


def _encode_vector(vector: list[float], encoding: str) -> list[float] | str:
    if encoding == "base64":
        return base64.b64encode(np.asarray(vector, dtype="<f4").tobytes()).decode("ascii")
    return vector
