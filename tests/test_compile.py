"""No needless recompiles: prompt lengths share compiled programs through length buckets, and a repeated
call compiles nothing at all.

Compilations are counted two ways: the jitted functions' own cache sizes, and JAX's compile log
(`jax_log_compiles`), which also sees any stray jit compiled along the way.
"""

from __future__ import annotations

import logging

import jax
import pytest

import momjax
from momjax import generation as G
from momjax.params import init_random

# A shape no other test uses, so this file's compilations are its own.
CFG = momjax.Config(vocab_size=131, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                    head_dim=8, max_position_embeddings=256, eos_token_ids=(2,), bos_token_id=1)
LENGTHS = list(range(3, 61, 3))  # 20 prompt lengths
PREFILL_BUDGET = 4


@pytest.fixture(scope="module")
def model():
    return momjax.Model(config=CFG, params=init_random(CFG, seed=0))


@pytest.fixture
def compile_log(caplog):
    """Records of every XLA compilation while the test runs."""
    jax.config.update("jax_log_compiles", True)
    caplog.set_level(logging.WARNING)
    try:
        yield lambda: [r.getMessage() for r in caplog.records if r.getMessage().startswith("Compiling ")]
    finally:
        jax.config.update("jax_log_compiles", False)


def prompt(n: int) -> list[int]:
    return [1] + [(7 * i) % (CFG.vocab_size - 3) + 3 for i in range(n - 1)]


def test_twenty_prompt_lengths_compile_prefill_at_most_four_times(model, compile_log, policy="mom"):
    assert len({G.bucket_length(n, momjax.get_policy(policy)) for n in LENGTHS}) <= PREFILL_BUDGET
    before = G.layer_fn._cache_size()  # the per-layer prefill program: one compilation per bucket
    for n in LENGTHS:
        gen = momjax.generate(model, [prompt(n)], 3, policy=policy, stop_tokens=[])
        assert gen.tokens.shape == (1, 3)
    added = G.layer_fn._cache_size() - before
    logged = [m for m in compile_log() if m.startswith("Compiling jit(layer_fn)")]
    assert added <= PREFILL_BUDGET, f"{added} prefill compilations for {len(LENGTHS)} prompt lengths"
    assert len(logged) <= PREFILL_BUDGET, logged
    assert len(logged) == added >= 1  # the log sees the compilations (the check is not vacuous)


def test_repeated_generate_compiles_nothing(model, compile_log):
    args = {"policy": "mom-stream", "temperature": 0.7, "top_k": 5, "top_p": 0.9, "seed": 3, "stop_tokens": []}
    first = momjax.generate(model, [prompt(21)], 6, **args)
    n_logged = len(compile_log())
    programs = (G.embed_fn, G.layer_fn, G.last_layer_fn, G.logits_fn, G.first_token_fn, G.decode_chunk_fn)
    sizes = [f._cache_size() for f in programs]
    again = momjax.generate(model, [prompt(21)], 6, **args)
    assert [f._cache_size() for f in programs] == sizes
    assert compile_log()[n_logged:] == [], "the second identical call compiled something"
    assert again.as_lists() == first.as_lists()


def test_streaming_compiles_once_per_bucket(model, compile_log):
    from momjax.cli.generate import stream_tokens

    def streamed(n):
        return [t for piece in stream_tokens(model, prompt(n), 9, policy="mom", stop_tokens=[]) for t in piece]

    expected = momjax.generate(model, [prompt(25)], 9, policy="mom", stop_tokens=[]).as_lists()[0]
    first = streamed(20)
    n_logged = len(compile_log())
    assert streamed(20) == first
    assert streamed(25) == expected  # the same tokens as momjax.generate
    assert compile_log()[n_logged:] == [], "a prompt in the same bucket recompiled the streaming programs"
