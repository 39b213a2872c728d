"""Config.from_hf (hub and transformers-5 spellings, every supported variation, every rejected field),
the presets, and MemoryPolicy validation. No JAX compilation here: these tests take milliseconds."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import transformers
from cli_helpers import (
    BASE,
    DELETE,
)

import momjax
import momjax.cli
import momjax.convert
from momjax import Config, ConfigError
from momjax.hf import config as hf_config

# config.json files as they are on the Hugging Face hub (transformers 4.x spelling: top-level rope_theta,
# rope_scaling and torch_dtype).
LLAMA_31_8B = {
    "architectures": ["LlamaForCausalLM"], "attention_bias": False, "attention_dropout": 0.0, "bos_token_id": 128000,
    "eos_token_id": [128001, 128008, 128009], "hidden_act": "silu", "hidden_size": 4096, "initializer_range": 0.02,
    "intermediate_size": 14336, "max_position_embeddings": 131072, "mlp_bias": False, "model_type": "llama",
    "num_attention_heads": 32, "num_hidden_layers": 32, "num_key_value_heads": 8, "pretraining_tp": 1,
    "rms_norm_eps": 1e-05,
    "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                     "original_max_position_embeddings": 8192, "rope_type": "llama3"},
    "rope_theta": 500000.0, "tie_word_embeddings": False, "torch_dtype": "bfloat16", "use_cache": True,
    "vocab_size": 128256,
}
LLAMA_32_1B = {
    **LLAMA_31_8B, "hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16, "head_dim": 64,
    "tie_word_embeddings": True,
    "rope_scaling": {"factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                     "original_max_position_embeddings": 8192, "rope_type": "llama3"},
}
QWEN25_7B_INSTRUCT = {
    "architectures": ["Qwen2ForCausalLM"], "attention_dropout": 0.0, "bos_token_id": 151643, "eos_token_id": 151645,
    "hidden_act": "silu", "hidden_size": 3584, "initializer_range": 0.02, "intermediate_size": 18944,
    "max_position_embeddings": 32768, "max_window_layers": 28, "model_type": "qwen2", "num_attention_heads": 28,
    "num_hidden_layers": 28, "num_key_value_heads": 4, "rms_norm_eps": 1e-06, "rope_theta": 1000000.0,
    "sliding_window": 131072, "tie_word_embeddings": False, "torch_dtype": "bfloat16", "use_cache": True,
    "use_sliding_window": False, "vocab_size": 152064,
}
QWEN25_GENERATION = {"bos_token_id": 151643, "eos_token_id": [151645, 151643], "do_sample": True, "top_p": 0.8}
MISTRAL_NEMO = {
    "architectures": ["MistralForCausalLM"], "attention_dropout": 0.0, "bos_token_id": 1, "eos_token_id": 2,
    "head_dim": 128, "hidden_act": "silu", "hidden_size": 5120, "initializer_range": 0.02, "intermediate_size": 14336,
    "max_position_embeddings": 1024000, "model_type": "mistral", "num_attention_heads": 32, "num_hidden_layers": 40,
    "num_key_value_heads": 8, "rms_norm_eps": 1e-05, "rope_theta": 1000000.0, "sliding_window": None,
    "tie_word_embeddings": False, "torch_dtype": "bfloat16", "use_cache": True, "vocab_size": 131072,
}
MISTRAL_7B_V01 = {
    **MISTRAL_NEMO, "head_dim": None, "hidden_size": 4096, "num_hidden_layers": 32, "max_position_embeddings": 32768,
    "rope_theta": 10000.0, "sliding_window": 4096, "vocab_size": 32000,
}
del MISTRAL_7B_V01["head_dim"]
HUB_CONFIGS = {"llama-3.1-8b": LLAMA_31_8B, "llama-3.2-1b": LLAMA_32_1B, "qwen2.5-7b": QWEN25_7B_INSTRUCT,
               "mistral-nemo-12b": MISTRAL_NEMO, "mistral-7b-v0.1": MISTRAL_7B_V01}
CONFIG_CLASSES = {"llama": transformers.LlamaConfig, "qwen2": transformers.Qwen2Config,
                  "mistral": transformers.MistralConfig}


def to_transformers5(hub: dict) -> dict:
    """The same config in transformers-5 spelling: rope_parameters (with rope_theta inside) and dtype."""
    d = copy.deepcopy(hub)
    rope = dict(d.pop("rope_scaling", None) or {"rope_type": "default"})
    rope["rope_theta"] = d.pop("rope_theta")
    d["rope_parameters"] = rope
    d["dtype"] = d.pop("torch_dtype")
    return d


def small(**changes) -> dict:
    """A small valid Llama config.json (hub spelling) with some fields changed (None deletes a field)."""
    d = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 100, "hidden_size": 64,
         "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
         "max_position_embeddings": 256, "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "hidden_act": "silu",
         "eos_token_id": 2, "bos_token_id": 1, "torch_dtype": "float32"}
    d.update(changes)
    return {k: v for k, v in d.items() if v is not None}


# ---------------------------------------------------------------------- spellings


@pytest.mark.parametrize("name", list(HUB_CONFIGS))
def test_hub_and_transformers5_spellings_agree(name):
    hub = HUB_CONFIGS[name]
    cfg = hf_config.from_hf(hub)
    assert hf_config.from_hf(to_transformers5(hub)) == cfg
    # And transformers' own rewrite of the hub file (what save_pretrained writes with transformers 5).
    written = CONFIG_CLASSES[hub["model_type"]](**hub).to_dict()
    assert "rope_parameters" in written and "rope_theta" not in written and "torch_dtype" not in written
    assert hf_config.from_hf(written) == cfg


@pytest.mark.parametrize("name", ["llama-3.1-8b", "llama-3.2-1b", "mistral-nemo-12b"])
def test_hub_config_reads_as_its_preset(name):
    assert hf_config.from_hf(HUB_CONFIGS[name]) == momjax.preset(name)


def test_qwen25_reads_as_its_preset_with_generation_config():
    cfg = hf_config.from_hf(QWEN25_7B_INSTRUCT, QWEN25_GENERATION)
    assert cfg.replace(bos_token_id=None) == momjax.preset("qwen2.5-7b")
    assert cfg.eos_token_ids == (151645, 151643)  # generation_config.json wins over config.json
    assert cfg.qkv_bias and not cfg.tie_embeddings
    # Qwen2.5 files carry sliding_window with use_sliding_window false: every layer is full attention.
    assert cfg.sliding_window is None


def test_llama3_rope_scaling_read():
    cfg = hf_config.from_hf(LLAMA_31_8B)
    assert (cfg.rope_type, cfg.rope_factor, cfg.rope_low_freq_factor, cfg.rope_high_freq_factor) == (
        "llama3", 8.0, 1.0, 4.0)
    assert cfg.rope_original_max_position == 8192 and cfg.rope_theta == 500000.0
    assert cfg.dtype == "bfloat16" and cfg.eos_token_ids == (128001, 128008, 128009) and cfg.bos_token_id == 128000
    assert (cfg.num_heads, cfg.num_kv_heads, cfg.group, cfg.head_dim) == (32, 8, 4, 128)
    assert cfg.kv_bytes_per_token("bfloat16") == 2 * 32 * 8 * 128 * 2  # bytes, not elements


@pytest.mark.parametrize("spelling", ["rope_type", "type", "rope_parameters"])
def test_linear_rope_scaling_read(spelling):
    if spelling == "rope_parameters":
        hf = small(rope_theta=None, rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 5000.0})
    else:  # "type" is the older key that some hub files still use
        hf = small(rope_theta=5000.0, rope_scaling={spelling: "linear", "factor": 2.0})
    cfg = hf_config.from_hf(hf)
    assert (cfg.rope_type, cfg.rope_factor, cfg.rope_theta) == ("linear", 2.0, 5000.0)


def test_default_rope_and_defaults():
    cfg = hf_config.from_hf(small(num_key_value_heads=None, torch_dtype=None))
    assert cfg.rope_type == "default" and cfg.rope_factor == 1.0
    assert cfg.num_kv_heads == cfg.num_heads == 4 and cfg.group == 1  # MHA when num_key_value_heads is missing
    assert cfg.head_dim == 16 and cfg.dtype == "float32"
    assert cfg.eos_token_ids == (2,) and cfg.bos_token_id == 1 and cfg.sliding_window is None
    assert hf_config.from_hf(small(eos_token_id=None)).eos_token_ids == ()


def test_explicit_head_dim():
    cfg = hf_config.from_hf(MISTRAL_NEMO)
    assert cfg.head_dim == 128 and cfg.hidden_size == 5120  # not 5120 // 32 = 160
    assert hf_config.from_hf(small(head_dim=32)).head_dim == 32
    assert hf_config.from_hf(small(head_dim=None)).head_dim == 16


def test_mqa():
    cfg = hf_config.from_hf(small(num_key_value_heads=1))
    assert (cfg.num_kv_heads, cfg.group) == (1, 4)


def test_qwen2_qkv_bias():
    hf = small(architectures=["Qwen2ForCausalLM"], model_type="qwen2", use_sliding_window=False,
               sliding_window=4096)
    cfg = hf_config.from_hf(hf)
    assert cfg.qkv_bias and cfg.model_type == "qwen2" and cfg.sliding_window is None
    assert not hf_config.from_hf(small()).qkv_bias
    assert not hf_config.from_hf(small(architectures=["MistralForCausalLM"], model_type="mistral")).qkv_bias


def test_mistral_sliding_window():
    assert hf_config.from_hf(MISTRAL_7B_V01).sliding_window == 4096
    assert hf_config.from_hf(MISTRAL_NEMO).sliding_window is None
    assert hf_config.from_hf(to_transformers5(MISTRAL_7B_V01)).sliding_window == 4096


def test_generation_config_eos_wins():
    assert hf_config.from_hf(small(eos_token_id=2), {"eos_token_id": [5, 6]}).eos_token_ids == (5, 6)
    assert hf_config.from_hf(small(eos_token_id=[2, 3]), {"do_sample": False}).eos_token_ids == (2, 3)


def test_from_folder_reads_saved_checkpoint_configs(tmp_path):
    hf_cfg = transformers.LlamaConfig(**{k: v for k, v in small().items() if k != "torch_dtype"})
    hf_cfg.save_pretrained(tmp_path)
    (tmp_path / "generation_config.json").write_text('{"eos_token_id": [2, 7]}')
    cfg = hf_config.from_folder(str(tmp_path))
    assert cfg.replace(eos_token_ids=(2,)) == hf_config.from_hf(small())
    assert cfg.eos_token_ids == (2, 7)


def test_from_folder_errors(tmp_path):
    with pytest.raises(ConfigError, match="no config.json"):
        hf_config.from_folder(str(tmp_path))
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        hf_config.from_folder(str(tmp_path))


def test_config_is_hashable_and_round_trips_json():
    cfg = hf_config.from_hf(LLAMA_31_8B)
    assert hash(cfg) == hash(hf_config.from_hf(to_transformers5(LLAMA_31_8B)))
    assert Config.from_json(cfg.to_json()) == cfg
    assert {cfg: 1}[momjax.preset("llama-3.1-8b")] == 1


# ---------------------------------------------------------------------- rejections


def test_unknown_architecture_lists_supported():
    with pytest.raises(ConfigError) as e:
        hf_config.from_hf(small(architectures=["GPT2LMHeadModel"], model_type="gpt2"))
    msg = str(e.value)
    assert "architecture" in msg and "GPT2LMHeadModel" in msg
    for arch in ("LlamaForCausalLM", "Qwen2ForCausalLM", "MistralForCausalLM"):
        assert arch in msg
    with pytest.raises(ConfigError) as e:
        hf_config.from_hf(small(architectures=None, model_type="gpt2"))
    msg = str(e.value)
    assert "model_type" in msg and "gpt2" in msg
    for model_type in ("llama", "qwen2", "mistral"):
        assert model_type in msg


@pytest.mark.parametrize("rope_type", ["longrope", "proportional"])  # yarn and dynamic: test_rope_scaling.py
@pytest.mark.parametrize("spelling", ["rope_scaling", "rope_scaling_type", "rope_parameters"])
def test_unsupported_rope_types_rejected(rope_type, spelling):
    fields = {"factor": 4.0, "original_max_position_embeddings": 4096}
    if spelling == "rope_scaling":
        hf = small(rope_scaling={"rope_type": rope_type, **fields})
    elif spelling == "rope_scaling_type":
        hf = small(rope_scaling={"type": rope_type, **fields})
    else:
        hf = small(rope_theta=None, rope_parameters={"rope_type": rope_type, "rope_theta": 1e4, **fields})
    with pytest.raises(ConfigError, match="rope") as e:
        hf_config.from_hf(hf)
    assert rope_type in str(e.value)


@pytest.mark.parametrize("rope", [
    {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0},  # no original max
    {"rope_type": "linear"},  # no factor
    {"rope_type": "linear", "factor": 2.0, "mrope_section": [16, 24, 24]},  # a field we would silently drop
])
def test_incomplete_or_unknown_rope_fields_rejected(rope):
    with pytest.raises(ConfigError, match="rope_scaling"):
        hf_config.from_hf(small(rope_scaling=rope))


@pytest.mark.parametrize("changes, field", [
    ({"hidden_act": "gelu"}, "hidden_act"),
    ({"hidden_act": "gelu_pytorch_tanh"}, "hidden_act"),
    ({"mlp_bias": True}, "mlp_bias"),
    ({"attention_bias": True}, "attention_bias"),
    ({"architectures": ["MistralForCausalLM"], "model_type": "mistral", "attention_bias": True}, "attention_bias"),
    ({"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "use_sliding_window": True,
      "sliding_window": 4096}, "use_sliding_window"),
    ({"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2",
      "layer_types": ["sliding_attention", "full_attention"]}, "sliding_window"),
    ({"partial_rotary_factor": 0.5}, "partial_rotary_factor"),
    ({"sliding_window": 4096}, "sliding_window"),  # a Llama with a window
    ({"architectures": ["MistralForCausalLM"], "model_type": "mistral", "sliding_window": 0}, "sliding_window"),
    ({"torch_dtype": "float8_e4m3fn"}, "dtype"),
    ({"is_encoder_decoder": True}, "is_encoder_decoder"),
])
def test_unsupported_fields_rejected_naming_the_field(changes, field):
    with pytest.raises(ConfigError, match=field):
        hf_config.from_hf(small(**changes))


def test_accepted_no_op_fields():
    # False/1.0 values of the rejected fields are the supported case and must not raise.
    cfg = hf_config.from_hf(small(mlp_bias=False, attention_bias=False, partial_rotary_factor=1.0, pretraining_tp=1))
    assert cfg == hf_config.from_hf(small())


def test_heads_must_be_a_multiple_of_kv_heads():
    with pytest.raises(ConfigError, match="num_key_value_heads"):
        hf_config.from_hf(small(num_attention_heads=4, num_key_value_heads=3))


# ---------------------------------------------------------------------- presets


def test_presets():
    assert set(momjax.PRESETS) >= {"llama-3.1-8b", "llama-3.2-1b", "qwen2.5-7b", "mistral-nemo-12b"}
    nemo = momjax.preset("mistral-nemo-12b")
    assert (nemo.head_dim, nemo.hidden_size, nemo.num_heads) == (128, 5120, 32)
    assert nemo.head_dim * nemo.num_heads != nemo.hidden_size
    llama = momjax.preset("llama-3.1-8b")
    assert (llama.num_layers, llama.num_kv_heads, llama.rope_type, llama.vocab_size) == (32, 8, "llama3", 128256)
    assert momjax.preset("llama-3.2-1b").tie_embeddings
    qwen = momjax.preset("qwen2.5-7b")
    assert qwen.qkv_bias and (qwen.num_heads, qwen.num_kv_heads, qwen.head_dim) == (28, 4, 128)
    for cfg in momjax.PRESETS.values():
        hash(cfg)
        assert cfg.dtype == "bfloat16"


def test_unknown_preset():
    with pytest.raises(ConfigError, match="llama-3.1-8b"):
        momjax.preset("llama-4")


# ---------------------------------------------------------------------- config.json read strictly
MISTRAL = {"architectures": ["MistralForCausalLM"], "model_type": "mistral"}
LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 64}

BAD_CONFIGS = {  # name -> (changes, words the message must hold)
    "tie as a string": ({"tie_word_embeddings": "false"}, "tie_word_embeddings"),
    "tie as a number": ({"tie_word_embeddings": 0}, "tie_word_embeddings"),
    "window true": ({**MISTRAL, "sliding_window": True}, "sliding_window"),
    "window as a string": ({**MISTRAL, "sliding_window": "4096"}, "sliding_window"),
    "window negative": ({**MISTRAL, "sliding_window": -4}, "sliding_window"),
    "size as a string": ({"hidden_size": "96"}, "hidden_size"),
    "size as a float": ({"hidden_size": 96.7}, "hidden_size"),
    "integral float": ({"num_hidden_layers": 2.0}, "num_hidden_layers"),
    "size as a bool": ({"intermediate_size": True}, "intermediate_size"),
    "zero layers": ({"num_hidden_layers": 0}, "num_hidden_layers"),
    "negative vocab": ({"vocab_size": -100}, "vocab_size"),
    "null required": ({"vocab_size": None}, "vocab_size"),
    "missing required": ({"hidden_size": DELETE}, "hidden_size"),
    "zero heads": ({"num_attention_heads": 0}, "num_attention_heads"),
    "kv heads do not divide": ({"num_key_value_heads": 3}, "num_key_value_heads"),
    "heads do not divide hidden": ({"num_attention_heads": 5, "num_key_value_heads": 5}, "hidden_size"),
    "head_dim as a string": ({"head_dim": "16"}, "head_dim"),
    "eps zero": ({"rms_norm_eps": 0}, "rms_norm_eps"),
    "eps as a string": ({"rms_norm_eps": "1e-5"}, "rms_norm_eps"),
    "theta negative": ({"rope_theta": -1.0}, "rope_theta"),
    "rope factor zero": ({"rope_scaling": {**LLAMA3, "factor": 0}}, "factor"),
    "rope factor string": ({"rope_scaling": {"rope_type": "linear", "factor": "2"}}, "factor"),
    "llama3 high <= low": ({"rope_scaling": {**LLAMA3, "high_freq_factor": 1.0}}, "high_freq_factor"),
    "llama3 original max float": ({"rope_scaling": {**LLAMA3, "original_max_position_embeddings": 64.5}},
                                  "original_max_position_embeddings"),
    "rope_scaling a string": ({"rope_scaling": "linear"}, "rope_scaling"),
    "unknown dtype": ({"torch_dtype": "int8"}, "int8"),
    "dtype not a string": ({"torch_dtype": 32}, "torch_dtype"),
    "max positions negative": ({"max_position_embeddings": -1}, "max_position_embeddings"),
    "eos outside vocab": ({"eos_token_id": 100}, "eos_token_id"),
    "eos as floats": ({"eos_token_id": [2.0]}, "eos_token_id"),
    "eos as a string": ({"eos_token_id": "2"}, "eos_token_id"),
    "bos as a string": ({"bos_token_id": "1"}, "bos_token_id"),
    "mlp_bias as a string": ({"mlp_bias": "false"}, "mlp_bias"),
    "act not a string": ({"hidden_act": ["silu"]}, "hidden_act"),
    "architectures a string": ({"architectures": "LlamaForCausalLM"}, "architectures"),
}


@pytest.mark.parametrize("case", BAD_CONFIGS)
def test_bad_config_fields_are_refused_by_name(case):
    changes, words = BAD_CONFIGS[case]
    hf = {**BASE, **changes}
    hf = {k: v for k, v in hf.items() if v is not DELETE}
    with pytest.raises(ConfigError, match=words) as e:
        hf_config.from_hf(hf)
    assert "config.json" in str(e.value)


def test_tie_false_is_still_read_as_false():
    assert hf_config.from_hf(BASE).tie_embeddings is False
    assert hf_config.from_hf({**BASE, "tie_word_embeddings": True}).tie_embeddings is True


@pytest.mark.parametrize("hf", [[BASE], "llama", None, 5])
def test_config_that_is_not_an_object(hf):
    with pytest.raises(ConfigError, match="JSON object"):
        hf_config.from_hf(hf)


@pytest.mark.parametrize("text, words", [
    ("{not json", "not valid JSON"),
    ('{"eos_token_id": NaN}', "not valid JSON"),
    ('[1, 2]', "JSON object"),
    ('{"eos_token_id": [2, 1000]}', "eos_token_id"),
    ('{"eos_token_id": "2"}', "eos_token_id"),
    ('{"eos_token_id": true}', "eos_token_id"),
])
def test_bad_generation_config_names_the_file(tmp_path, text, words):
    Path(tmp_path, "config.json").write_text(json.dumps(BASE))
    Path(tmp_path, "generation_config.json").write_text(text)
    with pytest.raises(ConfigError, match=words) as e:
        hf_config.from_folder(str(tmp_path))
    assert "generation_config.json" in str(e.value)


def test_config_json_with_nan_or_binary(tmp_path):
    Path(tmp_path, "config.json").write_text(json.dumps(BASE).replace("1e-05", "NaN"))
    with pytest.raises(ConfigError, match="not valid JSON"):
        hf_config.from_folder(str(tmp_path))
    Path(tmp_path, "config.json").write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(ConfigError, match="not valid JSON"):
        hf_config.from_folder(str(tmp_path))
