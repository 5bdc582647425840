"""Pack documents into task messages bounded in bytes.

Messages stay near ``batch_bytes`` (about 1 MB) so Redis, Celery and Flower never
carry giant payloads; a document larger than that is split into segments at paragraph
breaks, each sent on its own and chunked by the worker, so nothing is cut off.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, replace

from common.schemas import DocumentItem

#: Bytes a document's JSON adds beyond its content (keys, title, url, extra).
_OVERHEAD_MARGIN = 2048
#: Bytes of the task message around the documents (job id, batch index, Celery's body).
ENVELOPE_BYTES = 1024


@dataclass
class Batch:
    index: int
    items: list[DocumentItem]
    nbytes: int

    def to_payload(self) -> list[dict]:
        return [item.to_dict() for item in self.items]


#: Digits a sequence number may take (common.docseq numbers items after packing).
_SEQ_DIGITS = 16


def encoded_size(item: DocumentItem) -> int:
    """Bytes ``item`` takes in a task message: kombu's JSON escapes non-ASCII (``\\uXXXX``)."""
    return len(json.dumps(item.to_dict())) - len(str(item.seq)) + _SEQ_DIGITS


def split_document(item: DocumentItem, max_bytes: int) -> list[DocumentItem]:
    """Split one oversized document into segments of at most ``max_bytes`` of content."""
    budget = max(1024, max_bytes - _OVERHEAD_MARGIN - len(json.dumps(item.extra)))
    pieces = list(_split_text(item.content, budget))
    return [replace(item, content=piece, segment=i, segments=len(pieces)) for i, piece in enumerate(pieces)]


def _json_size(text: str) -> int:
    """Bytes ``text`` takes inside a JSON message (escapes: newlines 2, non-ASCII 6 or 12)."""
    return len(json.dumps(text))


def _split_text(text: str, budget: int) -> Iterator[str]:
    """Cut at the last paragraph (or line, or space) break within ``budget`` message bytes."""
    while text:
        if _json_size(text) <= budget:
            yield text
            return
        window = text[:budget]
        while _json_size(window) > budget:  # multi-byte or escaped text: shrink to fit
            window = window[: int(len(window) * 0.9)]
        cut = -1
        for mark in ("\n\n", "\n", "。", ". ", " "):
            cut = window.rfind(mark)
            if cut > len(window) // 2:
                cut += len(mark)
                break
            cut = -1
        if cut <= 0:
            cut = len(window)
        yield text[:cut]
        text = text[cut:]


def pack_batches(items: Iterable[DocumentItem], max_bytes: int) -> Iterator[Batch]:
    """Group documents into batches whose task message stays under ``max_bytes``."""
    max_bytes -= ENVELOPE_BYTES
    current: list[DocumentItem] = []
    size = 0
    index = 0
    for item in items:
        parts = split_document(item, max_bytes) if encoded_size(item) > max_bytes else [item]
        for part in parts:
            part_size = encoded_size(part) + 2  # ", " between items
            if current and size + part_size > max_bytes:
                yield Batch(index, current, size)
                index += 1
                current, size = [], 0
            current.append(part)
            size += part_size
    if current:
        yield Batch(index, current, size)
