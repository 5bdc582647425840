"""Benchmark: pipeline ingest throughput against an in-process embed-only loop.

Both sides get the same texts, model, device, threads and batch policy:
  * in-process: chunk the documents, then time ``Embedder.encode`` over the chunks of each
    ~1 MB batch the producer would send (the worker's unit of work);
  * pipeline: a real ``ragq worker`` process, warmed up, and ``Client.ingest``; time
    from the first enqueue until the job record says every chunk is stored.
The figure of merit is pipeline tokens/s divided by in-process tokens/s (target >= 0.9).

    python bench/ingest.py [--docs 400] [--device cpu|cuda] [--processes 1]

``--processes N`` runs N worker processes (per GPU, or sharing the CPU's cores); with
the embedded store and N > 1 they send their writes to the store-owning process, so
the ratio then measures that topology against the same in-process loop.

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
CORPUS = REPO.parent / "shared" / "data" / "jdcloud-en"


def corpus_files(n: int) -> list[Path]:
    if not (CORPUS / "manifest.jsonl").is_file():
        sys.exit(f"the benchmark needs the corpus at {CORPUS}")
    manifest = [json.loads(line) for line in (CORPUS / "manifest.jsonl").open()]
    stride = max(1, len(manifest) // n)
    return [CORPUS / m["file"] for m in manifest[::stride][:n]]


def in_process(files: list[Path], settings) -> dict:
    from common.batching import pack_batches
    from common.embedding import Embedder
    from common.ingest import make_chunker
    from common.inputs import InputReader
    from common.schemas import DocumentItem

    embedder = Embedder(settings.embed_model, settings.device, settings.embed_batch_tokens, settings.torch_threads)
    chunker = make_chunker(embedder, settings.chunk_tokens, settings.chunk_overlap)
    reader = InputReader(max_document_bytes=settings.max_document_bytes)
    docs = [e for e in reader.read(files) if isinstance(e, DocumentItem)]
    batches = [[c.text for item in b.items for c in chunker.split(item.content)]
               for b in pack_batches(docs, settings.batch_bytes)]
    embedder.encode(batches[0][:8])  # warm-up, as the worker warms up at start
    tokens = 0
    started = time.perf_counter()
    for texts in batches:
        _, stats = embedder.encode_with_stats(texts)
        tokens += stats.tokens
    seconds = time.perf_counter() - started
    return {"tokens": tokens, "chunks": sum(map(len, batches)), "batches": len(batches),
            "seconds": seconds, "tokens_per_s": tokens / seconds, "device": str(embedder.device)}


def pipeline(files: list[Path], env: dict[str, str], settings, processes: int = 1) -> dict:
    from producer.client import Client

    log = open(Path(env["RAGQ_DATA_DIR"]) / "worker.log", "wb")
    gpus = "none" if settings.device == "cpu" else "all"
    # an ingest-only worker, as deployments run them (no LLM loading beside the batches)
    worker = subprocess.Popen([sys.executable, "-m", "producer", "worker", "--gpus", gpus,
                               "--queues", settings.ingest_queue, "--processes", str(processes)],
                              cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        client = Client(settings)
        deadline = time.monotonic() + 180
        log_path = Path(env["RAGQ_DATA_DIR"]) / "worker.log"
        # warm: every process consumes, and each warm-up thread has loaded the model
        owner = processes > 1 and not settings.qdrant_url
        while not (log_path.read_bytes().count(b"ready.") >= processes + owner
                   and log_path.read_bytes().count(b"loaded embedding model") >= processes):
            if time.monotonic() > deadline or worker.poll() is not None:
                sys.exit(f"the worker did not start; see {log_path}")
            time.sleep(0.2)
        started = time.perf_counter()
        job = client.ingest(files)
        info = job.wait(timeout=3600, poll_s=0.05)
        seconds = time.perf_counter() - started
        if info.status != "completed":
            sys.exit(f"pipeline job ended {info.status}: {info.errors[:3]}")
        return {"tokens": info.tokens, "chunks": info.chunks, "batches": info.batches_total,
                "seconds": seconds, "tokens_per_s": info.tokens / seconds,
                "worker_busy_s": info.elapsed_s}
    finally:
        worker.send_signal(signal.SIGTERM)
        try:
            worker.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(worker.pid, signal.SIGKILL)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--docs", type=int, default=400, help="corpus pages to ingest (spread over the corpus)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (fp16 on cuda)")
    parser.add_argument("--processes", type=int, default=1, help="worker processes (per GPU, or on the CPU)")
    args = parser.parse_args()

    from common.config import Settings

    tag = uuid.uuid4().hex[:8]
    data_dir = Path(tempfile.mkdtemp(prefix="ragq-bench-"))
    env = {k: v for k, v in os.environ.items()}
    env.update({
        "RAGQ_DATA_DIR": str(data_dir), "RAGQ_KEY_PREFIX": f"ragq-bench-{tag}", "RAGQ_DEVICE": args.device,
        "RAGQ_INGEST_QUEUE": f"bench-ingest-{tag}", "RAGQ_QA_QUEUE": f"bench-qa-{tag}",
        "RAGQ_STORE_QUEUE": f"bench-store-{tag}",
        "RAGQ_COLLECTION": "bench", "TOKENIZERS_PARALLELISM": "false",
    })
    os.environ.update(env)
    settings = Settings()
    files = corpus_files(args.docs)

    local = in_process(files, settings)
    piped = pipeline(files, env, settings, args.processes)
    assert local["tokens"] == piped["tokens"], (local["tokens"], piped["tokens"])
    ratio = piped["tokens_per_s"] / local["tokens_per_s"]
    result = {"docs": len(files), "device": local["device"], "threads": os.cpu_count(), "processes": args.processes,
              "in_process": local, "pipeline": piped, "ratio": ratio, "target": 0.9}
    print(f"documents {len(files)}, chunks {local['chunks']}, tokens {local['tokens']}, "
          f"batches {local['batches']}, device {local['device']}, worker processes {args.processes}")
    print(f"in-process embed-only: {local['seconds']:.1f} s  {local['tokens_per_s']:.0f} tokens/s")
    print(f"pipeline (enqueue -> all stored): {piped['seconds']:.1f} s  {piped['tokens_per_s']:.0f} tokens/s")
    print(f"ratio pipeline / in-process: {ratio:.3f}  (target >= 0.9)")
    out = REPO / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / f"ingest-{args.device}-p{args.processes}-{time.strftime('%Y%m%d-%H%M%S')}.json").write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
