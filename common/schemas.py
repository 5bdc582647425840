"""Plain dataclasses that cross process boundaries (producer, workers, CLI, HTTP).

They are JSON-shaped on purpose: task messages and job records carry their ``to_dict``
form, never pickles.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from dataclasses import asdict, dataclass, field
from enum import Enum
from typing import Any

#: Namespace of ragq's deterministic point ids (uuid5 of document key and chunk index).
POINT_NAMESPACE = uuid.UUID("6f1e0c8e-3b5d-5b7a-9a57-2f0f6f7a4e21")

#: Fields of the original corpus format; anything else a document carries is "extra".
CORE_FIELDS = ("content", "title", "product", "url")


class JobStatus(str, Enum):
    """Where a job stands; python-rq-style, ``not_found`` is a status, not a crash."""

    queued = "queued"
    in_progress = "in_progress"
    completed = "completed"
    completed_with_errors = "completed_with_errors"
    failed = "failed"
    cancelled = "cancelled"
    not_found = "not_found"

    @property
    def is_terminal(self) -> bool:
        return self in TERMINAL_STATUSES


TERMINAL_STATUSES = frozenset(
    {JobStatus.completed, JobStatus.completed_with_errors, JobStatus.failed, JobStatus.cancelled}
)


class JobKind(str, Enum):
    ingest = "ingest"
    questions = "questions"
    embeddings = "embeddings"  # a Batch API batch of /v1/embeddings lines
    delete = "delete"
    reindex = "reindex"


@dataclass(frozen=True)
class ItemError:
    """A per-item failure: which input, and why, in words a user can act on."""

    item: str
    reason: str


@dataclass
class DocumentItem:
    """One document (or one segment of a very large one) as it travels to a worker.

    ``key`` identifies the document across re-ingests (its ``id`` field, else its url,
    else its path); ``version`` is a hash of what gets stored; ``seq`` says which of two
    versions is newer (:mod:`common.docseq`: the higher, given as its batch was sent),
    so a late delivery of an older version never replaces a newer one. 0 = not numbered
    (a hand-made message): the worker gives it its job's number. ``source`` names where it
    came from (a directory root or ``--source NAME``), so ``ragq ingest --sync`` can delete
    the source's documents that are gone.
    """

    key: str
    item: str
    content: str
    title: str = ""
    product: str = ""
    url: str = ""
    extra: dict[str, Any] = field(default_factory=dict)
    version: str = ""
    segment: int = 0
    segments: int = 1
    seq: int = 0
    source: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DocumentItem:
        return cls(**{k: data[k] for k in cls.__dataclass_fields__ if k in data})

    @staticmethod
    def version_of(content: str, title: str, product: str, url: str, extra: dict[str, Any]) -> str:
        blob = json.dumps([content, title, product, url, extra], sort_keys=True, ensure_ascii=False)
        return hashlib.sha1(blob.encode("utf-8")).hexdigest()[:16]


def point_id(doc_key: str, segment: int, chunk_index: int, seq: int = 0) -> str:
    """The deterministic id of one chunk of one numbered version of a document.

    A second delivery of the same version rewrites the same points; two versions never
    share a point, so an older one written late cannot overwrite a newer one (pruning
    then deletes whichever is older). ``seq`` 0 gives the ids of unnumbered versions.
    """
    name = f"{doc_key}\x1f{segment}\x1f{chunk_index}" + (f"\x1f{seq}" if seq else "")
    return str(uuid.uuid5(POINT_NAMESPACE, name))


@dataclass
class Source:
    """A retrieved chunk as shown to users: the page it came from and the matching text."""

    url: str
    title: str
    product: str
    score: float
    text: str

    @classmethod
    def from_payload(cls, payload: dict[str, Any], score: float) -> Source:
        return cls(
            url=str(payload.get("url", "")),
            title=str(payload.get("title", "")),
            product=str(payload.get("product", "")),
            score=round(float(score), 6),
            text=str(payload.get("text", "")),
        )
