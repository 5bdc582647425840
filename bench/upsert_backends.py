"""Upsert throughput of the store backends on the ingest path (``VectorStore.upsert``).

Embedded (qdrant-edge in-process) against qdrant-client's local mode (``path:``), with
384-d vectors, BM25-like sparse vectors and ingest-shaped payloads, in batches the size
of one ingest message's chunks. A Qdrant server (``--url http://host:6333``, ``--grpc``)
is measured the same way where one runs; none can run on the machine these figures
come from (no server binary, no Docker), and local mode is not a server: it keeps points
in Python dicts and pickles them, so its figure bounds nothing about a server's.

    python bench/upsert_backends.py --points 20000
    python bench/upsert_backends.py --points 200000 --url http://localhost:6333 --grpc
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np

from common.config import Settings
from common.sparse import SparseVector
from common.vectorstore import StoredChunk, open_store

NS = uuid.UUID("a3c1f2e4-7b6d-4e8f-9a0b-1c2d3e4f5a6b")


def chunks(rng: np.random.Generator, start: int, n: int) -> list[StoredChunk]:
    v = rng.normal(size=(n, 384)).astype(np.float32)
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    out = []
    for i in range(n):
        terms = sorted({int(t) for t in rng.integers(0, 20_000, 40)})
        k = start + i
        out.append(StoredChunk(str(uuid.uuid5(NS, str(k))), v[i], {
            "doc_key": f"doc{k // 8}", "doc_version": "v1", "segment": 0, "chunk_index": k % 8,
            "model": "bench/synthetic", "query_prefix": "", "document_prefix": "",
            "text": "x" * 600, "title": f"Title {k // 8}", "product": "CDN", "url": f"https://e.com/{k // 8}"},
            SparseVector(terms, rng.uniform(0.5, 2.0, len(terms)).tolist())))
    return out


def run(settings: Settings, points: int, batch: int) -> dict:
    rng = np.random.default_rng(0)
    data = [chunks(rng, s, min(batch, points - s)) for s in range(0, points, batch)]
    store = open_store(settings)
    try:
        started = time.perf_counter()
        for part in data:
            store.upsert(part)
            store.delete_stale_many({c.payload["doc_key"]: "v1" for c in part})  # what each ingest batch does
        seconds = time.perf_counter() - started
        assert store.count() == points
        return {"backend": store.backend, "location": store.location, "points": points, "batch": batch,
                "seconds": round(seconds, 2), "points_per_s": round(points / seconds)}
    finally:
        store.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--points", type=int, default=20_000)
    parser.add_argument("--batch", type=int, default=1000, help="chunks per upsert (one ~1 MB ingest batch)")
    parser.add_argument("--url", default=None, help="a Qdrant server to measure too")
    parser.add_argument("--grpc", action="store_true", help="talk to --url over gRPC")
    args = parser.parse_args()
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        base = {"_env_file": None, "collection": f"bench_{uuid.uuid4().hex[:8]}"}
        results.append(run(Settings(**base, data_dir=Path(tmp) / "data"), args.points, args.batch))
        results.append(run(Settings(**base, qdrant_url=f"path:{tmp}/local"), args.points, args.batch))
        if args.url:
            results.append(run(Settings(**base, qdrant_url=args.url, qdrant_grpc=args.grpc), args.points, args.batch))
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
