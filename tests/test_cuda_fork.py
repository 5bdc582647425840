"""The Celery main process never loads torch, so pool processes it forks can use CUDA.

A main process that initialised CUDA (``torch.cuda.is_available()`` at worker_ready did)
forks pool processes that cannot; the first pool process is spared only because it is
forked before worker_ready, so a process forked after a hard-limit kill or an OOM is the
one that breaks. On a CPU the same mistake shows as torch loaded in the main process,
which this test looks for from two sides, after start and after a pool process is killed
and forked again: the main process's own answer to the ``ragq_main_process``
remote-control command (its ``sys.modules``, ``torch.cuda.is_initialized()``, its CUDA
environment), and its memory map in /proc (libtorch mapped or not), checked against the
pool process, where torch must be loaded. On a GPU, ``bench/gpu_fork_check.py`` runs the
same kill and then CUDA itself.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Any

import pytest

from common.devices import CUDA_ENV
from producer.client import Client
from tests.conftest import Stack
from tests.faults import celery_main, pool_child, wait_for

pytestmark = [pytest.mark.fault, pytest.mark.timeout(300)]


def main_process_report(client: Client, pid: int) -> dict[str, Any]:
    """The answer of the Celery main process ``pid`` itself (remote control runs there)."""
    replies = client.celery.control.broadcast("ragq_main_process", reply=True, timeout=10)
    reports = [r for reply in replies for r in reply.values() if isinstance(r, dict) and r.get("pid") == pid]
    assert reports, f"no ragq_main_process answer from pid {pid}: {replies}"
    return reports[0]


def maps_torch(pid: int) -> bool:
    """Whether libtorch is mapped into process ``pid``: the import graph, seen from outside."""
    return "libtorch" in Path(f"/proc/{pid}/maps").read_text()


def environ(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return dict(item.decode(errors="replace").split("=", 1) for item in raw if b"=" in item)


def assert_main_clean(client: Client, main: int, when: str) -> None:
    report = main_process_report(client, main)
    assert report["loaded"] == [], f"{when}: the Celery main process loaded {report['loaded']}"
    assert report["cuda_initialized"] is False, when
    assert report["env"] == CUDA_ENV, f"{when}: {report['env']}"
    assert not maps_torch(main), f"{when}: libtorch is mapped into the Celery main process"


def test_main_process_never_loads_torch_across_a_pool_restart(stack: Stack) -> None:
    client = Client(stack.settings())
    main = celery_main(stack)
    assert client.search("how long are messages kept?", top_k=1, timeout=120) is not None
    first = pool_child(stack)
    assert maps_torch(first), "the pool process embeds, so torch must be loaded there (a real observation)"
    assert {k: environ(first).get(k) for k in CUDA_ENV} == CUDA_ENV
    assert_main_clean(client, main, "after start")

    os.kill(first, signal.SIGKILL)  # what a hard time limit or the OOM killer does
    second = wait_for(lambda: next((c for c in [pool_child(stack)] if c != first), None), 60,
                      "Celery to fork a new pool process", on_timeout=lambda: stack.log_text()[-3000:])
    assert client.search("how long are messages kept?", top_k=1, timeout=120) is not None
    assert maps_torch(second)
    assert celery_main(stack) == main  # the same main process forked it
    assert_main_clean(client, main, "after a pool process was killed and forked again")
    print(f"\nmain {main}: no torch; pool {first} killed, {second} forked, torch loaded there")


def test_every_planned_process_starts_with_the_cuda_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """NVML-based availability checks (no CUDA init) and PCI bus order (``gpuN`` is
    nvidia-smi's card N) in every worker the launcher plans, unless the operator set them."""
    from workers.launcher import plan_workers

    for key in CUDA_ENV:
        monkeypatch.delenv(key, raising=False)
    specs = plan_workers(["ingest"], ["0", "1"], store_queue="store", hostname="h")
    assert [{k: s.env.get(k) for k in CUDA_ENV} for s in specs] == [CUDA_ENV] * 3
    monkeypatch.setenv("CUDA_DEVICE_ORDER", "FASTEST_FIRST")
    (single,) = plan_workers(["ingest"], [], store_queue="store", hostname="h")
    assert single.env["CUDA_DEVICE_ORDER"] == "FASTEST_FIRST"
