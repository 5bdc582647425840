"""The Batch API's file store on a real directory: limits, expiry, listing, atomic writes."""

from __future__ import annotations

import io
import json
import time
from pathlib import Path

import pytest

from common.files import FileStore, FileTooLarge


def test_save_get_read_delete(tmp_path: Path) -> None:
    store = FileStore(tmp_path, max_bytes=10_000, ttl_s=60)
    meta = store.save(io.BytesIO(b'{"a": 1}\n' * 100), filename="../../etc/in.jsonl", purpose="batch")
    assert (meta.bytes, meta.filename, meta.purpose, meta.object) == (900, "in.jsonl", "batch", "file")
    assert meta.expires_at == meta.created_at + 60
    assert store.get(meta.id) == meta
    assert b"".join(store.iter_bytes(meta.id)) == b'{"a": 1}\n' * 100
    assert store.delete(meta.id) and store.get(meta.id) is None and not store.delete(meta.id)
    assert list(tmp_path.iterdir()) == []


def test_size_limit_leaves_nothing(tmp_path: Path) -> None:
    store = FileStore(tmp_path, max_bytes=1000, ttl_s=60)
    with pytest.raises(FileTooLarge):
        store.save(iter([b"x" * 600, b"x" * 600]), filename="big.jsonl", purpose="batch")
    assert list(tmp_path.iterdir()) == []
    assert store.save(iter([b"x" * 1000]), filename="ok", purpose="batch").bytes == 1000


def test_expired_files_read_as_absent_and_are_swept(tmp_path: Path) -> None:
    store = FileStore(tmp_path, max_bytes=1000, ttl_s=1)
    old = store.save(io.BytesIO(b"x"), filename="old", purpose="batch")
    time.sleep(1.1)
    assert store.get(old.id) is None and store.open(old.id) is None
    fresh = FileStore(tmp_path, max_bytes=1000, ttl_s=60).save(io.BytesIO(b"y"), filename="new", purpose="batch")
    files, more = store.list()
    assert [f.id for f in files] == [fresh.id] and not more
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"{fresh.id}.data", f"{fresh.id}.json"]


def test_list_pages_with_after_and_purpose(tmp_path: Path) -> None:
    store = FileStore(tmp_path, max_bytes=1000, ttl_s=60)
    made = [store.save(io.BytesIO(b"x"), filename=f"f{i}", purpose="batch") for i in range(5)]
    out = store.write_lines([{"n": 1}], filename="out.jsonl", purpose="batch_output")
    everything, _ = store.list(order="asc", limit=100)
    first, more = store.list(order="asc", limit=2, purpose="batch")
    assert more and len(first) == 2
    rest, more = store.list(order="asc", limit=10, purpose="batch", after=first[-1].id)
    assert not more and [f.id for f in first + rest] == [f.id for f in everything if f.purpose == "batch"]
    assert {f.id for f in first + rest} == {m.id for m in made}
    assert json.loads(b"".join(store.iter_bytes(out.id))) == {"n": 1}
    assert store.get("../../x") is None  # ids never become paths
