"""Re-index a collection to a new model or chunking from what it stores, beside the live one.

Every stored chunk keeps its text and where it starts in its document (``char_start``),
so the documents can be put back together from the store alone: no source file needs
to be where it was. A rebuilt document keeps its key, version hash, version number,
source, segmentation and extra fields, so after the switch a scheduled re-ingest of an
unchanged file finds it unchanged (its hash over the new model and chunking matches).

The steps (driven by ``workers/tasks.py``): plan (the live collection's document keys
and the next physical name, :func:`common.live.rebuilt_name`), rebuild page by page into
the target, catch up with what changed in the live collection meanwhile, then switch the
pointer. Searches keep using the live collection until the switch.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from common.schemas import DocumentItem
from common.vectorstore import Store

#: Payload fields ragq writes itself; every other one is a document's extra field.
OWN_FIELDS = frozenset({
    "id", "text", "title", "product", "url", "source", "content_hash", "doc_key", "doc_version", "doc_seq",
    "segment", "segments", "chunk_index", "char_start", "model", "query_prefix", "document_prefix",
    "embed_model", "chunk_tokens", "chunk_overlap",
})
#: Documents per re-index batch (their chunks are read back in one scroll); RAGQ_REINDEX_PAGE_DOCUMENTS.
PAGE_DOCUMENTS = 64


@dataclass(frozen=True)
class Recipe:
    """How the target collection's vectors are made; None = the worker's setting."""

    embed_model: str
    chunk_tokens: int | None = None
    chunk_overlap: int | None = None
    query_prefix: str | None = None
    document_prefix: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Recipe:
        return cls(**{k: data.get(k) for k in cls.__dataclass_fields__})


@dataclass
class Plan:
    """A re-index: from ``source`` into ``target``, the documents ``keys`` of the source."""

    source: str
    target: str
    recipe: Recipe
    keys: list[str] = field(default_factory=list)

    def pages(self, size: int = PAGE_DOCUMENTS) -> list[list[str]]:
        return [self.keys[i : i + size] for i in range(0, len(self.keys), size)]

    def to_dict(self, *, with_keys: bool = False) -> dict[str, Any]:
        out: dict[str, Any] = {"source": self.source, "target": self.target, "recipe": self.recipe.to_dict()}
        if with_keys:
            out["keys"] = self.keys
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Plan:
        return cls(str(data["source"]), str(data["target"]), Recipe.from_dict(data["recipe"]),
                   [str(k) for k in data.get("keys", [])])


def join_chunks(chunks: Sequence[Mapping[str, Any]]) -> str:
    """A document's (stripped) text from its chunks' payloads, in ``chunk_index`` order.

    With ``char_start`` the overlap between windows is cut exactly and a gap (whitespace
    the chunker trimmed at a window's edge) becomes that many spaces. Points written before
    offsets were recorded are joined on their longest overlap of text instead.
    """
    out = ""
    for chunk in sorted(chunks, key=lambda c: int(c.get("chunk_index") or 0)):
        text = str(chunk.get("text") or "")
        start = chunk.get("char_start")
        if start is None:
            out = _join_on_overlap(out, text)
        elif int(start) >= len(out):
            out += " " * (int(start) - len(out)) + text
        else:
            out += text[len(out) - int(start) :]
    return out


def _join_on_overlap(head: str, tail: str) -> str:
    if not head:
        return tail
    for size in range(min(len(head), len(tail)), 0, -1):
        if head.endswith(tail[:size]):
            return head + tail[size:]
    return head + " " + tail


def rebuild_documents(payloads: Sequence[Mapping[str, Any]]) -> list[DocumentItem]:
    """The documents (segments) whose chunks ``payloads`` are; one version each, the newest.

    Points of two versions of a document (mid-prune) would mix texts: only the highest
    ``doc_seq`` of each document is used.
    """
    newest: dict[str, int] = {}
    for p in payloads:
        key = str(p["doc_key"])
        newest[key] = max(newest.get(key, 0), int(p.get("doc_seq") or 0))
    parts: dict[tuple[str, int], list[Mapping[str, Any]]] = defaultdict(list)
    for p in payloads:
        if int(p.get("doc_seq") or 0) == newest[str(p["doc_key"])]:
            parts[(str(p["doc_key"]), int(p.get("segment") or 0))].append(p)
    segments_of: dict[str, int] = defaultdict(int)
    for key, _ in parts:
        segments_of[key] += 1
    items = []
    for (key, segment), chunks in sorted(parts.items()):
        first = min(chunks, key=lambda c: int(c.get("chunk_index") or 0))
        items.append(DocumentItem(
            key=key, item=str(first.get("source") or key), content=join_chunks(chunks),
            title=str(first.get("title") or ""), product=str(first.get("product") or ""),
            url=str(first.get("url") or ""), extra={k: v for k, v in first.items() if k not in OWN_FIELDS},
            version=str(first.get("doc_version") or ""), segment=segment,
            segments=int(first.get("segments") or segments_of[key]), seq=int(first.get("doc_seq") or 0),
            source=str(first.get("source") or ""),
        ))
    return items


def read_documents(store: Store, keys: Sequence[str]) -> list[DocumentItem]:
    """The documents ``keys`` as ``store`` holds them (one scroll of their chunks)."""
    if not keys:
        return []
    return rebuild_documents(store.scroll_payloads({"doc_key": list(keys)}, limit=1 << 30))


def lagging(source: Store, target: Store) -> tuple[list[str], list[str]]:
    """What changed in ``source`` while ``target`` was built: documents to rebuild again (newer
    or new in the source) and documents to delete from the target (gone from the source)."""
    have = {k: v.doc_seq for k, v in target.stored_versions({}).items()}
    want = {k: v.doc_seq for k, v in source.stored_versions({}).items()}
    again = sorted(k for k, seq in want.items() if have.get(k, -1) < seq)
    gone = sorted(k for k in have if k not in want)
    return again, gone
