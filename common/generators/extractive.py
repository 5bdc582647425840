"""Offline answers that read well: the retrieved sentences that best answer the question.

A small local LLM on a CPU writes unreadable answers (SmolLM2-135M repeats itself and
prints citation lists), so with no LLM configured ragq answers *extractively*: it
splits the retrieved sources into sentences, scores each against the question with the
embedding model the worker already has loaded, and returns the best few as the answer,
each followed by the ``[n]`` of its source. Every sentence is a verbatim span of a
source: nothing is invented. Sentences in the question's language are preferred, and on
FAQ pages a sentence that is itself a question hands its score to the sentence after
it (the answer) instead of being picked.
"""

from __future__ import annotations

import re
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from common.embedding import Embedder
from common.generators.base import Conversation, Generation, GroundedGenerator
from common.prompts import PromptSource, approx_tokens, detect_language

#: Sentence ends: CJK terminators, Latin ones before a space, and line breaks.
_BOUNDARY = re.compile(r"[。！？；]+|[.!?;](?=\s)|\n+")
#: Leading markdown that is not part of a sentence (headings, bullets, quotes, numbering,
#: emphasis) and an FAQ's "A:" / "答：" marker; trailing emphasis likewise.
_LEADING = re.compile(r"^(?:[#>*_\-+|\s]+|\d+[.)、]\s*|[AaQq][:：]\s*|[问答][:：]\s*)+")
_TRAILING = re.compile(r"[*_\s]+$")
#: An FAQ question: ends with a question mark, or is marked "Q:" / "问：" in the source.
_QUESTION = re.compile(r"(?:[?？]$)|(?:^\W*(?:[Qq]|问)\s*[:：])")
_FRAGMENT_START = re.compile(r"[a-z,，、;；:：)）\]」』]")
_SENTENCE_MARKS = tuple(".!?。！？；;:：)）\"”")
_ONLY_LINK = re.compile(r"\[[^\]]*\]\([^)]*\)[.。]?")
_LETTER = re.compile(r"[A-Za-z\u3400-\u4dbf\u4e00-\u9fff]")
MIN_TOKENS = 3  # approx_tokens: one per CJK character, one per four other characters
MAX_CHARS = 400
#: Sentences scored per question (from the best sources first), to bound the embedding cost.
MAX_CANDIDATES = 60
#: Sentences an answer holds at most, and how far below the best one a sentence may score.
MAX_SENTENCES = 3
SCORE_MARGIN = 0.04
#: Each later source rank costs this much score, so the top page wins a near tie.
RANK_PENALTY = 0.005

NO_SOURCES = {"en": "No documents were found for this question.", "zh": "没有检索到相关文档。"}


@dataclass
class _Sentence:
    source: int  # index into the question's sources
    start: int  # position in that source's text, for reading order
    text: str  # a verbatim span of the source text
    is_question: bool
    score: float = -1.0


def split_sentences(text: str) -> list[tuple[int, str]]:
    """(offset, sentence) spans of ``text`` that read as prose: verbatim, trimmed, no tables."""
    out: list[tuple[int, str]] = []
    start = 0
    for match in [*_BOUNDARY.finditer(text), None]:
        end = match.end() if match is not None else len(text)
        raw = text[start:end]
        lead = _LEADING.match(raw)
        offset = start + (lead.end() if lead else 0)
        piece = _TRAILING.sub("", text[offset:end]).strip()
        offset = text.find(piece, offset) if piece else offset
        start = end
        if not (MIN_TOKENS <= approx_tokens(piece) and len(piece) <= MAX_CHARS) or piece.count("|") >= 2 or "```" in piece:
            continue
        if len(_LETTER.findall(piece)) < len(piece) * 0.4 or _ONLY_LINK.fullmatch(piece):
            continue  # code, numbers, URLs, a bare link
        out.append((offset, piece))
    return out


def whole_sentences(text: str) -> list[tuple[int, str]]:
    """:func:`split_sentences` less a chunk's cut-off ends.

    A chunk is a token window: it may begin inside a sentence (it overlaps the previous
    chunk) and end inside one. Such a piece starts in lower case or on punctuation, or
    stops at the end of the chunk without a sentence's last mark; it would read as
    nonsense in an answer.
    """
    spans = split_sentences(text)
    stripped = text.strip()
    if spans and stripped.startswith(spans[0][1]) and _FRAGMENT_START.match(spans[0][1]):
        spans = spans[1:]
    if spans and stripped.endswith(spans[-1][1]) and not spans[-1][1].endswith(_SENTENCE_MARKS):
        spans = spans[:-1]
    return spans


def is_question(source: str, offset: int, sentence: str) -> bool:
    """Whether a sentence introduces rather than answers: a question, or a heading.

    Both hand their score to the sentence after them (FAQ pages put the answer there), as
    does a line that ends in a colon.
    """
    line_start = source.rfind("\n", 0, offset) + 1
    line = source[line_start:offset + len(sentence)]
    return bool(_QUESTION.search(sentence) or _QUESTION.search(line) or line.lstrip().startswith("#")
                or sentence.endswith((":", "：")))


class ExtractiveGenerator(GroundedGenerator):
    """Answers from the sources alone, with the worker's embedding model; no LLM."""

    def __init__(self, embedder: Embedder, *, max_tokens: int = 256) -> None:
        self.embedder = embedder
        self.max_tokens = max_tokens
        self.model_name = f"extractive ({embedder.model_name})"

    def generate(self, conversations: Sequence[Conversation], *, max_tokens: int | None = None,
                 temperature: float | None = None) -> list[Generation]:
        reason = "the extractive backend answers from retrieved sources, not from a prompt"
        return [Generation(None, self.model_name, 0.0, error=reason) for _ in conversations]

    def answer_from_sources(
        self, questions: Sequence[str], sources: Sequence[Sequence[PromptSource]], *,
        lang: str = "auto", max_tokens: int | None = None,
    ) -> list[tuple[Generation, list[int]]]:
        started = time.perf_counter()
        langs = [detect_language(q) if lang == "auto" else lang for q in questions]
        candidates = [self._candidates(srcs, lg) for srcs, lg in zip(sources, langs)]
        self._score(questions, candidates)
        seconds = (time.perf_counter() - started) / max(1, len(questions))
        budget = max_tokens or self.max_tokens
        return [self._compose(c, lg, budget, seconds) for c, lg in zip(candidates, langs)]

    # -- steps ------------------------------------------------------------------------
    @staticmethod
    def _candidates(sources: Sequence[PromptSource], lang: str) -> list[_Sentence]:
        found = [
            _Sentence(n, offset, text, is_question(source.text, offset, text))
            for n, source in enumerate(sources)
            for offset, text in whole_sentences(source.text)
        ]
        same_language = [s for s in found if detect_language(s.text) == lang]
        # Keep the question's language when the sources have it; a question sentence stays
        # a candidate either way, so that it can hand its score to the answer after it.
        chosen = [s for s in found if s in same_language or s.is_question] if same_language else found
        return chosen[:MAX_CANDIDATES]

    def _score(self, questions: Sequence[str], candidates: list[list[_Sentence]]) -> None:
        """Cosine of each sentence with its question: one encode call for the whole batch."""
        texts = [s.text for c in candidates for s in c]
        if not texts:
            return
        asked = self.embedder.encode_queries(list(questions))
        vectors, _ = self.embedder.encode_documents_with_stats(texts)
        row = 0
        for q, c in enumerate(candidates):
            scores = vectors[row:row + len(c)] @ asked[q] if c else np.zeros(0)
            row += len(c)
            for s, score in zip(c, scores):
                s.score = float(score) - RANK_PENALTY * s.source
            for before, after in zip(c, c[1:]):  # FAQ: a question's answer follows it
                if before.is_question and not after.is_question and after.source == before.source:
                    after.score = max(after.score, before.score)

    def _compose(self, sentences: list[_Sentence], lang: str, budget: int,
                 seconds: float) -> tuple[Generation, list[int]]:
        answers = sorted((s for s in sentences if not s.is_question), key=lambda s: -s.score)
        if not answers:
            return Generation(NO_SOURCES[lang], self.model_name, seconds), []
        best = answers[0].score
        picked: list[_Sentence] = []
        spent = 0
        for s in answers:
            if len(picked) == MAX_SENTENCES or s.score < best - SCORE_MARGIN:
                break
            cost = approx_tokens(s.text)
            if picked and spent + cost > budget:
                continue
            picked.append(s)
            spent += cost
        picked.sort(key=lambda s: (s.source, s.start))  # reading order, page by page
        cited: list[int] = []
        parts = []
        for s in picked:
            if s.source not in cited:
                cited.append(s.source)
            parts.append(f"{s.text} [{cited.index(s.source) + 1}]")
        text = ("" if lang == "zh" else " ").join(parts)
        return Generation(text, self.model_name, seconds, completion_tokens=spent), cited
