"""The safetensors loader and Orbax save/restore (momjax/checkpoint.py).

Loaded params are compared bit for bit against transformers' state_dict, transformed here independently
of the loader's name table; broken checkpoints must fail with one CheckpointError that names everything
wrong; Orbax round trips must be exact in every dtype and land in the requested memory kind.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import jax
import ml_dtypes
import numpy as np
import pytest
import torch
from conftest import FAMILY_NAMES, SHARDED
from safetensors.numpy import load_file, save_file

from momjax.checkpoint import CheckpointError, is_orbax_folder, load_hf_params, load_orbax, save_orbax
from momjax.config import Config
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
    return load_hf_params(folder, Config.from_folder(folder), dtype=dtype, memory_kind=memory_kind, progress=False)


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
    cfg = Config.from_folder(folder)
    assert_bitwise(load(folder), expected_params(zoo.hf(family), cfg), np.float32)


def test_blockwise_reads_are_exact(zoo, monkeypatch):
    # Tiny reads: every tensor is read and transposed in many row blocks, with reads split mid-row too.
    import momjax.checkpoint

    monkeypatch.setattr(momjax.checkpoint, "_READ_BYTES", 100)
    for checkpoint_dtype, dtype in (("float32", None), ("bfloat16", "float32")):
        folder = zoo.folder("qwen2", checkpoint_dtype)
        cfg = Config.from_folder(folder)
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
    cfg = Config.from_folder(folder)
    assert cfg.dtype == "bfloat16"
    bf16 = {k: v.astype(ml_dtypes.bfloat16) for k, v in expected_params(zoo.hf(family), cfg).items()}
    assert_bitwise(load(folder), bf16, ml_dtypes.bfloat16)  # dtype None = the checkpoint's
    assert_bitwise(load(folder, "float32"), bf16, np.float32)  # exact upcast


def test_pinned_host_load(zoo):
    params = load(zoo.folder("llama-gqa"), memory_kind="pinned_host")
    assert {x.sharding.memory_kind for x in jax.tree.leaves(params)} == {"pinned_host"}


def test_ignores_rotary_buffers_and_a_tied_lm_head(zoo, tmp_path):
    folder, tensors = editable_copy(zoo, "qwen2", tmp_path)  # tied embeddings
    cfg = Config.from_folder(folder)
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
    cfg = Config.from_folder(zoo.folder("llama-gqa"))
    for path in (tmp_path / "nothing-here", os.path.join(zoo.folder("llama-gqa"), "config.json")):
        with pytest.raises(CheckpointError, match="is not a folder"):
            load_hf_params(str(path), cfg, progress=False)
        with pytest.raises(CheckpointError, match="is not a folder"):
            load_orbax(str(path))


# ---------------------------------------------------------------------- Orbax
@pytest.mark.parametrize(("stored", "restored"), [("float32", "float32"), ("bfloat16", "float32"),
                                                  ("float32", "bfloat16"), ("bfloat16", None)])
def test_orbax_round_trip_is_exact(zoo, tmp_path, stored, restored):
    folder = zoo.folder("qwen2")
    cfg = Config.from_folder(folder)
    params = load(folder, stored)
    dst = str(tmp_path / "orbax")
    save_orbax(params, cfg, dst)
    assert is_orbax_folder(dst) and not is_orbax_folder(folder)
    cfg2, params2 = load_orbax(dst, dtype=restored)
    assert cfg2 == cfg.replace(dtype=stored)
    expected = {k: np.asarray(v) for k, v in flatten(params).items()}
    assert_bitwise(params2, expected, restored or stored)


def test_orbax_pinned_host_restore(zoo, tmp_path):
    folder = zoo.folder("llama-gqa")
    dst = str(tmp_path / "orbax")
    save_orbax(load(folder, memory_kind="pinned_host"), Config.from_folder(folder), dst)  # saved from host memory
    _, params = load_orbax(dst, memory_kind="pinned_host")
    assert {x.sharding.memory_kind for x in jax.tree.leaves(params)} == {"pinned_host"}
    _, params = load_orbax(dst, dtype="bfloat16", memory_kind="device")
    assert {x.sharding.memory_kind for x in jax.tree.leaves(params)} == {"device"}


def test_orbax_save_refuses_existing_and_incomplete_folders_fail_clearly(zoo, tmp_path):
    folder = zoo.folder("llama-gqa")
    cfg, params = Config.from_folder(folder), load(folder)
    dst = str(tmp_path / "orbax")
    save_orbax(params, cfg, dst)
    with pytest.raises(CheckpointError, match="already exists"):
        save_orbax(params, cfg, dst)
    save_orbax(jax.tree.map(lambda x: x * 2, params), cfg, dst, force=True)
    np.testing.assert_array_equal(np.asarray(load_orbax(dst)[1].embed), 2 * np.asarray(params.embed))
    assert sorted(os.listdir(tmp_path)) == ["orbax"]  # no temp folders left beside it
    shutil.rmtree(os.path.join(dst, "params", "layers.wq"))
    with pytest.raises(CheckpointError, match="layers.wq"):
        load_orbax(dst)


def test_float16_cast_matches_torch(zoo):
    # dtype="float16" goes through the same numpy cast as bfloat16; it must agree with torch's cast.
    folder = zoo.folder("llama-gqa")
    params = load(folder, "float16")
    want = zoo.hf("llama-gqa").model.embed_tokens.weight.detach().to(torch.float16).numpy()
    np.testing.assert_array_equal(np.asarray(params.embed), want)
