"""Deleting documents: which ones (one validation layer for CLI and HTTP), and the deletion.

A delete is a job like an ingest: the producer validates a :class:`DeleteSelector`
and queues it; a worker resolves it to document keys in the store, records a
*tombstone* version for each (a number reserved when the job was created, recorded
set-if-greater in :mod:`common.docseq`) and only then deletes their points. A batch of
the same document sent before the delete but running after it is then an older version:
it is skipped, or it deletes its own points, so it never brings the document back. A
later ingest gets a higher number and stores the document again as usual.

``ragq ingest --sync`` deletes, after its ingest completed without errors, the documents
recorded under its sources whose keys that ingest did not send (``unseen_in``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from common.docseq import DocSequences
from common.jobs import BatchOutcome
from common.vectorstore import Store, _check_value

#: Documents deleted per store call.
_KEYS_PER_DELETE = 1024
#: Selector fields and the payload field each matches.
SELECTOR_FIELDS = {"doc_key": "doc_key", "url": "url", "product": "product"}


@dataclass(frozen=True)
class DeleteSelector:
    """Which documents to delete: a payload filter, or the stale documents of a sync."""

    filter: dict[str, Any] = field(default_factory=dict)
    sources: tuple[str, ...] = ()  # with unseen_in: documents of these sources ...
    unseen_in: str | None = None  # ... that this ingest job did not send

    @classmethod
    def of(cls, *, doc_key: Any = None, url: Any = None, product: Any = None,
           filter: Mapping[str, Any] | None = None) -> DeleteSelector:
        """Validate user input; ValueError names the offending field. At least one
        condition is required, so a delete never means "everything" by omission."""
        if filter is not None and not isinstance(filter, Mapping):
            raise ValueError("filter: must be an object of payload field -> value (or list of values)")
        conditions: dict[str, Any] = {}
        for name, value in (("doc_key", doc_key), ("url", url), ("product", product)):
            if value is not None:
                conditions[SELECTOR_FIELDS[name]] = value
        for key, value in (filter or {}).items():
            if not isinstance(key, str) or not key:
                raise ValueError(f"filter: field names must be non-empty strings, got {key!r}")
            if key in conditions and conditions[key] != value:
                raise ValueError(f"filter: {key!r} given twice with different values")
            conditions[key] = value
        if not conditions:
            raise ValueError("give at least one of doc_key, url, product or filter")
        for key, value in conditions.items():
            if value == "" or value == []:
                raise ValueError(f"{key}: must not be empty")
            _check_value(key, value)
        return cls(filter=conditions)

    @classmethod
    def stale(cls, sources: Iterable[str], ingest_job: str) -> DeleteSelector:
        return cls(sources=tuple(sources), unseen_in=ingest_job)

    def to_dict(self) -> dict[str, Any]:
        return {"filter": self.filter, "sources": list(self.sources), "unseen_in": self.unseen_in}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> DeleteSelector:
        return cls(dict(data.get("filter") or {}), tuple(data.get("sources") or ()), data.get("unseen_in"))


def delete_documents(store: Store, sequences: DocSequences, selector: DeleteSelector, tombstone: int,
                     seen: Callable[[list[str]], set[str]] | None = None) -> BatchOutcome:
    """Delete the selected documents; ``completed`` = documents, ``chunks`` = points deleted.

    ``seen(keys)`` says which of ``keys`` the sync's ingest sent (required with ``unseen_in``).
    """
    if selector.unseen_in is not None:
        if seen is None:
            raise ValueError("a sync delete needs the ingest job's seen documents")
        keys = []
        for source in selector.sources:
            found = list(store.stored_versions({"source": source}))
            keep = seen(found) if found else set()
            keys += [k for k in found if k not in keep]
    else:
        keys = list(store.stored_versions(selector.filter))
    outcome = BatchOutcome()
    for start in range(0, len(keys), _KEYS_PER_DELETE):
        group = keys[start : start + _KEYS_PER_DELETE]
        sequences.advance({key: tombstone for key in group})  # first: no older batch lands after
        deleted = store.delete_where({"doc_key": group})
        outcome.completed += len(group)
        outcome.chunks += sum(deleted.values())
    return outcome
