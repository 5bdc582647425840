"""Hostile input through a real worker: a folder of bad files built here (truncated and
deeply nested JSON, a 10 MB single line, NUL bytes, invalid UTF-8, wrong types, empty
files, 10,000 tiny documents, odd file names, a FIFO, symlink loops and escapes).

Every bad item must come back as a per-item error naming it, every good document must
land (exact counts and points), and nothing may crash: not the producer, not the worker.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from producer.client import Client
from tests.conftest import Stack
from tests.faults import expected_chunks, planned_batches, pool_child, record, report, wait_finished

pytestmark = [pytest.mark.fault, pytest.mark.timeout(420)]

TINY_DOCS = 10_000


@dataclass
class Fixture:
    root: Path
    outside: Path
    good: dict[str, int] = field(default_factory=dict)  # file -> documents that must land
    bad: dict[str, str] = field(default_factory=dict)  # item (file, file[n] or file:line) -> words of its reason
    either: dict[str, str] = field(default_factory=dict)  # may land, or fail alone with these words


def _write(path: Path, data: bytes | str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(data, str):
        data = data.encode("utf-8")
    path.write_bytes(data)
    return path


def build_fixture(base: Path) -> Fixture:
    root = base / "hostile"
    outside = base / "outside"
    fx = Fixture(root, outside)
    doc = lambda text, **kw: json.dumps({"content": text, **kw})  # noqa: E731

    # --- good files, each with a known number of documents ---------------------------------
    fx.good[str(_write(root / "plain.md", "# Plain\nA normal Markdown page about cloud disks.\n"))] = 1
    fx.good[str(_write(root / "list.json", json.dumps([{"id": "l1", "content": "first listed page"},
                                                       {"id": "l2", "content": "second listed page"}])))] = 2
    bom = "\ufeffA text file that starts with a byte-order mark.\r\nCRLF lines.\r\n"
    fx.good[str(_write(root / "bom.txt", bom))] = 1
    # one 10 MB line: a single 10 MB word (BERT reads it as one [UNK] token per segment,
    # so it is cheap to embed), split into segments that each fit a message
    fx.good[str(_write(root / "huge-line.txt", "x" * (10 * 1024 * 1024)))] = 1
    # 10,000 tiny documents in one JSONL file
    tiny = "".join(json.dumps({"id": f"tiny-{n}", "content": f"tiny note {n} about region {n % 7}"}) + "\n"
                   for n in range(TINY_DOCS))
    fx.good[str(_write(root / "tiny.jsonl", tiny))] = TINY_DOCS
    # deeply nested, yet valid JSON in an extra field: kept as payload
    nested: object = "leaf"
    for _ in range(60):
        nested = {"n": nested}
    deep_ok = json.dumps({"id": "nested-ok", "content": "deep payload", "meta": nested})
    fx.good[str(_write(root / "nested-ok.json", deep_ok))] = 1
    # odd but legal file names
    for name in ("with space.md", "ünïcødé 文档.md", "-leading-dash.md", "--help.md", "semi;colon$(x).md"):
        fx.good[str(_write(root / "odd" / name, f"# {name}\nA page with an odd file name.\n"))] = 1
    newline = root / "odd" / "new\nline.md"
    try:
        _write(newline, "# newline\nA file name with a newline in it.\n")
        fx.good[str(newline)] = 1
    except OSError:
        pass  # file systems that refuse it

    # --- bad files: each must be reported, naming the item ---------------------------------
    fx.bad[str(_write(root / "truncated.json", '[{"content": "cut off here", "title": "x"'))] = "malformed JSON"
    fx.bad[str(_write(root / "deep.json", "[" * 100_000 + "]" * 100_000))] = "nested too deeply"
    fx.bad[str(_write(root / "nul.txt", b"text with a \x00 NUL byte inside"))] = "NUL"
    fx.bad[str(_write(root / "nul.json", doc("json with a \u0000 NUL character")))] = "NUL"
    fx.bad[str(_write(root / "latin1.txt", b"caf\xe9 au lait, not UTF-8"))] = "not valid UTF-8"
    fx.bad[str(_write(root / "empty.txt", b""))] = "empty file"
    fx.bad[str(_write(root / "empty.json", b""))] = "empty file"
    fx.bad[str(_write(root / "blank.md", "   \n\t\n"))] = "empty content"
    fx.bad[str(_write(root / "content-number.json", json.dumps({"content": 42})))] = "must be a string"
    fx.bad[str(_write(root / "title-list.json", json.dumps({"content": "ok", "title": ["a"]})))] = "must be a string"
    fx.bad[str(_write(root / "id-object.json", doc("ok", id={"a": 1})))] = "must be a string or integer"
    fx.bad[str(_write(root / "no-content.json", json.dumps({"title": "no content"})))] = "missing field 'content'"
    fx.bad[str(_write(root / "null.json", "null"))] = "expected a JSON object"
    mixed = root / "mixed.json"
    _write(mixed, json.dumps([{"id": "m0", "content": "good one"}, "a string", {"content": ""},
                              {"id": "m3", "content": "good too"}]))
    fx.good[str(mixed)] = 2
    fx.bad[f"{mixed}[1]"] = "expected a JSON object"
    fx.bad[f"{mixed}[2]"] = "empty content"
    lines = root / "lines.jsonl"
    _write(lines, b'{"id": "j1", "content": "good line"}\n{"content": \n' + b'{"content": "caf\xe9"}\n'
           + b"[1, 2]\n" + b'{"id": "j5", "content": "good line too"}\n')
    fx.good[str(lines)] = 2
    fx.bad[f"{lines}:2"] = "malformed JSON"
    fx.bad[f"{lines}:3"] = "not valid UTF-8"
    fx.bad[f"{lines}:4"] = "expected a JSON object"
    # a NaN in an extra field (Python's json accepts it; the vector store cannot hold it)
    nan = '{"id": "nan", "content": "a page with a NaN score", "score": NaN}'
    fx.either[str(_write(root / "nan.json", nan))] = "NaN"
    # a lone surrogate: legal as a JSON escape, not encodable as UTF-8
    fx.either[str(_write(root / "surrogate.json", '{"id": "sur", "content": "ok", "title": "bad \\ud800 title"}'))] = ""
    # a file name that is not UTF-8 (Linux allows any bytes but "/" and NUL)
    bad_name = os.fsdecode(bytes(root / "odd") + b"/latin1-\xe9t\xe9.md")
    try:
        _write(Path(bad_name), "# Latin-1 name\nA page whose file name is not UTF-8.\n")
        # reported with its bytes escaped (the record is JSON, which cannot hold them raw)
        fx.either[os.fsencode(bad_name).decode("utf-8", "backslashreplace")] = "UTF-8"
    except OSError:
        pass
    fifo = root / "fifo.txt"  # reading a FIFO would block the producer forever
    os.mkfifo(fifo)
    fx.bad[str(fifo)] = "not a regular file"

    # --- symlinks: loops and escapes -----------------------------------------------------------
    _write(outside / "secret.md", "# Secret\nThis file is outside the input root.\n")
    (root / "links").mkdir()
    os.symlink(outside / "secret.md", root / "links" / "escape.md")
    fx.bad[str(root / "links" / "escape.md")] = "outside the input root"
    os.symlink(outside, root / "links" / "escape-dir")  # a directory link: not walked at all
    os.symlink("..", root / "links" / "up")  # a directory loop: not walked either
    # inside the root: followed, but it names plain.md, which is read once (one key, one document)
    os.symlink(root / "plain.md", root / "links" / "inside.md")
    return fx


@pytest.fixture(scope="module")
def stack(redis_url: str, tmp_path_factory: pytest.TempPathFactory):
    s = Stack(redis_url, tmp_path_factory.mktemp("hostile-store"))
    s.start_worker()
    yield s
    s.stop_worker()


def test_hostile_folder_is_reported_per_item_and_good_files_land(stack: Stack, tmp_path: Path) -> None:
    """The whole folder in one ``ragq ingest``: per-item errors for exactly the bad items,
    exact counts and points for the good ones (a bad item never takes its batch
    neighbours down with it), the worker's pool process unharmed."""
    fx = build_fixture(tmp_path)
    settings = stack.settings()
    # what the good files make, read one by one (the same reader, segments and chunker)
    good_batches = planned_batches(settings, list(fx.good))
    good_chunks = expected_chunks(settings, good_batches)
    client = Client(settings)
    pool = pool_child(stack)

    started = time.monotonic()
    result = stack.cli("ingest", str(fx.root), "--json", timeout=300)
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr[-3000:]
    enqueue_s = time.monotonic() - started
    job_id = json.loads(result.stdout)["id"]
    info = wait_finished(record(stack, job_id, client.redis), 300, stack)
    total_s = time.monotonic() - started

    errors = {e["item"]: e["reason"] for e in info.errors}
    unexpected = {item: reason for item, reason in errors.items() if item not in fx.bad and item not in fx.either}
    assert not unexpected, f"{len(unexpected)} good items failed, e.g. {list(unexpected.items())[:3]}"
    for item, words in {**fx.bad, **fx.either}.items():
        if item in fx.bad:
            assert item in errors, f"no error for {item!r}; errors: {sorted(errors)}"
        if item in errors:
            assert words.lower() in errors[item].lower(), (item, errors[item])
    landed_either = [item for item in fx.either if item not in errors]
    good_docs = sum(fx.good.values()) + len(landed_either)
    bad_items = len(errors)
    assert info.status == "completed_with_errors", info
    assert (info.total, info.completed, info.failed) == (good_docs + bad_items, good_docs, bad_items)
    assert info.chunks == good_chunks + len(landed_either)  # each "either" page is one chunk
    assert int(client.store_info()["points"]) == info.chunks
    assert stack.proc.poll() is None and pool_child(stack) == pool  # nothing crashed
    hits = client.search("tiny note 4711 about region 2", top_k=3)[0]
    assert hits and all(hit.text.startswith("tiny note ") for hit in hits)  # the tiny documents are searchable
    outside = client.search("This file is outside the input root.", top_k=5)[0]
    assert all("outside" not in hit.url for hit in outside)  # never read through a link
    report("hostile-input", documents=good_docs, bad_items=bad_items, batches=info.batches_total,
           chunks=info.chunks, enqueue_s=enqueue_s, job_s=total_s)


def test_symlink_loops_are_reported_not_fatal(stack: Stack, tmp_path: Path) -> None:
    """Two links pointing at each other (a -> b -> a) among good files: each link is a
    per-item error, the files around them land, and the producer does not crash."""
    root = tmp_path / "loops"
    _write(root / "a-first.md", "# First\nA good page before the loop.\n")
    os.symlink("loop-b.md", root / "loop-a.md")
    os.symlink("loop-a.md", root / "loop-b.md")
    _write(root / "z-last.md", "# Last\nA good page after the loop.\n")
    result = stack.cli("ingest", str(root), "--wait", "--json", timeout=120)
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    info = json.loads(result.stdout)
    assert (info["status"], info["total"], info["completed"], info["failed"]) == ("completed_with_errors", 4, 2, 2)
    reasons = {e["item"]: e["reason"] for e in info["errors"]}
    assert set(reasons) == {str(root / "loop-a.md"), str(root / "loop-b.md")}
    assert all("symlink" in r.lower() for r in reasons.values()), reasons


def test_a_nan_value_fails_its_document_only(stack: Stack, tmp_path: Path) -> None:
    """``NaN`` is accepted by Python's json but cannot be stored: the document carrying it
    must fail alone, with a reason naming the value, and its batch neighbours must land
    (not the whole batch retried as if the store were down)."""
    root = tmp_path / "nan"
    for n in range(3):
        _write(root / f"good-{n}.json", json.dumps({"id": f"nan-good-{n}", "content": f"good page {n}"}))
    _write(root / "nan.json", '{"id": "nan-bad", "content": "a page with a NaN score", "score": NaN}')
    result = stack.cli("ingest", str(root), "--wait", "--json", timeout=120)
    info = json.loads(result.stdout)
    reasons = {e["item"]: e["reason"] for e in info["errors"]}
    assert (info["total"], info["completed"], info["failed"]) == (4, 3, 1), reasons
    assert list(reasons) == [str(root / "nan.json")] and "NaN" in reasons[str(root / "nan.json")]


def test_a_file_name_that_is_not_utf8_does_not_sink_the_job(stack: Stack, tmp_path: Path) -> None:
    """Linux file names are bytes; one that is not UTF-8 must be ingested (its name
    escaped) or reported as a per-item error, while the other files land."""
    root = tmp_path / "names"
    _write(root / "a-good.md", "# Good\nA page with a plain name.\n")
    bad = os.fsdecode(bytes(root) + b"/b-caf\xe9.md")
    _write(Path(bad), "# Latin-1 name\nA page whose file name is Latin-1.\n")
    _write(root / "c-good.md", "# Good too\nAnother page with a plain name.\n")
    result = stack.cli("ingest", str(root), "--wait", "--json", timeout=120)
    assert "Traceback" not in result.stderr, result.stderr[-2000:]
    info = json.loads(result.stdout)
    assert info["total"] == 3 and info["completed"] >= 2, info
    assert info["completed"] + info["failed"] == 3
    if info["failed"]:
        [error] = info["errors"]
        assert "UTF-8" in error["reason"], error


def test_a_lone_surrogate_escape_fails_its_document_only(stack: Stack, tmp_path: Path) -> None:
    """JSON may escape a lone surrogate (``"\\ud800"``), which no UTF-8 encoder accepts: the
    document must be reported (or cleaned and ingested) on its own, the others land."""
    root = tmp_path / "surrogate"
    _write(root / "a-good.json", json.dumps({"id": "sur-good", "content": "a good page"}))
    _write(root / "b-bad.json", '{"id": "sur-bad", "content": "text", "title": "bad \\ud800 title"}')
    result = stack.cli("ingest", str(root), "--wait", "--json", timeout=120)
    assert "Traceback" not in result.stderr, result.stderr[-2000:]
    info = json.loads(result.stdout)
    assert info["total"] == 2 and info["completed"] >= 1 and info["completed"] + info["failed"] == 2, info
    assert all(e["item"] == str(root / "b-bad.json") for e in info["errors"]), info["errors"]
