"""Share the embedded store between processes: one owner, requests over the queue.

The embedded store (qdrant-edge) is a directory that one process may open. So that any
number of embedding processes (one per GPU, or several on a CPU host) can feed it, one
worker process owns it and consumes the store queue; the others hold a
:class:`RemoteStore`, which turns each store call into one request to that owner and
waits for the answer. Embedding, the expensive part, runs in every process; the owner
only writes and searches, which qdrant-edge does in milliseconds per batch.

Requests are JSON. Vectors travel as base64 float32 (a quarter of the size of JSON
numbers), and a request larger than :data:`INLINE_LIMIT` (an upsert of a 1 MB batch is
several MB) is staged under a Redis key with a TTL, so the queue message stays small;
the owner reads the key and deletes it once it has answered.

The transport (send a request, wait for its answer) is the caller's: the workers use a
Celery task, so this module knows nothing of Celery. A transport raises
:class:`TimeoutError` when no answer came in time.
"""

from __future__ import annotations

import base64
import json
import uuid
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import redis

from common.vectorstore import (
    CollectionInfo,
    SearchHit,
    Store,
    StoredChunk,
    StoreError,
    StoreMismatchError,
)

#: Requests larger than this (bytes of JSON) are staged in Redis instead of sent inline.
INLINE_LIMIT = 64 * 1024

#: ``transport(method, request, timeout_s)`` -> the owner's reply; TimeoutError if none.
Transport = Callable[[str, dict[str, Any], float], dict[str, Any]]


def encode_vectors(vectors: np.ndarray) -> dict[str, Any]:
    matrix = np.ascontiguousarray(vectors, dtype=np.float32)
    if matrix.ndim == 1:
        matrix = matrix[None, :]
    return {"shape": list(matrix.shape), "b64": base64.b64encode(matrix.tobytes()).decode("ascii")}


def decode_vectors(data: Mapping[str, Any]) -> np.ndarray:
    rows, dim = (int(n) for n in data["shape"])
    return np.frombuffer(base64.b64decode(data["b64"]), dtype=np.float32).reshape(rows, dim)


class RemoteStore:
    """A :class:`~common.vectorstore.Store` whose calls run in the process owning the store."""

    backend = "embedded"

    def __init__(self, client: redis.Redis, transport: Transport, *, collection: str, location: str,
                 queue: str, prefix: str = "ragq", timeout_s: float = 60.0) -> None:
        self.redis = client
        self.transport = transport
        self.name = collection
        self.location = f"{location} (owned by the worker consuming queue {queue!r})"
        self.queue = queue
        self.prefix = prefix
        self.timeout_s = timeout_s

    # --- the Store interface ------------------------------------------------------

    def ensure_collection(self, dimension: int, model: str) -> None:
        self._call("ensure_collection", {"dimension": dimension, "model": model})

    def upsert(self, chunks: Sequence[StoredChunk]) -> None:
        if not chunks:
            return
        self._call("upsert", {
            "ids": [c.id for c in chunks],
            "payloads": [c.payload for c in chunks],
            "vectors": encode_vectors(np.stack([np.asarray(c.vector, dtype=np.float32) for c in chunks])),
        })

    def delete_stale(self, doc_key: str, keep_version: str) -> int:
        return self.delete_stale_many({doc_key: keep_version})

    def delete_stale_many(self, keep: Mapping[str, str]) -> int:
        return int(self._call("delete_stale_many", {"keep": dict(keep)})) if keep else 0

    def count(self, filter: Mapping[str, Any] | None = None) -> int:
        return int(self._call("count", {"filter": dict(filter) if filter else None}))

    def search(self, vectors: np.ndarray, top_k: int, filter: Mapping[str, Any] | None = None,
               distinct_docs: bool = True) -> list[list[SearchHit]]:
        rows = self._call("search", {"vectors": encode_vectors(np.asarray(vectors)), "top_k": top_k,
                                     "filter": dict(filter) if filter else None,
                                     "distinct_docs": distinct_docs})
        return [[SearchHit(h["id"], float(h["score"]), h["payload"]) for h in row] for row in rows]

    def scroll_payloads(self, filter: Mapping[str, Any] | None = None, limit: int = 10_000) -> list[dict[str, Any]]:
        return list(self._call("scroll_payloads", {"filter": dict(filter) if filter else None, "limit": limit}))

    def info(self) -> CollectionInfo:
        return CollectionInfo(**self._call("info", {}))

    def close(self) -> None:
        """Nothing to release: the owner keeps the store open."""

    # --- the wire -----------------------------------------------------------------

    def _call(self, method: str, request: dict[str, Any]) -> Any:
        body = json.dumps(request, ensure_ascii=False, allow_nan=False)
        staged = None
        if len(body) > INLINE_LIMIT:
            staged = f"{self.prefix}:store:staged:{uuid.uuid4().hex}"
            try:
                # lives a little longer than the request may wait, then expires on its own
                self.redis.set(staged, body, ex=int(self.timeout_s) + 60)
            except redis.RedisError as exc:
                raise StoreError(f"could not stage a {method} request in Redis: {exc}") from exc
            request = {"staged": staged}
        try:
            reply = self.transport(method, request, self.timeout_s)
        except TimeoutError as exc:
            raise StoreError(
                f"no answer to {method} from the embedded store's owner within {self.timeout_s:.0f}s: "
                f"is a worker consuming queue {self.queue!r} running? (`ragq worker` starts one)"
            ) from exc
        except Exception as exc:  # the broker or result backend failed; worth retrying like a store
            raise StoreError(f"{method} request to the store owner failed: {type(exc).__name__}: {exc}") from exc
        finally:
            if staged:
                try:
                    self.redis.delete(staged)  # usually already deleted by the owner
                except redis.RedisError:
                    pass
        return unwrap(reply)


# --- the owner's side -------------------------------------------------------------------


def serve(store: Store, client: redis.Redis, method: str, request: Mapping[str, Any]) -> dict[str, Any]:
    """Run one request on the store this process owns; the reply carries errors as data.

    Errors keep their kind (mismatch, bad value, store failure) so the caller raises the
    same exception it would have got from a store in its own process.
    """
    staged = request.get("staged")
    try:
        if staged:
            body = client.get(staged)
            if body is None:
                raise StoreError("the request's staged data expired before the owner read it")
            request = json.loads(body)
        result = _dispatch(store, method, request)
        if staged:
            client.delete(staged)
        return {"result": result}
    except StoreMismatchError as exc:
        return {"error": "mismatch", "message": str(exc)}
    except (ValueError, TypeError, KeyError) as exc:
        return {"error": "value", "message": f"{type(exc).__name__}: {exc}"}
    except StoreError as exc:
        return {"error": "store", "message": str(exc)}
    except redis.RedisError as exc:
        return {"error": "store", "message": f"the owner could not read the request from Redis: {exc}"}


def unwrap(reply: Mapping[str, Any]) -> Any:
    """The result of a reply from :func:`serve`, or its error raised as the original kind."""
    if "error" not in reply:
        return reply["result"]
    kind, message = reply["error"], reply.get("message", "")
    if kind == "mismatch":
        raise StoreMismatchError(message)
    if kind == "value":
        raise ValueError(message)
    raise StoreError(message)


def _dispatch(store: Store, method: str, req: Mapping[str, Any]) -> Any:
    if method == "ensure_collection":
        return store.ensure_collection(int(req["dimension"]), str(req["model"]))
    if method == "upsert":
        vectors = decode_vectors(req["vectors"])
        if len(vectors) != len(req["ids"]) or len(vectors) != len(req["payloads"]):
            raise ValueError("upsert: ids, payloads and vectors differ in length")
        store.upsert([StoredChunk(i, v, p) for i, v, p in zip(req["ids"], vectors, req["payloads"])])
        return None
    if method == "delete_stale_many":
        return store.delete_stale_many(req["keep"])
    if method == "count":
        return store.count(req.get("filter"))
    if method == "search":
        rows = store.search(decode_vectors(req["vectors"]), int(req["top_k"]), req.get("filter"),
                            bool(req.get("distinct_docs", True)))
        return [[{"id": h.id, "score": h.score, "payload": h.payload} for h in row] for row in rows]
    if method == "scroll_payloads":
        return store.scroll_payloads(req.get("filter"), int(req.get("limit", 10_000)))
    if method == "info":
        return dict(store.info().__dict__)
    raise ValueError(f"unknown store method {method!r}")
