"""``ragq worker``: start pinned Celery worker processes, one per GPU (or on the CPU).

Each process sees exactly one GPU through ``CUDA_VISIBLE_DEVICES`` and is named after
it (``ingest-gpu0@host``), so Flower shows which device did what. Beside each, a small
process with a threads pool (``interactive-gpu0@host``) serves only the interactive
queue (asks, searches, embeddings, single-document ingests) on the same device, so
an ask never waits for a bulk batch to end, nor for the bulk process's LLM requests
(the in-flight budget is per process). With the embedded
store and more than one process, a small extra process (``store@host``) owns the store
and the others send it their store calls (see ``common/remote_store.py``); it is
stopped last, after the others' final batches are stored. The launcher stays
in the foreground and restarts a process that dies (after killing anything the dead
process left behind in its process group). If the store's owner keeps exiting and is
given up on, the launch stops: the others could not store anything without it.

Stopping drains: the first SIGTERM/SIGINT is passed on as SIGTERM, Celery's warm
shutdown (the running batch finishes and is acked, a prefetched one goes back to the
queue); a second one, or ``drain_timeout_s`` running out, sends SIGQUIT, Celery's cold
shutdown (the running batch is abandoned unacked and the broker requeues it). Each
worker runs in its own process group, so a Ctrl-C in the terminal reaches the launcher
only and Celery sees one signal, not the terminal's SIGINT plus the forwarded SIGTERM
(two signals would turn the warm shutdown into a cold one). The signal handler only
counts; the supervising loop acts on it, so a signal landing while processes are being
started or restarted reaches every one of them. A launcher killed outright
(SIGKILL) takes its workers with it (Linux ``PR_SET_PDEATHSIG``), as if they shared its
process group, so it leaves no orphans consuming the queues.
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

from common.devices import apply_cuda_env

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
    #: Stopped only after every other process has exited (the embedded store's owner,
    #: which the others' last batches still need).
    stop_last: bool = False


def plan_workers(
    queues: Sequence[str],
    gpus: Sequence[str],
    *,
    processes: int = 1,
    store_queue: str | None = None,
    interactive_queue: str | None = None,
    interactive_threads: int = 2,
    pool: str = "prefork",
    concurrency: int = 1,
    loglevel: str = "INFO",
    hostname: str | None = None,
    extra_args: Sequence[str] = (),
) -> list[WorkerSpec]:
    """The worker processes of one ``ragq worker``: ``processes`` per GPU (or on the CPU).

    ``concurrency`` is how many batches each process runs at once. Above 1 it needs the
    threads pool: the slots share the process's loaded model and its LLM client and
    in-flight budget, so one batch is retrieved while another's requests are in flight
    (prefork children would each load the model: use ``processes`` for that).

    ``store_queue`` is given when this launch owns the embedded store. One process then
    consumes it itself; with more, a small extra process (no model, CPU) owns the store
    and the others send it their store calls, so any number of them can embed.

    ``interactive_queue`` is given when this launch serves interactive work. Each device
    then gets one more process consuming only it, a threads pool of
    ``interactive_threads`` (it loads the models once more on that device). With
    ``interactive_threads=0`` the bulk processes consume it too, listed first; they
    take it before any bulk batch (it is sent at the top priority), but only once their
    running batch has ended.
    """
    if concurrency > 1 and pool == "prefork":
        raise ValueError("--concurrency above 1 needs --pool threads (prefork children would each load "
                         "the model; use --processes for more processes)")
    host = hostname or socket.gethostname()
    queues = [q for q in queues if q not in (store_queue, interactive_queue)]
    dedicated = bool(interactive_queue) and interactive_threads > 0
    if interactive_queue and not dedicated:
        queues = [interactive_queue, *queues]
    devices = list(gpus) or [None]
    many = len(devices) * (processes + dedicated) > 1
    if store_queue and not many:
        queues = [*queues, store_queue]
    label = "-".join(q for q in queues if q not in (store_queue, interactive_queue)) or "store"
    cpu_threads = max(1, (os.cpu_count() or 1) // processes)
    specs: list[WorkerSpec] = []
    for gpu in devices:
        for index in range(processes):
            env = dict(os.environ)
            suffix = f".{index}" if processes > 1 else ""
            if gpu is None:
                name = f"{label}-cpu{suffix}@{host}"
                env["CUDA_VISIBLE_DEVICES"] = ""
                env.setdefault("RAGQ_DEVICE", "cpu")
                if processes > 1:  # share the cores instead of every process using all of them
                    env.setdefault("RAGQ_TORCH_THREADS", str(cpu_threads))
            else:
                name = f"{label}-gpu{gpu}{suffix}@{host}"
                env["CUDA_VISIBLE_DEVICES"] = gpu
            specs.append(_spec(name, gpu, queues, apply_cuda_env(env), pool, loglevel, extra_args,
                               concurrency=concurrency))
        if dedicated:
            env = dict(os.environ, CUDA_VISIBLE_DEVICES=gpu or "")
            if gpu is None:
                env.setdefault("RAGQ_DEVICE", "cpu")
            where = f"gpu{gpu}" if gpu is not None else "cpu"
            specs.append(_spec(f"interactive-{where}@{host}", gpu, [interactive_queue], apply_cuda_env(env),
                               "threads", loglevel, extra_args, concurrency=interactive_threads))
    if store_queue and many:
        env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "RAGQ_DEVICE": "cpu", "RAGQ_TORCH_THREADS": "1"}
        specs.append(_spec(f"store@{host}", None, [store_queue], apply_cuda_env(env), pool, loglevel, extra_args,
                           stop_last=True))
    return specs


def _spec(name: str, gpu: str | None, queues: Sequence[str], env: dict[str, str], pool: str,
          loglevel: str, extra_args: Sequence[str], *, stop_last: bool = False, concurrency: int = 1) -> WorkerSpec:
    argv = [sys.executable, "-m", "celery", "-A", "workers.app", "worker", "-Q", ",".join(queues),
            "-P", pool, "-c", str(concurrency), "-E", "--loglevel", loglevel, "--without-gossip", "--without-mingle",
            *extra_args, "-n", name]
    return WorkerSpec(name, gpu, argv, env, stop_last)


def _die_with_parent() -> None:
    """In the child, before exec: be killed too if the launcher is killed."""
    if sys.platform.startswith("linux"):
        import ctypes

        try:
            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            pass


class Supervisor:
    """Keeps the planned worker processes running until told to stop, then drains them."""

    #: After SIGQUIT, seconds to wait before SIGKILL.
    COLD_GRACE_S = 30.0

    def __init__(self, specs: Sequence[WorkerSpec], *, drain_timeout_s: float | None = None,
                 poll_s: float = 0.5) -> None:
        self.specs = list(specs)
        self.procs: dict[str, subprocess.Popen] = {}
        self.started: dict[str, float] = {}
        self.fast_exits: dict[str, int] = {}
        self.restart_at: dict[str, float] = {}
        self.drain_timeout_s = drain_timeout_s
        self.poll_s = poll_s
        self.stopping = False
        self.signals_received = 0  # counted by the handler ...
        self.signals_handled = 0  # ... acted on by the loop
        self.stop_since: float | None = None
        self.escalated: float | None = None
        self.last_wave_sent = False

    def _start(self, spec: WorkerSpec) -> None:
        self.procs[spec.name] = subprocess.Popen(spec.argv, env=spec.env, process_group=0,
                                                 preexec_fn=_die_with_parent)
        self.started[spec.name] = time.monotonic()
        print(f"ragq: started {spec.name} (pid {self.procs[spec.name].pid})", file=sys.stderr, flush=True)

    def _on_signal(self, signum: int, _frame: object = None) -> None:
        """Only count the signal; the loop acts on it (:meth:`_handle_signals`).

        A handler that signalled the processes itself would run between any two lines:
        in the middle of the start-up loop or of a restart, it missed the processes
        started after it, which then ran on unsignalled while the drain waited for them.
        """
        self.signals_received += 1

    def _handle_signals(self) -> None:
        """Act on signals counted since the last call: the first drains, the second escalates."""
        while self.signals_handled < self.signals_received:
            self.signals_handled += 1
            if not self.stopping:
                self._stop("draining (warm shutdown: running batches finish); "
                           "signal again to requeue them instead")
            elif self.escalated is None:
                self._escalate("second signal")

    def _stop(self, why: str) -> None:
        """Begin the drain: SIGTERM to every live process but the store owner, no restarts."""
        self.stopping = True
        self.stop_since = time.monotonic()
        self.restart_at.clear()
        print(f"ragq: {why}", file=sys.stderr, flush=True)
        self._send(signal.SIGTERM, last=False)

    def _escalate(self, why: str) -> None:
        self.escalated = time.monotonic()
        print(f"ragq: {why}: cold shutdown, running batches go back to the queue", file=sys.stderr, flush=True)
        self._send(signal.SIGQUIT)

    def _send(self, signum: int, *, last: bool | None = None) -> None:
        """Signal the live processes: all of them, or only those (not) stopped last."""
        stop_last = {spec.name for spec in self.specs if spec.stop_last}
        for name, proc in self.procs.items():
            if last is not None and (name in stop_last) != last:
                continue
            if proc.poll() is None:
                try:
                    proc.send_signal(signum)
                except ProcessLookupError:
                    pass

    @staticmethod
    def _reap_group(proc: subprocess.Popen) -> None:
        """Kill what a dead worker left in its process group (a pool child mid-batch, say)."""
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass

    def run(self) -> int:
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)
        for started, spec in enumerate(self.specs):
            if self.signals_received:  # stopped during start-up: start no more
                print(f"ragq: signalled during start-up, after {started} of {len(self.specs)} processes",
                      file=sys.stderr, flush=True)
                break
            self._start(spec)
        status = 0
        while True:
            self._handle_signals()  # before the exit test: a process started just now is signalled too
            if not (self.procs or self.restart_at):
                break
            time.sleep(self.poll_s)
            self._handle_signals()
            now = time.monotonic()
            if self.stopping:
                if (self.escalated is None and self.drain_timeout_s is not None
                        and now - (self.stop_since or now) > self.drain_timeout_s):
                    self._escalate(f"still draining after {self.drain_timeout_s:.0f}s")
                elif self.escalated is not None and now - self.escalated > self.COLD_GRACE_S:
                    self._send(signal.SIGKILL)
                if not self.last_wave_sent and not any(
                        spec.name in self.procs for spec in self.specs if not spec.stop_last):
                    self.last_wave_sent = True  # the rest have exited: now the store owner
                    self._send(signal.SIGTERM, last=True)
            for spec in self.specs:
                if spec.name in self.restart_at and now >= self.restart_at[spec.name]:
                    del self.restart_at[spec.name]
                    self._start(spec)
                proc = self.procs.get(spec.name)
                if proc is None or proc.poll() is None:
                    continue
                code = proc.returncode
                del self.procs[spec.name]
                self._reap_group(proc)
                if self.stopping:
                    print(f"ragq: {spec.name} stopped (code {code})", file=sys.stderr, flush=True)
                    status = status or (code if code and code > 0 else 0)
                    continue
                lived = now - self.started[spec.name]
                self.fast_exits[spec.name] = self.fast_exits.get(spec.name, 0) + 1 if lived < _FAST_EXIT_S else 0
                if self.fast_exits[spec.name] > _MAX_FAST_RESTARTS:
                    print(f"ragq: {spec.name} keeps exiting (code {code}); giving up", file=sys.stderr, flush=True)
                    status = code if code and code > 0 else 1
                    if spec.stop_last:  # without the store's owner every other process fails every batch
                        self._stop("the embedded store's owner gave up: stopping the others "
                                   "(their batches stay queued)")
                    continue
                delay = min(2.0 ** (self.fast_exits[spec.name] - 1), 10.0) if self.fast_exits[spec.name] else 0.0
                print(f"ragq: {spec.name} exited with code {code}; restarting"
                      + (f" in {delay:.0f}s" if delay else ""), file=sys.stderr, flush=True)
                self.restart_at[spec.name] = now + delay
        return status
