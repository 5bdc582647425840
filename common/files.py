"""The file store of the Batch API (``/v1/files``): uploads and batch outputs on disk.

Files live under ``RAGQ_DATA_DIR/files`` as ``{id}.data`` (the bytes) beside
``{id}.json`` (the metadata, an OpenAI ``FileObject``). Content is written in chunks to a
temporary name and renamed into place, so nothing is ever held whole in memory and a
reader never sees half a file. Every file expires ``RAGQ_FILE_TTL_S`` after its creation;
an expired one reads as absent and is removed by the next listing.

Only this module knows the layout. Several API servers share one store when they share
the directory (a volume or NFS mount); workers never touch it: the API server writes a
batch's output files from the job's results in Redis.
"""

from __future__ import annotations

import json
import os
import re
import time
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO, Any, Literal

from common.config import Settings

#: Purposes a client may upload with; batch outputs are written as ``batch_output``.
UPLOAD_PURPOSES = ("batch",)
FILE_ID = re.compile(r"^file-[0-9a-f]{24}$")
_CHUNK = 1024 * 1024


class FileTooLarge(ValueError):
    """An upload past the store's size limit (the partial file is removed)."""


@dataclass
class StoredFile:
    """A file's metadata in OpenAI's ``FileObject`` shape."""

    id: str
    bytes: int
    created_at: int
    filename: str
    purpose: str
    expires_at: int | None
    object: Literal["file"] = "file"
    status: Literal["uploaded", "processed", "error"] = "processed"
    status_details: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class FileStore:
    """Files on disk with a size limit and an expiry; every method touches one file or the listing."""

    def __init__(self, root: Path, *, max_bytes: int, ttl_s: int) -> None:
        self.root = Path(root)
        self.max_bytes = max_bytes
        self.ttl_s = ttl_s

    @classmethod
    def from_settings(cls, settings: Settings) -> FileStore:
        return cls(settings.files_dir, max_bytes=settings.file_max_bytes, ttl_s=settings.file_ttl_s)

    # -- paths (nowhere else) -----------------------------------------------------
    def _data(self, file_id: str) -> Path:
        return self.root / f"{file_id}.data"

    def _meta(self, file_id: str) -> Path:
        return self.root / f"{file_id}.json"

    # -- writing ------------------------------------------------------------------
    def save(self, source: IO[bytes] | Iterable[bytes], *, filename: str, purpose: str) -> StoredFile:
        """Copy ``source`` (a binary file or an iterable of chunks) in; :class:`FileTooLarge` past the limit."""
        chunks = _chunks(source) if hasattr(source, "read") else iter(source)  # type: ignore[arg-type]
        return self._write(chunks, filename=filename, purpose=purpose)

    def write_lines(self, lines: Iterable[dict[str, Any]], *, filename: str, purpose: str) -> StoredFile:
        """A JSONL file written line by line (batch outputs); no size limit: the server made it."""
        encoded = (json.dumps(line, ensure_ascii=False).encode("utf-8") + b"\n" for line in lines)
        return self._write(_grouped(encoded), filename=filename, purpose=purpose, limit=None)

    def _write(self, chunks: Iterator[bytes], *, filename: str, purpose: str,
               limit: int | None = -1) -> StoredFile:
        limit = self.max_bytes if limit == -1 else limit
        self.root.mkdir(parents=True, exist_ok=True)
        file_id = f"file-{uuid.uuid4().hex[:24]}"
        tmp = self.root / f".{file_id}.part"
        size = 0
        try:
            with tmp.open("wb") as handle:
                for chunk in chunks:
                    size += len(chunk)
                    if limit is not None and size > limit:
                        raise FileTooLarge(f"file is over the {limit}-byte limit (RAGQ_FILE_MAX_BYTES)")
                    handle.write(chunk)
            now = int(time.time())
            meta = StoredFile(id=file_id, bytes=size, created_at=now, filename=_clean_name(filename),
                              purpose=purpose, expires_at=now + self.ttl_s)
            os.replace(tmp, self._data(file_id))
            _write_json(self._meta(file_id), meta.to_dict())  # last: a file without metadata does not exist
        except BaseException:
            tmp.unlink(missing_ok=True)
            self._data(file_id).unlink(missing_ok=True)
            raise
        return meta

    # -- reading ------------------------------------------------------------------
    def get(self, file_id: str) -> StoredFile | None:
        """The file's metadata, or None when unknown or expired."""
        if not FILE_ID.match(file_id):
            return None
        try:
            meta = StoredFile(**json.loads(self._meta(file_id).read_text("utf-8")))
        except (OSError, ValueError, TypeError):
            return None
        if meta.expires_at is not None and meta.expires_at <= time.time():
            return None
        return meta

    def open(self, file_id: str) -> IO[bytes] | None:
        """The file's content for reading (the caller closes it), or None."""
        if self.get(file_id) is None:
            return None
        try:
            return self._data(file_id).open("rb")
        except OSError:
            return None

    def iter_bytes(self, file_id: str) -> Iterator[bytes] | None:
        handle = self.open(file_id)
        if handle is None:
            return None

        def read() -> Iterator[bytes]:
            with handle:
                yield from _chunks(handle)

        return read()

    def delete(self, file_id: str) -> bool:
        if self.get(file_id) is None:
            return False
        self._remove(file_id)
        return True

    def list(self, *, after: str | None = None, limit: int = 10000, order: Literal["asc", "desc"] = "desc",
             purpose: str | None = None) -> tuple[list[StoredFile], bool]:
        """Files by ``created_at`` (then id), after the one named ``after``; (page, has_more).

        Expired files met on the way are removed.
        """
        files: list[StoredFile] = []
        for path in self.root.glob("file-*.json") if self.root.is_dir() else ():
            file_id = path.name.removesuffix(".json")
            meta = self.get(file_id)
            if meta is None:
                self._remove(file_id)
            elif purpose is None or meta.purpose == purpose:
                files.append(meta)
        files.sort(key=lambda f: (f.created_at, f.id), reverse=order == "desc")
        if after is not None:
            ids = [f.id for f in files]
            files = files[ids.index(after) + 1:] if after in ids else []
        return files[:limit], len(files) > limit

    def _remove(self, file_id: str) -> None:
        self._meta(file_id).unlink(missing_ok=True)
        self._data(file_id).unlink(missing_ok=True)


def _chunks(handle: IO[bytes]) -> Iterator[bytes]:
    while chunk := handle.read(_CHUNK):
        yield chunk


def _grouped(pieces: Iterable[bytes]) -> Iterator[bytes]:
    """Small pieces joined into writes of about a megabyte."""
    pending: list[bytes] = []
    held = 0
    for piece in pieces:
        pending.append(piece)
        held += len(piece)
        if held >= _CHUNK:
            yield b"".join(pending)
            pending, held = [], 0
    if pending:
        yield b"".join(pending)


def _clean_name(name: str) -> str:
    """The client's file name without any directory part (it is only a label)."""
    base = re.split(r"[\\/]", name or "")[-1].strip()
    return base[:255] or "upload.jsonl"


def _write_json(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.part")
    tmp.write_text(json.dumps(data, ensure_ascii=False), "utf-8")
    os.replace(tmp, path)
