"""Operations commands: ``ragq flower``, ``ragq metrics`` and ``ragq top``.

``flower`` runs Celery's Flower against ragq's app and broker (basic auth required
whenever it listens beyond localhost); ``metrics`` serves ragq's own Prometheus
exporter (queue depths, workers' counters and stage latencies, read from Redis on each
scrape); ``top`` shows throughput per queue and worker in the terminal.
"""

from __future__ import annotations

import ipaddress
import os
import signal
import sys
import threading
import time
from typing import Optional

import typer
from rich.console import Group
from rich.live import Live
from rich.table import Table

from common.config import Settings
from common.metrics import STAGES, MetricsStore, PrometheusCollector, Snapshot, Throughput, throughput
from common.runtime import redis_client
from producer.cli import EXIT_SETUP, _fail, _print_json, app, err, out

#: ragq's exporter port (Flower's own metrics are on Flower's port, at /metrics).
DEFAULT_METRICS_PORT = 9808


def is_loopback(address: str) -> bool:
    """True for addresses only this host can reach (``''`` and ``0.0.0.0`` are every interface)."""
    if address.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(address.strip().strip("[]")).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to a public interface


def check_basic_auth(value: str) -> str | None:
    """None if ``user:password[,user2:password2]`` is well formed, else the problem."""
    for pair in value.split(","):
        user, sep, password = pair.partition(":")
        if not sep or not user.strip() or not password:
            return "--basic-auth must be user:password (several separated by commas), each part non-empty"
    return None


def flower_command(address: str, port: int, extra: list[str]) -> list[str]:
    """``celery -A producer.cli_ops:celery_app flower ...`` (see :func:`__getattr__`)."""
    return [sys.executable, "-m", "celery", "-A", f"{__name__}:celery_app", "flower",
            f"--address={address}", f"--port={port}", *extra]


def __getattr__(name: str) -> object:
    """``celery_app``: the producer's Celery app, built from Settings when Flower asks for it.

    Flower needs ragq's configuration (routes, so a task sent through its API lands on
    the right queue; JSON only; the result backend, which its ``/api/task/result`` reads
    through the default app) but not the tasks' code: the workers' app would make
    Flower import the task module and with it torch. Built on first access (PEP 562),
    so importing this module reads no settings.
    """
    if name == "celery_app":
        from producer.client import Client

        globals()["celery_app"] = app_ = Client(Settings()).celery
        app_.set_default()  # Flower's result API builds AsyncResult(id) without an app
        return app_
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def flower(
    ctx: typer.Context,
    port: int = typer.Option(5555, help="Port to listen on."),
    address: str = typer.Option("127.0.0.1", help="Interface to listen on; anything but loopback needs --basic-auth."),
    basic_auth: Optional[str] = typer.Option(
        None, envvar="FLOWER_BASIC_AUTH", show_envvar=True,
        help="user:password[,user2:password2]; passed to Flower in its environment, not its command line."),
) -> None:
    """Run Flower (Celery's web monitor and HTTP API) for ragq's workers.

    Options after the known ones go to Flower as they are (e.g. --url_prefix=flower,
    --purge_offline_workers=60, --max_tasks=50000).
    """
    env = dict(os.environ)
    if basic_auth:
        problem = check_basic_auth(basic_auth)
        if problem:
            _fail(problem)
        env["FLOWER_BASIC_AUTH"] = basic_auth
    else:
        env.pop("FLOWER_BASIC_AUTH", None)
    oauth = bool(env.get("FLOWER_AUTH")) or any(a.startswith("--auth") for a in ctx.args)
    if not is_loopback(address) and not basic_auth and not oauth:
        _fail(f"refusing to start Flower on {address or 'every interface'} without authentication: Flower can "
              "run and revoke tasks and shut workers down. Pass --basic-auth user:password (or set "
              "FLOWER_BASIC_AUTH), or listen on 127.0.0.1.")
    if not basic_auth and not oauth:
        err.print("[yellow]note:[/yellow] no authentication: Flower's HTTP API stays disabled "
                  "(pass --basic-auth to use it)", highlight=False)
    argv = flower_command(address, port, list(ctx.args))
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(argv[0], argv, env)  # Flower gets the signals directly (Procfile, containers)


def _store(settings: Settings) -> MetricsStore:
    return MetricsStore(redis_client(settings), prefix=settings.key_prefix, ttl=settings.job_ttl_s)


@app.command()
def metrics(
    port: int = typer.Option(DEFAULT_METRICS_PORT, help="Port of the /metrics endpoint."),
    host: str = typer.Option("127.0.0.1", help="Interface to listen on (0.0.0.0 for a Prometheus elsewhere)."),
    queues: str = typer.Option("", help="Extra queues to report the depth of (comma-separated); the "
                                        "configured ones and those workers consume are always reported."),
) -> None:
    """Serve ragq's Prometheus metrics: queue depths, workers' counters, stage latencies, devices."""
    from prometheus_client import CollectorRegistry, start_http_server

    settings = Settings()
    store = _store(settings)
    try:
        store.redis.ping()
    except Exception as exc:
        _fail(f"cannot reach Redis: {exc}")
    wanted = [settings.interactive_queue, settings.ingest_queue, settings.qa_queue,
              *(q.strip() for q in queues.split(",") if q.strip())]
    registry = CollectorRegistry(auto_describe=False)
    registry.register(PrometheusCollector(store, wanted))
    try:
        server, _thread = start_http_server(port, addr=host, registry=registry)
    except OSError as exc:
        _fail(f"cannot listen on {host}:{port}: {exc}")
    err.print(f"ragq metrics on http://{host}:{server.server_port}/metrics", highlight=False)
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    stop.wait()
    server.shutdown()


def _render(t: Throughput, taken_at: float) -> Group:
    clock = time.strftime("%H:%M:%S", time.localtime(taken_at))
    queues = Table(title=f"queues [dim]{clock}, {t.unacked} in flight, rates over {t.interval_s:.1f}s[/dim]",
                   title_justify="left")
    for col, justify in (("queue", "left"), ("waiting", "right"), ("tasks/s", "right"), ("workers online", "left")):
        queues.add_column(col, justify=justify)
    for q in t.queues:
        queues.add_row(q["queue"], str(q["waiting"]), f"{q['tasks_per_s']:.2f}", ", ".join(q["workers"]) or "-")

    workers = Table(title="workers", title_justify="left")
    for col, justify in (("worker", "left"), ("device", "left"), ("docs/s", "right"), ("tok/s", "right"),
                         ("q/s", "right"), ("ok/err/retry", "right"), ("seen", "right")):
        workers.add_column(col, justify=justify, no_wrap=col in ("worker", "device"))
    stages = Table(title="stage latency, mean per batch (ms)", title_justify="left")
    stages.add_column("worker", no_wrap=True)
    names = [s for s in STAGES if any(s in w["stage_mean_s"] for w in t.workers)]
    for stage in names:
        stages.add_column(stage, justify="right")
    for w in t.workers:
        name = w["name"] if w["state"] == "online" else f"[dim]{w['name']} ({w['state'] or '?'})[/dim]"
        device = w["device"] or "?"
        if w["gpu_name"]:
            device += f" {w['gpu_name']}"
        elif w["gpu"]:
            device += f" (GPU {w['gpu']})"
        seen = f"{w['last_seen_s']:.0f}s" if w["last_seen_s"] is not None else "-"
        tasks = w["tasks"]
        workers.add_row(name, device, f"{w['documents_per_s']:.1f}", f"{w['tokens_per_s']:.0f}",
                        f"{w['questions_per_s']:.2f}", f"{tasks['succeeded']}/{tasks['failed']}/{tasks['retried']}",
                        seen)
        stages.add_row(name, *(f"{w['stage_mean_s'][s] * 1000:.0f}" if s in w["stage_mean_s"] else "-"
                               for s in names))
    if not t.workers:
        workers.add_row("(none has reported yet: start one with `ragq worker`)", *[""] * 6)
    return Group(queues, workers, stages) if names else Group(queues, workers)


@app.command()
def top(
    interval: float = typer.Option(2.0, min=0.1, max=60.0, help="Seconds between refreshes (and the rate window)."),
    once: bool = typer.Option(False, "--once", help="Print one snapshot (rates over --interval) and exit."),
    as_json: bool = typer.Option(False, "--json", help="With --once: print the snapshot as JSON on stdout."),
) -> None:
    """Live throughput per queue and worker (docs, chunks, tokens, questions per second)."""
    settings = Settings()
    store = _store(settings)
    wanted = [settings.interactive_queue, settings.ingest_queue, settings.qa_queue]

    def snap() -> Snapshot:
        try:
            return store.snapshot(wanted)
        except Exception as exc:
            _fail(f"cannot read metrics from Redis: {exc}")
            raise  # unreachable

    if as_json and not once:
        _fail("--json needs --once", EXIT_SETUP)
    before = snap()
    if once:
        time.sleep(interval)
        after = snap()
        t = throughput(before, after)
        if as_json:
            _print_json({"taken_at": after.taken_at, **t.to_dict()})
        else:
            out.print(_render(t, after.taken_at))
        return
    try:
        with Live(_render(throughput(before, before), before.taken_at), console=out,
                  refresh_per_second=4, screen=False) as live:
            while True:
                time.sleep(interval)
                after = snap()
                live.update(_render(throughput(before, after), after.taken_at))
                before = after
    except KeyboardInterrupt:
        pass
