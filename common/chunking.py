"""Split documents into overlapping token windows that fit the embedding model.

Nothing is cut off: a text longer than the model's window becomes several chunks whose
windows overlap by ``overlap`` tokens, so a sentence on a boundary is whole in one of
them. Windows end on a paragraph or sentence break when one lies near the limit, so
chunks read naturally as sources in a prompt.

Each chunk keeps the token ids it was cut from, so the embedder feeds them to the model
as they are instead of tokenizing the chunk's text a second time (:meth:`Chunker.split_many`
tokenizes a whole batch's documents in one call of the fast tokenizer).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from common.interrupts import interrupts

#: Characters after which a window may end early, strongest first.
_BREAKS: tuple[str, ...] = ("\n\n", "\n", "。", ". ", "！", "？", "? ", "! ", "；", "; ")


def _cjk(char: str) -> bool:
    """A CJK ideograph or kana, which BERT tokenizers treat as a word of its own."""
    code = ord(char)
    return 0x3040 <= code <= 0x30FF or 0x3400 <= code <= 0x9FFF or 0xF900 <= code <= 0xFAFF


class Tokenizer(Protocol):
    def __call__(self, text: str, **kwargs: object) -> dict: ...


@dataclass(frozen=True)
class Chunk:
    index: int
    text: str
    tokens: int  # tokens of ``text`` without special tokens
    ids: tuple[int, ...] = ()  # those tokens' ids, as cut from the document's tokenization
    start: int = 0  # where ``text`` begins in the (stripped) document: enough to rebuild it (reindex)


class Chunker:
    """Token-window chunking with a fast (offset-mapping) Hugging Face tokenizer."""

    def __init__(self, tokenizer: Tokenizer, max_tokens: int, overlap: int = 32) -> None:
        if max_tokens < 8:
            raise ValueError(f"chunk size of {max_tokens} tokens is too small")
        self.tokenizer = tokenizer
        self.max_tokens = max_tokens
        self.overlap = min(overlap, max_tokens // 2)

    def split(self, text: str) -> list[Chunk]:
        """Chunks of at most ``max_tokens`` tokens covering all of ``text``."""
        result = self.split_many([text])[0]
        if isinstance(result, Exception):
            raise result
        return result

    def split_many(self, texts: Sequence[str]) -> list[list[Chunk] | Exception]:
        """:meth:`split` for each text, tokenized in one call; a text the tokenizer
        refuses gets its exception in its place and the others are still split."""
        stripped = [t.strip() for t in texts]
        wanted = [i for i, t in enumerate(stripped) if t]
        out: list[list[Chunk] | Exception] = [[] for _ in stripped]
        try:
            encoded = self._tokenize([stripped[i] for i in wanted])
        except interrupts():  # the soft time limit is the batch's, not a text's
            raise
        except Exception:  # noqa: BLE001 - find the odd text one by one, keep the rest
            encoded = []
            for i in wanted:
                try:
                    encoded.append(self._tokenize([stripped[i]])[0])
                except interrupts():
                    raise
                except Exception as exc:  # noqa: BLE001 - that text's own failure
                    encoded.append(exc)
        for i, enc in zip(wanted, encoded):
            out[i] = enc if isinstance(enc, Exception) else self._cut(stripped[i], *enc)
        return out

    def _tokenize(self, texts: list[str]) -> list[tuple[list[int], Sequence[tuple[int, int]]]]:
        if not texts:
            return []
        enc = self.tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
        return list(zip(enc["input_ids"], enc["offset_mapping"]))

    def _cut(self, text: str, ids: list[int], offsets: Sequence[tuple[int, int]]) -> list[Chunk]:
        if len(offsets) <= self.max_tokens:
            return [Chunk(0, text, len(offsets), tuple(ids))]
        chunks: list[Chunk] = []
        start = 0
        while start < len(offsets):
            end = min(start + self.max_tokens, len(offsets))
            if end < len(offsets):
                end = self._soft_end(text, offsets, start, end)
            raw = text[offsets[start][0] : offsets[end - 1][1]]
            piece = raw.strip()
            if piece:
                first, last = start, end
                while last > first + 1 and not text[offsets[last - 1][0] : offsets[last - 1][1]].strip():
                    last -= 1  # a lone SentencePiece "▁" before a line break: not in the stripped text
                begins = offsets[start][0] + len(raw) - len(raw.lstrip())
                chunks.append(Chunk(len(chunks), piece, end - start, tuple(ids[first:last]), begins))
            if end >= len(offsets):
                break
            start = self._word_start(text, offsets, max(end - self.overlap, start + 1), end)
        return chunks

    @staticmethod
    def _word_start(text: str, offsets: Sequence[tuple[int, int]], start: int, end: int) -> int:
        """The first token from ``start`` (before ``end``) that begins a word.

        A window that opens on a word's continuation piece (``##c``, or a SentencePiece
        piece without its ``▁``) embeds a fragment the model never saw at a word's start,
        and its ids differ from its text's: such chunks embedded up to 0.12 off in cosine.
        """
        for i in range(start, end):
            at = offsets[i][0]
            if at == 0 or at > offsets[i - 1][1] or not (text[at - 1].isalnum() and text[at].isalnum()) \
                    or _cjk(text[at]):
                return i
        return start

    def _soft_end(
        self, text: str, offsets: Sequence[tuple[int, int]], start: int, end: int
    ) -> int:
        """Move ``end`` back to just after a break in the window's last quarter."""
        floor = start + max(self.overlap + 1, (end - start) * 3 // 4)
        window = text[offsets[floor][0] : offsets[end - 1][1]]
        for mark in _BREAKS:
            cut = window.rfind(mark)
            if cut < 0:
                continue
            cut_at = offsets[floor][0] + cut + len(mark)
            for token in range(end - 1, floor, -1):
                if offsets[token][1] <= cut_at:
                    return token + 1
        return end
