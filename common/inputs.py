"""Read documents from files and directories, one at a time, with per-item errors.

Accepted inputs: ``.json`` (one document object, or a list of them), ``.jsonl`` (one
object per line) and ``.md``/``.markdown``/``.txt`` (title from the first heading, or
the file name; url = the path). Documents follow the corpus format
``{"content", "title", "product", "url"}``; extra fields are kept as payload.

Everything is a generator: the corpus is never held in memory, and a bad file yields an
:class:`~common.schemas.ItemError` instead of raising, so one bad file never sinks a job.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

from common.schemas import CORE_FIELDS, DocumentItem, ItemError

JSON_SUFFIXES = {".json"}
JSONL_SUFFIXES = {".jsonl", ".ndjson"}
TEXT_SUFFIXES = {".md", ".markdown", ".txt"}
SUPPORTED_SUFFIXES = JSON_SUFFIXES | JSONL_SUFFIXES | TEXT_SUFFIXES

_HEADING = re.compile(r"^\s{0,3}#{1,6}\s+(.+?)\s*#*\s*$", re.MULTILINE)

InputEvent = DocumentItem | ItemError


class InputReader:
    """Walks the given roots and yields documents and per-item errors in a stable order."""

    def __init__(self, *, max_document_bytes: int, follow_symlinks: bool = False) -> None:
        self.max_document_bytes = max_document_bytes
        self.follow_symlinks = follow_symlinks
        self.skipped_files = 0  # files of other types met while walking, or read already
        self._read_paths: set[str] = set()  # resolved paths read so far: a file is read once

    def read_sources(self, paths: Iterable[str | Path], source: str | None = None) -> Iterator[InputEvent]:
        """:meth:`read`, each document marked with its source (``source``, else the resolved
        path it was found under), which ``ragq ingest --sync`` deletes by."""
        for path in paths:
            name = source or str(Path(path).resolve())
            for event in self.read([path]):
                yield replace(event, source=name) if isinstance(event, DocumentItem) else event

    def read(self, paths: Iterable[str | Path]) -> Iterator[InputEvent]:
        for raw in paths:
            root = Path(raw)
            if not _utf8_name(root):
                yield ItemError(display_path(root), "path is not valid UTF-8; rename it")
            elif root.is_dir():
                yield from self._walk(root)
            elif root.exists() or root.is_symlink():
                yield from self._read_file(root, explicit=True)
            else:
                yield ItemError(str(root), "no such file or directory")

    def _walk(self, root: Path) -> Iterator[InputEvent]:
        real_root = root.resolve()
        seen_dirs: set[tuple[int, int]] = set()
        for dirpath, dirnames, filenames in os.walk(root, followlinks=self.follow_symlinks, onerror=None):
            here = Path(dirpath)
            try:
                stat = here.stat()
            except OSError as exc:
                yield ItemError(str(here), f"cannot read directory: {exc.strerror or exc}")
                continue
            if (stat.st_dev, stat.st_ino) in seen_dirs:  # a symlink loop, when following
                dirnames[:] = []
                yield ItemError(str(here), "directory loop (symlink back to an ancestor); skipped")
                continue
            seen_dirs.add((stat.st_dev, stat.st_ino))
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            for name in sorted(filenames):
                if name.startswith("."):
                    continue
                path = here / name
                if path.suffix.lower() not in SUPPORTED_SUFFIXES:
                    self.skipped_files += 1
                    continue
                if not _utf8_name(path):
                    yield ItemError(display_path(path), "file name is not valid UTF-8; rename the file")
                    continue
                if path.is_symlink() and not self.follow_symlinks:
                    try:
                        target = path.resolve(strict=True)
                    except (OSError, RuntimeError):  # a loop, or a link to nothing
                        yield ItemError(str(path), "broken symlink or symlink loop; not followed")
                        continue
                    if not target.is_relative_to(real_root):
                        yield ItemError(str(path), "symlink points outside the input root; not followed")
                        continue
                yield from self._read_file(path, explicit=False)

    def _read_file(self, path: Path, explicit: bool) -> Iterator[InputEvent]:
        # A symlink inside the root, or a path given twice, names a file already read: its
        # documents have the same keys (file_key), so reading it again would only embed them twice.
        try:
            real = str(path.resolve(strict=True))
        except (OSError, RuntimeError):
            real = None
        if real is not None and real in self._read_paths:
            self.skipped_files += 1
            return
        if real is not None:
            self._read_paths.add(real)
        suffix = path.suffix.lower()
        if suffix not in SUPPORTED_SUFFIXES:
            yield ItemError(
                str(path), f"unsupported file type {suffix or '(none)'}; use .json, .jsonl, .md or .txt"
            )
            return
        try:
            if path.is_symlink() and not path.exists():
                yield ItemError(str(path), "broken symlink or symlink loop")
                return
            if not path.is_file():
                yield ItemError(str(path), "not a regular file")
                return
            size = path.stat().st_size
        except OSError as exc:
            yield ItemError(str(path), f"cannot read file: {exc.strerror or exc}")
            return
        if size == 0:
            yield ItemError(str(path), "empty file")
            return
        if suffix in JSONL_SUFFIXES:
            yield from self._read_jsonl(path)
            return
        if size > self.max_document_bytes:
            yield ItemError(str(path), f"file is {size} bytes, over the {self.max_document_bytes}-byte limit")
            return
        text = _read_text(path)
        if isinstance(text, ItemError):
            yield text
        elif suffix in JSON_SUFFIXES:
            yield from self._parse_json(path, text)
        else:
            yield self._text_document(path, text)

    def _parse_json(self, path: Path, text: str) -> Iterator[InputEvent]:
        try:
            data = json.loads(text, parse_constant=_refuse_constant)
        except NonStandardJSON as exc:
            yield ItemError(str(path), str(exc))
            return
        except json.JSONDecodeError as exc:
            yield ItemError(str(path), f"malformed JSON: {exc.msg} (line {exc.lineno}, column {exc.colno})")
            return
        except RecursionError:
            yield ItemError(str(path), "malformed JSON: nested too deeply")
            return
        if isinstance(data, list):
            for n, obj in enumerate(data):
                yield document_from_object(obj, item=f"{path}[{n}]", default_key=f"{file_key(path)}[{n}]")
        else:
            yield document_from_object(data, item=str(path), default_key=file_key(path))

    def _read_jsonl(self, path: Path) -> Iterator[InputEvent]:
        try:
            handle = path.open("rb")
        except OSError as exc:
            yield ItemError(str(path), f"cannot read file: {exc.strerror or exc}")
            return
        with handle:
            for lineno, raw in enumerate(handle, start=1):
                item = f"{path}:{lineno}"
                if not raw.strip():
                    continue
                if len(raw) > self.max_document_bytes:
                    yield ItemError(item, f"line is {len(raw)} bytes, over the {self.max_document_bytes}-byte limit")
                    continue
                try:
                    line = raw.decode("utf-8")
                    obj = json.loads(line, parse_constant=_refuse_constant)
                except NonStandardJSON as exc:
                    yield ItemError(item, str(exc))
                    continue
                except UnicodeDecodeError as exc:
                    yield ItemError(item, f"not valid UTF-8 (byte {exc.start})")
                    continue
                except json.JSONDecodeError as exc:
                    yield ItemError(item, f"malformed JSON: {exc.msg} (column {exc.colno})")
                    continue
                except RecursionError:
                    yield ItemError(item, "malformed JSON: nested too deeply")
                    continue
                yield document_from_object(obj, item=item, default_key=f"{file_key(path)}:{lineno}")

    @staticmethod
    def _text_document(path: Path, text: str) -> InputEvent:
        if not text.strip():
            return ItemError(str(path), "empty content")
        match = _HEADING.search(text)
        title = match.group(1).strip() if match else path.stem
        return _make_document(
            key=file_key(path), item=str(path), content=text, title=title, product="", url=str(path), extra={}
        )


class NonStandardJSON(ValueError):
    """NaN or Infinity: Python's json reads them, but they are not JSON and cannot be stored."""


def _refuse_constant(name: str) -> float:
    raise NonStandardJSON(f"not standard JSON: {name} is not a number JSON allows")


def _utf8_name(path: Path) -> bool:
    try:
        str(path).encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def file_key(path: Path) -> str:
    """A file's identity: its resolved absolute path, however it was spelled.

    ``docs/a.md``, ``./docs/a.md`` and ``/abs/docs/a.md`` are one document, so
    ingesting it again, from any working directory, replaces it instead of adding a copy.
    """
    return str(path.resolve())


def display_path(path: Path) -> str:
    """A path for messages, with bytes that are not UTF-8 shown as escapes."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def _read_text(path: Path) -> str | ItemError:
    try:
        data = path.read_bytes()
    except OSError as exc:
        return ItemError(str(path), f"cannot read file: {exc.strerror or exc}")
    if b"\x00" in data[:8192]:
        return ItemError(str(path), "binary file (contains NUL bytes)")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        return ItemError(str(path), f"not valid UTF-8 (byte {exc.start})")


def document_from_object(obj: Any, *, item: str, default_key: str) -> InputEvent:
    """Validate one corpus-format object; wrong shapes become an :class:`ItemError`."""
    if not isinstance(obj, dict):
        return ItemError(item, f"expected a JSON object, got {_json_type(obj)}")
    content = obj.get("content")
    if content is None:
        return ItemError(item, "missing field 'content'")
    if not isinstance(content, str):
        return ItemError(item, f"field 'content' must be a string, got {_json_type(content)}")
    if not content.strip():
        return ItemError(item, "empty content")
    if "\x00" in content:
        return ItemError(item, "field 'content' contains NUL characters")
    fields: dict[str, str] = {}
    for name in ("title", "product", "url"):
        value = obj.get(name, "")
        if value is None:
            value = ""
        if not isinstance(value, str):
            return ItemError(item, f"field '{name}' must be a string, got {_json_type(value)}")
        fields[name] = value
    doc_id = obj.get("id")
    if doc_id is not None and not isinstance(doc_id, (str, int)):
        return ItemError(item, f"field 'id' must be a string or integer, got {_json_type(doc_id)}")
    extra = {k: v for k, v in obj.items() if k not in CORE_FIELDS}
    try:
        json.dumps(obj, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError as exc:
        return ItemError(item, f"text holds a lone surrogate ({exc.object[exc.start:exc.end]!a}), not valid Unicode")
    key = str(doc_id) if doc_id is not None else (fields["url"] or default_key)
    return _make_document(key=key, item=item, content=content, extra=extra, **fields)


def _make_document(
    *, key: str, item: str, content: str, title: str, product: str, url: str, extra: dict[str, Any]
) -> DocumentItem:
    version = DocumentItem.version_of(content, title, product, url, extra)
    return DocumentItem(
        key=key, item=item, content=content, title=title, product=product, url=url,
        extra=extra, version=version,
    )


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    return {bool: "boolean", int: "number", float: "number", str: "string", list: "array", dict: "object"}.get(
        type(value), type(value).__name__
    )
