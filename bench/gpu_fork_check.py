#!/usr/bin/env python
"""On a GPU host: a pool process forked after its predecessor was killed still runs CUDA.

Not a test (it needs a GPU); run by hand on a GPU machine with Redis answering:

    PYTHONPATH=. python bench/gpu_fork_check.py [--gpu 0] [--kills 2] [--redis redis://127.0.0.1:6379/9]

It starts ``ragq worker --gpus N`` (RAGQ_DEVICE=cuda, so a broken CUDA fails loudly
instead of falling back to the CPU), embeds through the queue, then SIGKILLs the pool
process ``--kills`` times (what Celery's hard time limit or the OOM killer does) and
embeds again after each restart. It checks, printing PASS/FAIL per line and exiting 1 on
any failure:

* the Celery main process (asked with the ``ragq_main_process`` remote-control command,
  answered by the main process itself) never imports torch nor initialises CUDA, and has
  PYTORCH_NVML_BASED_CUDA_CHECK=1 and CUDA_DEVICE_ORDER=PCI_BUS_ID;
* every embed after a kill succeeds, and the worker's metrics then report ``cuda:0``
  with GPU memory reserved (flushed by the new pool process, which initialised CUDA);
* the card the worker reports is the one ``nvidia-smi -i N`` names (name and, where
  torch exposes it, PCI bus id): ``gpuN`` in the worker's name is nvidia-smi's N.
"""

from __future__ import annotations

import argparse
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

from common.config import MINILM_MODEL, Settings  # noqa: E402
from common.metrics import MetricsStore  # noqa: E402

failures: list[str] = []


def check(ok: bool, what: str) -> None:
    print(f"{'PASS' if ok else 'FAIL'}  {what}", flush=True)
    if not ok:
        failures.append(what)


def children(pid: int) -> list[int]:
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid and fields[0] != "Z":
                out.append(int(entry))
    return sorted(out)


def wait_for(fn, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = fn()
        if value:
            return value
        time.sleep(0.2)
    raise SystemExit(f"FAIL  timed out after {timeout:.0f}s waiting for {what}")


def smi(gpu: str, field: str) -> str:
    return subprocess.run(["nvidia-smi", "-i", gpu, f"--query-gpu={field}", "--format=csv,noheader"],
                          capture_output=True, text=True, check=True).stdout.strip()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gpu", default="0")
    parser.add_argument("--kills", type=int, default=2)
    parser.add_argument("--redis", default=os.environ.get("RAGQ_REDIS_URL", "redis://127.0.0.1:6379/9"))
    args = parser.parse_args()

    tag = uuid.uuid4().hex[:6]
    data = Path(tempfile.mkdtemp(prefix="ragq-gpu-fork-"))
    env_vars = {
        "RAGQ_REDIS_URL": args.redis, "RAGQ_DATA_DIR": str(data), "RAGQ_KEY_PREFIX": f"ragq-gpucheck-{tag}",
        "RAGQ_INGEST_QUEUE": f"ingest-{tag}", "RAGQ_QA_QUEUE": f"qa-{tag}", "RAGQ_STORE_QUEUE": f"store-{tag}",
        "RAGQ_LLM_BACKEND": "none", "RAGQ_EMBED_MODEL": os.environ.get("RAGQ_EMBED_MODEL", MINILM_MODEL),
        "RAGQ_DEVICE": "cuda",
    }
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAGQ_") and k != "CUDA_VISIBLE_DEVICES"}
    env.update(env_vars, PYTHONPATH=str(REPO), PYTHONUNBUFFERED="1")
    settings = Settings(_env_file=None, **{k.removeprefix("RAGQ_").lower(): v for k, v in env_vars.items()})

    from producer.client import Client, RagqError

    client = Client(settings)
    log = (data / "worker.log").open("ab")
    launcher = subprocess.Popen(
        [sys.executable, "-m", "producer", "worker", "--gpus", args.gpu, "--loglevel", "INFO",
         "--queues", f"{settings.ingest_queue},{settings.qa_queue}", "--interactive-threads", "0"],
        cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        def answering() -> bool:
            try:
                client.store_info(timeout=5)
                return True
            except RagqError:
                if launcher.poll() is not None:
                    raise SystemExit(f"FAIL  the worker exited; see {data}/worker.log") from None
                return False
        wait_for(answering, 300, "the worker to answer")
        celery_main = wait_for(lambda: (children(launcher.pid) or [None])[0], 30, "the Celery main process")
        metrics = MetricsStore(client.redis, prefix=settings.key_prefix)

        def main_process_clean(when: str) -> None:
            replies = client.celery.control.broadcast("ragq_main_process", reply=True, timeout=10)
            report = next(iter(replies[0].values())) if replies else {}
            check(report.get("pid") == celery_main, f"{when}: the reply comes from the Celery main process "
                  f"(pid {report.get('pid')} vs {celery_main})")
            check("torch" not in report.get("loaded", ["?"]), f"{when}: main process has not imported torch "
                  f"(loaded: {report.get('loaded')})")
            check(report.get("cuda_initialized") is False, f"{when}: main process has not initialised CUDA")
            check(report.get("env") == {"PYTORCH_NVML_BASED_CUDA_CHECK": "1", "CUDA_DEVICE_ORDER": "PCI_BUS_ID"},
                  f"{when}: main process env {report.get('env')}")

        def embeds_on_gpu(when: str) -> dict[str, str]:
            try:
                reply = client.embed(["Is CUDA still usable in this pool process?"], timeout=300)
                ok = len(reply["embeddings"]) == 1
            except RagqError as exc:
                ok = False
                print(f"      {exc}")
            check(ok, f"{when}: embedding through the queue works")
            time.sleep(0.5)  # the metrics flush follows the task
            info = next(iter(metrics.snapshot().workers.values())).info
            check(info.get("device") == "cuda:0" and int(info.get("gpu_memory_reserved_bytes") or 0) > 0,
                  f"{when}: the pool process reports CUDA ({info.get('device')}, "
                  f"{info.get('gpu_memory_reserved_bytes')} bytes reserved)")
            return info

        main_process_clean("after start")
        info = embeds_on_gpu("first pool process")
        name = smi(args.gpu, "name")
        check(info.get("gpu_name") == name, f"gpu{args.gpu} is nvidia-smi's card {args.gpu} "
              f"({info.get('gpu_name')!r} vs {name!r})")
        probe = subprocess.run(
            [sys.executable, "-c", "import torch; p = torch.cuda.get_device_properties(0); "
             "print(f'{p.pci_domain_id:08X}:{p.pci_bus_id:02X}:{p.pci_device_id:02X}.0')"],
            env={**env, "CUDA_VISIBLE_DEVICES": args.gpu, "CUDA_DEVICE_ORDER": "PCI_BUS_ID"},
            capture_output=True, text=True)
        if probe.returncode == 0:
            bus = smi(args.gpu, "pci.bus_id")
            check(probe.stdout.strip().upper() == bus.upper(), f"CUDA device of gpu{args.gpu} sits at nvidia-smi's "
                  f"PCI bus id ({probe.stdout.strip()} vs {bus})")
        else:
            print(f"SKIP  PCI bus id (this torch does not expose it): {probe.stderr.strip()[-200:]}")

        for kill in range(1, args.kills + 1):
            (old,) = wait_for(lambda: children(celery_main), 60, "a pool process")
            os.kill(old, signal.SIGKILL)
            new = wait_for(lambda: [c for c in children(celery_main) if c != old], 60, "a new pool process")
            print(f"      killed pool process {old}; Celery forked {new[0]}")
            embeds_on_gpu(f"pool process forked after kill {kill}")
            main_process_clean(f"after kill {kill}")
    finally:
        launcher.send_signal(signal.SIGTERM)
        try:
            launcher.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(launcher.pid, signal.SIGKILL)
    print(f"{'FAILED' if failures else 'PASSED'}: {len(failures)} failure(s); worker log {data}/worker.log")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
