"""Per-process resources a worker keeps loaded: Redis client, embedder, store, generator.

Each getter builds its resource on first use under a lock and then returns the same
object, so a model is loaded once per worker process (never per task), and a warm-up
thread started at worker start and the first task never load it twice.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Any

import redis
from redis import asyncio as aioredis

from common.config import Settings
from common.jobs import JobRecord

if TYPE_CHECKING:
    from common.docseq import DocSequences
    from common.live import LivePointer
    from common.embedding import Embedder
    from common.generators import Generator
    from common.ingest import Ingestor
    from common.live import LivePointer
    from common.remote_store import Transport
    from common.retrieval import Retriever
    from common.store_index import IndexKeeper
    from common.vectorstore import Store


#: What the sync and the asyncio client share (each takes its own kind of Retry).
_CLIENT_OPTIONS: dict[str, Any] = {
    "decode_responses": True, "health_check_interval": 30, "socket_keepalive": True,
    "retry_on_error": [redis.ConnectionError, redis.TimeoutError],
}


def redis_client(settings: Settings) -> redis.Redis:
    """A Redis client that reconnects and retries briefly on connection errors."""
    from redis.backoff import ExponentialBackoff
    from redis.retry import Retry

    return redis.Redis.from_url(settings.redis_dsn, retry=Retry(ExponentialBackoff(cap=2.0, base=0.1), retries=8),
                                **_CLIENT_OPTIONS)


def async_redis_client(settings: Settings) -> aioredis.Redis:
    """:func:`redis_client` for an event loop: its connections belong to the loop that uses it first."""
    from redis.asyncio.retry import Retry
    from redis.backoff import ExponentialBackoff

    return aioredis.Redis.from_url(settings.redis_dsn, retry=Retry(ExponentialBackoff(cap=2.0, base=0.1), retries=8),
                                   **_CLIENT_OPTIONS)


class Runtime:
    """The lazily loaded resources of one worker process.

    ``store_transport`` is given to a process that uses the embedded store without owning
    it: its store is then a :class:`~common.remote_store.RemoteStore` over that transport.

    Resources follow the collection ``RAGQ_COLLECTION`` points at now (:mod:`common.live`):
    after a re-index switches it, the next task gets the new collection's store, and an
    embedder and chunking made the way its points were (``recipe``), loaded once.
    """

    def __init__(self, settings: Settings, store_transport: Transport | None = None) -> None:
        self.settings = settings
        self.store_transport = store_transport
        self.redis = redis_client(settings)
        # One lock per resource: loading a large LLM must not hold up the embedder or
        # the store, which an ingest batch or a search needs at once.
        self._locks = {name: threading.Lock() for name in ("embedder", "store", "ingestor", "retriever", "generator")}
        self._embedders: dict[tuple[str, str | None, str | None], Embedder] = {}
        self._stores: dict[str, Store] = {}
        self._recipes: dict[str, dict[str, Any]] = {}
        self._ingestors: dict[str, Ingestor] = {}
        self._retrievers: dict[str, Retriever] = {}
        self._generator: Generator | None = None
        self._keepers: dict[str, IndexKeeper] = {}
        self._pointer: LivePointer | None = None

    def job(self, job_id: str) -> JobRecord:
        return JobRecord(self.redis, job_id, prefix=self.settings.key_prefix, ttl=self.settings.job_ttl_s)

    # --- the live collection ------------------------------------------------------

    def live(self) -> str:
        """The physical collection ``RAGQ_COLLECTION`` names now."""
        return self.pointer().resolve()

    def pointer(self) -> LivePointer:
        if self._pointer is None:
            from common.vectorstore import open_pointer

            self._pointer = open_pointer(self.settings, self.store_named(self.settings.collection))
        return self._pointer

    def recipe(self, collection: str) -> dict[str, Any]:
        """How ``collection``'s points are made: settings overrides for its embedder and chunker.

        ``RAGQ_COLLECTION`` itself uses the settings as they are; a re-indexed collection
        what its stored points record (given by the re-index while it is being built).
        """
        if collection == self.settings.collection:
            return {}
        if collection not in self._recipes:
            info = self.store_named(collection).info()
            if info.embed_model is None:
                raise RuntimeError(f"collection {collection!r} records no embedding model: "
                                   "was it built by `ragq reindex`?")
            self._recipes[collection] = {
                "embed_model": info.embed_model, "query_prefix": info.query_prefix,
                "document_prefix": info.document_prefix, "chunk_tokens": info.chunk_tokens,
                "chunk_overlap": info.chunk_overlap}
        return self._recipes[collection]

    def adopt_recipe(self, collection: str, recipe: dict[str, Any]) -> None:
        """Use ``recipe`` for ``collection`` (a re-index target that has no points yet)."""
        self._recipes.setdefault(collection, {k: v for k, v in recipe.items() if v is not None})

    # --- resources ----------------------------------------------------------------

    def embedder(self, collection: str | None = None) -> Embedder:
        """The embedder of ``collection`` (default: the live one), one per model and prefixes."""
        recipe = self.recipe(collection or self.live())
        s = self.settings.model_copy(update={k: recipe[k] for k in ("embed_model", "query_prefix",
                                                                     "document_prefix") if k in recipe})
        key = (s.embed_model, s.query_prefix, s.document_prefix)
        with self._locks["embedder"]:
            if key not in self._embedders:
                from common.embedding import Embedder

                self._embedders[key] = Embedder.from_settings(s)
            return self._embedders[key]

    def store(self) -> Store:
        return self.store_named(self.live())

    def store_named(self, collection: str) -> Store:
        with self._locks["store"]:
            if collection not in self._stores:
                s = self.settings
                if self.store_transport is not None:
                    from common.remote_store import RemoteStore

                    self._stores[collection] = RemoteStore(
                        self.redis, self.store_transport, collection=collection,
                        location=str(s.store_dir / collection), queue=s.store_queue,
                        prefix=s.key_prefix, timeout_s=s.store_request_timeout_s)
                else:
                    from common.vectorstore import open_store

                    first = next(iter(self._stores.values()), None)
                    self._stores[collection] = open_store(s, collection, client=getattr(first, "client", None))
                    keeper = _index_keeper(self._stores[collection], s)
                    if keeper is not None:
                        self._keepers[collection] = keeper
            return self._stores[collection]

    def forget_store(self, collection: str) -> None:
        """Close ``collection``'s store and every resource built on it (before dropping it)."""
        with self._locks["store"]:
            store = self._stores.pop(collection, None)
            keeper = self._keepers.pop(collection, None)
        if keeper is not None:
            keeper.stop()
        self._ingestors.pop(collection, None)
        self._retrievers.pop(collection, None)
        self._recipes.pop(collection, None)
        if store is not None and not getattr(store, "owns_client", False):  # the others share its client
            store.close()

    def sequences(self) -> DocSequences:
        """The document version numbers (common.docseq) in this process's Redis."""
        from common.docseq import DocSequences

        return DocSequences(self.redis, self.settings.key_prefix)

    def ingestor(self, collection: str | None = None) -> Ingestor:
        collection = collection or self.live()
        with self._locks["ingestor"]:
            if collection not in self._ingestors:
                from common.ingest import Ingestor

                recipe = self.recipe(collection)
                s = self.settings
                self._ingestors[collection] = Ingestor(
                    self.embedder(collection), self.store_named(collection),
                    recipe.get("chunk_tokens") or s.chunk_tokens,
                    s.chunk_overlap if recipe.get("chunk_overlap") is None else recipe["chunk_overlap"],
                    sequences=self.sequences())
            return self._ingestors[collection]

    def retriever(self) -> Retriever:
        collection = self.live()
        with self._locks["retriever"]:
            if collection not in self._retrievers:
                from common.retrieval import Retriever

                self._retrievers[collection] = Retriever(self.embedder(collection), self.store_named(collection),
                                                         mode=self.settings.retrieval)
            return self._retrievers[collection]

    def generator(self) -> Generator:
        with self._locks["generator"]:
            if self._generator is None:
                from common.generators import build_generator

                # the extractive backend scores sentences with the loaded embedding model
                embedder = self.embedder() if self.settings.answer_backend == "extractive" else None
                self._generator = build_generator(self.settings, embedder=embedder)
            return self._generator

    def close(self) -> None:
        with self._locks["store"]:
            keepers, self._keepers = list(self._keepers.values()), {}
            stores, self._stores = list(self._stores.values()), {}
        for keeper in keepers:
            keeper.stop()
        for store in stores:
            store.close()
        with self._locks["generator"]:
            if self._generator is not None:
                self._generator.close()
                self._generator = None


def _index_keeper(store: Store, settings: Settings) -> IndexKeeper | None:
    """The embedded store's owner builds its index after large writes (a server does it itself)."""
    from common.store_edge import EdgeStore
    from common.store_index import IndexKeeper

    if not isinstance(store, EdgeStore) or settings.store_optimize_points <= 0:
        return None
    return IndexKeeper(store, min_points=settings.store_optimize_points,
                       idle_s=settings.store_optimize_idle_s).start()
