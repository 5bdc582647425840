"""Benchmark: retrieval quality on the JD Cloud dev questions, per model and retrieval mode.

For each corpus (English, Chinese) and embedding model, a real ``ragq worker`` ingests the
whole corpus (``docs/``), then ``Client.evaluate`` (what ``ragq eval`` runs) measures
hit@1/3/5/10, MRR@10 and nDCG@10 of ``questions-dev.jsonl`` through the queue, once per
retrieval mode (the worker is restarted with ``RAGQ_RETRIEVAL`` changed; the collection
holds dense and BM25 vectors, so it is ingested once). Targets (issue 10): English
hit@5 >= 0.95 and hit@1 >= 0.75; Chinese hit@5 >= 0.90 and hit@1 >= 0.70.

    python bench/retrieval.py [--corpus en,cn] [--models e5,minilm] [--modes hybrid,dense] [--docs all|N]

Everything runs under its own key prefix, queues and temporary store; results go to
stdout and bench/results/retrieval-*.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
DATA = REPO.parent / "shared" / "data"
MODELS = {"e5": "intfloat/multilingual-e5-small", "minilm": "sentence-transformers/all-MiniLM-L6-v2"}
TARGETS = {"en": {"hit@5": 0.95, "hit@1": 0.75}, "cn": {"hit@5": 0.90, "hit@1": 0.70}}


class Worker:
    """``ragq worker`` (CPU, one process) with the given settings, until stop()."""

    def __init__(self, env: dict[str, str]) -> None:
        from common.config import Settings
        from producer.client import Client, RagqError

        self.log = Path(env["RAGQ_DATA_DIR"]) / "worker.log"
        self.proc = subprocess.Popen([sys.executable, "-m", "producer", "worker", "--gpus", "none"], cwd=REPO,
                                     env=env, stdout=self.log.open("ab"), stderr=subprocess.STDOUT,
                                     start_new_session=True)
        self.client = Client(Settings(_env_file=None, **{k[5:].lower(): v for k, v in env.items()
                                                          if k.startswith("RAGQ_")}))
        deadline = time.monotonic() + 600
        while True:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                sys.exit(f"the worker did not start; see {self.log}")
            try:
                self.client.store_info(timeout=5)
                return
            except RagqError:
                time.sleep(0.5)

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(120)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)


def docs_for(corpus: Path, spec: str, workdir: Path) -> Path:
    """``docs/`` itself, or a folder holding the dev questions' pages plus N others."""
    if spec == "all":
        return corpus / "docs"
    questions = [json.loads(line) for line in (corpus / "questions-dev.jsonl").open(encoding="utf-8")]
    wanted = {q["source_url"] for q in questions}
    manifest = [json.loads(line) for line in (corpus / "manifest.jsonl").open(encoding="utf-8")]
    rest = [m for m in manifest if m["url"] not in wanted]
    chosen = [m for m in manifest if m["url"] in wanted] + rest[:: max(1, len(rest) // int(spec))][: int(spec)]
    target = workdir / "docs"
    for m in chosen:
        (target / m["file"]).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(corpus / m["file"], target / m["file"])
    return target


def run(corpus_name: str, model_key: str, modes: list[str], docs: str) -> dict:
    from common.config import Settings

    corpus = DATA / f"jdcloud-{corpus_name}"
    tag = uuid.uuid4().hex[:8]
    workdir = Path(tempfile.mkdtemp(prefix="ragq-bench-retrieval-"))
    env = dict(os.environ)
    env.update({
        "RAGQ_DATA_DIR": str(workdir), "RAGQ_KEY_PREFIX": f"ragq-bench-{tag}", "RAGQ_COLLECTION": "bench",
        "RAGQ_INGEST_QUEUE": f"bench-ingest-{tag}", "RAGQ_QA_QUEUE": f"bench-qa-{tag}",
        "RAGQ_STORE_QUEUE": f"bench-store-{tag}", "RAGQ_EMBED_MODEL": MODELS[model_key],
        "RAGQ_LLM_BACKEND": "none", "RAGQ_RETRIEVAL": modes[0],
        # a temporary store, but the user's converted models (converting again costs seconds and 0.5 GB)
        "RAGQ_MODEL_CACHE_DIR": str(Settings().models_dir),
    })
    source = docs_for(corpus, docs, workdir)
    out: dict = {"corpus": corpus_name, "model": MODELS[model_key], "docs": docs, "modes": {}}
    worker = Worker(env)
    try:
        started = time.perf_counter()
        info = worker.client.ingest([source]).wait(timeout=7200, poll_s=0.5)
        out["ingest"] = {"status": info.status, "documents": info.completed, "failed": info.failed,
                         "chunks": info.chunks, "tokens": info.tokens,
                         "seconds": round(time.perf_counter() - started, 1)}
        print(f"[{corpus_name} {model_key}] ingested {info.completed} docs, {info.chunks} chunks, "
              f"{info.tokens} tokens in {out['ingest']['seconds']} s ({info.status})", flush=True)
        for n, mode in enumerate(modes):
            if n:
                worker.stop()
                env["RAGQ_RETRIEVAL"] = mode
                worker = Worker(env)
            report = worker.client.evaluate(corpus / "questions-dev.jsonl", top_k=10, timeout=3600)
            out["modes"][mode] = {"overall": report.overall, "errors": len(report.errors),
                                  "model": report.meta.get("model")}
            o = report.overall
            print(f"[{corpus_name} {model_key} {mode}] n={o['n']} hit@1 {o['hit@1']:.3f} hit@3 {o['hit@3']:.3f} "
                  f"hit@5 {o['hit@5']:.3f} hit@10 {o['hit@10']:.3f} mrr@10 {o['mrr@10']:.3f} "
                  f"ndcg@10 {o['ndcg@10']:.3f}", flush=True)
    finally:
        worker.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--corpus", default="en,cn")
    parser.add_argument("--models", default="e5,minilm")
    parser.add_argument("--modes", default="hybrid,dense")
    parser.add_argument("--docs", default="all", help="'all' or N pages besides the questions' source pages")
    args = parser.parse_args()
    results = [run(c, m, args.modes.split(","), args.docs)
               for c in args.corpus.split(",") for m in args.models.split(",")]
    print("\ncorpus  model                                    mode    hit@1  hit@3  hit@5 hit@10 mrr@10 ndcg@10")
    for r in results:
        for mode, figures in r["modes"].items():
            o = figures["overall"]
            print(f"{r['corpus']:<7} {r['model']:<40} {mode:<7} {o['hit@1']:.3f}  {o['hit@3']:.3f}  "
                  f"{o['hit@5']:.3f}  {o['hit@10']:.3f}  {o['mrr@10']:.3f}  {o['ndcg@10']:.3f}")
    out = REPO / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / f"retrieval-{time.strftime('%Y%m%d-%H%M%S')}.json").write_text(
        json.dumps({"results": results, "targets": TARGETS}, indent=2, ensure_ascii=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
