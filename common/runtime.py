"""Per-process resources a worker keeps loaded: Redis client, embedder, store, generator.

Each getter builds its resource on first use under a lock and then returns the same
object, so a model is loaded once per worker process (never per task), and a warm-up
thread started at worker start and the first task never load it twice.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING

import redis

from common.config import Settings
from common.jobs import JobRecord

if TYPE_CHECKING:
    from common.embedding import Embedder
    from common.generators import Generator
    from common.ingest import Ingestor
    from common.remote_store import Transport
    from common.vectorstore import Store


def redis_client(settings: Settings) -> redis.Redis:
    """A Redis client that reconnects and retries briefly on connection errors."""
    from redis.backoff import ExponentialBackoff
    from redis.retry import Retry

    return redis.Redis.from_url(
        settings.redis_dsn,
        decode_responses=True,
        health_check_interval=30,
        socket_keepalive=True,
        retry=Retry(ExponentialBackoff(cap=2.0, base=0.1), retries=8),
        retry_on_error=[redis.ConnectionError, redis.TimeoutError],
    )


class Runtime:
    """The lazily loaded resources of one worker process.

    ``store_transport`` is given to a process that uses the embedded store without owning
    it: its store is then a :class:`~common.remote_store.RemoteStore` over that transport.
    """

    def __init__(self, settings: Settings, store_transport: Transport | None = None) -> None:
        self.settings = settings
        self.store_transport = store_transport
        self.redis = redis_client(settings)
        # One lock per resource: loading a large LLM must not hold up the embedder or
        # the store, which an ingest batch or a search needs at once.
        self._locks = {name: threading.Lock() for name in ("embedder", "store", "ingestor", "generator")}
        self._embedder: Embedder | None = None
        self._store: Store | None = None
        self._ingestor: Ingestor | None = None
        self._generator: Generator | None = None

    def job(self, job_id: str) -> JobRecord:
        return JobRecord(self.redis, job_id, prefix=self.settings.key_prefix, ttl=self.settings.job_ttl_s)

    def embedder(self) -> Embedder:
        with self._locks["embedder"]:
            if self._embedder is None:
                from common.embedding import Embedder

                s = self.settings
                self._embedder = Embedder(s.embed_model, s.device, s.embed_batch_tokens, s.torch_threads)
            return self._embedder

    def store(self) -> Store:
        with self._locks["store"]:
            if self._store is None:
                if self.store_transport is not None:
                    from common.remote_store import RemoteStore

                    s = self.settings
                    self._store = RemoteStore(
                        self.redis, self.store_transport, collection=s.collection,
                        location=str(s.store_dir / s.collection), queue=s.store_queue,
                        prefix=s.key_prefix, timeout_s=s.store_request_timeout_s)
                else:
                    from common.vectorstore import open_store

                    self._store = open_store(self.settings)
            return self._store

    def ingestor(self) -> Ingestor:
        with self._locks["ingestor"]:
            if self._ingestor is None:
                from common.ingest import Ingestor

                s = self.settings
                self._ingestor = Ingestor(self.embedder(), self.store(), s.chunk_tokens, s.chunk_overlap)
            return self._ingestor

    def generator(self) -> Generator:
        with self._locks["generator"]:
            if self._generator is None:
                from common.generators import build_generator

                self._generator = build_generator(self.settings)
            return self._generator

    def close(self) -> None:
        with self._locks["store"]:
            if self._store is not None:
                self._store.close()
                self._store = None
        with self._locks["generator"]:
            if self._generator is not None:
                self._generator.close()
                self._generator = None
