"""Orbax folders (momjax.store.orbax): round trips exact in every dtype, into the requested memory kind, and
incomplete or existing folders refused clearly."""

from __future__ import annotations

import os
import shutil

import jax
import numpy as np
import pytest
import torch
from conftest import load_orbax
from test_hf_tensors import assert_bitwise, load

from momjax.errors import CheckpointError
from momjax.hf import config as hf_config
from momjax.params import flatten
from momjax.store.orbax import is_orbax_folder, save_orbax


# ---------------------------------------------------------------------- Orbax
@pytest.mark.parametrize(("stored", "restored"), [("float32", "float32"), ("bfloat16", "float32"),
                                                  ("float32", "bfloat16"), ("bfloat16", None)])
def test_orbax_round_trip_is_exact(zoo, tmp_path, stored, restored):
    folder = zoo.folder("qwen2")
    cfg = hf_config.from_folder(folder)
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
    save_orbax(load(folder, memory_kind="pinned_host"), hf_config.from_folder(folder), dst)  # saved from host memory
    _, params = load_orbax(dst, memory_kind="pinned_host")
    assert {x.sharding.memory_kind for x in jax.tree.leaves(params)} == {"pinned_host"}
    _, params = load_orbax(dst, dtype="bfloat16", memory_kind="device")
    assert {x.sharding.memory_kind for x in jax.tree.leaves(params)} == {"device"}


def test_orbax_save_refuses_existing_and_incomplete_folders_fail_clearly(zoo, tmp_path):
    folder = zoo.folder("llama-gqa")
    cfg, params = hf_config.from_folder(folder), load(folder)
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
