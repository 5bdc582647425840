"""Operations: Flower's HTTP API against a real worker, ragq's Prometheus exporter,
``ragq top --once``, the metrics recorder, and ``docker-compose config`` on the file."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from common import metrics
from common.jobs import JobRecord
from common.schemas import DocumentItem, JobKind
from producer.cli_ops import check_basic_auth, is_loopback
from tests.conftest import REPO, Stack, terminate

FLOWER_AUTH = ("ragq", "test-secret")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(stack: Stack, args: list[str], url: str, log: Path, timeout: float = 60.0,
                 auth: tuple[str, str] | None = None) -> subprocess.Popen:
    """Start ``ragq ARGS`` in the background and wait until ``url`` answers."""
    proc = subprocess.Popen([sys.executable, "-m", "producer", *args], cwd=REPO, env=stack.env,
                            stdout=log.open("wb"), stderr=subprocess.STDOUT)
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"ragq {args[0]} exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(url, auth=auth, timeout=2).status_code == 200:
                return proc
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"ragq {args[0]} not answering after {timeout}s:\n{log.read_text()[-3000:]}")
        time.sleep(0.2)


def stop_server(proc: subprocess.Popen) -> None:
    terminate(proc)


@pytest.fixture(scope="module")
def flower_url(stack: Stack, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    port = free_port()
    log = tmp_path_factory.mktemp("flower") / "flower.log"
    proc = start_server(stack, ["flower", "--port", str(port), "--basic-auth", ":".join(FLOWER_AUTH)],
                        f"http://127.0.0.1:{port}/healthcheck", log)
    yield f"http://127.0.0.1:{port}"
    stop_server(proc)


@pytest.fixture(scope="module")
def ingested(stack: Stack, tmp_path_factory: pytest.TempPathFactory) -> str:
    """Three tiny documents ingested and two questions asked through the CLI, so the worker has counted."""
    path = tmp_path_factory.mktemp("docs") / "docs.jsonl"
    path.write_text("".join(json.dumps({"id": f"m{i}", "title": f"Metrics {i}",
                                        "content": f"Elastic IP {i} binds to a cloud server instance."}) + "\n"
                            for i in range(3)))
    result = stack.cli("ingest", str(path), "--wait", "--json", timeout=120, check=True)
    questions = path.with_name("questions.txt")
    questions.write_text("What does an elastic IP bind to?\nWhich instance has elastic IP 2?\n")
    stack.cli("ask-file", str(questions), "--retrieval-only", "--wait", timeout=120, check=True)
    return json.loads(result.stdout)["id"]


# --------------------------------------------------------------------------- Flower
def test_flower_refuses_a_public_address_without_auth(stack: Stack) -> None:
    env_cli = stack.cli("flower", "--address", "0.0.0.0", "--port", str(free_port()))
    assert env_cli.returncode == 2
    assert "refusing to start Flower" in env_cli.stderr
    assert "--basic-auth" in env_cli.stderr


def test_flower_auth_checks() -> None:
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("") and not is_loopback("10.0.0.5")
    assert not is_loopback("flower.internal")  # a name may resolve to a public interface
    assert check_basic_auth("ops:s3cret,bob:pw") is None
    assert check_basic_auth("ops") and check_basic_auth("ops:") and check_basic_auth(":pw")


def test_flower_api_submits_and_polls_an_ingest_batch(stack: Stack, flower_url: str,
                                                       redis_client: redis.Redis) -> None:
    settings = stack.settings()
    n = 3
    record = JobRecord.create(redis_client, JobKind.ingest, prefix=settings.key_prefix, meta={"via": "flower"})
    record.add_items(items=n, batches=1)
    record.seal()
    items = [DocumentItem(key=f"flower-{i}", item=f"flower-{i}.md", title=f"Flower {i}",
                          content=f"Load balancer listener {i} forwards HTTP traffic.").to_dict() for i in range(n)]

    assert httpx.post(f"{flower_url}/api/task/send-task/ragq.ingest_batch", json={"args": []},
                         timeout=10).status_code == 401  # the API needs the credentials
    sent = httpx.post(f"{flower_url}/api/task/send-task/ragq.ingest_batch", auth=FLOWER_AUTH, timeout=10,
                         json={"args": [record.id, 0, items], "argsrepr": f"({record.id!r}, batch=0, documents={n})"})
    assert sent.status_code == 200, sent.text
    task_id = sent.json()["task-id"]

    deadline = time.monotonic() + 60
    while True:
        polled = httpx.get(f"{flower_url}/api/task/result/{task_id}", auth=FLOWER_AUTH, timeout=10).json()
        if polled["state"] in ("SUCCESS", "FAILURE") or time.monotonic() > deadline:
            break
        time.sleep(0.25)
    assert polled["state"] == "SUCCESS", polled
    assert polled["result"]["completed"] == n and polled["result"]["chunks"] >= n

    info = record.info()
    assert (info.status, info.total, info.completed, info.failed, info.batches_done) == ("completed", n, n, 0, 1)
    assert info.chunks == polled["result"]["chunks"]

    # the task page: named, run by the stack's worker, and showing the short argsrepr, never
    # the documents (Celery's task-sent event would carry them, so ragq does not send it;
    # without it Flower does not know the routing key either)
    def task_page() -> dict | None:
        page = httpx.get(f"{flower_url}/api/task/info/{task_id}", auth=FLOWER_AUTH, timeout=10)
        return page.json() if page.status_code == 200 and page.json().get("args") else None

    deadline = time.monotonic() + 30
    while (task := task_page()) is None:  # events can lag a poll behind the result
        assert time.monotonic() < deadline, "Flower never showed the task"
        time.sleep(0.25)
    assert task["name"] == "ragq.ingest_batch"
    assert task["worker"].startswith(f"{stack.env_vars['RAGQ_INGEST_QUEUE']}-")
    assert task["args"] == f"({record.id!r}, batch=0, documents={n})"
    assert "Load balancer listener" not in json.dumps(task)

    flower_metrics = httpx.get(f"{flower_url}/metrics", timeout=10).text  # Flower's own, unauthenticated
    assert "flower_worker_online" in flower_metrics


def test_task_events_carry_the_short_argsrepr_never_documents(stack: Stack, tmp_path: Path) -> None:
    """What Flower (or anyone on the event channel) sees of an ingest: names and counts.

    Celery's task-sent event would repeat the whole batch (saferepr of its args, not the
    message's argsrepr), so the producer does not send it; the worker's events carry the
    argsrepr the producer wrote.
    """
    from producer.client import Client

    marker = f"needle-{os.getpid()}-in-the-event-stream"
    path = tmp_path / "secret.jsonl"
    path.write_text(json.dumps({"id": "ev-1", "title": "Events", "content": f"Private text {marker}."}) + "\n")
    client = Client(stack.settings())
    events: list[dict] = []
    with client.celery.connection_for_read() as conn:
        receiver = client.celery.events.Receiver(conn, handlers={"*": events.append})
        listener = threading.Thread(target=receiver.capture, kwargs={"limit": None, "timeout": None}, daemon=True)
        listener.start()
        with client.celery.connection_for_write() as out:  # ready once our own ping comes back
            dispatcher = client.celery.events.Dispatcher(out)
            deadline = time.monotonic() + 20
            while not any(e.get("type") == "ragq-test-ping" for e in events):
                assert time.monotonic() < deadline, "the event receiver never subscribed"
                dispatcher.send("ragq-test-ping")
                time.sleep(0.1)
        job = client.ingest([path])
        info = job.wait(timeout=120)
        wait_deadline = time.monotonic() + 10
        while not any(e.get("type") == "task-succeeded" and e.get("uuid") for e in events):
            assert time.monotonic() < wait_deadline, [e.get("type") for e in events]
            time.sleep(0.1)
        receiver.should_stop = True
    assert info.status == "completed" and info.completed == 1
    received = [e for e in events if e.get("type") == "task-received" and e.get("name") == "ragq.ingest_batch"]
    assert len(received) == 1 and received[0]["args"].startswith(f"({job.id!r}, batch=0, documents=1, bytes=")
    assert not [e.get("type") for e in events if e.get("type") == "task-sent"]
    assert marker not in json.dumps(events, default=str)


# --------------------------------------------------------------------------- ragq metrics
def _samples(text: str) -> dict[str, list]:
    out: dict[str, list] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out.setdefault(sample.name, []).append(sample)
    return out


def test_metrics_endpoint(stack: Stack, ingested: str, tmp_path: Path) -> None:
    port = free_port()
    proc = start_server(stack, ["metrics", "--port", str(port)], f"http://127.0.0.1:{port}/metrics",
                        tmp_path / "metrics.log")
    try:
        text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    finally:
        stop_server(proc)
    samples = _samples(text)
    assert samples["ragq_redis_up"][0].value == 1
    ingest_q, qa_q = stack.env_vars["RAGQ_INGEST_QUEUE"], stack.env_vars["RAGQ_QA_QUEUE"]
    store_q = stack.env_vars["RAGQ_STORE_QUEUE"]  # a single process owns the embedded store itself
    interactive_q = stack.env_vars["RAGQ_INTERACTIVE_QUEUE"]  # and serves interactive work first
    depths = {s.labels["queue"]: s.value for s in samples["ragq_queue_depth"]}
    assert depths == {interactive_q: 0, ingest_q: 0, qa_q: 0, store_q: 0}
    (info,) = samples["ragq_worker_info"]
    worker = info.labels["worker"]
    assert worker.startswith(f"{ingest_q}-{qa_q}-cpu@") and info.labels["device"] == "cpu"
    assert sorted(info.labels["queues"].split(",")) == sorted([interactive_q, ingest_q, qa_q, store_q])
    assert {s.labels["worker"]: s.value for s in samples["ragq_worker_online"]} == {worker: 1}
    docs = sum(s.value for s in samples["ragq_documents_embedded_total"])
    assert docs >= 3  # the CLI's three, plus Flower's three if that test ran first
    assert sum(s.value for s in samples["ragq_tokens_embedded_total"]) > docs
    assert sum(s.value for s in samples["ragq_questions_answered_total"]) == 2
    succeeded = {s.labels["queue"]: s.value for s in samples["ragq_tasks_total"] if s.labels["state"] == "succeeded"}
    assert succeeded[ingest_q] >= 1 and succeeded[qa_q] >= 1
    stage_counts = {s.labels["stage"]: s.value for s in samples["ragq_stage_duration_seconds_count"]}
    assert {"tokenize", "embed", "upsert"} <= set(stage_counts)
    # one observation per stage per batch: the ingest queue's batches, plus any one-document
    # ingest that went to the interactive queue (whose other tasks, searches, observe no embed stage)
    assert succeeded[ingest_q] <= stage_counts["embed"] <= succeeded[ingest_q] + succeeded.get(interactive_q, 0)
    inf = [s for s in samples["ragq_stage_duration_seconds_bucket"]
           if s.labels["stage"] == "embed" and s.labels["le"] == "+Inf"]
    assert inf[0].value == stage_counts["embed"]


def test_top_once(stack: Stack, ingested: str) -> None:
    shown = stack.cli("top", "--once", "--json", "--interval", "0.2", timeout=60, check=True)
    snap = json.loads(shown.stdout)
    queues = (stack.env_vars["RAGQ_INTERACTIVE_QUEUE"], stack.env_vars["RAGQ_INGEST_QUEUE"],
              stack.env_vars["RAGQ_QA_QUEUE"], stack.env_vars["RAGQ_STORE_QUEUE"])
    assert {q["queue"]: q["waiting"] for q in snap["queues"]} == dict.fromkeys(queues, 0)
    (worker,) = snap["workers"]
    assert worker["device"] == "cpu" and worker["state"] == "online"
    assert worker["totals"]["documents"] >= 3 and worker["tasks"]["succeeded"] >= 1
    assert worker["stage_mean_s"]["embed"] > 0
    table = stack.cli("top", "--once", "--interval", "0.1", timeout=60, check=True)
    assert worker["name"] in table.stdout and "waiting" in table.stdout and "embed" in table.stdout


def test_metrics_store_round_trip(redis_client: redis.Redis) -> None:
    """The recorder, the store and the collector without a worker: buckets, sums, labels."""
    store = metrics.MetricsStore(redis_client, prefix="ragq-test-metrics", ttl=600)
    metrics._pending.take()  # drop what in-process pipelines of earlier tests recorded here
    try:
        metrics.count(documents=2, chunks=5)
        lap = metrics.Lap()
        lap("embed")
        metrics.observe("embed", 0.3)
        metrics.observe("embed", 400.0)
        counters, stages = metrics._pending.take()
        store.flush("w1@h", counters, stages, {("ingest", "succeeded"): 1},
                    info={"device": "cuda:0", "gpu": "3", "queues": "ingest", "state": "online"})
        store.flush("w1@h", {"documents": 1}, {}, {("ingest", "retried"): 1})
        snap = store.snapshot(["ingest"])
        w = snap.workers["w1@h"]
        assert w.counters == {"documents": 3, "chunks": 5}
        assert w.tasks == {("ingest", "succeeded"): 1, ("ingest", "retried"): 1}
        hist = w.stages["embed"]
        assert hist.count == 3 and hist.sum == pytest.approx(400.3, abs=0.01)
        assert hist.buckets[metrics.BUCKETS.index(0.5)] == 1 and hist.buckets[-1] == 1  # 0.3 s and +Inf
        exposed = _samples(generate_latest(_registry(store)).decode())
        (info,) = exposed["ragq_worker_info"]
        assert info.labels["gpu"] == "3" and info.labels["device"] == "cuda:0"
        assert exposed["ragq_queue_depth"][0].labels == {"queue": "ingest"}
    finally:
        store.forget("w1@h")
    assert "w1@h" not in store.snapshot().workers


def _registry(store: metrics.MetricsStore) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(metrics.PrometheusCollector(store, ["ingest"]))
    return registry


def test_grafana_dashboard_uses_exported_metrics() -> None:
    dashboard = json.loads((REPO / "deploy" / "grafana" / "ragq-dashboard.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    assert exprs
    known = ("ragq_queue_depth", "ragq_broker_unacked_messages", "ragq_worker_", "ragq_tasks_total",
             "ragq_stage_duration_seconds", "flower_", *(name for name, _ in metrics.COUNTERS.values()))
    for expr in exprs:
        names = {w for w in expr.replace("(", " ").replace("[", " ").replace("{", " ").split()
                 if w.startswith(("ragq_", "flower_"))}
        assert names and all(n.startswith(known) for n in names), expr


# --------------------------------------------------------------------------- docker-compose
def _docker_compose() -> str:
    found = shutil.which("docker-compose")
    if found:
        return found
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        pytest.skip("docker-compose is not installed and apt-get as root is not available to install it")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run(["apt-get", "update", "-qq"], env=env, capture_output=True, timeout=300)
    done = subprocess.run(["apt-get", "install", "-y", "-qq", "docker-compose"], env=env, capture_output=True,
                          text=True, timeout=600)
    found = shutil.which("docker-compose")
    if not found:
        pytest.skip(f"could not install docker-compose: {done.stderr[-500:]}")
    return found


def test_compose_file_validates() -> None:
    import yaml

    compose = _docker_compose()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAGQ_", "FLOWER_", "COMPOSE_"))}
    env.update(REDIS_PASSWORD="test-redis-pw", QDRANT_API_KEY="test-qdrant-key", FLOWER_BASIC_AUTH="ops:test")
    cmd = [compose, "-f", str(REPO / "docker-compose.yml"), "--project-directory", str(REPO)]
    done = subprocess.run([*cmd, "--profile", "monitoring", "config"], env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    config = yaml.safe_load(done.stdout)
    services = config["services"]
    assert {"redis", "qdrant", "vllm", "worker-ingest", "worker-qa", "flower", "ragq-metrics", "prometheus",
            "grafana"} <= set(services)
    redis_cmd = " ".join(services["redis"]["command"])
    assert "--appendonly yes" in redis_cmd and "--maxmemory-policy noeviction" in redis_cmd
    assert "--requirepass test-redis-pw" in redis_cmd
    for name in ("worker-ingest", "worker-qa", "vllm"):
        devices = services[name]["deploy"]["resources"]["reservations"]["devices"]
        assert devices[0]["capabilities"] == ["gpu"]
    assert "Qwen2-7B-Instruct" in " ".join(services["vllm"]["command"])
    assert services["flower"]["environment"]["FLOWER_BASIC_AUTH"] == "ops:test"
    worker_env = services["worker-ingest"]["environment"]
    assert worker_env["RAGQ_REDIS_URL"] == "redis://:test-redis-pw@redis:6379/0"
    assert worker_env["RAGQ_QDRANT_URL"] == "http://qdrant:6333" and worker_env["RAGQ_LLM_BACKEND"] == "openai"

    for name in ("ragq-metrics", "prometheus", "grafana"):
        assert services[name]["profiles"] == ["monitoring"]  # opt-in

    missing = {k: v for k, v in env.items() if k != "REDIS_PASSWORD"}
    refused = subprocess.run([*cmd, "config"], env=missing, capture_output=True, text=True, timeout=120)
    assert refused.returncode != 0 and "REDIS_PASSWORD" in refused.stderr
