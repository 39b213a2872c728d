"""Hugging Face safetensors weights (momjax.hf.tensors).

Loaded params are compared bit for bit against transformers' state_dict, transformed here independently
of the loader's name table; broken checkpoints must fail with one CheckpointError that names everything
wrong.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
from pathlib import Path

import jax
import ml_dtypes
import numpy as np
import pytest
from cli_helpers import (
    rewrite_header,
)
from conftest import FAMILY_NAMES, SHARDED, load_hf_params, load_orbax
from safetensors.numpy import load_file, save_file

import momjax
import momjax.cli
import momjax.convert
from momjax.config import Config
from momjax.convert import convert
from momjax.errors import CheckpointError
from momjax.hf import config as hf_config
from momjax.hf.tensors import read_safetensors_header
from momjax.params import flatten


def expected_params(hf_model, cfg: Config) -> dict[str, np.ndarray]:
    """Our flat params from a transformers state_dict, written out by hand (transpose, then reshape)."""
    sd = {k: v.detach().float().numpy() for k, v in hf_model.state_dict().items()}
    D, H, K, E = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim

    def stack(name, fn=lambda x: x):
        return np.stack([fn(sd[f"model.layers.{i}.{name}"]) for i in range(cfg.num_layers)])

    flat = {
        "embed": sd["model.embed_tokens.weight"],
        "final_norm": sd["model.norm.weight"],
        "layers.attn_norm": stack("input_layernorm.weight"),
        "layers.mlp_norm": stack("post_attention_layernorm.weight"),
        "layers.wq": stack("self_attn.q_proj.weight", lambda w: w.T.reshape(D, H, E)),
        "layers.wk": stack("self_attn.k_proj.weight", lambda w: w.T.reshape(D, K, E)),
        "layers.wv": stack("self_attn.v_proj.weight", lambda w: w.T.reshape(D, K, E)),
        "layers.wo": stack("self_attn.o_proj.weight", lambda w: w.T.reshape(H, E, D)),
        "layers.w_gate": stack("mlp.gate_proj.weight", lambda w: w.T),
        "layers.w_up": stack("mlp.up_proj.weight", lambda w: w.T),
        "layers.w_down": stack("mlp.down_proj.weight", lambda w: w.T),
    }
    if cfg.qkv_bias:
        flat["layers.bq"] = stack("self_attn.q_proj.bias", lambda b: b.reshape(H, E))
        flat["layers.bk"] = stack("self_attn.k_proj.bias", lambda b: b.reshape(K, E))
        flat["layers.bv"] = stack("self_attn.v_proj.bias", lambda b: b.reshape(K, E))
    if not cfg.tie_embeddings:
        flat["lm_head"] = sd["lm_head.weight"].T
    return flat


def assert_bitwise(params, expected: dict, dtype) -> None:
    flat = flatten(params)
    assert sorted(flat) == sorted(expected)
    for name, x in flat.items():
        assert x.dtype == np.dtype(dtype), name
        want = np.ascontiguousarray(np.asarray(expected[name]).astype(dtype))
        assert x.shape == want.shape, name
        np.testing.assert_array_equal(np.asarray(x).view(np.uint8), want.view(np.uint8), err_msg=name)


def load(folder, dtype=None, memory_kind="device"):
    return load_hf_params(folder, hf_config.from_folder(folder), dtype=dtype, memory_kind=memory_kind, progress=False)


def editable_copy(zoo, family, tmp_path) -> tuple[str, dict[str, np.ndarray]]:
    """A private copy of a family's single-file float32 checkpoint and its tensors, to break on purpose."""
    folder = str(tmp_path / "ckpt")
    shutil.copytree(zoo.folder(family), folder)
    tensors = {}
    for f in os.listdir(folder):
        if f.endswith(".safetensors"):
            tensors.update(load_file(os.path.join(folder, f)))
            os.remove(os.path.join(folder, f))
    if os.path.exists(os.path.join(folder, "model.safetensors.index.json")):
        os.remove(os.path.join(folder, "model.safetensors.index.json"))
    return folder, tensors


# ---------------------------------------------------------------------- loading HF checkpoints
@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_every_family_loads_bit_exact(zoo, family):
    folder = zoo.folder(family)
    cfg = hf_config.from_folder(folder)
    assert_bitwise(load(folder), expected_params(zoo.hf(family), cfg), np.float32)


def test_blockwise_reads_are_exact(zoo, monkeypatch):
    # Tiny reads: every tensor is read and transposed in many row blocks, with reads split mid-row too.
    import momjax.hf.tensors

    monkeypatch.setattr(momjax.hf.tensors, "_READ_BYTES", 100)
    for checkpoint_dtype, dtype in (("float32", None), ("bfloat16", "float32")):
        folder = zoo.folder("qwen2", checkpoint_dtype)
        cfg = hf_config.from_folder(folder)
        expected = expected_params(zoo.hf("qwen2"), cfg)
        if checkpoint_dtype == "bfloat16":
            expected = {k: v.astype(ml_dtypes.bfloat16) for k, v in expected.items()}
        assert_bitwise(load(folder, dtype), expected, np.float32)


def test_sharded_checkpoint_loads_like_single_file(zoo, tmp_path):
    family = next(iter(SHARDED))
    sharded = zoo.folder(family)
    index = json.loads(Path(sharded, "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    single, tensors = editable_copy(zoo, family, tmp_path)
    save_file(tensors, os.path.join(single, "model.safetensors"), metadata={"format": "pt"})
    a, b = flatten(load(sharded)), flatten(load(single))
    for name in a:
        np.testing.assert_array_equal(np.asarray(a[name]), np.asarray(b[name]), err_msg=name)


@pytest.mark.parametrize("family", ["llama-gqa", "qwen2"])
def test_bfloat16_checkpoint(zoo, family):
    folder = zoo.folder(family, "bfloat16")
    cfg = hf_config.from_folder(folder)
    assert cfg.dtype == "bfloat16"
    bf16 = {k: v.astype(ml_dtypes.bfloat16) for k, v in expected_params(zoo.hf(family), cfg).items()}
    assert_bitwise(load(folder), bf16, ml_dtypes.bfloat16)  # dtype None = the checkpoint's
    assert_bitwise(load(folder, "float32"), bf16, np.float32)  # exact upcast


def test_pinned_host_load(zoo):
    params = load(zoo.folder("llama-gqa"), memory_kind="pinned_host")
    assert {x.sharding.memory_kind for x in jax.tree.leaves(params)} == {"pinned_host"}


def test_ignores_rotary_buffers_and_a_tied_lm_head(zoo, tmp_path):
    folder, tensors = editable_copy(zoo, "qwen2", tmp_path)  # tied embeddings
    cfg = hf_config.from_folder(folder)
    assert cfg.tie_embeddings
    tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"]
    tensors["model.layers.0.self_attn.rotary_emb.inv_freq"] = np.ones(cfg.head_dim // 2, np.float32)
    save_file(tensors, os.path.join(folder, "model.safetensors"))
    assert_bitwise(load(folder), expected_params(zoo.hf("qwen2"), cfg), np.float32)


def test_every_mismatch_is_reported_in_one_error(zoo, tmp_path):
    folder, tensors = editable_copy(zoo, "llama-gqa", tmp_path)
    del tensors["model.layers.1.mlp.up_proj.weight"], tensors["lm_head.weight"]
    tensors["model.layers.0.mlp.extra.weight"] = np.zeros((4, 4), np.float32)
    tensors["model.layers.5.input_layernorm.weight"] = np.zeros(64, np.float32)
    tensors["model.norm.weight"] = np.zeros(65, np.float32)
    tensors["model.layers.0.self_attn.k_proj.weight"] = np.zeros((64, 64), np.float32)
    tensors["model.layers.1.self_attn.v_proj.weight"] = np.zeros((32, 64), np.int8)
    save_file(tensors, os.path.join(folder, "model.safetensors"))
    with pytest.raises(CheckpointError) as e:
        load(folder)
    msg = str(e.value)
    for name in ("model.layers.1.mlp.up_proj.weight", "lm_head.weight", "model.layers.0.mlp.extra.weight",
                 "model.layers.5.input_layernorm.weight", "model.norm.weight [65] (expected [64])",
                 "model.layers.0.self_attn.k_proj.weight [64, 64] (expected [32, 64])",
                 "model.layers.1.self_attn.v_proj.weight I8"):
        assert name in msg
    assert "2 missing" in msg and "2 unexpected" in msg and "2 misshapen" in msg


def test_truncated_and_corrupt_files(zoo, tmp_path):
    folder, tensors = editable_copy(zoo, "llama-gqa", tmp_path)
    path = os.path.join(folder, "model.safetensors")
    save_file(tensors, path)
    data = Path(path).read_bytes()
    cases = {
        "truncated": data[: len(data) // 2],
        "too short": data[:5],
        "header past the end": (10**9).to_bytes(8, "little") + data[8:100],
        "bad JSON": data[:8] + b"\xff" * (len(data) - 8),
    }
    for why, broken in cases.items():
        Path(path).write_bytes(broken)
        with pytest.raises(CheckpointError, match="model.safetensors") as e:
            load(folder)
        assert "download it again" in str(e.value), why


def test_missing_shard(zoo, tmp_path):
    folder = str(tmp_path / "ckpt")
    shutil.copytree(zoo.folder(next(iter(SHARDED))), folder)
    shard = max(f for f in os.listdir(folder) if f.endswith(".safetensors"))
    os.remove(os.path.join(folder, shard))
    with pytest.raises(CheckpointError, match=shard):
        load(folder)


def test_pickle_only_folder_is_refused(zoo, tmp_path):
    folder = tmp_path / "bin"
    folder.mkdir()
    shutil.copy(os.path.join(zoo.folder("llama-gqa"), "config.json"), folder)
    (folder / "pytorch_model.bin").write_bytes(b"not really a pickle, and never opened")
    with pytest.raises(CheckpointError) as e:
        load(str(folder))
    assert "never loads pickles" in str(e.value) and "safe_serialization=True" in str(e.value)


def test_not_a_folder(zoo, tmp_path):
    cfg = hf_config.from_folder(zoo.folder("llama-gqa"))
    for path in (tmp_path / "nothing-here", os.path.join(zoo.folder("llama-gqa"), "config.json")):
        with pytest.raises(CheckpointError, match="is not a folder"):
            load_hf_params(str(path), cfg, progress=False)
        with pytest.raises(CheckpointError, match="is not a folder"):
            load_orbax(str(path))


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
    rewrite_header(path, lambda h: h["a"].update({field: value(h["a"][field])}))
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
