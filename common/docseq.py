"""Per-document sequence numbers, so an older delivery never overwrites a newer version.

A batch may run late (redelivered after its worker died) or beside another job that
ingests the same document. Content hashes cannot say which of two versions is newer, so
every document gets a number from one Redis counter as its batch is sent: a document
sent later has a higher number. Workers store it with the points (``doc_seq``, also
part of the point ids, so two versions never write the same point) and advance a
per-document "highest stored" number with set-if-greater only after their points are
written; a version older than that is skipped, and pruning deletes only points older
than it (never a newer version's).

Only this module knows these Redis keys: ``{prefix}:docseq:next`` (the counter) and
``{prefix}:docseq:stored`` (a hash: document key -> highest stored sequence; one field
per document ever ingested, about 100 bytes each, kept as long as the documents are).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import replace

import redis

from common.schemas import DocumentItem

# KEYS: stored ; ARGV: key1, seq1, key2, seq2, ... -> the stored sequence of each key after
_ADVANCE = """
local out = {}
for i = 1, #ARGV, 2 do
  local key, seq = ARGV[i], tonumber(ARGV[i + 1])
  local cur = tonumber(redis.call('HGET', KEYS[1], key) or '-1')
  if seq > cur then
    redis.call('HSET', KEYS[1], key, ARGV[i + 1])
    cur = seq
  end
  out[#out + 1] = tostring(cur)
end
return out
"""

# KEYS: stored ; ARGV: key1, points_seq1, new_seq1, ... -> 1/0 per key: adopted or not
_ADOPT = """
local out = {}
for i = 1, #ARGV, 3 do
  local key, have, new = ARGV[i], tonumber(ARGV[i + 1]), tonumber(ARGV[i + 2])
  local cur = tonumber(redis.call('HGET', KEYS[1], key) or '-1')
  if cur == new or cur <= have then
    if new > cur then redis.call('HSET', KEYS[1], key, ARGV[i + 2]) end
    out[#out + 1] = 1
  else
    out[#out + 1] = 0
  end
end
return out
"""


class DocSequences:
    """The sequence counter and the highest stored sequence of each document."""

    __slots__ = ("redis", "prefix")

    def __init__(self, client: redis.Redis, prefix: str = "ragq") -> None:
        self.redis = client
        self.prefix = prefix

    def _key(self, suffix: str) -> str:
        return f"{self.prefix}:docseq:{suffix}"

    # -- producer side -----------------------------------------------------------------
    def reserve(self, n: int) -> range:
        """``n`` fresh numbers, all higher than any handed out before (one round trip)."""
        if n <= 0:
            return range(0)
        end = int(self.redis.incrby(self._key("next"), n))
        return range(end - n + 1, end + 1)

    # -- worker side -------------------------------------------------------------------
    def stored(self, keys: Sequence[str]) -> dict[str, int]:
        """The highest stored sequence of each of ``keys`` (absent: never stored)."""
        keys = list(dict.fromkeys(keys))
        if not keys:
            return {}
        values = self.redis.hmget(self._key("stored"), keys)
        return {k: int(v) for k, v in zip(keys, values) if v is not None}

    def advance(self, seqs: Mapping[str, int]) -> dict[str, int]:
        """Record that these versions are stored; returns each key's highest stored sequence,
        which is higher than the one given when a newer version got there first."""
        if not seqs:
            return {}
        argv: list[str | int] = []
        for key, seq in seqs.items():
            argv += [key, int(seq)]
        values = self.redis.eval(_ADVANCE, 1, self._key("stored"), *argv)
        return {key: int(v) for key, v in zip(seqs, values)}

    def adopt(self, moves: Mapping[str, tuple[int, int]]) -> set[str]:
        """Let unchanged versions take over stored points: for each key, ``(have, new)``
        says the stored points are version ``have`` and version ``new`` has the same content.

        Atomically, per key: if no version newer than ``have`` was recorded since (or ``new``
        itself was), ``new`` becomes the stored version and the key is returned; the caller
        then relabels the points. Otherwise another version got there first and the caller
        must embed as usual, so a skip never stands in for content that was replaced.
        """
        if not moves:
            return set()
        argv: list[str | int] = []
        for key, (have, new) in moves.items():
            argv += [key, int(have), int(new)]
        values = self.redis.eval(_ADOPT, 1, self._key("stored"), *argv)
        return {key for key, ok in zip(moves, values) if int(ok)}


class Stamper:
    """Numbers a job's documents batch by batch, just before each batch is sent.

    The segments of a split document are consecutive and share their first segment's
    number, so the document is one version however many batches carry it.
    """

    def __init__(self, sequences: DocSequences) -> None:
        self.sequences = sequences
        self._split: tuple[str, int] | None = None  # (key, seq) of the document being split

    def __call__(self, items: Sequence[DocumentItem]) -> list[DocumentItem]:
        numbers = iter(self.sequences.reserve(sum(1 for i in items if i.segment == 0)))
        out = []
        for item in items:
            if item.segment == 0:
                seq = next(numbers)
                self._split = (item.key, seq) if item.segments > 1 else None
            elif self._split is not None and self._split[0] == item.key:
                seq = self._split[1]
            else:
                raise ValueError(f"segment {item.segment} of {item.key!r} without its first segment")
            out.append(replace(item, seq=seq))
        return out


def fill_missing(items: Iterable[DocumentItem], seq: int) -> list[DocumentItem]:
    """Give items sent without a sequence (a hand-made message) their job's number."""
    return [item if item.seq else replace(item, seq=seq) for item in items]
