"""Search latency of the embedded store at scale, before and after its HNSW index is built.

Synthetic 384-d vectors clustered like embeddings (64 centres plus noise, unit length)
and BM25-like sparse vectors (a dozen terms of a 20,000-word vocabulary) go into a fresh
:class:`~common.store_edge.EdgeStore` through ``upsert`` (the ingest path). Then one query
at a time, as a user's question arrives, runs ``search(top_k=5, distinct_docs=True)`` (the
retrieval path: over-fetch 40 chunks, best chunk per document), dense and hybrid
(dense + sparse prefetch fused by RRF), and p50/p99 are printed; then ``optimize()`` (what
the owner's IndexKeeper runs when idle) is timed, the queries run again, and the share of
top-5 documents that stayed the same is reported.

    python bench/search_scale.py --points 100000
    python bench/search_scale.py --points 1000000   # the build: about 9 minutes and 7 GB on 2 cores
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np

from common.sparse import SparseVector
from common.store_edge import EdgeStore
from common.vectorstore import StoredChunk

DIM = 384
NS = uuid.UUID("5d2b1c9e-3f4a-4e6b-8a7c-9d0e1f2a3b4c")


def clustered(rng: np.random.Generator, centres: np.ndarray, n: int) -> np.ndarray:
    v = centres[rng.integers(0, len(centres), n)] + 0.6 * rng.normal(size=(n, DIM))
    return (v / np.linalg.norm(v, axis=1, keepdims=True)).astype(np.float32)


def sparse_rows(rng: np.random.Generator, n: int) -> list[SparseVector]:
    out = []
    for _ in range(n):
        terms = sorted({int(t) for t in rng.integers(0, 20_000, 12)})
        out.append(SparseVector(terms, rng.uniform(0.5, 2.0, len(terms)).round(4).tolist()))
    return out


def fill(store: EdgeStore, points: int, rng: np.random.Generator, centres: np.ndarray) -> float:
    started = time.perf_counter()
    batch = 2000
    for start in range(0, points, batch):
        n = min(batch, points - start)
        vectors, terms = clustered(rng, centres, n), sparse_rows(rng, n)
        store.upsert([
            StoredChunk(str(uuid.uuid5(NS, str(start + i))), vectors[i],
                        {"doc_key": f"doc{(start + i) // 4}", "doc_version": "v1", "chunk_index": (start + i) % 4,
                         "model": "bench/synthetic", "text": f"chunk {start + i}"}, terms[i])
            for i in range(n)])
    return time.perf_counter() - started


def measure(store: EdgeStore, queries: np.ndarray, sparse: list[SparseVector]) -> dict:
    out: dict = {}
    for mode in ("dense", "hybrid"):
        times, tops = [], []
        for i, q in enumerate(queries):
            t = time.perf_counter()
            rows = store.search(q[None, :], top_k=5, sparse=[sparse[i]] if mode == "hybrid" else None)
            times.append(time.perf_counter() - t)
            tops.append([h.payload["doc_key"] for h in rows[0]])
        ms = np.array(times) * 1000
        out[mode] = {"p50_ms": round(float(np.percentile(ms, 50)), 2),
                     "p99_ms": round(float(np.percentile(ms, 99)), 2), "tops": tops}
    return out


def same_share(a: list[list[str]], b: list[list[str]]) -> float:
    return round(sum(len(set(x) & set(y)) for x, y in zip(a, b)) / max(1, sum(len(x) for x in a)), 4)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--points", type=int, default=100_000)
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--no-optimize", action="store_true", help="measure the exact scan only")
    parser.add_argument("--dir", type=Path, default=None, help="where the shard goes [a temporary directory]")
    args = parser.parse_args()

    rng = np.random.default_rng(0)
    centres = rng.normal(size=(64, DIM))
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        store = EdgeStore(Path(tmp) / "shard", "bench")
        try:
            fill_s = fill(store, args.points, rng, centres)
            queries = clustered(rng, centres, args.queries)
            sparse = [SparseVector(t.indices[:3], [1.0] * min(3, len(t.indices))) for t in sparse_rows(rng, args.queries)]
            report: dict = {"points": args.points, "queries": args.queries, "upsert_s": round(fill_s, 1),
                            "upsert_points_per_s": round(args.points / fill_s), "index_before": store.index_info()}
            before = measure(store, queries, sparse)
            report["before"] = {m: {k: v for k, v in r.items() if k != "tops"} for m, r in before.items()}
            if not args.no_optimize:
                t = time.perf_counter()
                store.optimize()
                report["optimize_s"] = round(time.perf_counter() - t, 1)
                report["index_after"] = store.index_info()
                after = measure(store, queries, sparse)
                report["after"] = {m: {k: v for k, v in r.items() if k != "tops"} for m, r in after.items()}
                report["same_top5_docs"] = {m: same_share(before[m]["tops"], after[m]["tops"]) for m in before}
        finally:
            store.close()
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
