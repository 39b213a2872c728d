"""GGUF metadata -> Config: the one place llama.cpp's metadata keys appear.

`config_from_gguf` reads llama.cpp's keys for the architectures `llama` (Llama, and Mistral, which llama.cpp
converts as `llama`) and `qwen2`. Like momjax.hf.config it refuses what it does not handle, naming the key:
another architecture, rope scaling other than linear or yarn, Llama 3's rope frequency factors when no llama3
scaling reproduces them, mixtures of experts, sliding windows, and any `{arch}.*` key it does not know (those
keys are the model's hyperparameters, so an unknown one may change the computation).

Rope scaling as llama.cpp stores it: `rope.scaling.type` linear (or a bare factor) and yarn (with the factor,
the original context length, and beta_fast / beta_slow; yarn's attention factor is the one transformers and
llama.cpp both compute from the factor, so a file that sets its own is refused), and Llama 3's scaling as a
`rope_freqs` tensor of per-frequency divisors, turned back into `llama3` scaling here.
"""

from __future__ import annotations

import math

import numpy as np

from momjax.config import Config
from momjax.errors import ConfigError
from momjax.gguf.file import ROPE_FREQS, GGUFFile, read_gguf, refuse
from momjax.hf.config import yarn_mscale
from momjax.rope import rope_inv_freq

ARCHITECTURES = ("llama", "qwen2")
REFETCH = ("the file is incomplete: download it again, or convert the model again with llama.cpp's "
           "convert_hf_to_gguf.py")

# {arch}.* keys read by config_from_gguf, and those accepted only with a value that changes nothing.
READ_KEYS = frozenset({
    "block_count", "context_length", "embedding_length", "feed_forward_length", "attention.head_count",
    "attention.head_count_kv", "attention.key_length", "attention.value_length",
    "attention.layer_norm_rms_epsilon", "rope.dimension_count", "rope.freq_base", "rope.scaling.type",
    "rope.scaling.factor", "rope.scale_linear", "vocab_size", "rope.scaling.original_context_length",
    "rope.scaling.yarn_beta_fast", "rope.scaling.yarn_beta_slow", "rope.scaling.yarn_ext_factor",
    "rope.scaling.yarn_attn_factor", "rope.scaling.yarn_log_multiplier",
})
INERT_KEYS = {  # key -> (values that change nothing or None for any value, what it would mean otherwise)
    "expert_count": ((0,), "mixture-of-experts models (Mixtral, Qwen2-MoE) are not supported"),
    "expert_used_count": ((0,), "mixture-of-experts models (Mixtral, Qwen2-MoE) are not supported"),
    "attention.sliding_window": ((0,), ("sliding-window attention is not read from GGUF files (llama.cpp does "
                                        "not apply it to these architectures either)")),
    "attention.causal": ((True,), "only causal attention is supported"),
    "rope.scaling.finetuned": ((True, False), ""),
    "rope.scaling.attn_factor": ((1.0,), "momjax applies no extra attention factor to rope"),
    "tensor_data_layout": (None, ""),  # old converters' note on the tensor layout ("Meta AI original pth")
}
# YaRN's own keys (llama.cpp's names) and the value each must have for momjax to compute what llama.cpp does.
_FROM_FACTOR = ("momjax takes YaRN's attention factor from the scaling factor (0.1 ln factor + 1) and cannot apply "
                "another")
_YARN_NEUTRAL = {
    "rope.scaling.yarn_ext_factor": (1.0, "momjax blends YaRN's frequencies in full (extrapolation factor 1)"),
    "rope.scaling.yarn_attn_factor": (1.0, _FROM_FACTOR),
    "rope.scaling.yarn_log_multiplier": (0.0, _FROM_FACTOR),
}
_MISSING = object()


class Meta:
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
                raise ConfigError(f"{self.g.path}: the GGUF metadata has no {key}, which momjax needs; {REFETCH}")
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


def read_config(path: str) -> Config:
    """The Config of a .gguf file (its header only; no tensor data but Llama 3's small rope_freqs is read)."""
    return config_from_gguf(read_gguf(path))


def config_from_gguf(g: GGUFFile) -> Config:
    """The Config of a parsed GGUF file, from its metadata and tensor table (and, for Llama 3, the small
    rope_freqs tensor). Raises ConfigError naming the key for anything momjax does not handle."""
    arch = g.metadata.get("general.architecture")
    if arch is None:
        raise ConfigError(f"{g.path}: the GGUF metadata has no general.architecture; {REFETCH}")
    if arch not in ARCHITECTURES:
        raise ConfigError(f"{g.path}: GGUF architecture {arch!r} is not supported; momjax loads "
                          f"{' and '.join(map(repr, ARCHITECTURES))} (Llama, Mistral and Qwen2 models)")
    m = Meta(g, arch)
    p = arch + "."
    shapes = _shapes(m)
    theta = m.number(p + "rope.freq_base", 10000.0)
    context = m.integer(p + "context_length")
    rope = _rope_fields(m, theta, shapes["head_dim"], context)
    vocab = _vocab_size(m)
    eos = m.token_ids(("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id",
                       "tokenizer.ggml.eom_token_id"), vocab)
    bos = m.token_ids(("tokenizer.ggml.bos_token_id",), vocab)
    eps = m.number(p + "attention.layer_norm_rms_epsilon")
    ffn = m.integer(p + "feed_forward_length")
    _refuse_unknown_keys(m)  # after the keys read above, so that their own errors come first
    return Config(vocab_size=vocab, intermediate_size=ffn, rms_norm_eps=eps, rope_theta=theta,
                  max_position_embeddings=context, qkv_bias=arch == "qwen2",
                  tie_embeddings="output.weight" not in g.tensors, eos_token_ids=eos,
                  bos_token_id=bos[0] if bos else None, model_type=arch, dtype=_file_dtype(g), **shapes, **rope)


def _shapes(m: Meta) -> dict:
    """Config's layer, width and head fields."""
    p = m.arch + "."
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
    return dict(hidden_size=hidden, num_layers=m.integer(p + "block_count"), num_heads=heads, num_kv_heads=kv_heads,
                head_dim=head_dim)


def _vocab_size(m: Meta) -> int:
    vocab = m.integer(m.arch + ".vocab_size", None)
    tokens = m.md.get("tokenizer.ggml.tokens")
    if vocab is None and isinstance(tokens, list) and tokens:
        vocab = len(tokens)  # llama.cpp pads the token list to the embedding's rows
    if vocab is None and "token_embd.weight" in m.g.tensors:
        vocab = m.g.tensors["token_embd.weight"].shape[0]
    if vocab is None:
        m.get(m.arch + ".vocab_size")  # raises: nothing says how large the vocabulary is
    return vocab


def _rope_fields(m: Meta, theta: float, head_dim: int, context: int) -> dict:
    """Config's rope fields. llama.cpp reads a factor without a type as linear; Llama 3 stores per-frequency
    factors in a tensor."""
    p = m.arch + "."
    scaling = m.string(p + "rope.scaling.type", None)
    factor = m.number(p + "rope.scaling.factor", None)
    if factor is None:
        factor = m.number(p + "rope.scale_linear", None)
    if scaling not in (None, "none", "linear", "yarn"):
        m.reject(p + "rope.scaling.type", scaling, "supported rope scaling types: none, linear, yarn (and Llama 3's "
                                                   "rope_freqs factors)")
    if scaling in ("linear", "yarn") and factor is None:
        m.reject(p + "rope.scaling.type", scaling, f"{scaling} scaling needs {p}rope.scaling.factor")
    if scaling != "yarn":
        for key in ("rope.scaling.yarn_beta_fast", "rope.scaling.yarn_beta_slow", *_YARN_NEUTRAL):
            if p + key in m.md:
                m.reject(p + key, m.md[p + key], f"a YaRN setting in a file whose rope scaling is {scaling or 'none'}")
    rope = {"rope_type": "default"}
    if scaling == "yarn":
        rope = _yarn_fields(m, factor, context)
    elif scaling != "none" and factor not in (None, 1.0):
        rope = {"rope_type": "linear", "rope_factor": factor}
    if ROPE_FREQS in m.g.tensors:
        if rope["rope_type"] != "default":
            m.reject(p + "rope.scaling.type", scaling, f"the file also has {ROPE_FREQS}; momjax applies one or "
                                                       "the other, not both")
        rope = _llama3_fields(m.g, theta, head_dim)
    return rope


def _yarn_fields(m: Meta, factor: float, context: int) -> dict:
    """YaRN as llama.cpp computes it, which is transformers' yarn with its defaults: the original context
    (llama.cpp's default: the trained context_length), beta_fast and beta_slow, the ramp's ends rounded outwards,
    and the attention factor 0.1 ln(factor) + 1."""
    p = m.arch + "."
    for key, (neutral, why) in _YARN_NEUTRAL.items():
        value = m.md.get(p + key)
        if value is not None and (isinstance(value, (bool, list, np.ndarray)) or value != neutral):
            m.reject(p + key, value, why)
    original = m.integer(p + "rope.scaling.original_context_length", context)
    beta_fast = m.number(p + "rope.scaling.yarn_beta_fast", 32.0)
    beta_slow = m.number(p + "rope.scaling.yarn_beta_slow", 1.0)
    if beta_fast < beta_slow:
        m.reject(p + "rope.scaling.yarn_beta_fast", beta_fast, f"it must be at least yarn_beta_slow ({beta_slow})")
    return dict(rope_type="yarn", rope_factor=factor, rope_original_max_position=original,
                rope_attention_factor=yarn_mscale(factor), rope_beta_fast=beta_fast, rope_beta_slow=beta_slow,
                rope_truncate=True)


def _refuse_unknown_keys(m: Meta) -> None:
    """The {arch}.* keys are the model's hyperparameters: one momjax does not read may change the computation."""
    for key, value in m.md.items():
        if not key.startswith(m.arch + "."):
            continue
        name = key[len(m.arch) + 1:]
        if name in READ_KEYS:
            continue
        if name in INERT_KEYS:
            allowed, why = INERT_KEYS[name]
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


def _llama3_fields(g: GGUFFile, theta: float, head_dim: int) -> dict:
    """Config fields for a file with Llama 3's rope_freqs tensor: the llama3 rope scaling that reproduces it.

    llama.cpp's converter stores Llama 3's frequency scaling as one divisor per rotary frequency (1 for high
    frequencies, `factor` for low ones, a smooth ramp between). The ramp is linear in 1 / wavelength, so two
    or more ramp entries determine it; with fewer, Meta's values (low_freq_factor 1, high_freq_factor 4,
    original context 8192: every Llama 3.x) are tried. The result is accepted only if momjax's own llama3
    frequencies equal the file's to float32 precision; otherwise the file is refused.
    """
    factors = _rope_freqs(g, head_dim)
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
                candidates.append((factor, 1.0, 1.0 - 1.0 / b, -a / b))
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


def _rope_freqs(g: GGUFFile, head_dim: int) -> np.ndarray:
    """The rope_freqs tensor's divisors, float64 [head_dim / 2]."""
    t = g.tensors[ROPE_FREQS]
    if t.type_name != "F32" or t.shape != (head_dim // 2,):
        refuse(g.path, f"{ROPE_FREQS} is {t.type_name} {list(t.shape)}; Llama 3 files hold F32 [{head_dim // 2}]")
    with open(g.path, "rb") as f:
        f.seek(t.start)
        factors = np.frombuffer(f.read(t.nbytes), "<f4").astype(np.float64)
    if factors.size != head_dim // 2:
        refuse(g.path, f"the file ended while reading {ROPE_FREQS}")
    return factors
