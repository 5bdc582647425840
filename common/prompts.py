"""Question-answering prompts: the template, the language choice and the context budget.

The Chinese template is the one of the Rust demo ragq descends from, kept verbatim so
answers stay comparable with it; the English one says the same. Retrieved hits go into
the context as numbered blocks (``[1] title (url)``) so that an answer can cite them and
the caller can map a citation back through the returned indices.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

#: The demo's instruction, verbatim.
ZH_INSTRUCTION = "你是一个云技术专家, 使用以下检索到的Context 回答问题。用中文回答问题。"
EN_INSTRUCTION = (
    "You are a cloud technology expert. Answer the question using the retrieved Context "
    "below. Answer in English."
)
ZH_CITE = "引用Context 中的资料时, 请用方括号标注来源编号, 例如 [1]。"
EN_CITE = "When you use the Context, cite the source numbers in square brackets, e.g. [1]."
ZH_NO_HITS = "没有检索到任何相关文档。请直接回答: 根据现有文档无法回答这个问题。不要编造答案。"
EN_NO_HITS = (
    "No documents were found for this question. Say that you don't know the answer "
    "from the documentation. Do not make one up."
)
ZH_NO_CONTEXT = "(没有检索到相关文档)"
EN_NO_CONTEXT = "(no documents found)"
#: Both templates end with the demo's two lines.
USER_TEMPLATE = "Question: {question}\nContext: {context}"
TRUNCATION_MARK = " …"

# CJK ideographs (+ extension A, compatibility), kana and hangul decide the language;
# CJK and fullwidth punctuation only count as tokens.
_CJK_LETTER = re.compile(r"[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af\uf900-\ufaff]")
_CJK = re.compile(
    r"[\u3000-\u303f\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af\uf900-\ufaff\uff00-\uffef]"
)
_LATIN_WORD = re.compile(r"[A-Za-z]+")
#: Share of CJK characters among (CJK characters + Latin words) from which a text is "zh".
#: Counting Latin *words*, not letters, keeps "如何配置 Kubernetes Ingress" Chinese.
CJK_SHARE_ZH = 0.3


@dataclass(frozen=True)
class PromptSource:
    """One retrieval hit as the prompt sees it."""

    title: str
    url: str
    product: str
    text: str
    score: float


def detect_language(text: str) -> Literal["zh", "en"]:
    """``"zh"`` when CJK characters make up a fair share of the text, else ``"en"``.

    A text with neither CJK nor Latin words (empty, digits) counts as English.
    """
    cjk = len(_CJK_LETTER.findall(text))
    words = len(_LATIN_WORD.findall(text))
    if cjk == 0:
        return "en"
    return "zh" if cjk / (cjk + words) >= CJK_SHARE_ZH else "en"


def approx_tokens(text: str) -> int:
    """A cheap token estimate: one per CJK character, one per four other characters.

    Errs on the high side for English BPE vocabularies, so a budget in these units is
    rarely exceeded; pass the model's tokenizer to :func:`build_messages` to be exact.
    """
    cjk = len(_CJK.findall(text))
    return cjk + math.ceil((len(text) - cjk) / 4)


def build_messages(
    question: str,
    sources: Sequence[PromptSource],
    *,
    lang: str = "auto",
    context_tokens: int = 1500,
    count_tokens: Callable[[str], int] | None = None,
) -> tuple[list[dict[str, str]], list[int]]:
    """Chat messages (system + user) for ``question`` and the indices of the sources used.

    Sources are taken in the order given (retrieval rank) while they fit in
    ``context_tokens``; one that doesn't fit is skipped and later, shorter ones may still
    go in. Only the first source is truncated to fit, so that a single long top hit
    doesn't leave the context empty. Source ``[n]`` in the prompt is
    ``sources[used[n - 1]]``.
    """
    if lang == "auto":
        lang = detect_language(question)
    if lang not in ("zh", "en"):
        raise ValueError(f"lang must be 'auto', 'zh' or 'en', not {lang!r}")
    count = count_tokens or approx_tokens

    blocks, used = _select_context(sources, context_tokens, count)
    zh = lang == "zh"
    if blocks:
        system = f"{ZH_INSTRUCTION}\n{ZH_CITE}" if zh else f"{EN_INSTRUCTION}\n{EN_CITE}"
        context = "\n\n".join(blocks)
    else:
        system = f"{ZH_INSTRUCTION}\n{ZH_NO_HITS}" if zh else f"{EN_INSTRUCTION}\n{EN_NO_HITS}"
        context = ZH_NO_CONTEXT if zh else EN_NO_CONTEXT
    user = USER_TEMPLATE.format(question=question.strip(), context=context)
    return [{"role": "system", "content": system}, {"role": "user", "content": user}], used


def _header(number: int, source: PromptSource) -> str:
    title = source.title.strip() or source.product.strip() or source.url.strip() or "untitled"
    url = source.url.strip()
    return f"[{number}] {title} ({url})" if url and url != title else f"[{number}] {title}"


def _select_context(
    sources: Sequence[PromptSource], budget: int, count: Callable[[str], int]
) -> tuple[list[str], list[int]]:
    """Numbered context blocks within ``budget`` tokens, and the source indices they show."""
    blocks: list[str] = []
    used: list[int] = []
    spent = 0
    for index, source in enumerate(sources):
        header = _header(len(blocks) + 1, source)
        block = f"{header}\n{source.text.strip()}"
        # The blank line between blocks costs a token or so; count it with the block.
        cost = count(block) + (1 if blocks else 0)
        if spent + cost > budget:
            if index != 0:
                continue
            block = _truncate(header, source.text.strip(), budget, count)
            if block is None:
                continue
            cost = count(block)
        blocks.append(block)
        used.append(index)
        spent += cost
    return blocks, used


def _truncate(header: str, text: str, budget: int, count: Callable[[str], int]) -> str | None:
    """The longest ``header + text prefix`` within ``budget`` (binary search on the prefix).

    ``None`` when not even the header and a few characters fit.
    """
    def block(n: int) -> str:
        return f"{header}\n{text[:n].rstrip()}{TRUNCATION_MARK}"

    low, high = 0, len(text)
    while low < high:
        mid = (low + high + 1) // 2
        if count(block(mid)) <= budget:
            low = mid
        else:
            high = mid - 1
    return block(low) if low > 0 and count(block(low)) <= budget else None
