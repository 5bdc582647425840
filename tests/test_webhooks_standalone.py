"""``ragq webhooks`` on its own, where no API server runs: the README's way to get job
events from a CLI-only deployment.

A real worker runs a job submitted with ``ragq ingest --webhook-url``; no event goes out
while no sender runs (the event waits in Redis), then a standalone ``ragq webhooks``
process delivers it to a loopback receiver that verifies the signature and fails the
first two attempts, so the same ``webhook-id`` arrives three times. SIGTERM stops the
sender cleanly.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import REPO, Stack
from tests.test_webhooks import SECRET, Receiver, assert_event, start_receiver

pytestmark = pytest.mark.timeout(240)


@pytest.fixture(scope="module")
def receiver() -> Iterator[Receiver]:
    r = start_receiver()
    yield r
    r.server.shutdown()


def test_standalone_sender_delivers_an_event_that_waited(stack: Stack, receiver: Receiver,
                                                         tmp_path: Path) -> None:
    doc = tmp_path / "disk.json"
    doc.write_text(json.dumps({"id": "wh-disk", "title": "Cloud Disk", "product": "Cloud Disk Service",
                               "content": "Cloud Disk Service provides persistent block storage volumes."}))
    done = stack.cli("ingest", str(doc), "--wait", "--json", "--webhook-url", f"{receiver.base}/flaky", check=True)
    job = json.loads(done.stdout)
    assert job["status"] == "completed", job

    time.sleep(1.0)  # no sender runs: nothing may arrive, the event waits in Redis
    assert receiver.events("job.completed", job["id"]) == []

    env = {**stack.env, "RAGQ_WEBHOOK_SECRET": SECRET, "RAGQ_WEBHOOK_BACKOFF_S": "0.2"}
    log = (tmp_path / "webhooks.log").open("wb")
    sender = subprocess.Popen([sys.executable, "-m", "producer", "webhooks"], cwd=REPO, env=env,
                              stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        got = receiver.wait_for("job.completed", job["id"], timeout=60)
    finally:
        sender.send_signal(signal.SIGTERM)
        try:
            code = sender.wait(20)
        except subprocess.TimeoutExpired:
            sender.kill()
            code = None
    assert code == 0, (tmp_path / "webhooks.log").read_text()
    assert [r.answered for r in got] == [500, 500, 200]
    assert len({r.headers["webhook-id"] for r in got}) == 1 and len({r.body for r in got}) == 1
    for r in got:
        assert_event(r, "job.completed", job["id"])
    assert got[-1].event["data"]["kind"] == "ingest"
