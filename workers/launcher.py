"""``ragq worker``: start one pinned Celery worker process per GPU (or one on the CPU).

Each process sees exactly one GPU through ``CUDA_VISIBLE_DEVICES`` and is named after
it (``ingest-gpu0@host``), so Flower shows which device did what. The launcher stays
in the foreground, passes SIGINT/SIGTERM on (Celery's warm shutdown: the running batch
finishes, prefetched ones go back to the queue) and restarts a process that dies.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass

#: A process that dies sooner than this after its start is not restarted again
#: more than ``_MAX_FAST_RESTARTS`` times in a row (a configuration error, say).
_FAST_EXIT_S = 30.0
_MAX_FAST_RESTARTS = 3


def visible_gpus() -> list[str]:
    """GPU indices this host offers, without importing torch (``nvidia-smi -L``)."""
    preset = os.environ.get("CUDA_VISIBLE_DEVICES")
    if preset is not None:
        return [g.strip() for g in preset.split(",") if g.strip() and g.strip() != "-1"]
    smi = shutil.which("nvidia-smi")
    if not smi:
        return []
    try:
        out = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=20, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [str(i) for i, line in enumerate(out.splitlines()) if line.startswith("GPU ")]


def select_gpus(spec: str) -> list[str]:
    """``all`` -> every visible GPU, ``none`` -> [], ``0,2`` -> those (checked)."""
    spec = spec.strip().lower()
    if spec == "none":
        return []
    available = visible_gpus()
    if spec == "all":
        return available
    wanted = [g.strip() for g in spec.split(",") if g.strip()]
    missing = [g for g in wanted if g not in available]
    if missing:
        raise ValueError(f"GPU(s) {', '.join(missing)} not found; visible: {', '.join(available) or 'none'}")
    return wanted


@dataclass
class WorkerSpec:
    name: str
    gpu: str | None
    argv: list[str]
    env: dict[str, str]


def plan_workers(
    queues: Sequence[str],
    gpus: Sequence[str],
    *,
    pool: str = "prefork",
    loglevel: str = "INFO",
    hostname: str | None = None,
    extra_args: Sequence[str] = (),
) -> list[WorkerSpec]:
    host = hostname or socket.gethostname()
    label = "-".join(queues)
    base = [sys.executable, "-m", "celery", "-A", "workers.app", "worker", "-Q", ",".join(queues),
            "-P", pool, "-c", "1", "-E", "--loglevel", loglevel, "--without-gossip", "--without-mingle",
            *extra_args]
    specs: list[WorkerSpec] = []
    for gpu in gpus or [None]:
        env = dict(os.environ)
        if gpu is None:
            name = f"{label}-cpu@{host}"
            env["CUDA_VISIBLE_DEVICES"] = ""
            env.setdefault("RAGQ_DEVICE", "cpu")
        else:
            name = f"{label}-gpu{gpu}@{host}"
            env["CUDA_VISIBLE_DEVICES"] = gpu
        specs.append(WorkerSpec(name, gpu, [*base, "-n", name], env))
    return specs


class Supervisor:
    """Keeps the planned worker processes running until told to stop."""

    def __init__(self, specs: Sequence[WorkerSpec]) -> None:
        self.specs = list(specs)
        self.procs: dict[str, subprocess.Popen] = {}
        self.started: dict[str, float] = {}
        self.fast_exits: dict[str, int] = {}
        self.stopping = False

    def _start(self, spec: WorkerSpec) -> None:
        self.procs[spec.name] = subprocess.Popen(spec.argv, env=spec.env)
        self.started[spec.name] = time.monotonic()
        print(f"ragq: started {spec.name} (pid {self.procs[spec.name].pid})", file=sys.stderr, flush=True)

    def _signal_all(self, signum: int, _frame: object = None) -> None:
        self.stopping = True
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM if signum == signal.SIGINT else signum)

    def run(self) -> int:
        signal.signal(signal.SIGTERM, self._signal_all)
        signal.signal(signal.SIGINT, self._signal_all)
        for spec in self.specs:
            self._start(spec)
        status = 0
        while self.procs:
            time.sleep(0.5)
            for spec in self.specs:
                proc = self.procs.get(spec.name)
                if proc is None or proc.poll() is None:
                    continue
                code = proc.returncode
                del self.procs[spec.name]
                if self.stopping:
                    continue
                lived = time.monotonic() - self.started[spec.name]
                self.fast_exits[spec.name] = self.fast_exits.get(spec.name, 0) + 1 if lived < _FAST_EXIT_S else 0
                if self.fast_exits[spec.name] > _MAX_FAST_RESTARTS:
                    print(f"ragq: {spec.name} keeps exiting (code {code}); giving up", file=sys.stderr, flush=True)
                    status = code or 1
                    continue
                print(f"ragq: {spec.name} exited with code {code}; restarting", file=sys.stderr, flush=True)
                self._start(spec)
        return status
