"""The FastAPI app of ``ragq serve``: assembled from the token gate, the routers and the error handlers."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import redis
from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import JSONResponse
from kombu.exceptions import OperationalError
from redis import asyncio as aioredis

from common.config import Settings
from common.files import FileStore
from common.jobs import JobRecord
from producer.client import Client, RagqError, WorkerTimeout
from producer.http.auth import TokenGate, authorized, bearer_dependency
from producer.http.bodies import document_bodies
from producer.http.calls import WorkerCalls
from producer.http.context import Context
from producer.http.health import HealthCheck
from producer.http.notify import Notifier
from producer.http.routes_batches import batches_router
from producer.http.routes_files import files_router
from producer.http.routes_jobs import jobs_router
from producer.http.routes_workers import workers_router
from producer.http.schemas import V1_RESPONSES, Health
from producer.webhooks import start_thread

log = logging.getLogger("ragq.http")


def create_app(settings: Settings | None = None, *, client: Client | None = None) -> FastAPI:
    """The FastAPI app of ``ragq serve``; ``client`` defaults to one built from ``settings``."""
    ctx = build_context(settings, client)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        sender, stop = start_thread(ctx.client, ctx.files)  # webhook events, off the event loop
        yield
        stop.set()
        sender.join(ctx.settings.webhook_timeout_s + 5)
        await ctx.notifier.close()
        await ctx.aredis.aclose()

    app = FastAPI(
        title="ragq",
        version=_version(),
        summary="Queue documents and questions for GPU-pinned RAG workers; search, answer and embed through them.",
        max_body_size=ctx.settings.http_max_body_bytes,
        lifespan=lifespan,
    )
    app.add_middleware(TokenGate, token=ctx.token)  # 401 before any body is read
    v1 = APIRouter(prefix="/v1", dependencies=[Depends(bearer_dependency(ctx.token))], responses=V1_RESPONSES)
    v1.include_router(jobs_router(ctx))
    v1.include_router(workers_router(ctx))
    v1.include_router(files_router(ctx))
    v1.include_router(batches_router(ctx))
    app.include_router(v1)

    @app.get("/health", response_model=Health, tags=["health"],
             responses={503: {"model": Health, "description": "Something is unavailable; see checks."}})
    async def health(request: Request) -> JSONResponse:
        """Redis, a consumer on each queue and the vector store (as its owner last reported it): 200 or 503.

        Nothing is queued behind bulk work; the result is cached for a few seconds.
        Details are given to callers with the token (or to anyone when no token is set).
        """
        checks = await ctx.health.checks()
        ok = all(check["ok"] for check in checks.values())
        shown = checks if authorized(request, ctx.token) else None
        body = Health(status="ok" if ok else "unavailable", checks=shown)
        return JSONResponse(body.model_dump(exclude_none=True), status_code=200 if ok else 503)

    _install_error_handlers(app, ctx.scrub)
    document_bodies(app)
    return app


def build_context(settings: Settings | None, client: Client | None) -> Context:
    settings = settings or (client.settings if client else Settings())
    client = client or Client(settings)
    token = settings.api_token.get_secret_value() if settings.api_token else ""
    scrub = _scrubber(settings)
    probe = redis.Redis.from_url(settings.redis_dsn, socket_connect_timeout=1.0, socket_timeout=2.0)
    # Waits run on the event loop: an asyncio client (no retries: a waiter re-checks anyway).
    aredis = aioredis.Redis.from_url(settings.redis_dsn, decode_responses=True, socket_connect_timeout=2.0,
                                     health_check_interval=30, socket_keepalive=True)
    notifier = Notifier(aredis, keyed_channel=JobRecord.finished_channel(settings.key_prefix))
    calls = WorkerCalls(client, aredis, notifier, scrub, probe)
    return Context(settings=settings, client=client, token=token, scrub=scrub, probe=probe, aredis=aredis,
                   notifier=notifier, calls=calls, health=HealthCheck(client, settings, scrub, probe),
                   files=FileStore.from_settings(settings))


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("ragq")
    except PackageNotFoundError:
        return "0"


def _scrubber(settings: Settings) -> Callable[[str], str]:
    """Replace every configured secret in a message with ``***`` before it leaves the server."""
    from urllib.parse import urlsplit

    secrets = [s.get_secret_value() for s in (settings.api_token, settings.qdrant_api_key, settings.llm_api_key,
                                              settings.webhook_secret) if s]
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
