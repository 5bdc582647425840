"""Benchmark: ragq's ingest pipeline against sentence-transformers' ``encode`` on the same chunks.

The peer is what a user would pick instead of ragq to embed a corpus: sentence-transformers'
``SentenceTransformer.encode`` (its default batch size, normalised) over exactly the chunk
texts ragq makes (with the model's document prefix, as ragq embeds them), in a fresh process.
ragq runs as the README starts it: ``ragq worker`` with its defaults, warmed up; a pipeline
run is timed from the first enqueue until the job record says every chunk is stored. The
two sides alternate (``--rounds`` times each, default 2: this machine's speed swings by a
third over minutes) and the best run of each side is compared: pipeline tokens/s over peer
tokens/s, both counted with ragq's tokens (target >= 0.95 on the CPU; on a GPU, against
sentence-transformers in fp16, >= 2). On a GPU the peak memory used on the card during each
run is reported too (bench/gpu.sh runs it for both models).

    python bench/ingest.py [--docs 400] [--corpus en|cn] [--model M] [--rounds 2] [--device cpu|cuda] [--processes 1]

``--processes N`` runs N worker processes (per GPU, or sharing the CPU's cores); with
the embedded store and N > 1 they send their writes to the store-owning process.

The pipeline uses its own queue names, key prefix and temporary store, so it never
touches a running deployment's queues. Results go to stdout and bench/results/.
"""

from __future__ import annotations

import argparse
import json
import os
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
TARGET = {"cpu": 0.95, "cuda": 2.0}  # pipeline / sentence-transformers, best vs best


def corpus_files(corpus: Path, n: int) -> list[Path]:
    if not (corpus / "manifest.jsonl").is_file():
        sys.exit(f"the benchmark needs the corpus at {corpus}")
    manifest = [json.loads(line) for line in (corpus / "manifest.jsonl").open()]
    stride = max(1, len(manifest) // n)
    return [corpus / m["file"] for m in manifest[::stride][:n]]


def chunk_texts(files: list[Path], settings) -> tuple[list[str], object]:
    """The texts ragq embeds for ``files``: its own reader and chunker, its document prefix."""
    from common.embedding import Embedder
    from common.ingest import make_chunker
    from common.inputs import InputReader
    from common.schemas import DocumentItem

    embedder = Embedder.from_settings(settings, threads=1)
    chunker = make_chunker(embedder, settings.chunk_tokens, settings.chunk_overlap)
    reader = InputReader(max_document_bytes=settings.max_document_bytes)
    docs = [e for e in reader.read(files) if isinstance(e, DocumentItem)]
    texts = [embedder.document_prefix + c.text for d in docs for c in chunker.split(d.content)]
    return texts, embedder


class Peer:
    """sentence-transformers over the same weights, device and threads, in a process of its own.

    A fresh process, as a user would run it: nothing of ragq's (its malloc tuning, for one)
    is applied to the peer's process.
    """

    SCRIPT = """
import json, os, sys, time
import torch
from sentence_transformers import SentenceTransformer
path, device, texts_file = sys.argv[1:4]
torch.set_num_threads(os.cpu_count() or 1)
model = SentenceTransformer(path, device="cuda" if device.startswith("cuda") else "cpu")
if device.startswith("cuda"):
    model.half()
texts = json.load(open(texts_file, encoding="utf-8"))
model.encode(texts[:8], normalize_embeddings=True)  # warm, as the worker is
started = time.perf_counter()
model.encode(texts, normalize_embeddings=True)
print(json.dumps({"seconds": time.perf_counter() - started}))
"""

    def __init__(self, model_path: str, device: str, texts: list[str], workdir: Path) -> None:
        self.args = [sys.executable, "-c", self.SCRIPT, model_path, device, str(workdir / "peer-texts.json")]
        (workdir / "peer-texts.json").write_text(json.dumps(texts, ensure_ascii=False), encoding="utf-8")

    def run(self, tokens: int) -> dict:
        out = subprocess.run(self.args, capture_output=True, text=True, check=True)
        seconds = json.loads(out.stdout.strip().splitlines()[-1])["seconds"]
        return {"seconds": seconds, "tokens_per_s": tokens / seconds}


class GpuMemory:
    """Peak memory used on the GPUs while a run lasts, sampled from ``nvidia-smi`` every 100 ms
    (it sees every process: the worker's pool processes and the peer's alike)."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> GpuMemory:
        if self.enabled:
            self.proc = subprocess.Popen(
                ["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits", "-lms", "100"],
                stdout=subprocess.PIPE, text=True)
        return self

    def __exit__(self, *exc: object) -> None:
        self.peak_mib = 0
        if self.proc is not None:
            self.proc.terminate()
            out, _ = self.proc.communicate(timeout=10)
            values = [int(v) for v in out.split() if v.strip().isdigit()]
            self.peak_mib = max(values, default=0)


class Pipeline:
    """A real ``ragq worker`` (as the README starts it) and the producer's Client."""

    def __init__(self, env: dict[str, str], settings, processes: int) -> None:
        from producer.client import Client

        self.env, self.settings, self.processes = env, settings, processes
        self.log_path = Path(env["RAGQ_DATA_DIR"]) / "worker.log"
        gpus = "none" if settings.device == "cpu" else "all"
        args = [sys.executable, "-m", "producer", "worker", "--gpus", gpus]
        if processes > 1:
            args += ["--processes", str(processes)]
        self.worker = subprocess.Popen(args, cwd=REPO, env=env, stdout=self.log_path.open("wb"),
                                       stderr=subprocess.STDOUT, start_new_session=True)
        self.client = Client(settings)
        deadline = time.monotonic() + 600
        owner = processes > 1 and not settings.qdrant_url
        while not (self.log_path.read_bytes().count(b"ready.") >= processes + owner
                   and self.log_path.read_bytes().count(b"loaded embedding model") >= processes):
            if time.monotonic() > deadline or self.worker.poll() is not None:
                sys.exit(f"the worker did not start; see {self.log_path}")
            time.sleep(0.2)

    def run(self, files: list[Path]) -> dict:
        started = time.perf_counter()
        job = self.client.ingest(files, force=True)  # every round embeds: unchanged pages are skipped otherwise
        info = job.wait(timeout=7200, poll_s=0.05)
        seconds = time.perf_counter() - started
        if info.status != "completed":
            sys.exit(f"pipeline job ended {info.status}: {info.errors[:3]}")
        return {"tokens": info.tokens, "chunks": info.chunks, "batches": info.batches_total,
                "documents": info.completed, "skipped": info.skipped,
                "seconds": seconds, "tokens_per_s": info.tokens / seconds}

    def stop(self) -> None:
        self.worker.send_signal(signal.SIGTERM)
        try:
            self.worker.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(self.worker.pid, signal.SIGKILL)


def private_deployment(device: str, model: str | None) -> tuple[dict[str, str], object, Path]:
    """Environment and Settings of a deployment of its own: queue names, key prefix and a
    temporary store that a running ragq never shares (the user's converted models, though:
    converting again costs seconds and 0.5 GB). Applied to this process's environment too."""
    from common.config import Settings

    tag = uuid.uuid4().hex[:8]
    data_dir = Path(tempfile.mkdtemp(prefix="ragq-bench-"))
    env = dict(os.environ)
    env.update({
        "RAGQ_DATA_DIR": str(data_dir), "RAGQ_MODEL_CACHE_DIR": str(Settings().models_dir),
        "RAGQ_KEY_PREFIX": f"ragq-bench-{tag}",
        "RAGQ_DEVICE": device, "RAGQ_INGEST_QUEUE": f"bench-ingest-{tag}", "RAGQ_QA_QUEUE": f"bench-qa-{tag}",
        "RAGQ_STORE_QUEUE": f"bench-store-{tag}", "RAGQ_COLLECTION": f"bench-{tag}",
    })
    if model:
        env["RAGQ_EMBED_MODEL"] = model
    os.environ.update(env)
    return env, Settings(), data_dir


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--docs", type=int, default=400, help="corpus pages to ingest (spread over the corpus)")
    parser.add_argument("--corpus", default="en", choices=["en", "cn"], help="../shared/data/jdcloud-<corpus>")
    parser.add_argument("--model", default=None, help="RAGQ_EMBED_MODEL (default: ragq's default)")
    parser.add_argument("--rounds", type=int, default=2, help="runs of each side, alternating")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (fp16 on cuda)")
    parser.add_argument("--processes", type=int, default=1, help="worker processes (per GPU, or on the CPU)")
    args = parser.parse_args()

    env, settings, data_dir = private_deployment(args.device, args.model)
    files = corpus_files(DATA / f"jdcloud-{args.corpus}", args.docs)
    texts, embedder = chunk_texts(files, settings)
    from common.models import resolve_embed_model

    peer = Peer(resolve_embed_model(settings.embed_model, settings.models_dir), args.device, texts, data_dir)
    pipeline = Pipeline(env, settings, args.processes)
    runs: dict[str, list[dict]] = {"pipeline": [], "sentence_transformers": []}
    try:
        gpu = args.device.startswith("cuda")
        for _ in range(args.rounds):
            with GpuMemory(gpu) as memory:
                runs["pipeline"].append(pipeline.run(files))
            runs["pipeline"][-1]["gpu_peak_mib"] = memory.peak_mib
            tokens = runs["pipeline"][-1]["tokens"]
            assert runs["pipeline"][-1]["chunks"] == len(texts), (runs["pipeline"][-1]["chunks"], len(texts))
            with GpuMemory(gpu) as memory:
                runs["sentence_transformers"].append(peer.run(tokens))
            runs["sentence_transformers"][-1]["gpu_peak_mib"] = memory.peak_mib
            print(f"round {len(runs['pipeline'])}: pipeline {runs['pipeline'][-1]['tokens_per_s']:.0f} tok/s, "
                  f"sentence-transformers {runs['sentence_transformers'][-1]['tokens_per_s']:.0f} tok/s"
                  + (f"; GPU memory peak {runs['pipeline'][-1]['gpu_peak_mib']} vs "
                     f"{runs['sentence_transformers'][-1]['gpu_peak_mib']} MiB (whole card)" if gpu else ""),
                  flush=True)
    finally:
        pipeline.stop()
    best = {side: max(r["tokens_per_s"] for r in rs) for side, rs in runs.items()}
    ratio = best["pipeline"] / best["sentence_transformers"]
    first = runs["pipeline"][0]
    result = {"docs": len(files), "corpus": args.corpus, "model": embedder.model_name, "device": args.device,
              "threads": os.cpu_count(), "processes": args.processes, "chunks": len(texts),
              "tokens": first["tokens"], "batches": first["batches"], "runs": runs, "best": best,
              "ratio": ratio, "target": TARGET[args.device.split(":")[0]]}
    print(f"{args.corpus} corpus: documents {len(files)}, chunks {len(texts)}, tokens {first['tokens']}, "
          f"batches {first['batches']}, model {embedder.model_name}, device {args.device}, "
          f"worker processes {args.processes}")
    print(f"best pipeline (enqueue -> all stored): {best['pipeline']:.0f} tokens/s")
    print(f"best sentence-transformers encode, same chunks: {best['sentence_transformers']:.0f} tokens/s")
    print(f"ratio pipeline / sentence-transformers: {ratio:.3f}  (target >= {result['target']})")
    out = REPO / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    name = f"ingest-{args.corpus}-{args.device}-p{args.processes}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    (out / name).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
