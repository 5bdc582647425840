"""Benchmark: tokens/s of ragq's embedder per token budget (RAGQ_EMBED_BATCH_TOKENS), to pick
each device's default (common/embedding.py: CPU_BATCH_TOKENS, GPU_BATCH_TOKENS).

    python bench/embed_budget.py [--docs 120] [--device cpu|cuda] [--budgets 2048,4096,8192,16384] [--rounds 2]

The chunks are ragq's own of JD Cloud pages (tokenized once, as a worker embeds them). The
budgets take turns, ``--rounds`` times each (this machine's speed swings over minutes), and
the best run of each is reported, relative to the best budget.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from bench.ingest import DATA, corpus_files  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--docs", type=int, default=120)
    parser.add_argument("--corpus", default="en", choices=["en", "cn"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--budgets", default="2048,4096,8192,16384")
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()

    from common.config import Settings
    from common.embedding import Embedder
    from common.ingest import make_chunker
    from common.inputs import InputReader
    from common.schemas import DocumentItem

    settings = Settings(device=args.device)
    embedder = Embedder.from_settings(settings)
    chunker = make_chunker(embedder, settings.chunk_tokens, settings.chunk_overlap)
    docs = [e for e in InputReader(max_document_bytes=settings.max_document_bytes).read(
        corpus_files(DATA / f"jdcloud-{args.corpus}", args.docs)) if isinstance(e, DocumentItem)]
    rows = [c.ids for result in chunker.split_many([d.content for d in docs]) for c in result]
    budgets = [int(b) for b in args.budgets.split(",")]
    best: dict[int, float] = {}
    embedder.encode_document_ids_with_stats(rows[:16])  # warm
    for round_ in range(args.rounds):
        for budget in budgets:
            embedder.batch_tokens = max(budget, embedder.max_tokens)
            started = time.perf_counter()
            _, stats = embedder.encode_document_ids_with_stats(rows)
            rate = stats.tokens / (time.perf_counter() - started)
            best[budget] = max(best.get(budget, 0.0), rate)
            print(f"round {round_ + 1} budget {budget}: {rate:.0f} tok/s ({stats.batches} passes)", flush=True)
    top = max(best.values())
    print(f"{embedder.model_name} on {embedder.device}, {len(rows)} chunks:")
    for budget, rate in best.items():
        print(f"  budget {budget:6d}: best {rate:7.0f} tok/s  {rate / top:.3f} of the best")
    print(json.dumps({"model": embedder.model_name, "device": str(embedder.device), "best": best}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
