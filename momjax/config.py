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
        """Read a Hugging Face config.json dict (hub spelling or transformers-5 spelling)."""
        model_type = hf.get("model_type")
        archs = hf.get("architectures") or []
        for arch in archs:
            if arch not in SUPPORTED_ARCHITECTURES:
                raise ConfigError(
                    f"unsupported architecture {arch!r}; momjax supports {', '.join(SUPPORTED_ARCHITECTURES)}"
                )
        if model_type not in SUPPORTED_ARCHITECTURES.values():
            raise ConfigError(
                f"unsupported model_type {model_type!r}; momjax supports {', '.join(SUPPORTED_ARCHITECTURES.values())}"
            )

        def reject(field, value, why):
            raise ConfigError(f"config.json field {field}={value!r} is not supported: {why}")

        act = hf.get("hidden_act", "silu")
        if act != "silu":
            reject("hidden_act", act, "only 'silu' (SwiGLU) MLPs are supported")
        if hf.get("mlp_bias", False):
            reject("mlp_bias", True, "MLP biases are not supported")
        if hf.get("attention_bias", False) and model_type != "qwen2":
            reject("attention_bias", True, "attention biases are supported only as Qwen2's q/k/v biases")
        if hf.get("partial_rotary_factor", 1.0) != 1.0:
            reject("partial_rotary_factor", hf["partial_rotary_factor"], "only full rotary embeddings are supported")
        if hf.get("is_encoder_decoder", False):
            reject("is_encoder_decoder", True, "momjax runs decoder-only models")

        hidden = int(hf["hidden_size"])
        heads = int(hf["num_attention_heads"])
        kv_heads = int(hf.get("num_key_value_heads") or heads)
        head_dim = hf.get("head_dim") or hidden // heads

        # Rope: hub files put rope_theta / rope_scaling at top level; transformers 5 writes rope_parameters.
        rope = dict(hf.get("rope_parameters") or {})
        scaling = hf.get("rope_scaling")
        if scaling:
            rope.update(scaling)
        theta = float(rope.get("rope_theta", hf.get("rope_theta", 10000.0)))
        rope_type = rope.get("rope_type", rope.get("type", "default")) or "default"
        if rope_type not in SUPPORTED_ROPE_TYPES:
            reject("rope_scaling.rope_type", rope_type, f"supported rope types: {', '.join(SUPPORTED_ROPE_TYPES)}")
        rope_kwargs = {}
        if rope_type in ("linear", "llama3"):
            if "factor" not in rope:
                reject("rope_scaling", rope, f"rope type {rope_type!r} needs a 'factor'")
            rope_kwargs["rope_factor"] = float(rope["factor"])
        if rope_type == "llama3":
            for key in ("low_freq_factor", "high_freq_factor", "original_max_position_embeddings"):
                if key not in rope:
                    reject("rope_scaling", rope, f"llama3 rope scaling needs {key!r}")
            rope_kwargs.update(
                rope_low_freq_factor=float(rope["low_freq_factor"]),
                rope_high_freq_factor=float(rope["high_freq_factor"]),
                rope_original_max_position=int(rope["original_max_position_embeddings"]),
            )
        extra = set(rope) - {
            "rope_theta", "rope_type", "type", "factor", "low_freq_factor", "high_freq_factor",
            "original_max_position_embeddings",
        }
        if extra:
            reject("rope_scaling", rope, f"unhandled rope fields {sorted(extra)}")

        sliding_window = None
        if model_type == "mistral":
            sliding_window = hf.get("sliding_window")
        elif model_type == "qwen2":
            layer_types = hf.get("layer_types") or []
            if hf.get("use_sliding_window", False) or "sliding_attention" in layer_types:
                reject("use_sliding_window", True, "Qwen2's per-layer sliding window is not supported")
        elif hf.get("sliding_window") is not None:
            reject("sliding_window", hf["sliding_window"], "sliding windows are supported for Mistral only")
        if sliding_window is not None:
            sliding_window = int(sliding_window)
            if sliding_window <= 0:
                reject("sliding_window", sliding_window, "must be a positive number of tokens")

        eos = (generation_config or {}).get("eos_token_id", hf.get("eos_token_id"))
        eos = () if eos is None else tuple(int(e) for e in (eos if isinstance(eos, list) else [eos]))
        dtype = hf.get("dtype") or hf.get("torch_dtype") or "float32"
        if dtype not in SUPPORTED_DTYPES:
            reject("torch_dtype", dtype, f"supported dtypes: {SUPPORTED_DTYPES}")

        return cls(
            vocab_size=int(hf["vocab_size"]),
            hidden_size=hidden,
            intermediate_size=int(hf["intermediate_size"]),
            num_layers=int(hf["num_hidden_layers"]),
            num_heads=heads,
            num_kv_heads=kv_heads,
            head_dim=int(head_dim),
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            rope_theta=theta,
            rope_type=rope_type,
            max_position_embeddings=int(hf.get("max_position_embeddings", 4096)),
            qkv_bias=model_type == "qwen2",
            tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
            sliding_window=sliding_window,
            eos_token_ids=eos,
            bos_token_id=hf.get("bos_token_id"),
            model_type=model_type,
            dtype=dtype,
            **rope_kwargs,
        )

    @classmethod
    def from_folder(cls, path: str) -> Config:
        """Read config.json (and generation_config.json for the EOS ids) from a checkpoint folder."""
        cfg_path = os.path.join(path, "config.json")
        if not os.path.isfile(cfg_path):
            raise ConfigError(f"{path} has no config.json; pass a Hugging Face checkpoint folder")
        try:
            with open(cfg_path) as f:
                hf = json.load(f)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{cfg_path} is not valid JSON ({e}); re-download the checkpoint") from None
        gen = None
        gen_path = os.path.join(path, "generation_config.json")
        if os.path.isfile(gen_path):
            with open(gen_path) as f:
                gen = json.load(f)
        return cls.from_hf(hf, gen)


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
    """

    name: str = "custom"
    minisequence: int | None = None
    minisequence_scope: str = "layer"
    last_position_only: bool = False
    q_block: int = 512
    kv_block: int = 512
    kv_prefill: str = "device"
    kv_decode: str = "device"

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

    def replace(self, **changes) -> MemoryPolicy:
        return dataclasses.replace(self, **changes)


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
