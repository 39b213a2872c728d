"""The architecture of one model, and the presets.

`Config` describes a Llama-family decoder (Llama 2/3/3.1/3.2, Qwen2/2.5, Mistral/NeMo) as a frozen,
hashable dataclass so it can be a static jit argument. It knows nothing of files: `momjax.hf.config` reads a
Hugging Face config.json into one, `momjax.store.orbax` an Orbax folder's. Runtime memory knobs live apart,
in `momjax.policy.MemoryPolicy`.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import dataclass

from momjax.errors import ConfigError

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "yarn", "dynamic")
SUPPORTED_DTYPES = ("float32", "bfloat16", "float16")
_ITEMSIZE = {"float32": 4, "bfloat16": 2, "float16": 2, "int8": 1}


@dataclass(frozen=True)
class Config:
    """Shapes and numerics of one model. Letters: V vocab, D model, F ffn, L layers, H heads, K kv heads."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_type: str = "default"  # default | linear | llama3 | yarn | dynamic (see `momjax.rope.rope_inv_freq`)
    rope_factor: float = 1.0  # linear, llama3, yarn, dynamic
    rope_low_freq_factor: float = 1.0  # llama3
    rope_high_freq_factor: float = 4.0  # llama3
    rope_original_max_position: int = 8192  # llama3, yarn (dynamic scales from max_position_embeddings instead)
    max_position_embeddings: int = 4096
    qkv_bias: bool = False  # Qwen2
    tie_embeddings: bool = False  # Qwen2.5 small, Llama 3.2
    sliding_window: int | None = None  # Mistral v0.1: each query sees itself and the W-1 keys before it
    eos_token_ids: tuple[int, ...] = ()
    bos_token_id: int | None = None
    model_type: str = "llama"
    dtype: str = "float32"  # the checkpoint's dtype
    # yarn only (written to JSON only when they differ from these defaults, see `to_json`):
    rope_beta_fast: float = 32.0
    rope_beta_slow: float = 1.0
    rope_truncate: bool = True  # round the correction range outwards to whole dimensions
    rope_attention_factor: float = 1.0  # multiplies cos and sin (yarn's mscale, resolved by momjax.hf.config)

    def __post_init__(self):
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads",
                     "head_dim", "rope_original_max_position", "max_position_embeddings"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        for name in ("rms_norm_eps", "rope_theta", "rope_factor", "rope_low_freq_factor", "rope_high_freq_factor",
                     "rope_beta_fast", "rope_beta_slow", "rope_attention_factor"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) or value <= 0:
                raise ConfigError(f"{name} must be a finite number > 0, got {value!r}")
        if self.sliding_window is not None and (isinstance(self.sliding_window, bool)
                                                or not isinstance(self.sliding_window, numbers.Integral)
                                                or self.sliding_window < 1):
            raise ConfigError(f"sliding_window must be a positive integer or None, got {self.sliding_window!r}")
        if self.rope_beta_fast < self.rope_beta_slow:
            raise ConfigError(f"rope_beta_fast ({self.rope_beta_fast}) must be >= rope_beta_slow "
                              f"({self.rope_beta_slow})")
        for name in ("qkv_bias", "tie_embeddings", "rope_truncate"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name} must be True or False, got {getattr(self, name)!r}")
        if self.dtype not in SUPPORTED_DTYPES:
            raise ConfigError(f"dtype must be one of {', '.join(SUPPORTED_DTYPES)}, got {self.dtype!r}")
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(
                f"num_attention_heads ({self.num_heads}) must be a multiple of num_key_value_heads ({self.num_kv_heads})"
            )
        if self.rope_type not in SUPPORTED_ROPE_TYPES:
            raise ConfigError(f"rope type {self.rope_type!r} is not supported; supported: {SUPPORTED_ROPE_TYPES}")

    @property
    def group(self) -> int:
        """Query heads per KV head (G): 1 for MHA, H for MQA."""
        return self.num_heads // self.num_kv_heads

    def kv_bytes_per_token(self, dtype) -> int:
        """Bytes of K and V of all layers for one token, in dtype (a name, or a numpy/JAX dtype)."""
        import numpy as np

        name = dtype if isinstance(dtype, str) else np.dtype(dtype).name
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * _ITEMSIZE[name]

    @property
    def context_length(self) -> int:
        """The longest context the checkpoint is meant for: max_position_embeddings, or what its rope scaling
        extends the trained length to (yarn: factor x original_max_position_embeddings; dynamic NTK: factor x
        max_position_embeddings), whichever is longer."""
        if self.rope_type == "yarn":
            return max(self.max_position_embeddings, int(self.rope_factor * self.rope_original_max_position))
        if self.rope_type == "dynamic":
            return int(self.rope_factor * self.max_position_embeddings)
        return self.max_position_embeddings

    def replace(self, **changes) -> Config:
        return dataclasses.replace(self, **changes)

    def to_json(self) -> dict:
        """The fields as a JSON-ready dict. The yarn fields (added after the first release) are left out while
        they hold their defaults, so the JSON of every other model is what it was: session files and converted
        folders that hold it still match (`from_json` fills them in again)."""
        d = dataclasses.asdict(self)
        d["eos_token_ids"] = list(self.eos_token_ids)
        for name in _LATER_FIELDS:
            if d[name] == _DEFAULTS[name]:
                del d[name]
        return d

    @classmethod
    def from_json(cls, d: dict) -> Config:
        d = dict(d)
        d["eos_token_ids"] = tuple(d.get("eos_token_ids", ()))
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


_DEFAULTS = {field.name: field.default for field in dataclasses.fields(Config)}
# Fields added after the first release; `Config.to_json` writes them only when they differ from their defaults.
_LATER_FIELDS = ("rope_beta_fast", "rope_beta_slow", "rope_truncate", "rope_attention_factor")

# ---------------------------------------------------------------------- presets (shapes only, no weights)
PRESETS: dict[str, Config] = {
    "llama-3.1-8b": Config(
        vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_layers=32, num_heads=32, num_kv_heads=8,
        head_dim=128, rms_norm_eps=1e-5, rope_theta=500000.0, rope_type="llama3", rope_factor=8.0,
        rope_low_freq_factor=1.0, rope_high_freq_factor=4.0, rope_original_max_position=8192,
        max_position_embeddings=131072, eos_token_ids=(128001, 128008, 128009), bos_token_id=128000,
        model_type="llama", dtype="bfloat16",
    ),
    "llama-3.2-1b": Config(
        vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_layers=16, num_heads=32, num_kv_heads=8,
        head_dim=64, rms_norm_eps=1e-5, rope_theta=500000.0, rope_type="llama3", rope_factor=32.0,
        rope_low_freq_factor=1.0, rope_high_freq_factor=4.0, rope_original_max_position=8192,
        max_position_embeddings=131072, tie_embeddings=True, eos_token_ids=(128001, 128008, 128009),
        bos_token_id=128000, model_type="llama", dtype="bfloat16",
    ),
    "qwen2.5-7b": Config(
        vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_layers=28, num_heads=28, num_kv_heads=4,
        head_dim=128, rms_norm_eps=1e-6, rope_theta=1000000.0, max_position_embeddings=32768, qkv_bias=True,
        eos_token_ids=(151645, 151643), model_type="qwen2", dtype="bfloat16",
    ),
    "llama-3.1-70b": Config(
        vocab_size=128256, hidden_size=8192, intermediate_size=28672, num_layers=80, num_heads=64, num_kv_heads=8,
        head_dim=128, rms_norm_eps=1e-5, rope_theta=500000.0, rope_type="llama3", rope_factor=8.0,
        rope_low_freq_factor=1.0, rope_high_freq_factor=4.0, rope_original_max_position=8192,
        max_position_embeddings=131072, eos_token_ids=(128001, 128008, 128009), bos_token_id=128000,
        model_type="llama", dtype="bfloat16",
    ),
    "qwen2.5-72b": Config(
        vocab_size=152064, hidden_size=8192, intermediate_size=29568, num_layers=80, num_heads=64, num_kv_heads=8,
        head_dim=128, rms_norm_eps=1e-6, rope_theta=1000000.0, max_position_embeddings=32768, qkv_bias=True,
        eos_token_ids=(151645, 151643), model_type="qwen2", dtype="bfloat16",
    ),
    "mistral-nemo-12b": Config(
        vocab_size=131072, hidden_size=5120, intermediate_size=14336, num_layers=40, num_heads=32, num_kv_heads=8,
        head_dim=128, rms_norm_eps=1e-5, rope_theta=1000000.0, max_position_embeddings=1024000,
        eos_token_ids=(2,), bos_token_id=1, model_type="mistral", dtype="bfloat16",
    ),
}


def preset(name: str) -> Config:
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; presets: {', '.join(PRESETS)}")
    return PRESETS[name]
