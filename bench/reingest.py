"""Benchmark: re-ingesting an unchanged corpus against its first ingest (target <= 5 %).

ragq runs as the README starts it (``ragq worker`` with its defaults, warmed up, and the
producer's ``Client.ingest`` of the corpus directory, as ``ragq ingest DIR`` does). The
first ingest embeds every page; the second sends the same pages, which the workers find
unchanged (one store lookup per batch) and skip. Each is timed from the first enqueue
until the job record says every document is done; the re-ingest must report every
document ``skipped`` and no tokens embedded.

    python bench/reingest.py [--docs N] [--corpus en|cn] [--model M] [--device cpu|cuda]

Without ``--docs`` the whole corpus directory is ingested (1,645 English pages);
``--docs N`` takes N pages spread over the corpus. Own queues, key prefix and temporary
store, like bench/ingest.py. Results go to stdout and bench/results/.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.ingest import DATA, Pipeline, corpus_files, private_deployment  # noqa: E402  (needs the path above)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--docs", type=int, default=None, help="pages spread over the corpus (default: all)")
    parser.add_argument("--corpus", default="en", choices=["en", "cn"], help="../shared/data/jdcloud-<corpus>")
    parser.add_argument("--model", default=None, help="RAGQ_EMBED_MODEL (default: ragq's default)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    args = parser.parse_args()

    env, settings, _ = private_deployment(args.device, args.model)
    corpus = DATA / f"jdcloud-{args.corpus}"
    inputs = corpus_files(corpus, args.docs) if args.docs else [corpus / "docs"]
    pipeline = Pipeline(env, settings, processes=1)
    try:
        first = pipeline.run(inputs)
        print(f"first ingest: {first}", flush=True)
        again = pipeline.run(inputs)
        print(f"re-ingest:    {again}", flush=True)
    finally:
        pipeline.stop()
    if again["skipped"] != again["documents"] or again["tokens"]:
        sys.exit(f"the re-ingest embedded something: {again}")
    ratio = again["seconds"] / first["seconds"]
    result = {"corpus": args.corpus, "inputs": [str(p) for p in inputs][:3], "model": settings.embed_model,
              "device": args.device, "first": first, "reingest": again, "ratio": ratio, "target": 0.05}
    print(f"{args.corpus} corpus, {first['documents']} documents, {first['chunks']} chunks: first ingest "
          f"{first['seconds']:.1f} s, unchanged re-ingest {again['seconds']:.2f} s; ratio {ratio:.4f} "
          f"(target <= 0.05)")
    out = REPO / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / f"reingest-{args.corpus}-{args.device}-{time.strftime('%Y%m%d-%H%M%S')}.json").write_text(
        json.dumps(result, indent=2))
    return 0 if ratio <= 0.05 else 1


if __name__ == "__main__":
    sys.exit(main())
