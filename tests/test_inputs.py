"""Reading inputs: every supported format, and a clear per-item error for each bad one."""

from __future__ import annotations

import json
import os
from pathlib import Path

from common.batching import ENVELOPE_BYTES, encoded_size, pack_batches, split_document
from common.inputs import InputReader
from common.schemas import DocumentItem, ItemError


def read(*paths: Path, **kwargs) -> tuple[list[DocumentItem], list[ItemError]]:
    reader = InputReader(max_document_bytes=kwargs.pop("max_document_bytes", 10_000_000), **kwargs)
    events = list(reader.read(paths))
    return ([e for e in events if isinstance(e, DocumentItem)], [e for e in events if isinstance(e, ItemError)])


def test_corpus_json_keeps_fields_and_extra_payload(tmp_path: Path) -> None:
    doc = {"content": "# Attach\nAttach a disk.", "title": "Attach", "product": "CDS",
           "url": "https://docs.example/attach", "lang": "en", "tags": ["disk"]}
    (tmp_path / "a.json").write_text(json.dumps(doc))
    docs, errors = read(tmp_path / "a.json")
    assert errors == []
    [d] = docs
    assert (d.key, d.title, d.product, d.url) == ("https://docs.example/attach", "Attach", "CDS", doc["url"])
    assert d.extra == {"lang": "en", "tags": ["disk"]}
    assert len(d.version) == 16


def test_jsonl_lines_and_their_errors_are_named_by_line(tmp_path: Path) -> None:
    lines = [
        json.dumps({"content": "first", "url": "u1"}),
        "{not json",
        json.dumps({"content": 5}),
        json.dumps({"title": "no content"}),
        json.dumps({"content": "   "}),
        json.dumps({"content": "ok", "title": ["wrong"]}),
        json.dumps([1, 2]),
        "",
        json.dumps({"content": "last", "url": "u2"}),
    ]
    path = tmp_path / "docs.jsonl"
    path.write_text("\n".join(lines) + "\n")
    docs, errors = read(path)
    assert [d.key for d in docs] == ["u1", "u2"]
    reasons = {e.item.rsplit(":", 1)[1]: e.reason for e in errors}
    assert reasons["2"].startswith("malformed JSON")
    assert reasons["3"] == "field 'content' must be a string, got number"
    assert reasons["4"] == "missing field 'content'"
    assert reasons["5"] == "empty content"
    assert reasons["6"] == "field 'title' must be a string, got array"
    assert reasons["7"] == "expected a JSON object, got array"
    assert len(errors) == 6


def test_markdown_and_text_title_from_heading_or_name(tmp_path: Path) -> None:
    (tmp_path / "guide.md").write_text("Intro line\n\n## Detach a disk ##\nBody text.\n")
    (tmp_path / "notes.txt").write_text("plain notes without a heading")
    docs, errors = read(tmp_path)
    assert errors == []
    by_name = {Path(d.key).name: d for d in docs}
    assert by_name["guide.md"].title == "Detach a disk"
    assert by_name["notes.txt"].title == "notes"
    assert by_name["notes.txt"].url == str(tmp_path / "notes.txt")


def test_bad_files_each_get_an_error_and_good_ones_still_read(tmp_path: Path) -> None:
    (tmp_path / "good.json").write_text(json.dumps({"content": "fine", "url": "good"}))
    (tmp_path / "truncated.json").write_text('{"content": "cut off')
    (tmp_path / "binary.txt").write_bytes(b"abc\x00\x01\x02")
    (tmp_path / "latin1.md").write_bytes("caf\xe9".encode("latin-1"))
    (tmp_path / "empty.json").write_text("")
    (tmp_path / "nested.json").write_text("[" * 100_000 + "]" * 100_000)
    (tmp_path / "image.png").write_bytes(b"\x89PNG")
    docs, errors = read(tmp_path)
    assert [d.key for d in docs] == ["good"]
    reasons = {Path(e.item).name: e.reason for e in errors}
    assert reasons["truncated.json"].startswith("malformed JSON")
    assert reasons["binary.txt"] == "binary file (contains NUL bytes)"
    assert reasons["latin1.md"] == "not valid UTF-8 (byte 3)"
    assert reasons["empty.json"] == "empty file"
    assert reasons["nested.json"] == "malformed JSON: nested too deeply"
    assert "image.png" not in reasons  # other file types in a directory are skipped, not errors


def test_missing_path_and_unsupported_explicit_file(tmp_path: Path) -> None:
    (tmp_path / "x.csv").write_text("a,b")
    docs, errors = read(tmp_path / "nope", tmp_path / "x.csv")
    assert docs == []
    assert errors[0].reason == "no such file or directory"
    assert errors[1].reason.startswith("unsupported file type .csv")


def test_symlinks_out_of_the_root_and_loops_are_not_followed(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.txt").write_text("not for ingestion")
    root = tmp_path / "root"
    root.mkdir()
    (root / "doc.txt").write_text("inside")
    os.symlink(outside / "secret.txt", root / "link.txt")
    os.symlink(root, root / "loop")
    docs, errors = read(root)
    assert [Path(d.key).name for d in docs] == ["doc.txt"]
    assert [e.reason for e in errors] == ["symlink points outside the input root; not followed"]


def test_oversized_file_is_refused(tmp_path: Path) -> None:
    (tmp_path / "big.txt").write_text("x" * 2000)
    docs, errors = read(tmp_path / "big.txt", max_document_bytes=1000)
    assert docs == [] and "over the 1000-byte limit" in errors[0].reason


def test_batches_stay_under_the_byte_bound_and_keep_every_document() -> None:
    docs = [DocumentItem(key=f"k{i}", item=f"i{i}", content="word " * (50 + i * 7)) for i in range(300)]
    batches = list(pack_batches(docs, max_bytes=20_000))
    assert len(batches) > 5
    assert all(b.nbytes <= 20_000 for b in batches)
    assert [b.index for b in batches] == list(range(len(batches)))
    assert [i.key for b in batches for i in b.items] == [d.key for d in docs]


def test_oversized_document_is_split_into_segments_without_losing_text() -> None:
    paragraphs = [f"Paragraph {n}: " + "lorem ipsum dolor " * 40 for n in range(400)]
    content = "\n\n".join(paragraphs)
    doc = DocumentItem(key="big", item="big.md", content=content)
    parts = split_document(doc, max_bytes=30_000)
    assert len(parts) > 10
    assert "".join(p.content for p in parts) == content
    assert [p.segment for p in parts] == list(range(len(parts)))
    assert all(p.segments == len(parts) and p.key == "big" for p in parts)
    assert all(encoded_size(p) <= 30_000 for p in parts)
    batches = list(pack_batches([doc], max_bytes=30_000))  # its messages leave room for the envelope
    packed = [item for b in batches for item in b.items]
    assert "".join(p.content for p in packed) == content
    assert all(b.nbytes <= 30_000 - ENVELOPE_BYTES for b in batches)


def test_a_50_mb_document_splits_into_1_mb_segments_losslessly(tmp_path: Path) -> None:
    line = "Elastic IP addresses can be bound to a virtual machine or a load balancer.\n"
    content = line * (50 * 1024 * 1024 // len(line))
    (tmp_path / "huge.json").write_text(json.dumps({"content": content, "url": "test://huge"}))
    [doc], errors = read(tmp_path / "huge.json", max_document_bytes=64 * 1024 * 1024)
    assert errors == [] and len(doc.content) >= 50 * 1024 * 1024 - len(line)
    batches = list(pack_batches([doc], max_bytes=1_000_000))
    parts = [item for b in batches for item in b.items]
    assert len(parts) >= 50 and all(b.nbytes <= 1_000_000 for b in batches)
    assert "".join(p.content for p in parts) == content


def test_non_ascii_text_is_measured_as_it_travels() -> None:
    """kombu's JSON escapes non-ASCII, so a CJK page takes about twice its UTF-8 bytes."""
    docs = [DocumentItem(key=f"zh{i}", item=f"zh{i}", content="云硬盘挂载到云主机。" * 300) for i in range(40)]
    batches = list(pack_batches(docs, max_bytes=50_000))
    for b in batches:
        body = json.dumps([["job", b.index, b.to_payload()], {}, {}])
        assert len(body) <= 50_000


def test_file_identity_does_not_depend_on_how_the_path_is_spelled(tmp_path: Path, monkeypatch) -> None:
    """`ragq ingest docs/`, `ragq ingest /abs/docs/` and a run from another working
    directory key a file alike, so re-ingesting replaces it instead of adding a copy;
    documents with an `id` or `url` keep those."""
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "a.md").write_text("# A\nCloud disks can be detached.\n")
    (docs / "b.jsonl").write_text(json.dumps({"content": "no id, no url"}) + "\n"
                                  + json.dumps({"id": "kept-id", "content": "has an id"}) + "\n")
    (docs / "c.json").write_text(json.dumps([{"content": "first"}, {"url": "https://x/y", "content": "url"}]))
    (tmp_path / "elsewhere").mkdir()

    def keys(*spelling: str) -> list[str]:
        found, errors = read(*map(Path, spelling))
        assert not errors
        return sorted(d.key for d in found)

    monkeypatch.chdir(tmp_path)
    relative = keys("docs")
    dotted = keys("./docs/")
    absolute = keys(str(docs))
    monkeypatch.chdir(tmp_path / "elsewhere")
    from_elsewhere = keys("../docs")
    assert relative == dotted == absolute == from_elsewhere
    real = docs.resolve()
    assert relative == sorted([f"{real / 'a.md'}", f"{real / 'b.jsonl'}:1", "kept-id",
                               f"{real / 'c.json'}[0]", "https://x/y"])
