"""Split documents into overlapping token windows that fit the embedding model.

Nothing is cut off: a text longer than the model's window becomes several chunks whose
windows overlap by ``overlap`` tokens, so a sentence on a boundary is whole in one of
them. Windows end on a paragraph or sentence break when one lies near the limit, so
chunks read naturally as sources in a prompt.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

#: Characters after which a window may end early, strongest first.
_BREAKS: tuple[str, ...] = ("\n\n", "\n", "。", ". ", "！", "？", "? ", "! ", "；", "; ")


class Tokenizer(Protocol):
    def __call__(self, text: str, **kwargs: object) -> dict: ...


@dataclass(frozen=True)
class Chunk:
    index: int
    text: str
    tokens: int  # tokens of ``text`` without special tokens


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
        text = text.strip()
        if not text:
            return []
        offsets: Sequence[tuple[int, int]] = self.tokenizer(
            text, add_special_tokens=False, return_offsets_mapping=True, verbose=False
        )["offset_mapping"]
        if len(offsets) <= self.max_tokens:
            return [Chunk(0, text, len(offsets))]
        chunks: list[Chunk] = []
        start = 0
        while start < len(offsets):
            end = min(start + self.max_tokens, len(offsets))
            if end < len(offsets):
                end = self._soft_end(text, offsets, start, end)
            piece = text[offsets[start][0] : offsets[end - 1][1]].strip()
            if piece:
                chunks.append(Chunk(len(chunks), piece, end - start))
            if end >= len(offsets):
                break
            start = max(end - self.overlap, start + 1)
        return chunks

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
