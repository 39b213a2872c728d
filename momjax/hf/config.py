"""config.json (and generation_config.json) -> Config: the one place Hugging Face config names appear.

Every field of a config.json is either read (type- and range-checked: a JSON string "96", a float 96.7, a
bool where a number belongs, a null where a value is required are refused, naming the field, the value
and what is allowed), knowingly ignored (bookkeeping, training-only settings and generation defaults that
do not change what the model computes), or unknown; unknown fields are all reported in one ConfigError
rather than converted wrongly in silence. Both spellings are read: hub files (`rope_scaling`,
`rope_theta`, `torch_dtype`) and files saved by transformers 5 (`rope_parameters`, `dtype`).
"""

from __future__ import annotations

import json
import math
import os

from momjax.config import SUPPORTED_DTYPES, SUPPORTED_ROPE_TYPES, Config
from momjax.errors import ConfigError

SUPPORTED_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "Qwen2ForCausalLM": "qwen2",
    "MistralForCausalLM": "mistral",
}
# Fields from_hf reads (and checks).
READ = frozenset({
    "architectures", "model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
    "num_attention_heads", "num_key_value_heads", "head_dim", "hidden_act", "mlp_bias", "attention_bias",
    "partial_rotary_factor", "is_encoder_decoder", "rope_theta", "rope_scaling", "rope_parameters", "sliding_window",
    "use_sliding_window", "layer_types", "eos_token_id", "bos_token_id", "dtype", "torch_dtype", "rms_norm_eps",
    "max_position_embeddings", "tie_word_embeddings", "original_max_position_embeddings",
})
# Fields that do not change what these architectures compute at inference: bookkeeping, training-only settings
# (dropout, initialisation, tensor-parallel pretraining slices), generation defaults (generate's own arguments
# set those), labels and the encoder-decoder switches transformers writes as defaults.
IGNORED = frozenset({
    "_name_or_path", "transformers_version", "initializer_range", "use_cache", "pad_token_id", "attention_dropout",
    "pretraining_tp", "max_window_layers", "output_attentions", "output_hidden_states", "return_dict", "torchscript",
    "use_bfloat16", "tf_legacy_loss", "pruned_heads", "chunk_size_feed_forward", "is_decoder",
    "cross_attention_hidden_size", "add_cross_attention", "tie_encoder_decoder", "finetuning_task", "id2label",
    "label2id", "tokenizer_class", "prefix", "sep_token_id", "decoder_start_token_id", "task_specific_params",
    "problem_type", "max_length", "min_length", "do_sample", "early_stopping", "num_beams", "num_beam_groups",
    "diversity_penalty", "temperature", "top_k", "top_p", "typical_p", "repetition_penalty", "length_penalty",
    "no_repeat_ngram_size", "encoder_no_repeat_ngram_size", "bad_words_ids", "num_return_sequences",
    "output_scores", "return_dict_in_generate", "forced_bos_token_id", "forced_eos_token_id",
    "remove_invalid_values", "exponential_decay_length_penalty", "suppress_tokens", "begin_suppress_tokens",
    "_attn_implementation_autoset", "embd_pdrop", "resid_pdrop",
})


def from_hf(hf: dict, generation_config: dict | None = None) -> Config:
    """Read a Hugging Face config.json dict (hub spelling or transformers-5 spelling).

    Every field read is type- and range-checked (a JSON string "96", a float 96.7, a bool where a number
    belongs, a null where a value is required are all refused, naming the field, the value and what is
    allowed). generation_config: generation_config.json's dict; its eos_token_id wins over config.json's.
    """
    if not isinstance(hf, dict):
        raise ConfigError(f"config.json must hold a JSON object, got {type(hf).__name__}; re-download it")
    model_type = _architecture(hf)
    f = _Fields(hf, "config.json")
    _refuse_unsupported_layers(f, model_type)
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
    eos, bos = _special_tokens(f, generation_config, vocab)
    dtype = f.string("dtype", None) or f.string("torch_dtype", "float32")
    if dtype not in SUPPORTED_DTYPES:
        f.reject("torch_dtype", dtype, f"supported dtypes: {SUPPORTED_DTYPES}")
    return Config(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=f.integer("intermediate_size"),
        num_layers=f.integer("num_hidden_layers"),
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        rms_norm_eps=f.number("rms_norm_eps", 1e-6),
        max_position_embeddings=f.integer("max_position_embeddings", 4096),
        qkv_bias=model_type == "qwen2",
        tie_embeddings=f.boolean("tie_word_embeddings", False),
        sliding_window=_sliding_window(f, hf, model_type),
        eos_token_ids=eos,
        bos_token_id=bos,
        model_type=model_type,
        dtype=dtype,
        **_rope(f, hf),
    )


def _architecture(hf: dict) -> str:
    """The model_type of a supported architecture; ConfigError for any other, and for every field momjax
    neither reads nor knowingly ignores (all of them in one error)."""
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
    unknown = sorted(set(hf) - READ - IGNORED)
    if unknown:
        raise ConfigError(
            f"config.json has fields momjax does not handle: {', '.join(map(repr, unknown))} (with values "
            f"{', '.join(repr(hf[k])[:40] for k in unknown[:5])}); momjax refuses what it cannot convert exactly. "
            + ("A quantized checkpoint cannot be loaded: use the unquantized weights" if "quantization_config" in hf
               else "If a field does not change the model, report it as a momjax bug"))
    return model_type


def _refuse_unsupported_layers(f, model_type: str) -> None:
    act = f.string("hidden_act", "silu")
    if act != "silu":
        f.reject("hidden_act", act, "only 'silu' (SwiGLU) MLPs are supported")
    if f.boolean("mlp_bias", False):
        f.reject("mlp_bias", True, "MLP biases are not supported")
    if f.boolean("attention_bias", False) and model_type != "qwen2":
        f.reject("attention_bias", True, "attention biases are supported only as Qwen2's q/k/v biases")
    if f.number("partial_rotary_factor", 1.0) != 1.0:
        f.reject("partial_rotary_factor", f.d["partial_rotary_factor"], "only full rotary embeddings are supported")
    if f.boolean("is_encoder_decoder", False):
        f.reject("is_encoder_decoder", True, "momjax runs decoder-only models")


def _rope(f, hf: dict) -> dict:
    """The Config's rope fields. Hub files put rope_theta / rope_scaling at top level; transformers 5 writes
    rope_parameters."""
    rope = {}
    for key in ("rope_parameters", "rope_scaling"):
        value = hf.get(key)
        if value is not None and not isinstance(value, dict):
            f.reject(key, value, "expected a JSON object or null")
        rope.update(value or {})
    return _rope_fields(hf, rope, f, f.integer("max_position_embeddings", 4096))


# Fields of a rope_scaling / rope_parameters object. The older types keep the set they always accepted; yarn and
# dynamic accept only their own (anything else would be dropped in silence).
_ROPE_FIELDS = {"rope_theta", "rope_type", "type", "factor", "low_freq_factor", "high_freq_factor",
                "original_max_position_embeddings"}
_YARN_FIELDS = {"rope_theta", "rope_type", "type", "factor", "original_max_position_embeddings", "beta_fast",
                "beta_slow", "mscale", "mscale_all_dim", "attention_factor", "truncate"}
_DYNAMIC_FIELDS = {"rope_theta", "rope_type", "type", "factor", "original_max_position_embeddings"}


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    """YaRN's attention temperature for a context `factor` times longer: 0.1 mscale ln(factor) + 1 (1 when
    factor <= 1), in Python floats as transformers computes it."""
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def _rope_fields(hf: dict, rope: dict, f: _Fields, max_positions: int) -> dict:
    """Config's rope_* fields from config.json (hf) and its merged rope_scaling / rope_parameters object (rope),
    read with the defaults transformers' rope initialisation functions use."""
    r = _Fields(rope, "config.json", prefix="rope_scaling.")
    out = dict(rope_theta=r.number("rope_theta", f.number("rope_theta", 10000.0)))
    rope_type = rope.get("rope_type", rope.get("type", "default")) or "default"
    if rope_type not in SUPPORTED_ROPE_TYPES:
        f.reject("rope_scaling.rope_type", rope_type, f"supported rope types: {', '.join(SUPPORTED_ROPE_TYPES)}")
    out["rope_type"] = rope_type
    allowed = {"yarn": _YARN_FIELDS, "dynamic": _DYNAMIC_FIELDS}.get(rope_type, _ROPE_FIELDS)
    extra = set(rope) - allowed
    if extra:
        f.reject("rope_scaling", rope, f"unhandled rope fields {sorted(extra)} for rope type {rope_type!r}")
    if rope_type != "default" and "factor" not in rope:
        f.reject("rope_scaling", rope, f"rope type {rope_type!r} needs a 'factor'")

    def needs_max_positions(why: str):  # transformers would use its config class's default, which differs by family
        if hf.get("max_position_embeddings") is None:
            f.reject("max_position_embeddings", hf.get("max_position_embeddings"),
                     f"{why}, so config.json must give it (a positive integer)")

    # transformers lets a top-level original_max_position_embeddings (Phi-3 style) win over the rope object's one.
    top_original = f.integer("original_max_position_embeddings", None) if rope_type in ("llama3", "yarn") else None

    if rope_type in ("linear", "llama3", "dynamic"):
        out["rope_factor"] = r.number("factor")
    if rope_type == "llama3":
        for key in ("low_freq_factor", "high_freq_factor", "original_max_position_embeddings"):
            if key not in rope and not (key == "original_max_position_embeddings" and top_original):
                f.reject("rope_scaling", rope, f"llama3 rope scaling needs {key!r}")
        low, high = r.number("low_freq_factor"), r.number("high_freq_factor")
        if high <= low:
            f.reject("rope_scaling.high_freq_factor", high, f"it must exceed low_freq_factor ({low})")
        out.update(rope_low_freq_factor=low, rope_high_freq_factor=high,
                   rope_original_max_position=top_original or r.integer("original_max_position_embeddings"))
    elif rope_type == "yarn":
        if top_original:
            original = top_original
        else:
            if rope.get("original_max_position_embeddings") is None:
                needs_max_positions("yarn without original_max_position_embeddings scales from it")
            original = r.integer("original_max_position_embeddings", max_positions)
        if rope["factor"] is None:  # transformers: the ratio of the two lengths (DeepSeek-V3 style)
            needs_max_positions("yarn with a null factor takes max_position_embeddings / original length")
            factor = max_positions / original
        else:
            factor = r.number("factor")
        mscale, mscale_all_dim = r.number("mscale", 0.0, zero=True), r.number("mscale_all_dim", 0.0, zero=True)
        attention_factor = r.number("attention_factor", None)
        if attention_factor is None:  # null or absent: from the factor (and mscale / mscale_all_dim when both set)
            if mscale and mscale_all_dim:
                attention_factor = yarn_mscale(factor, mscale) / yarn_mscale(factor, mscale_all_dim)
            else:
                attention_factor = yarn_mscale(factor)
        beta_fast, beta_slow = r.number("beta_fast", 32.0), r.number("beta_slow", 1.0)
        if beta_fast < beta_slow:
            f.reject("rope_scaling.beta_fast", beta_fast, f"it must be at least beta_slow ({beta_slow}); "
                     "transformers warns about this too")
        if "truncate" in rope and rope["truncate"] is None:
            f.reject("rope_scaling.truncate", None, "expected true or false (transformers would read null as false)")
        out.update(rope_factor=factor, rope_original_max_position=original, rope_attention_factor=attention_factor,
                   rope_beta_fast=beta_fast, rope_beta_slow=beta_slow, rope_truncate=r.boolean("truncate", True))
    elif rope_type == "dynamic":
        needs_max_positions("dynamic rope scaling starts at max_position_embeddings")
        original = r.integer("original_max_position_embeddings", None)
        if original is not None and original != max_positions:
            f.reject("rope_scaling.original_max_position_embeddings", original,
                     f"transformers' dynamic NTK scaling ignores it and scales from max_position_embeddings "
                     f"({max_positions}); remove it, or set max_position_embeddings to the length the model was "
                     "trained on")
    return out


def _sliding_window(f, hf: dict, model_type: str) -> int | None:
    if model_type == "mistral":
        return f.integer("sliding_window", None)
    if model_type == "qwen2":
        layer_types = hf.get("layer_types") or []
        if f.boolean("use_sliding_window", False) or (isinstance(layer_types, list)
                                                      and "sliding_attention" in layer_types):
            f.reject("use_sliding_window", True, "Qwen2's per-layer sliding window is not supported")
    elif hf.get("sliding_window") is not None:
        f.reject("sliding_window", hf["sliding_window"], "sliding windows are supported for Mistral only")
    return None


def _special_tokens(f, generation_config: dict | None, vocab: int) -> tuple[tuple[int, ...], int | None]:
    """(EOS ids, BOS id): generation_config.json's eos_token_id wins over config.json's."""
    eos = f.token_ids("eos_token_id", vocab)
    if generation_config is not None:
        if not isinstance(generation_config, dict):
            raise ConfigError("generation_config.json must hold a JSON object, got "
                              f"{type(generation_config).__name__}; re-download it or delete it")
        if generation_config.get("eos_token_id") is not None:
            eos = _Fields(generation_config, "generation_config.json").token_ids("eos_token_id", vocab)
    bos = f.token_ids("bos_token_id", vocab)
    if len(bos) > 1:
        f.reject("bos_token_id", f.d["bos_token_id"], "expected one token id")
    return eos, bos[0] if bos else None


def from_folder(path: str) -> Config:
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
    return from_hf(hf, gen)


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

    def number(self, key, default=_MISSING, zero: bool = False):
        """A finite number > 0 (an int is fine), or >= 0 with `zero`."""
        value = self._get(key, default)
        if value is _MISSING:
            return default
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or \
                value < 0 or (value == 0 and not zero):
            self.reject(self.prefix + key, value, f"expected a finite number {'>=' if zero else '>'} 0")
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


