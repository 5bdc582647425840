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

from common.interrupts import interrupts
from common.sparse import SparseVector
from common.vectorstore import (
    CollectionInfo,
    Keep,
    SearchHit,
    Store,
    StoredChunk,
    StoredVersion,
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

    def ensure_collection(self, dimension: int, model: str, *, query_prefix: str = "",
                          document_prefix: str = "") -> None:
        self._call("ensure_collection", {"dimension": dimension, "model": model,
                                         "query_prefix": query_prefix, "document_prefix": document_prefix})

    def upsert(self, chunks: Sequence[StoredChunk]) -> None:
        if not chunks:
            return
        self._call("upsert", {
            "ids": [c.id for c in chunks],
            "payloads": [c.payload for c in chunks],
            "vectors": encode_vectors(np.stack([np.asarray(c.vector, dtype=np.float32) for c in chunks])),
            "sparse": [c.sparse.to_dict() if c.sparse is not None else None for c in chunks],
        })

    def delete_older(self, doc_key: str, seq: int, version: str | None = None) -> int:
        return self.delete_older_many({doc_key: (seq, version)})

    def delete_older_many(self, keep: Mapping[str, Keep]) -> int:
        keep = {key: [int(seq), version] for key, (seq, version) in keep.items()}
        return int(self._call("delete_older_many", {"keep": keep})) if keep else 0

    def stored_versions(self, filter: Mapping[str, Any]) -> dict[str, StoredVersion]:
        rows = self._call("stored_versions", {"filter": dict(filter)})
        return {key: StoredVersion.from_dict(row) for key, row in rows.items()}

    def relabel(self, moves: Mapping[str, tuple[int, int]]) -> int:
        moves = {key: [int(old), int(new)] for key, (old, new) in moves.items()}
        return int(self._call("relabel", {"moves": moves})) if moves else 0

    def delete_where(self, filter: Mapping[str, Any]) -> dict[str, int]:
        return {key: int(n) for key, n in self._call("delete_where", {"filter": dict(filter)}).items()}

    def count(self, filter: Mapping[str, Any] | None = None) -> int:
        return int(self._call("count", {"filter": dict(filter) if filter else None}))

    def search(self, vectors: np.ndarray, top_k: int, filter: Mapping[str, Any] | None = None,
               distinct_docs: bool = True,
               sparse: Sequence[SparseVector] | None = None) -> list[list[SearchHit]]:
        rows = self._call("search", {"vectors": encode_vectors(np.asarray(vectors)), "top_k": top_k,
                                     "filter": dict(filter) if filter else None,
                                     "distinct_docs": distinct_docs,
                                     "sparse": [t.to_dict() for t in sparse] if sparse is not None else None})
        return [[SearchHit(h["id"], float(h["score"]), h["payload"]) for h in row] for row in rows]

    def scroll_payloads(self, filter: Mapping[str, Any] | None = None, limit: int = 10_000) -> list[dict[str, Any]]:
        return list(self._call("scroll_payloads", {"filter": dict(filter) if filter else None, "limit": limit}))

    def info(self) -> CollectionInfo:
        return CollectionInfo(**self._call("info", {}))

    def optimize(self, timeout_s: float = 1500.0) -> bool:
        """Build the owner's index; waits longer than other calls (tens of minutes per million points
        on two cores), yet under the 1800 s soft limit of the task that waits."""
        return bool(self._call("optimize", {}, timeout_s=timeout_s))

    def close(self) -> None:
        """Nothing to release: the owner keeps the store open."""

    # --- the wire -----------------------------------------------------------------

    def _call(self, method: str, request: dict[str, Any], timeout_s: float | None = None) -> Any:
        timeout_s = self.timeout_s if timeout_s is None else timeout_s
        request = {**request, "collection": self.name}  # the owner may hold several (a re-index)
        body = json.dumps(request, ensure_ascii=False, allow_nan=False)
        staged = None
        if len(body) > INLINE_LIMIT:
            staged = f"{self.prefix}:store:staged:{uuid.uuid4().hex}"
            try:
                # lives a little longer than the request may wait, then expires on its own
                self.redis.set(staged, body, ex=int(self.timeout_s) + 60)
            except redis.RedisError as exc:
                raise StoreError(f"could not stage a {method} request in Redis: {exc}") from exc
            request = {"staged": staged, "collection": self.name}
        try:
            reply = self.transport(method, request, timeout_s)
        except TimeoutError as exc:
            raise StoreError(
                f"no answer to {method} from the embedded store's owner within {timeout_s:.0f}s: "
                f"is a worker consuming queue {self.queue!r} running? (`ragq worker` starts one)"
            ) from exc
        except interrupts():  # the task's soft time limit, landing while it waits for the owner
            raise
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
        return store.ensure_collection(int(req["dimension"]), str(req["model"]),
                                       query_prefix=str(req.get("query_prefix", "")),
                                       document_prefix=str(req.get("document_prefix", "")))
    if method == "upsert":
        vectors = decode_vectors(req["vectors"])
        sparse = req.get("sparse") or [None] * len(vectors)
        if not len(vectors) == len(req["ids"]) == len(req["payloads"]) == len(sparse):
            raise ValueError("upsert: ids, payloads, vectors and sparse vectors differ in length")
        store.upsert([StoredChunk(i, v, p, SparseVector.from_dict(t) if t else None)
                      for i, v, p, t in zip(req["ids"], vectors, req["payloads"], sparse)])
        return None
    if method == "delete_older_many":
        return store.delete_older_many({key: (int(seq), version) for key, (seq, version) in req["keep"].items()})
    if method == "stored_versions":
        return {key: v.to_dict() for key, v in store.stored_versions(req["filter"]).items()}
    if method == "relabel":
        return store.relabel({key: (int(old), int(new)) for key, (old, new) in req["moves"].items()})
    if method == "delete_where":
        return store.delete_where(req["filter"])
    if method == "count":
        return store.count(req.get("filter"))
    if method == "search":
        sparse = req.get("sparse")
        rows = store.search(decode_vectors(req["vectors"]), int(req["top_k"]), req.get("filter"),
                            bool(req.get("distinct_docs", True)),
                            [SparseVector.from_dict(t) for t in sparse] if sparse is not None else None)
        return [[{"id": h.id, "score": h.score, "payload": h.payload} for h in row] for row in rows]
    if method == "scroll_payloads":
        return store.scroll_payloads(req.get("filter"), int(req.get("limit", 10_000)))
    if method == "info":
        return dict(store.info().__dict__)
    if method == "optimize":
        return store.optimize()
    raise ValueError(f"unknown store method {method!r}")
