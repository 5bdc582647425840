"""Documents over time, as a user drives them: re-ingest unchanged (skipped), delete by
key, url, product or filter (CLI and HTTP), and ``ingest --sync`` of a directory.

A real worker (``ragq worker``), the real CLI as subprocesses, ``ragq serve`` for HTTP,
real Redis and the real embedded store; the worker owns the store, so the tests look
at it through ``ragq info`` / search like a user, and at counts through job records.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from common.deletion import DeleteSelector
from producer.client import Client
from tests.conftest import Stack
from tests.test_http import Server, start_server, stop_server, wait_job

pytestmark = pytest.mark.timeout(300)


def write(directory: Path, name: str, content: str, product: str = "MQ", **fields: Any) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{name}.json"
    path.write_text(json.dumps({"title": name, "product": product, "content": content, **fields}))
    return path


def job_json(result: Any) -> list[dict[str, Any]]:
    """The JSON documents a ``--json`` command printed (``--sync`` prints two)."""
    decoder, text, out = json.JSONDecoder(), result.stdout.strip(), []
    while text:
        obj, end = decoder.raw_decode(text)
        out.append(obj)
        text = text[end:].strip()
    return out


def points(client: Client) -> int:
    return int(client.store_info()["points"])


def titles(client: Client, query: str, **filter: Any) -> set[str]:
    return {s.title for s in client.search(query, top_k=20, filter=filter or None)[0]}


@pytest.fixture(scope="module")
def client(stack: Stack) -> Client:
    return Client(stack.settings())


def test_reingest_unchanged_is_skipped_and_force_reembeds(stack: Stack, client: Client, tmp_path: Path) -> None:
    docs = tmp_path / "docs"
    for i in range(4):
        write(docs, f"page{i}", f"Page {i} explains how to rotate access keys for service {i}.")
    first = job_json(stack.cli("ingest", str(docs), "--wait", "--json"))[0]
    assert (first["status"], first["completed"], first["skipped"]) == ("completed", 4, 0)
    stored = points(client)

    again = job_json(stack.cli("ingest", str(docs), "--wait", "--json"))[0]
    assert (again["completed"], again["skipped"], again["chunks"], again["tokens"]) == (4, 4, 0, 0)
    write(docs, "page2", "Page 2 now explains how to delete access keys.")
    changed = job_json(stack.cli("ingest", str(docs), "--wait", "--json"))[0]
    assert (changed["completed"], changed["skipped"], changed["chunks"]) == (4, 3, 1)
    status = job_json(stack.cli("status", changed["id"], "--json"))[0]
    assert status["skipped"] == 3
    assert points(client) == stored

    forced = job_json(stack.cli("ingest", str(docs), "--wait", "--json", "--force"))[0]
    assert (forced["skipped"], forced["chunks"]) == (0, 4)
    assert points(client) == stored
    assert "page2" in titles(client, "delete access keys")


def test_delete_by_key_url_product_and_filter(stack: Stack, client: Client, tmp_path: Path) -> None:
    docs = tmp_path / "del"
    write(docs, "cdn1", "CDN caches static content at edge nodes near users.", product="CDN", url="https://x/cdn1")
    write(docs, "cdn2", "CDN purge removes cached copies of a URL from every edge node.", product="CDN")
    write(docs, "dns1", "Cloud DNS answers queries for A and CNAME records.", product="DNS", tier="gold")
    write(docs, "dns2", "Cloud DNS health checks fail over to a backup address.", product="DNS", tier="free")
    write(docs, "mq1", "MQ topics keep messages for three days.", url="https://x/mq1")
    assert client.ingest([docs]).wait(120).completed == 5
    before = points(client)

    by_product = job_json(stack.cli("delete", "--product", "CDN", "--wait", "--json"))[0]
    assert (by_product["kind"], by_product["status"], by_product["completed"]) == ("delete", "completed", 2)
    assert by_product["chunks"] == 2 and points(client) == before - 2
    assert not titles(client, "edge nodes cache", product="CDN")

    by_filter = job_json(stack.cli("delete", "--filter", '{"product": "DNS", "tier": "free"}', "--wait", "--json"))[0]
    assert by_filter["completed"] == 1
    assert titles(client, "Cloud DNS", product="DNS") == {"dns1"}

    key = str((docs / "dns1.json").resolve())
    assert job_json(stack.cli("delete", "--key", key, "--wait", "--json"))[0]["completed"] == 1
    assert job_json(stack.cli("delete", "--url", "https://x/mq1", "--wait", "--json"))[0]["completed"] == 1
    assert points(client) == before - 5
    nothing = job_json(stack.cli("delete", "--url", "https://nowhere", "--wait", "--json"))[0]
    assert (nothing["status"], nothing["completed"]) == ("completed", 0)

    refused = stack.cli("delete", "--wait")
    assert refused.returncode == 2 and "at least one of" in refused.stderr
    assert stack.cli("delete", "--filter", '{"product": true}').returncode == 2

    # Deleted, then ingested again: stored again (not skipped, nor held back by the delete's version).
    back = client.ingest([docs]).wait(120)
    assert (back.completed, back.skipped) == (5, 0) and points(client) == before


def test_sync_deletes_what_left_the_directory_only_after_a_clean_run(stack: Stack, client: Client,
                                                                     tmp_path: Path) -> None:
    site = tmp_path / "site"
    for name in ("keep", "gone", "edit"):
        write(site, name, f"The {name} page of the sync test, about snapshot schedules.", product="Sync")
    other = tmp_path / "other"
    write(other, "elsewhere", "A page of another source, about snapshot schedules too.", product="Sync")
    client.ingest([other]).wait(120)
    first = job_json(stack.cli("ingest", "--sync", str(site), "--json"))
    assert [j["kind"] for j in first] == ["ingest", "delete"] and first[1]["completed"] == 0

    (site / "gone.json").unlink()
    write(site, "edit", "The edit page, edited: snapshot schedules run hourly.", product="Sync")
    (site / "broken.json").write_text("{not json")
    partial = stack.cli("ingest", "--sync", str(site))
    assert partial.returncode == 1 and "nothing deleted" in partial.stderr
    assert "gone" in titles(client, "snapshot schedules", product="Sync")

    (site / "broken.json").unlink()
    synced = job_json(stack.cli("ingest", "--sync", str(site), "--json"))
    ingest, delete = synced
    assert (ingest["status"], ingest["completed"], ingest["skipped"]) == ("completed", 2, 2)
    assert (delete["status"], delete["completed"]) == ("completed", 1)
    # another source's page is not this sync's to delete
    assert titles(client, "snapshot schedules", product="Sync") == {"keep", "edit", "elsewhere"}

    named = job_json(stack.cli("ingest", "--sync", "--source", "named", str(site / "keep.json"), "--json"))
    assert named[1]["completed"] == 0  # nothing was recorded under "named" before
    assert job_json(stack.cli("ingest", "--sync", "--source", "named", str(site / "edit.json"), "--json"))[1][
        "completed"] == 1  # keep.json left the named source


@pytest.fixture(scope="module")
def server(stack: Stack) -> Iterator[Server]:
    s = start_server(stack)
    yield s
    stop_server(s)


def test_http_delete_and_skipped_counts(server: Server, client: Client) -> None:
    docs = [{"id": f"http-{i}", "title": f"t{i}", "product": "HTTPDEL", "content": f"HTTP page {i} on load balancers."}
            for i in range(3)]
    with server.client(token=None) as http:
        first = wait_job(http, http.post("/v1/ingest", json=docs).json()["id"])
        again = wait_job(http, http.post("/v1/ingest", json=docs).json()["id"])
        forced = wait_job(http, http.post("/v1/ingest?force=true", json=docs).json()["id"])
        assert (first["skipped"], again["skipped"], forced["skipped"]) == (0, 3, 0)

        bad = http.request("DELETE", "/v1/documents", json={})
        assert bad.status_code == 422 and "at least one of" in bad.text
        assert http.request("DELETE", "/v1/documents", json={"filter": {"x": 1.5}}).status_code == 422
        assert http.request("DELETE", "/v1/documents", json={"bogus": "x"}).status_code == 422
        response = http.request("DELETE", "/v1/documents", json={"doc_key": ["http-0", "http-1"]})
        assert response.status_code == 202 and response.headers["location"].startswith("/v1/jobs/")
        done = wait_job(http, response.json()["id"])
        assert (done["kind"], done["status"], done["completed"], done["chunks"]) == ("delete", "completed", 2, 2)
        rest = wait_job(http, http.request("DELETE", "/v1/documents", json={"product": "HTTPDEL"}).json()["id"])
        assert rest["completed"] == 1
    assert not titles(client, "load balancers", product="HTTPDEL")


def test_one_validation_layer_for_selectors() -> None:
    assert DeleteSelector.of(product="CDN", filter={"tier": ["a", "b"]}).filter == {"product": "CDN", "tier": ["a", "b"]}
    for bad in ({}, {"filter": {"x": True}}, {"url": ""}, {"product": "a", "filter": {"product": "b"}},
                {"filter": {"x": [1, "a"]}}):
        with pytest.raises(ValueError):
            DeleteSelector.of(**bad)
