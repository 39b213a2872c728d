"""Adversarial input, walked class by class through the API and the command line.

For each bad input: the right exception class (API) or exit status 2 with one line on stderr and no
traceback (CLI, run as a real subprocess), a message naming the problem, and nothing written. The
converter's data safety is tested on real paths (symlinks, nesting, a concurrent writer) and its interrupt
handling with real signals sent to a conversion caught midway.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import math
import os
import shutil
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import momjax
import momjax.convert
from momjax import memory
from momjax.api import InputError
from momjax.checkpoint import CheckpointError, is_orbax_folder, read_safetensors_header
from momjax.config import Config, ConfigError
from momjax.convert import convert

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", ""), "JAX_PLATFORMS": "cpu"}


def tree(path) -> dict[str, int]:
    """Every file and folder under path (hidden ones too) -> size: to show that nothing was written or removed."""
    out = {}
    for root, dirs, files in os.walk(path):
        for name in dirs + files:
            p = os.path.join(root, name)
            out[os.path.relpath(p, path)] = os.lstat(p).st_size if name in files else -1
    return out


def momjax_cli(*args, cwd=None, timeout=300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "momjax.cli", *map(str, args)], cwd=cwd, env=ENV, text=True,
                          capture_output=True, timeout=timeout, check=False)


def assert_one_line_error(run: subprocess.CompletedProcess, needle: str) -> None:
    lines = run.stderr.strip().splitlines()
    assert run.returncode == 2, (run.returncode, run.stderr)
    assert "Traceback" not in run.stderr and len(lines) == 1, run.stderr
    assert lines[0].startswith("momjax: error: ") and needle in lines[0], lines[0]
    assert run.stdout == "", run.stdout


def edit_json(folder, name="config.json", **changes) -> None:
    path = Path(folder, name)
    d = json.loads(path.read_text())
    for key, value in changes.items():
        if value is _DELETE:
            d.pop(key, None)
        else:
            d[key] = value
    path.write_text(json.dumps(d))


_DELETE = object()


@pytest.fixture(scope="module")
def cli_model(tmp_path_factory) -> str:
    """A HF checkpoint with a tokenizer (the demo's, built without torch)."""
    from momjax import demo

    return demo.write_checkpoint(str(tmp_path_factory.mktemp("hardening-model")))


@pytest.fixture
def model_copy(cli_model, tmp_path) -> str:
    folder = str(tmp_path / "model")
    shutil.copytree(cli_model, folder)
    return folder


@pytest.fixture(scope="module")
def model(zoo) -> momjax.Model:
    return zoo.model("llama-gqa")


# ---------------------------------------------------------------------- config.json read strictly
BASE = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 100, "hidden_size": 64,
        "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "max_position_embeddings": 256, "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "hidden_act": "silu",
        "eos_token_id": 2, "bos_token_id": 1, "torch_dtype": "float32", "tie_word_embeddings": False}
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
    "missing required": ({"hidden_size": _DELETE}, "hidden_size"),
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
    hf = {k: v for k, v in hf.items() if v is not _DELETE}
    with pytest.raises(ConfigError, match=words) as e:
        Config.from_hf(hf)
    assert "config.json" in str(e.value)


def test_tie_false_is_still_read_as_false():
    assert Config.from_hf(BASE).tie_embeddings is False
    assert Config.from_hf({**BASE, "tie_word_embeddings": True}).tie_embeddings is True


@pytest.mark.parametrize("hf", [[BASE], "llama", None, 5])
def test_config_that_is_not_an_object(hf):
    with pytest.raises(ConfigError, match="JSON object"):
        Config.from_hf(hf)


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
        Config.from_folder(str(tmp_path))
    assert "generation_config.json" in str(e.value)


def test_config_json_with_nan_or_binary(tmp_path):
    Path(tmp_path, "config.json").write_text(json.dumps(BASE).replace("1e-05", "NaN"))
    with pytest.raises(ConfigError, match="not valid JSON"):
        Config.from_folder(str(tmp_path))
    Path(tmp_path, "config.json").write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(ConfigError, match="not valid JSON"):
        Config.from_folder(str(tmp_path))


# ---------------------------------------------------------------------- checkpoints read strictly
def _sharded(zoo, tmp_path) -> tuple[str, dict]:
    folder = str(tmp_path / "sharded")
    shutil.copytree(zoo.folder("llama-gqa"), folder)
    index = json.loads(Path(folder, "model.safetensors.index.json").read_text())
    return folder, index


def test_a_tensor_in_a_shard_the_index_does_not_assign_is_refused(zoo, tmp_path):
    folder, index = _sharded(zoo, tmp_path)
    shards = sorted(set(index["weight_map"].values()))
    name = next(n for n, s in index["weight_map"].items() if s == shards[0])
    other = os.path.join(folder, shards[-1])
    tensors = load_file(other)
    tensors[name] = np.zeros_like(load_file(os.path.join(folder, shards[0]))[name])  # a stale copy, sorted last
    save_file(tensors, other)
    with pytest.raises(CheckpointError, match="the index assigns it to") as e:
        momjax.load(folder, progress=False)
    assert name in str(e.value)


def test_a_tensor_missing_from_the_index_is_refused(zoo, tmp_path):
    folder, index = _sharded(zoo, tmp_path)
    shards = list(index["weight_map"].values())
    name = next(n for n, s in index["weight_map"].items() if shards.count(s) > 1)  # its shard is still read
    del index["weight_map"][name]
    Path(folder, "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="not in the index"):
        momjax.load(folder, progress=False)


def test_duplicate_tensors_without_an_index_are_refused(zoo, tmp_path):
    folder, _ = _sharded(zoo, tmp_path)
    os.remove(os.path.join(folder, "model.safetensors.index.json"))
    files = sorted(f for f in os.listdir(folder) if f.endswith(".safetensors"))
    first = load_file(os.path.join(folder, files[0]))
    name = next(iter(first))
    last = load_file(os.path.join(folder, files[-1]))
    last[name] = first[name]
    save_file(last, os.path.join(folder, files[-1]))
    with pytest.raises(CheckpointError, match="also in"):
        momjax.load(folder, progress=False)


@pytest.mark.parametrize("shard", ["../outside.safetensors", "/etc/passwd", "sub/../../x.safetensors", 5, ""])
def test_index_entries_outside_the_folder_are_refused(zoo, tmp_path, shard):
    folder, index = _sharded(zoo, tmp_path)
    name = next(iter(index["weight_map"]))
    index["weight_map"][name] = shard
    Path(folder, "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="outside the checkpoint folder|weight_map must map"):
        momjax.load(folder, progress=False)


def _rewrite_header(path: str, edit) -> None:
    """Rewrite a safetensors file's header JSON with edit(header) (the data bytes stay as they are)."""
    data = Path(path).read_bytes()
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + n])
    edit(header)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    Path(path).write_bytes(struct.pack("<Q", len(text)) + text + data[8 + n:])


@pytest.mark.parametrize("field, value", [
    ("data_offsets", lambda o: [str(o[0]), str(o[1])]),
    ("data_offsets", lambda o: [float(o[0]), float(o[1])]),
    ("data_offsets", lambda o: [o[0]]),
    ("data_offsets", lambda o: [True, o[1]]),
    ("shape", lambda s: [str(x) for x in s]),
    ("shape", lambda s: [-1, *s[1:]]),
    ("dtype", lambda d: 32),
])
def test_malformed_safetensors_headers(tmp_path, field, value):
    path = str(tmp_path / "model.safetensors")
    save_file({"a": np.ones((2, 3), np.float32)}, path)
    _rewrite_header(path, lambda h: h["a"].update({field: value(h["a"][field])}))
    with pytest.raises(CheckpointError, match="malformed header"):
        read_safetensors_header(path)


def test_huge_header_length_is_not_read(tmp_path):
    path = tmp_path / "model.safetensors"
    path.write_bytes(struct.pack("<Q", 2**62) + b"{}")
    with pytest.raises(CheckpointError, match="header length"):
        read_safetensors_header(str(path))


def _poison(zoo, tmp_path, value, dtype=np.float32) -> tuple[str, str]:
    folder = str(tmp_path / "poisoned")
    shutil.copytree(zoo.folder("llama31-mha"), folder)  # one file
    path = os.path.join(folder, "model.safetensors")
    tensors = load_file(path)
    name = "model.layers.1.mlp.up_proj.weight"
    tensors[name] = tensors[name].astype(dtype)
    tensors[name].flat[7] = value
    save_file(tensors, path)
    return folder, name


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_nan_or_inf_weights_are_refused_on_load_and_convert(zoo, tmp_path, value):
    folder, _ = _poison(zoo, tmp_path, value)
    for call in (lambda: momjax.load(folder, progress=False),
                 lambda: convert(folder, str(tmp_path / "out"), progress=False)):
        with pytest.raises(CheckpointError, match="NaN or inf") as e:
            call()
        assert "layers.w_up" in str(e.value) or "up_proj" in str(e.value)
    assert sorted(os.listdir(tmp_path)) == ["poisoned"]


def test_float16_overflow_is_refused_and_bfloat16_works(zoo, tmp_path):
    folder, _ = _poison(zoo, tmp_path, 1e6)
    with pytest.raises(CheckpointError, match="overflow float16"):
        momjax.load(folder, dtype="float16", progress=False)
    assert momjax.load(folder, dtype="bfloat16", progress=False).dtype == "bfloat16"
    dst = str(tmp_path / "orbax")  # a float32 conversion is fine; restoring it in float16 is refused the same way
    convert(folder, dst, progress=False)
    with pytest.raises(CheckpointError, match="overflow float16"):
        momjax.load(dst, dtype="float16")
    assert momjax.load(dst, dtype="bfloat16").dtype == "bfloat16"


def test_pinned_host_weights_are_refused_at_load(zoo):
    with pytest.raises(InputError, match="pinned_host"):
        momjax.load(zoo.folder("llama-gqa"), memory_kind="pinned_host")
    for bad in ("host", None, 1):
        with pytest.raises(InputError, match="memory_kind"):
            momjax.load(zoo.folder("llama-gqa"), memory_kind=bad)


@pytest.mark.parametrize("kwargs, words", [
    ({"path": None}, "path"), ({"path": 5}, "path"), ({"dtype": "int8"}, "dtype"), ({"progress": "no"}, "progress"),
])
def test_bad_load_arguments(zoo, kwargs, words):
    kwargs = {"path": zoo.folder("llama-gqa"), **kwargs}
    with pytest.raises(InputError, match=words):
        momjax.load(**kwargs)


# ---------------------------------------------------------------------- API inputs
PROMPT = [[1, 5, 9, 4]]
BAD_CALLS = {  # name -> (keyword arguments of generate, words)
    "temperature nan": ({"temperature": float("nan")}, "temperature"),
    "temperature inf": ({"temperature": float("inf")}, "temperature"),
    "temperature string": ({"temperature": "0.5"}, "temperature"),
    "temperature bool": ({"temperature": True}, "temperature"),
    "top_k float": ({"top_k": 2.7}, "top_k"),
    "top_k integral float": ({"top_k": 3.0}, "top_k"),
    "top_k bool": ({"top_k": True}, "top_k"),
    "top_k string": ({"top_k": "5"}, "top_k"),
    "top_p nan": ({"top_p": float("nan")}, "top_p"),
    "top_p string": ({"top_p": "0.9"}, "top_p"),
    "seed float": ({"seed": 1.5}, "seed"),
    "seed huge": ({"seed": 2**70}, "seed"),
    "seed string": ({"seed": "1"}, "seed"),
    "seed bool": ({"seed": True}, "seed"),
    "stop_tokens int": ({"stop_tokens": 5}, "stop_tokens"),
    "stop_tokens string": ({"stop_tokens": "2"}, "stop_tokens"),
    "stop_tokens floats": ({"stop_tokens": [2.0]}, "stop_tokens"),
    "stop_tokens bools": ({"stop_tokens": [True]}, "stop_tokens"),
    "stop_tokens huge": ({"stop_tokens": [2**70]}, "stop_tokens"),
    "tokens None": ({"tokens": None}, "tokens"),
    "tokens int": ({"tokens": 5}, "tokens"),
    "tokens string": ({"tokens": "hello"}, "tokenize"),
    "tokens bools": ({"tokens": [[True, False]]}, "tokens"),
    "tokens flat bools": ({"tokens": [True, False]}, "tokens"),
    "tokens bool array": ({"tokens": np.array([[True, False]])}, "tokens"),
    "tokens floats": ({"tokens": [[1.0, 2.0]]}, "tokens"),
    "tokens nested": ({"tokens": [[1, [2]]]}, "tokens"),
    "tokens a set": ({"tokens": {1, 2}}, "tokens"),
    "tokens a dict": ({"tokens": {"input_ids": [1, 2]}}, "tokens"),
    "tokens huge id": ({"tokens": [[1, 2**70]]}, "vocabulary"),
    "max_new_tokens bool": ({"max_new_tokens": True}, "max_new_tokens"),
    "max_new_tokens float": ({"max_new_tokens": 2.0}, "max_new_tokens"),
    "max_new_tokens numpy zero": ({"max_new_tokens": np.int64(0)}, "max_new_tokens"),
    "on_layer not callable": ({"on_layer": 5}, "on_layer"),
    "policy a list": ({"policy": ["mom"]}, "policy"),
    "policy None": ({"policy": None}, "policy"),
    "model a path": ({"model": "some/folder"}, "momjax.Model"),
}


@pytest.mark.parametrize("case", BAD_CALLS)
def test_bad_generate_arguments_raise_input_error(model, case):
    kwargs, words = BAD_CALLS[case]
    kwargs = {"model": model, "tokens": PROMPT, "max_new_tokens": 2, **kwargs}
    with pytest.raises(InputError, match=words):
        momjax.generate(**kwargs)


@pytest.mark.parametrize("call", ["forward", "prefill"])
@pytest.mark.parametrize("tokens", [None, 5, [[True]], "hi"])
def test_bad_tokens_in_forward_and_prefill(model, call, tokens):
    with pytest.raises(InputError, match="tokens"):
        getattr(momjax, call)(model, tokens)


def test_bad_max_context_is_an_input_error(model):
    import dataclasses

    for bad in (-5, 2.5, "8"):  # 0 and None mean the config's max_position_embeddings
        with pytest.raises(InputError, match="max_context"):
            momjax.forward(dataclasses.replace(model, max_context=bad), PROMPT)


def test_top_k_beyond_the_vocabulary_means_no_top_k(model):
    run = lambda top_k: momjax.generate(model, PROMPT, 3, temperature=1.0, top_k=top_k, seed=3, stop_tokens=[])
    np.testing.assert_array_equal(run(np.int64(10**12)).tokens, run(None).tokens)


def test_token_forms_with_numpy_and_jax_scalars_agree(model):
    import jax.numpy as jnp

    ids = [1, 5, 9, 4]
    expected = momjax.forward(model, [ids])
    for form in ([np.int64(t) for t in ids], [jnp.int32(t) for t in ids], [jnp.asarray(ids)], [np.asarray(ids)],
                 (tuple(ids),), jnp.asarray([ids])):
        np.testing.assert_array_equal(momjax.forward(model, form), expected)
    for bad in ([jnp.asarray([1.0, 2.0])], [np.ones((2, 2), int)], [jnp.asarray([True])], [np.float32(1.0)]):
        with pytest.raises(InputError, match="token ids"):
            momjax.forward(model, bad)


def test_numpy_scalars_are_accepted(model):
    a = momjax.generate(model, PROMPT, 3, temperature=np.float32(0.7), top_k=np.int32(5), top_p=np.float64(0.9),
                        seed=np.int64(4), stop_tokens=np.array([2]))
    b = momjax.generate(model, PROMPT, 3, temperature=0.7, top_k=5, top_p=0.9, seed=4, stop_tokens=[2])
    np.testing.assert_array_equal(a.tokens, b.tokens)


def test_a_request_that_cannot_fit_is_refused_before_allocating(model):
    import dataclasses

    huge = dataclasses.replace(model, max_context=10**12)
    t0 = time.perf_counter()
    with pytest.raises(InputError, match="cannot fit") as e:
        momjax.generate(huge, PROMPT, 10**10)
    assert time.perf_counter() - t0 < 5  # refused from the closed-form estimate, nothing allocated or compiled
    assert "GiB" in str(e.value) or "TiB" in str(e.value)


@pytest.mark.parametrize("call, words", [
    (lambda: memory.memory_report("llama-3.2-1b", -1), "seq_len"),
    (lambda: memory.memory_report("llama-3.2-1b", 1024, batch=0), "batch"),
    (lambda: memory.memory_report("llama-3.2-1b", 1024, dtype="int8"), "dtype"),
    (lambda: memory.memory_report("llama-3.2-1b", 1024, phase="train"), "phase"),
    (lambda: memory.plan("llama-3.1-8b", "80GiB", dtype="int8"), "dtype"),
    (lambda: memory.plan("llama-3.1-8b", -5), "hbm_bytes"),
    (lambda: memory.plan("llama-3.1-8b", float("nan")), "hbm_bytes"),
    (lambda: memory.plan("llama-3.1-8b", "80GiB", -1), "host_bytes"),
    (lambda: memory.plan("llama-3.1-8b", "80GiB", new_tokens=0), "new_tokens"),
])
def test_memory_arguments(call, words):
    with pytest.raises(InputError, match=words):
        call()


# ---------------------------------------------------------------------- CLI: a real process, exit 2, one line
CLI_CASES = {  # name -> (arguments, words in the one line), "{m}" is a copy of a checkpoint with a tokenizer
    "top-k in scientific notation": (["generate", "--model", "{m}", "--prompt", "hi", "--top-k", "1e12"], "--top-k"),
    "seed beyond 64 bits": (["generate", "--model", "{m}", "--prompt", "hi", "--seed", str(2**70)], "--seed"),
    "temperature nan": (["generate", "--model", "{m}", "--prompt", "hi", "--temperature", "nan"], "--temperature"),
    "top-p inf": (["generate", "--model", "{m}", "--prompt", "hi", "--top-p", "inf"], "--top-p"),
    "cannot fit in memory": (["generate", "--model", "{m}", "--prompt", "hi", "--max-new-tokens", "100000000",
                              "--allow-long-context"], "cannot fit"),
    "compile cache is a file": (["generate", "--model", "{m}", "--prompt", "hi", "--compile-cache", "{m}/config.json"],
                                "compile cache"),
    "convert compile cache is a file": (["--compile-cache", "{m}/config.json", "convert", "{m}", "{m}-out"],
                                        "compile cache"),
    "string offsets in a header": (["convert", "{m}", "{m}-out", "--quiet"], "malformed header"),
    "tie as a string": (["generate", "--model", "{m}", "--prompt", "hi"], "tie_word_embeddings"),
    "bad generation config": (["generate", "--model", "{m}", "--prompt", "hi"], "generation_config.json"),
    "plan negative size": (["plan", "--model", "llama-3.1-8b", "--hbm=-5GB"], "size"),
    "plan negative hidden size": (["plan", "--model", "{m}", "--hbm", "8GiB"], "hidden_size"),
}
CLI_SETUP = {
    "string offsets in a header": lambda m: _rewrite_header(
        os.path.join(m, "model.safetensors"),
        lambda h: h[next(k for k in h if k != "__metadata__")].update(data_offsets=["0", "8"])),
    "tie as a string": lambda m: edit_json(m, tie_word_embeddings="false"),
    "bad generation config": lambda m: Path(m, "generation_config.json").write_text('{"eos_token_id": [1, 99999]}'),
    "plan negative hidden size": lambda m: edit_json(m, hidden_size=-64),
}


@pytest.mark.parametrize("case", CLI_CASES)
def test_cli_bad_input_is_one_line_exit_2_and_writes_nothing(model_copy, tmp_path, case):
    CLI_SETUP.get(case, lambda m: None)(model_copy)
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    before = tree(tmp_path)
    args, words = CLI_CASES[case]
    run = momjax_cli(*[a.format(m=model_copy) for a in args], cwd=cwd)
    assert_one_line_error(run, words)
    assert tree(tmp_path) == before


# ---------------------------------------------------------------------- convert: never destroy, never half-write
@pytest.fixture
def src(zoo, tmp_path) -> str:
    folder = str(tmp_path / "src")
    shutil.copytree(zoo.folder("llama31-mha"), folder)
    return folder


def test_dst_reaching_src_through_a_symlink_is_refused_even_with_force(src, tmp_path, capsys):
    before = tree(tmp_path)
    os.symlink(src, tmp_path / "link")
    for dst in (tmp_path / "link", src, Path(src) / ".", tmp_path, Path(src) / "sub", tmp_path / "link" / "sub"):
        for flags in ([], ["--force"], ["--force", "--replace-any-folder"]):
            assert momjax.convert.main([src, str(dst), "--quiet", *flags]) == 2, (dst, flags)
            err = capsys.readouterr().err
            assert err.count("\n") == 1 and "source folder" in err, err
    os.remove(tmp_path / "link")
    assert tree(tmp_path) == before


def test_dst_reaching_src_through_a_bind_or_parent_symlink(src, tmp_path, capsys):
    os.symlink(tmp_path, tmp_path.parent / f"{tmp_path.name}-alias")
    alias = tmp_path.parent / f"{tmp_path.name}-alias"
    try:
        assert momjax.convert.main([src, str(alias / "src"), "--quiet", "--force"]) == 2
        assert momjax.convert.main([str(alias / "src"), str(tmp_path), "--quiet", "--force"]) == 2
        assert "source folder" in capsys.readouterr().err
    finally:
        os.remove(alias)
    assert Config.from_folder(src).num_layers == 3


def test_force_replaces_only_a_previous_momjax_output(src, tmp_path, capsys):
    mine = tmp_path / "photos"
    mine.mkdir()
    (mine / "holiday.jpg").write_bytes(b"\xff\xd8 precious")
    assert momjax.convert.main([src, str(mine), "--quiet", "--force"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "not a momjax conversion" in err and "--replace-any-folder" in err
    assert (mine / "holiday.jpg").read_bytes() == b"\xff\xd8 precious"

    out = tmp_path / "out"  # a previous conversion is replaced with --force
    assert momjax.convert.main([src, str(out), "--quiet"]) == 0
    assert momjax.convert.main([src, str(out), "--quiet", "--force"]) == 0
    (out / "notes.txt").write_text("mine")  # ... but not once the user put files of their own in it
    assert momjax.convert.main([src, str(out), "--quiet", "--force"]) == 2
    assert "notes.txt" in capsys.readouterr().err and (out / "notes.txt").exists()

    a_file = tmp_path / "file.bin"
    a_file.write_bytes(b"data")
    assert momjax.convert.main([src, str(a_file), "--quiet", "--force"]) == 2
    assert a_file.read_bytes() == b"data"
    assert momjax.convert.main([src, str(out), "--quiet", "--replace-any-folder"]) == 2  # needs --force too
    capsys.readouterr()

    assert momjax.convert.main([src, str(mine), "--quiet", "--force", "--replace-any-folder"]) == 0
    assert is_orbax_folder(str(mine)) and not (mine / "holiday.jpg").exists()
    assert sorted(f for f in os.listdir(tmp_path) if f.startswith(".")) == []


def test_dst_appearing_during_the_conversion_is_left_alone(src, tmp_path, monkeypatch):
    dst = tmp_path / "out"
    real = momjax.convert.write_orbax

    def racing(folder, cfg, leaves):  # another process creates DST while this one converts
        real(folder, cfg, leaves)
        dst.mkdir()
        (dst / "theirs.txt").write_text("first")

    monkeypatch.setattr(momjax.convert, "write_orbax", racing)
    with pytest.raises(CheckpointError, match="appeared while converting"):
        convert(src, str(dst), progress=False)
    assert os.listdir(dst) == ["theirs.txt"]
    assert sorted(os.listdir(tmp_path)) == ["out", "src"]

    shutil.rmtree(dst)  # an empty folder appearing is not replaced either
    monkeypatch.setattr(momjax.convert, "write_orbax", lambda f, c, leaves: (real(f, c, leaves), dst.mkdir()))
    with pytest.raises(CheckpointError, match="appeared while converting"):
        convert(src, str(dst), progress=False)
    assert os.listdir(dst) == []


def test_a_running_conversion_to_the_same_dst_is_not_disturbed(src, tmp_path):
    partial = tmp_path / f".out{momjax.convert.PARTIAL}999999"
    partial.mkdir()
    (partial / "leaf").write_text("being written")
    fd = os.open(str(partial) + ".lock", os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)  # held, as by a live conversion
    try:
        with pytest.raises(CheckpointError, match="another conversion"):
            convert(src, str(tmp_path / "out"), progress=False)
        assert (partial / "leaf").read_text() == "being written"
    finally:
        os.close(fd)
    convert(src, str(tmp_path / "out"), progress=False)  # the lock is free now: a killed run's leftover
    assert sorted(os.listdir(tmp_path)) == ["out", "src"]


def test_read_only_destination(src, tmp_path, monkeypatch, capsys):
    real = os.mkdir

    def read_only(path, *args, **kwargs):
        if str(tmp_path) in os.fspath(path):
            raise OSError(30, "Read-only file system", path)
        return real(path, *args, **kwargs)

    monkeypatch.setattr(os, "mkdir", read_only)
    before = tree(tmp_path)
    assert momjax.convert.main([src, str(tmp_path / "out"), "--quiet"]) == 2
    assert momjax.convert.main([src, str(tmp_path / "new" / "deeper" / "out"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 2 and err.count("Read-only file system") == 2, err
    assert tree(tmp_path) == before


def test_full_disk_leaves_nothing(big, tmp_path):
    limit = 1 << 20  # bytes per file: a large chunk Orbax writes fails (EFBIG, as a full disk would)
    code = (f"import resource, runpy, sys; resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, {limit})); "
            f"sys.argv = ['momjax', 'convert', {big!r}, {str(tmp_path / 'out')!r}, '--quiet']; "
            "runpy.run_module('momjax.cli', run_name='__main__')")
    run = subprocess.run([sys.executable, "-c", code], env=ENV, text=True, capture_output=True, timeout=300, check=False)
    assert_one_line_error(run, "cannot write")
    assert "File too large" in run.stderr
    assert os.listdir(tmp_path) == []


def test_tokenizer_symlinks_out_of_src_are_not_copied(src, tmp_path, capsys):
    secret = tmp_path / "secret.txt"
    secret.write_text("not for sharing")
    os.symlink(secret, os.path.join(src, "tokenizer.json"))
    Path(src, "vocab.txt").write_text("a\nb\n")
    os.symlink(os.path.join(src, "vocab.txt"), os.path.join(src, "merges.txt"))  # inside SRC: fine
    dst = tmp_path / "out"
    assert momjax.convert.main([src, str(dst), "--quiet"]) == 0
    assert not (dst / "tokenizer.json").exists()
    assert (dst / "merges.txt").read_text() == "a\nb\n" and not (dst / "merges.txt").is_symlink()
    assert "tokenizer.json" in capsys.readouterr().err


def test_hub_cache_snapshot_links_are_copied(src, tmp_path):
    repo = tmp_path / "models--org--tiny"
    (repo / "blobs").mkdir(parents=True)
    snapshot = repo / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    for name in os.listdir(src):
        shutil.copy(os.path.join(src, name), repo / "blobs" / f"blob-{name}")
        os.symlink(f"../../blobs/blob-{name}", snapshot / name)
    Path(repo / "blobs" / "blob-tok").write_text("{}")
    os.symlink("../../blobs/blob-tok", snapshot / "tokenizer.json")
    convert(str(snapshot), str(tmp_path / "out"), progress=False)
    assert Path(tmp_path / "out" / "tokenizer.json").read_text() == "{}"


@pytest.mark.parametrize("kwargs, words", [
    ({"force": "yes"}, "force"), ({"dtype": "int8"}, "dtype"), ({"replace_any": True}, "force"),
    ({"dst": None}, "DST"), ({"dst": ""}, "DST"),
])
def test_bad_convert_arguments(src, tmp_path, kwargs, words):
    kwargs = {"src": src, "dst": str(tmp_path / "out"), "progress": False, **kwargs}
    with pytest.raises(CheckpointError, match=words):
        convert(**kwargs)
    assert sorted(os.listdir(tmp_path)) == ["src"]


# ---------------------------------------------------------------------- convert under real signals
@pytest.fixture(scope="module")
def big(tmp_path_factory) -> str:
    """A random 32-layer float32 checkpoint of ~100 MB: a conversion takes long enough to be caught midway."""
    folder = tmp_path_factory.mktemp("big")
    L, V, D, F, H, K, E = 32, 512, 256, 768, 8, 4, 32
    cfg = {**BASE, "vocab_size": V, "hidden_size": D, "intermediate_size": F, "num_hidden_layers": L,
           "num_attention_heads": H, "num_key_value_heads": K}
    Path(folder, "config.json").write_text(json.dumps(cfg))
    shapes = {"model.embed_tokens.weight": (V, D), "model.norm.weight": (D,), "lm_head.weight": (V, D)}
    for i in range(L):
        p = f"model.layers.{i}."
        shapes.update({p + "input_layernorm.weight": (D,), p + "post_attention_layernorm.weight": (D,),
                       p + "self_attn.q_proj.weight": (H * E, D), p + "self_attn.k_proj.weight": (K * E, D),
                       p + "self_attn.v_proj.weight": (K * E, D), p + "self_attn.o_proj.weight": (D, H * E),
                       p + "mlp.gate_proj.weight": (F, D), p + "mlp.up_proj.weight": (F, D),
                       p + "mlp.down_proj.weight": (D, F)})
    rng = np.random.default_rng(0)
    save_file({n: rng.standard_normal(s, np.float32) * 0.02 for n, s in shapes.items()},
              str(folder / "model.safetensors"))
    return str(folder)


def _convert_until_midway(src: str, parent: Path, leaves: int) -> subprocess.Popen:
    """Start a conversion of src into parent/out and return once `leaves` of its leaves are being written."""
    proc = subprocess.Popen([sys.executable, "-m", "momjax.cli", "convert", src, str(parent / "out"), "--quiet"],
                            env=ENV, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        partial = [p for p in parent.glob(".out.momjax-partial-*") if p.is_dir()]
        with contextlib.suppress(OSError):  # the folder may vanish between the glob and the listing
            if partial and len(os.listdir(partial[0] / "params")) >= leaves:
                break
        time.sleep(0.002)
    assert proc.poll() is None, "the conversion finished before it could be interrupted; make `big` larger"
    return proc


@pytest.mark.parametrize("sig, leaves", [(signal.SIGINT, 1), (signal.SIGTERM, 1), (signal.SIGINT, 5),
                                         (signal.SIGTERM, 8)])
def test_signals_mid_conversion_leave_nothing_and_print_one_line(big, tmp_path, sig, leaves):
    proc = _convert_until_midway(big, tmp_path, leaves)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + sig, (proc.returncode, err)
    assert err.count("\n") == 1 and err.startswith("momjax: interrupted") and sig.name in err, err
    assert "Traceback" not in err and out == ""
    time.sleep(0.2)  # any writer thread that survived would show up now
    assert os.listdir(tmp_path) == [], os.listdir(tmp_path)


def test_a_killed_conversion_is_cleaned_up_by_the_next_one(big, tmp_path):
    proc = _convert_until_midway(big, tmp_path, 2)
    proc.kill()
    proc.communicate(timeout=60)
    left = sorted(os.listdir(tmp_path))
    assert len(left) == 2 and all(momjax.convert.PARTIAL in n for n in left), left  # the folder and its lock
    run = momjax_cli("convert", big, tmp_path / "out", "--quiet")
    assert run.returncode == 0, run.stderr
    assert "removed" in run.stderr and "interrupted conversion" in run.stderr
    assert os.listdir(tmp_path) == ["out"] and is_orbax_folder(str(tmp_path / "out"))
    assert math.isclose(Config.from_folder(big).num_layers, 32)


def test_two_conversions_to_one_dst_at_once_one_wins(big, tmp_path):
    cmd = [sys.executable, "-m", "momjax.cli", "convert", big, str(tmp_path / "out"), "--quiet"]
    procs = [subprocess.Popen(cmd, env=ENV, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for _ in range(2)]
    results = sorted((p.wait(timeout=300), p.stdout.read(), p.stderr.read()) for p in procs)
    for p in procs:
        p.stdout.close()
        p.stderr.close()
    (ok, out, _), (refused, _, err) = results
    assert ok == 0 and out.startswith("wrote"), results
    assert refused == 2 and err.count("\n") == 1 and "Traceback" not in err, results
    assert "another conversion" in err or "appeared while converting" in err, err
    assert os.listdir(tmp_path) == ["out"] and is_orbax_folder(str(tmp_path / "out"))
