"""Which physical collection a collection name means now: the alias a re-index switches.

``RAGQ_COLLECTION`` names a *logical* collection. Until the first ``ragq reindex`` it is
the physical collection of that name; a re-index builds ``{name}__r{n}`` beside it and
then points the name at the new one in one step, so every search and ingest that starts
after the switch uses it, and those running finish on the old one. The old collections
stay until ``ragq reindex --drop-old``.

The pointer lives with the store, not in Redis, so it survives a Redis flush like the
vectors do: a Qdrant collection alias ``{name}__live`` (Qdrant refuses an alias with the
name of an existing collection, and the first physical collection already has the name),
or, for the embedded store, a small JSON file beside its directories, replaced atomically.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

#: How long a resolved Qdrant alias is trusted before it is read again (one REST call).
ALIAS_TTL_S = 1.0
_REBUILT = re.compile(r"__r(\d+)$")


def rebuilt_name(logical: str, existing: list[str]) -> str:
    """The next physical name for a re-index of ``logical``: ``{logical}__r{n}``."""
    numbers = [int(m.group(1)) for name in existing if name.startswith(logical)
               and (m := _REBUILT.search(name)) and name[: m.start()] == logical]
    return f"{logical}__r{max(numbers, default=0) + 1}"


class LivePointer(Protocol):
    logical: str

    def resolve(self) -> str: ...
    def switch(self, target: str) -> str: ...
    def physical(self) -> list[str]: ...


class FilePointer:
    """The embedded store's pointer: ``{store_dir}/{logical}.live.json`` = ``{"target": ...}``.

    Every process on the host reads it (a stat per call, the file only when it changed);
    only the store's owner writes it, by an atomic rename.
    """

    def __init__(self, store_dir: Path, logical: str) -> None:
        self.store_dir = Path(store_dir)
        self.logical = logical
        self.path = self.store_dir / f"{logical}.live.json"
        self._seen: tuple[float, int, str] | None = None  # (mtime, size, target)
        self._lock = threading.Lock()

    def resolve(self) -> str:
        try:
            stat = self.path.stat()
        except FileNotFoundError:
            return self.logical
        with self._lock:
            if self._seen is None or self._seen[:2] != (stat.st_mtime, stat.st_size):
                try:
                    target = str(json.loads(self.path.read_text(encoding="utf-8"))["target"])
                except (OSError, ValueError, KeyError) as exc:
                    raise RuntimeError(f"collection pointer {self.path} is unreadable: {exc}") from exc
                self._seen = (stat.st_mtime, stat.st_size, target)
            return self._seen[2]

    def switch(self, target: str) -> str:
        previous = self.resolve()
        self.store_dir.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps({"target": target, "previous": previous, "switched_at": time.time()}),
                       encoding="utf-8")
        os.replace(tmp, self.path)
        return previous

    def physical(self) -> list[str]:
        if not self.store_dir.is_dir():
            return []
        return sorted(p.name for p in self.store_dir.iterdir() if p.is_dir() and
                      (p.name == self.logical or (_REBUILT.search(p.name) and p.name.startswith(self.logical + "__r"))))

    def drop(self, name: str) -> None:
        shutil.rmtree(self.store_dir / name)


class AliasPointer:
    """A Qdrant server's (or local mode's) pointer: the alias ``{logical}__live``."""

    def __init__(self, client: Any, logical: str, *, wrap: Callable[[str], Any]) -> None:
        self.client = client
        self.logical = logical
        self.alias = f"{logical}__live"
        self._wrap = wrap  # the store's error wrapper: a failed call is a StoreError
        self._cached: tuple[float, str] | None = None

    def resolve(self) -> str:
        if self._cached is not None and time.monotonic() - self._cached[0] < ALIAS_TTL_S:
            return self._cached[1]
        with self._wrap("read collection aliases"):
            aliases = self.client.get_aliases().aliases
        target = next((a.collection_name for a in aliases if a.alias_name == self.alias), self.logical)
        self._cached = (time.monotonic(), target)
        return target

    def switch(self, target: str) -> str:
        from qdrant_client import models as qm

        self._cached = None
        previous = self.resolve()
        ops: list[Any] = []
        if previous != self.logical or self._has_alias():
            ops.append(qm.DeleteAliasOperation(delete_alias=qm.DeleteAlias(alias_name=self.alias)))
        ops.append(qm.CreateAliasOperation(create_alias=qm.CreateAlias(collection_name=target, alias_name=self.alias)))
        with self._wrap("switch the collection alias"):
            self.client.update_collection_aliases(change_aliases_operations=ops)  # one step on the server
        self._cached = None
        return previous

    def _has_alias(self) -> bool:
        with self._wrap("read collection aliases"):
            return any(a.alias_name == self.alias for a in self.client.get_aliases().aliases)

    def physical(self) -> list[str]:
        with self._wrap("list collections"):
            names = [c.name for c in self.client.get_collections().collections]
        return sorted(n for n in names if n == self.logical or
                      (n.startswith(self.logical + "__r") and _REBUILT.search(n)))

    def drop(self, name: str) -> None:
        with self._wrap("delete collection"):
            self.client.delete_collection(name)
