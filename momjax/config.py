"""Architecture config and memory policy.

`Config` describes a Llama-family decoder (Llama 2/3/3.1/3.2, Qwen2/2.5, Mistral/NeMo) as a frozen,
hashable dataclass so it can be a static jit argument. `Config.from_hf` is the only place Hugging Face
field names appear; it raises `ConfigError` on anything it does not handle rather than converting it
wrongly in silence.

`MemoryPolicy` holds the runtime memory knobs (mini-sequence length, attention blocks, where the KV
cache lives). The three named policies are `POLICIES["baseline" | "mom" | "mom-stream"]`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import numbers
import os
from dataclasses import dataclass

SUPPORTED_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "Qwen2ForCausalLM": "qwen2",
    "MistralForCausalLM": "mistral",
}
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")
SUPPORTED_DTYPES = ("float32", "bfloat16", "float16")


class ConfigError(ValueError):
    """A checkpoint's config.json asks for something momjax does not support."""


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
    rope_type: str = "default"  # default | linear | llama3
    rope_factor: float = 1.0
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_max_position: int = 8192
    max_position_embeddings: int = 4096
    qkv_bias: bool = False  # Qwen2
    tie_embeddings: bool = False  # Qwen2.5 small, Llama 3.2
    sliding_window: int | None = None  # Mistral v0.1: each query sees itself and the W-1 keys before it
    eos_token_ids: tuple[int, ...] = ()
    bos_token_id: int | None = None
    model_type: str = "llama"
    dtype: str = "float32"  # the checkpoint's dtype

    def __post_init__(self):
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads",
                     "head_dim", "rope_original_max_position", "max_position_embeddings"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        for name in ("rms_norm_eps", "rope_theta", "rope_factor", "rope_low_freq_factor", "rope_high_freq_factor"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) or value <= 0:
                raise ConfigError(f"{name} must be a finite number > 0, got {value!r}")
        if self.sliding_window is not None and (isinstance(self.sliding_window, bool)
                                                or not isinstance(self.sliding_window, numbers.Integral)
                                                or self.sliding_window < 1):
            raise ConfigError(f"sliding_window must be a positive integer or None, got {self.sliding_window!r}")
        for name in ("qkv_bias", "tie_embeddings"):
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

    @property
    def kv_bytes_per_token(self) -> int:
        """K and V of all layers for one token, in elements (multiply by the dtype's size)."""
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim

    def replace(self, **changes) -> Config:
        return dataclasses.replace(self, **changes)

    def to_json(self) -> dict:
        d = dataclasses.asdict(self)
        d["eos_token_ids"] = list(self.eos_token_ids)
        return d

    @classmethod
    def from_json(cls, d: dict) -> Config:
        d = dict(d)
        d["eos_token_ids"] = tuple(d.get("eos_token_ids", ()))
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})

    # ------------------------------------------------------------------ Hugging Face
    @classmethod
    def from_hf(cls, hf: dict, generation_config: dict | None = None) -> Config:
        """Read a Hugging Face config.json dict (hub spelling or transformers-5 spelling).

        Every field read is type- and range-checked (a JSON string "96", a float 96.7, a bool where a number
        belongs, a null where a value is required are all refused, naming the field, the value and what is
        allowed). generation_config: generation_config.json's dict; its eos_token_id wins over config.json's.
        """
        if not isinstance(hf, dict):
            raise ConfigError(f"config.json must hold a JSON object, got {type(hf).__name__}; re-download it")
        model_type = hf.get("model_type")
        archs = hf.get("architectures") or []
        if not isinstance(archs, list) or not all(isinstance(a, str) for a in archs):
            raise ConfigError(f"config.json field architectures={archs!r} is not supported: expected a list of names")
        for arch in archs:
            if arch not in SUPPORTED_ARCHITECTURES:
                raise ConfigError(
                    f"unsupported architecture {arch!r}; momjax supports {', '.join(SUPPORTED_ARCHITECTURES)}"
                )
        if model_type not in SUPPORTED_ARCHITECTURES.values():
            raise ConfigError(
                f"unsupported model_type {model_type!r}; momjax supports {', '.join(SUPPORTED_ARCHITECTURES.values())}"
            )
        f = _Fields(hf, "config.json")

        act = f.string("hidden_act", "silu")
        if act != "silu":
            f.reject("hidden_act", act, "only 'silu' (SwiGLU) MLPs are supported")
        if f.boolean("mlp_bias", False):
            f.reject("mlp_bias", True, "MLP biases are not supported")
        if f.boolean("attention_bias", False) and model_type != "qwen2":
            f.reject("attention_bias", True, "attention biases are supported only as Qwen2's q/k/v biases")
        if f.number("partial_rotary_factor", 1.0) != 1.0:
            f.reject("partial_rotary_factor", hf["partial_rotary_factor"], "only full rotary embeddings are supported")
        if f.boolean("is_encoder_decoder", False):
            f.reject("is_encoder_decoder", True, "momjax runs decoder-only models")

        vocab = f.integer("vocab_size")
        hidden = f.integer("hidden_size")
        heads = f.integer("num_attention_heads")
        kv_heads = f.integer("num_key_value_heads", heads)
        if heads % kv_heads:
            f.reject("num_key_value_heads", kv_heads, f"it must divide num_attention_heads ({heads})")
        head_dim = f.integer("head_dim", None)
        if head_dim is None:
            if hidden % heads:
                f.reject("num_attention_heads", heads, f"it must divide hidden_size ({hidden}) when head_dim is absent")
            head_dim = hidden // heads

        # Rope: hub files put rope_theta / rope_scaling at top level; transformers 5 writes rope_parameters.
        rope = {}
        for key in ("rope_parameters", "rope_scaling"):
            value = hf.get(key)
            if value is not None and not isinstance(value, dict):
                f.reject(key, value, "expected a JSON object or null")
            rope.update(value or {})
        r = _Fields(rope, "config.json", prefix="rope_scaling.")
        theta = r.number("rope_theta", f.number("rope_theta", 10000.0))
        rope_type = rope.get("rope_type", rope.get("type", "default")) or "default"
        if rope_type not in SUPPORTED_ROPE_TYPES:
            f.reject("rope_scaling.rope_type", rope_type, f"supported rope types: {', '.join(SUPPORTED_ROPE_TYPES)}")
        rope_kwargs = {}
        if rope_type in ("linear", "llama3"):
            if "factor" not in rope:
                f.reject("rope_scaling", rope, f"rope type {rope_type!r} needs a 'factor'")
            rope_kwargs["rope_factor"] = r.number("factor")
        if rope_type == "llama3":
            for key in ("low_freq_factor", "high_freq_factor", "original_max_position_embeddings"):
                if key not in rope:
                    f.reject("rope_scaling", rope, f"llama3 rope scaling needs {key!r}")
            low, high = r.number("low_freq_factor"), r.number("high_freq_factor")
            if high <= low:
                f.reject("rope_scaling.high_freq_factor", high, f"it must exceed low_freq_factor ({low})")
            rope_kwargs.update(rope_low_freq_factor=low, rope_high_freq_factor=high,
                               rope_original_max_position=r.integer("original_max_position_embeddings"))
        extra = set(rope) - {
            "rope_theta", "rope_type", "type", "factor", "low_freq_factor", "high_freq_factor",
            "original_max_position_embeddings",
        }
        if extra:
            f.reject("rope_scaling", rope, f"unhandled rope fields {sorted(extra)}")

        sliding_window = None
        if model_type == "mistral":
            sliding_window = f.integer("sliding_window", None)
        elif model_type == "qwen2":
            layer_types = hf.get("layer_types") or []
            if f.boolean("use_sliding_window", False) or (isinstance(layer_types, list)
                                                          and "sliding_attention" in layer_types):
                f.reject("use_sliding_window", True, "Qwen2's per-layer sliding window is not supported")
        elif hf.get("sliding_window") is not None:
            f.reject("sliding_window", hf["sliding_window"], "sliding windows are supported for Mistral only")

        eos = f.token_ids("eos_token_id", vocab)
        if generation_config is not None:
            if not isinstance(generation_config, dict):
                raise ConfigError("generation_config.json must hold a JSON object, got "
                                  f"{type(generation_config).__name__}; re-download it or delete it")
            if generation_config.get("eos_token_id") is not None:
                eos = _Fields(generation_config, "generation_config.json").token_ids("eos_token_id", vocab)
        bos = f.token_ids("bos_token_id", vocab)
        if len(bos) > 1:
            f.reject("bos_token_id", hf["bos_token_id"], "expected one token id")
        dtype = f.string("dtype", None) or f.string("torch_dtype", "float32")
        if dtype not in SUPPORTED_DTYPES:
            f.reject("torch_dtype", dtype, f"supported dtypes: {SUPPORTED_DTYPES}")

        return cls(
            vocab_size=vocab,
            hidden_size=hidden,
            intermediate_size=f.integer("intermediate_size"),
            num_layers=f.integer("num_hidden_layers"),
            num_heads=heads,
            num_kv_heads=kv_heads,
            head_dim=head_dim,
            rms_norm_eps=f.number("rms_norm_eps", 1e-6),
            rope_theta=theta,
            rope_type=rope_type,
            max_position_embeddings=f.integer("max_position_embeddings", 4096),
            qkv_bias=model_type == "qwen2",
            tie_embeddings=f.boolean("tie_word_embeddings", False),
            sliding_window=sliding_window,
            eos_token_ids=eos,
            bos_token_id=bos[0] if bos else None,
            model_type=model_type,
            dtype=dtype,
            **rope_kwargs,
        )

    @classmethod
    def from_folder(cls, path: str) -> Config:
        """Read config.json (and generation_config.json for the EOS ids) from a checkpoint folder."""
        if not os.path.isdir(path):
            raise ConfigError(f"{path} is not a folder; pass a Hugging Face checkpoint folder")
        cfg_path = os.path.join(path, "config.json")
        if not os.path.isfile(cfg_path):
            raise ConfigError(f"{path} has no config.json; pass a Hugging Face checkpoint folder")
        hf = _read_json(cfg_path, "re-download the checkpoint")
        gen = None
        gen_path = os.path.join(path, "generation_config.json")
        if os.path.isfile(gen_path):
            gen = _read_json(gen_path, "re-download it, or delete it to use config.json's eos_token_id")
        return cls.from_hf(hf, gen)


def _read_json(path: str, fix: str):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f, parse_constant=_no_constant)
    except (json.JSONDecodeError, UnicodeDecodeError, ValueError, RecursionError) as e:
        raise ConfigError(f"{path} is not valid JSON ({' '.join(str(e).split())[:200]}); {fix}") from None
    except OSError as e:
        raise ConfigError(f"cannot read {path} ({e.strerror or e}); check its permissions") from None


def _no_constant(name: str):
    """NaN and Infinity are not JSON; Python's reader accepts them unless told not to."""
    raise ValueError(f"{name} is not a JSON value")


_MISSING = object()


class _Fields:
    """Typed, range-checked reads of one JSON object's fields; errors name the file, the field and the value."""

    def __init__(self, d: dict, file: str, prefix: str = ""):
        self.d, self.file, self.prefix = d, file, prefix

    def reject(self, field, value, why):
        raise ConfigError(f"{self.file} field {field}={value!r} is not supported: {why}")

    def _get(self, key, default):
        value = self.d.get(key, _MISSING)
        if value is _MISSING or (value is None and default is not _MISSING):
            if default is _MISSING:
                raise ConfigError(f"{self.file} has no {self.prefix}{key} (or it is null); the checkpoint's config "
                                  "is incomplete, re-download it")
            return _MISSING
        if value is None:
            self.reject(self.prefix + key, value, "a value is required")
        return value

    def integer(self, key, default=_MISSING, minimum: int = 1):
        value = self._get(key, default)
        if value is _MISSING:
            return default
        if isinstance(value, bool) or not isinstance(value, int):
            self.reject(self.prefix + key, value, f"expected an integer >= {minimum}")
        if value < minimum:
            self.reject(self.prefix + key, value, f"expected an integer >= {minimum}")
        return value

    def number(self, key, default=_MISSING):
        """A finite number > 0 (an int is fine)."""
        value = self._get(key, default)
        if value is _MISSING:
            return default
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
            self.reject(self.prefix + key, value, "expected a finite number > 0")
        return float(value)

    def boolean(self, key, default=_MISSING):
        value = self._get(key, default)
        if value is _MISSING:
            return default
        if not isinstance(value, bool):
            self.reject(self.prefix + key, value, "expected true or false (a JSON boolean, not a string or number)")
        return value

    def string(self, key, default=_MISSING):
        value = self._get(key, default)
        if value is _MISSING:
            return default
        if not isinstance(value, str):
            self.reject(self.prefix + key, value, "expected a string")
        return value

    def token_ids(self, key, vocab: int) -> tuple[int, ...]:
        """An id or a list of ids, each an integer in [0, vocab); absent or null gives ()."""
        value = self.d.get(key)
        if value is None:
            return ()
        ids = value if isinstance(value, list) else [value]
        if not all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < vocab for t in ids):
            self.reject(self.prefix + key, value, f"expected token ids: integers in [0, {vocab}) (the vocabulary)")
        return tuple(ids)


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


# ---------------------------------------------------------------------- memory policy
@dataclass(frozen=True)
class MemoryPolicy:
    """Runtime memory knobs. Every policy computes the same function; only memory and speed differ.

    minisequence: tokens per mini-sequence (None = the whole sequence at once).
    minisequence_scope: "layer" runs the whole layer chunk by chunk (q/k/v, attention, o-proj, MLP);
        "mlp" chunks only the MLP, as the paper does.
    last_position_only: the final layer's attention output, MLP, final norm and LM head run on the last
        position only in prefill.
    kv_prefill / kv_decode: memory kind of the prompt's KV cache after prefill and while decoding
        ("device" or "pinned_host"). kv_decode="pinned_host" streams one layer at a time to the device.
    kv_dtype: None keeps K/V in the model's dtype (exact); "int8" stores them as int8 with one float32 scale
        per token per KV head (approximate: logits change slightly; every policy gives the same tokens).
    kv_device_layers: with kv_decode="pinned_host" only: the first N layers' prompt K/V are brought to the
        device once after prefill and stay there; the others stream every step. None or 0 streams them all;
        N = the model's layer count behaves like `mom`. Exact.
    """

    name: str = "custom"
    minisequence: int | None = None
    minisequence_scope: str = "layer"
    last_position_only: bool = False
    q_block: int = 512
    kv_block: int = 512
    kv_prefill: str = "device"
    kv_decode: str = "device"
    kv_dtype: str | None = None
    kv_device_layers: int | None = None

    def __post_init__(self):
        if self.minisequence is not None and self.minisequence <= 0:
            raise ValueError(f"minisequence must be a positive number of tokens, got {self.minisequence}")
        if self.minisequence_scope not in ("layer", "mlp"):
            raise ValueError(f"minisequence_scope must be 'layer' or 'mlp', got {self.minisequence_scope!r}")
        for kind in (self.kv_prefill, self.kv_decode):
            if kind not in ("device", "pinned_host"):
                raise ValueError(f"KV placement must be 'device' or 'pinned_host', got {kind!r}")
        if self.kv_prefill == "device" and self.kv_decode == "pinned_host":
            raise ValueError("kv_decode='pinned_host' needs kv_prefill='pinned_host'")
        if self.q_block <= 0 or self.kv_block <= 0:
            raise ValueError("attention blocks must be positive")
        if self.kv_dtype not in KV_DTYPES:
            raise ValueError(f"kv_dtype must be None (the model's dtype) or 'int8', got {self.kv_dtype!r}")
        n = self.kv_device_layers
        if n is not None:
            if isinstance(n, bool) or not isinstance(n, int) or n < 0:
                raise ValueError(f"kv_device_layers must be a whole number of layers >= 0, got {n!r}")
            if self.kv_decode != "pinned_host":
                raise ValueError(f"kv_device_layers={n} needs a policy that streams the KV cache from the host "
                                 "while decoding (kv_decode='pinned_host', e.g. 'mom-stream')")

    def check_layers(self, num_layers: int) -> None:
        """ValueError when kv_device_layers is more than the model's num_layers."""
        if self.kv_device_layers is not None and self.kv_device_layers > num_layers:
            raise ValueError(f"kv_device_layers must be between 0 and the model's {num_layers} layers, "
                             f"got {self.kv_device_layers}")

    @property
    def quantized_kv(self) -> bool:
        return self.kv_dtype == "int8"

    def device_layers(self, num_layers: int) -> int:
        """How many layers' prompt K/V are on the device while decoding."""
        if self.kv_decode == "device":
            return num_layers
        return min(self.kv_device_layers or 0, num_layers)

    def replace(self, **changes) -> MemoryPolicy:
        return dataclasses.replace(self, **changes)


KV_DTYPES = (None, "int8")

# Default mini-sequence length, from the rule and measurement in benchmarks/minisequence_size.py: CPU prefill time
# is flat from 512 to 8192 tokens, and 2048 is the largest chunk within 5% of the least memory at 128k tokens.
DEFAULT_MINISEQUENCE = 2048

POLICIES: dict[str, MemoryPolicy] = {
    "baseline": MemoryPolicy(name="baseline"),
    "mom": MemoryPolicy(
        name="mom", minisequence=DEFAULT_MINISEQUENCE, last_position_only=True, kv_prefill="pinned_host",
        kv_decode="device",
    ),
    "mom-stream": MemoryPolicy(
        name="mom-stream", minisequence=DEFAULT_MINISEQUENCE, last_position_only=True, kv_prefill="pinned_host",
        kv_decode="pinned_host",
    ),
}


def get_policy(policy: str | MemoryPolicy) -> MemoryPolicy:
    if isinstance(policy, MemoryPolicy):
        return policy
    if policy not in POLICIES:
        raise ValueError(f"unknown policy {policy!r}; choose one of {', '.join(POLICIES)} or pass a MemoryPolicy")
    return POLICIES[policy]


def ceil_to(n: int, multiple: int) -> int:
    return int(math.ceil(n / multiple) * multiple)
