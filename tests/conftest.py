"""Shared fixtures: one tiny random Hugging Face model per family in tiny.FAMILIES, its checkpoint folder
written with save_pretrained, and the momjax Model loaded from that folder.

Everything is built once per test session and cached in a `Zoo`: building a transformers model, saving
it and loading it costs far less than compiling, but the same objects also keep the jitted functions'
inputs identical across test modules, so compiled shapes are reused.
"""

from __future__ import annotations

import os
import sys

# Four virtual CPU devices, set before JAX starts, so the mesh tests (test_mesh.py) split models over 1, 2 and 4
# devices in this process. Everything else runs on the first device, as on a machine with one.
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4").strip()

import numpy as np
import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import tiny

import momjax

# The tiny PyTorch references run in milliseconds on one thread; more threads only fight JAX for the cores.
torch.set_num_threads(1)

FAMILY_NAMES = list(tiny.FAMILIES)

_CACHE_OPTIONS = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
                  "jax_persistent_cache_min_entry_size_bytes")


@pytest.fixture(autouse=True, scope="module")
def _fresh_compiled_programs():
    """Drop every compiled program after each test module. One process compiling the whole suite's programs
    (thousands of executables, all kept alive by jit caches) crashed inside XLA's CPU compiler late in the run,
    at different tests each time, while every module passes on its own; releasing them per module keeps the
    process's state to what one module builds."""
    yield
    import jax

    jax.clear_caches()


@pytest.fixture(autouse=True)
def _no_persistent_compile_cache_leaks():
    """A test that runs the CLI in this process may switch on JAX's persistent compilation cache (--compile-cache,
    $MOMJAX_COMPILATION_CACHE) in a temporary folder; switch it off again so later tests compile as usual."""
    import jax
    from jax._src import compilation_cache

    saved = {name: getattr(jax.config, name) for name in _CACHE_OPTIONS}
    yield
    if any(getattr(jax.config, name) != value for name, value in saved.items()):
        for name, value in saved.items():
            jax.config.update(name, value)
        compilation_cache.reset_cache()

# Families whose float32 checkpoint is written in several safetensors shards (with an index file).
SHARDED = {"llama-gqa": "40KB", "qwen2": "60KB", "mistral-window": "30KB"}


def load_model(folder: str, dtype: str | None = None) -> momjax.Model:
    """momjax.load on a checkpoint folder, without the progress bar."""
    return momjax.load(folder, dtype=dtype, progress=False)


def load_hf_params(path: str, cfg, dtype=None, memory_kind: str = "device", progress: bool = False):
    """A HF folder's weights placed in memory_kind (pinned_host too, which momjax.load refuses for running)."""
    from momjax.hf.tensors import stream_hf_leaves
    from momjax.loading import place

    return place(stream_hf_leaves(path, cfg, dtype, progress), memory_kind)


def load_orbax(path: str, dtype=None, memory_kind: str = "device"):
    """(Config, params) of an Orbax folder, placed in memory_kind."""
    from momjax.loading import place
    from momjax.store.orbax import read_leaves

    cfg, leaves = read_leaves(path, dtype)
    return cfg, place(leaves, memory_kind)


class Zoo:
    """Lazily built, cached tiny models: the HF PyTorch model, its checkpoint folders and the momjax Model."""

    def __init__(self, tmp_path_factory):
        self._tmp = tmp_path_factory
        self._hf, self._folders, self._models = {}, {}, {}

    def hf(self, family: str):
        if family not in self._hf:
            self._hf[family] = tiny.build_hf_model(family)
        return self._hf[family]

    def folder(self, family: str, dtype: str = "float32") -> str:
        """The checkpoint folder: float32 (sharded for the SHARDED families) or bfloat16 (one file)."""
        key = (family, dtype)
        if key not in self._folders:
            path = str(self._tmp.mktemp(f"{family}-{dtype}"))
            if dtype == "float32":
                tiny.save_checkpoint(self.hf(family), path, max_shard_size=SHARDED.get(family))
            else:
                tiny.save_checkpoint(self.hf(family), path, dtype=getattr(torch, dtype))
            self._folders[key] = path
        return self._folders[key]

    def model(self, family: str, checkpoint_dtype: str = "float32", dtype: str | None = None) -> momjax.Model:
        key = (family, checkpoint_dtype, dtype)
        if key not in self._models:
            self._models[key] = load_model(self.folder(family, checkpoint_dtype), dtype=dtype)
        return self._models[key]


@pytest.fixture(scope="session")
def zoo(tmp_path_factory) -> Zoo:
    return Zoo(tmp_path_factory)


@pytest.fixture(scope="session", params=FAMILY_NAMES)
def family(request) -> str:
    return request.param


@pytest.fixture(scope="session")
def hf_model(zoo, family):
    return zoo.hf(family)


@pytest.fixture(scope="session")
def checkpoint_dir(zoo, family) -> str:
    return zoo.folder(family)


@pytest.fixture(scope="session")
def model(zoo, family) -> momjax.Model:
    return zoo.model(family)


# Shapes shared by test_golden, test_policies and test_inputs so that their compilations are shared too:
# everything runs in one 128-token bucket. Two prompts of PROMPT_LENS tokens (75 > 64, llama31-mha's
# original_max_position_embeddings; both longer than mistral-window's window of 7; neither a multiple
# of the 8-token mini-sequences of test_policies) and 16 new tokens.
PROMPT_LENS = (75, 37)
LONG_LEN = 100
NEW_TOKENS = 16


def long_tokens(model, seed: int = 1) -> np.ndarray:
    """[2, LONG_LEN] token ids; prompt_tokens and mixed_prompts are cut from it."""
    return random_tokens(model.config.vocab_size, (2, LONG_LEN), seed)


def prompt_tokens(model, seed: int = 1) -> np.ndarray:
    """Two prompts of PROMPT_LENS[0] tokens, [2, 75]."""
    return long_tokens(model, seed)[:, :PROMPT_LENS[0]]


def mixed_prompts(model, seed: int = 1) -> list[list[int]]:
    """Two prompts of different lengths (PROMPT_LENS) as a list of lists: the rows of prompt_tokens, cut."""
    toks = prompt_tokens(model, seed)
    return [toks[b, :n].tolist() for b, n in enumerate(PROMPT_LENS)]


def hf_greedy(hf_model, prompt: list[int], max_new_tokens: int) -> list[int]:
    """transformers' greedy continuation of one prompt: argmax of a full forward pass, one token at a time.

    Not tiny.hf_greedy: it passes min_new_tokens, which makes transformers mask the EOS logits, so where
    the true greedy token is an EOS id it returns the runner-up instead (momjax with stop_tokens=[] keeps
    the EOS token and goes on, as greedy decoding should).
    """
    seq = list(prompt)
    for _ in range(max_new_tokens):
        seq.append(int(tiny.hf_logits(hf_model, [seq])[0, -1].argmax()))
    return seq[len(prompt):]


def random_tokens(vocab_size: int, shape, seed: int = 0) -> np.ndarray:
    """Token ids in [4, vocab) so that no prompt contains the tiny models' BOS/EOS ids (1, 2, 3)."""
    return np.random.default_rng(seed).integers(4, vocab_size, size=shape, dtype=np.int32)


def rel_err(actual, expected) -> float:
    """max |actual - expected| / max |expected|: the relative error the tolerances are stated in."""
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    return float(np.max(np.abs(actual - expected)) / np.max(np.abs(expected)))


def lower_decode_loop(params, cache, cfg, policy, steps: int, batch: int = 1):
    """The resumable decode loop (what momjax.decoding runs) lowered for abstract inputs: params, a cache with its
    tail, greedy settings as traced arguments (top_k 0)."""
    import jax
    import jax.numpy as jnp

    from momjax.decoding import decode_program

    sds = jax.ShapeDtypeStruct
    sampling = (sds((2,), jnp.uint32), sds((), jnp.float32), 0, sds((), jnp.float32), sds((8,), jnp.int32),
                sds((), jnp.int32))
    fn, args, static = decode_program(params, cache, sds((batch,), jnp.int32), sds((batch,), jnp.bool_), sampling,
                                      cfg, policy, steps)
    return fn.lower(*args, **static)


@pytest.fixture(scope="session")
def cli_model(tmp_path_factory) -> str:
    """A HF checkpoint with a tokenizer (the demo's, built without torch)."""
    from cli_helpers import make_cli_model

    return make_cli_model(tmp_path_factory)


@pytest.fixture
def model_copy(cli_model, tmp_path) -> str:
    """A private copy of cli_model, to break on purpose."""
    from cli_helpers import copy_model

    return copy_model(cli_model, tmp_path)
