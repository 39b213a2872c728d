"""Every memory policy computes what `baseline` computes, for every family in tiny.FAMILIES, and the memory
tricks do what they are for: the KV cache lands in pinned host memory, mini-sequences lower the compiled
temporary bytes.

Besides the named policies, small-chunk variants run the mini-sequence and blockwise-attention code on
tiny prompts: 8-token mini-sequences with 4-query / 8-key attention blocks, and the paper's MLP-only
chunking. conftest's prompts of 75 and 37 tokens, which 8 does not divide, are padded on the left to one
128 bucket (so whole chunks are padding) and are longer than mistral-window's window of 7 tokens.
Compilations are shared with test_golden (same prompts, same policy objects for the named ones).

Compilations dominate the run time, so each test compiles only programs that differ. forward() reads only
the mini-sequence knobs (mom and mom-stream run it as baseline does, as one chunk); prefill does not read
kv_decode (mom-stream-small prefills as mom-small does); decode reads neither chunk sizes nor blocks (the
small-chunk variants decode as their parent policy). So: prefill logits and KV caches of every policy on
every family; greedy tokens of the named policies on every family and of the small-chunk variants, whose
only new part is their prefill, on mistral-window (sliding window and GQA: the most masking).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import NEW_TOKENS, PROMPT_LENS, lower_decode_loop, mixed_prompts, prompt_tokens, rel_err

import momjax
from momjax import generation as G
from momjax.params import abstract_params

RTOL = 1e-5
P = momjax.POLICIES
SMALL = {"minisequence": 8, "q_block": 4, "kv_block": 8}
POLICIES = {
    "baseline": P["baseline"],
    "mom": P["mom"],
    "mom-stream": P["mom-stream"],
    "mom-small": P["mom"].replace(name="mom-small", **SMALL),
    "mom-stream-small": P["mom-stream"].replace(name="mom-stream-small", **SMALL),
    "mom-mlp": P["mom"].replace(name="mom-mlp", minisequence_scope="mlp", **SMALL),
}
FORWARD_DIFFERS = ["mom-small", "mom-mlp"]
PREFILL_DIFFERS = ["mom", "mom-stream", "mom-small", "mom-mlp"]  # mom-stream: compiled for generate anyway

_BASELINE: dict = {}


def baseline(model, what: str):
    """Baseline results, computed once per model."""
    key = (id(model), what)
    if key not in _BASELINE:
        base = POLICIES["baseline"]
        if what == "forward":
            value = np.asarray(momjax.forward(model, prompt_tokens(model), base))
        elif what == "prefill":
            logits, cache = momjax.prefill(model, prompt_tokens(model), base)
            value = (np.asarray(logits), np.stack(cache.k), np.stack(cache.v), np.asarray(cache.start))
        elif what == "prefill-mixed":
            value = np.asarray(momjax.prefill(model, mixed_prompts(model), base)[0])
        else:
            out = momjax.generate(model, mixed_prompts(model), NEW_TOKENS, base, temperature=0, stop_tokens=[])
            value = out.tokens
        _BASELINE[key] = value
    return _BASELINE[key]


@pytest.mark.parametrize("policy", FORWARD_DIFFERS)
def test_forward_equals_baseline(model, policy):
    ours = momjax.forward(model, prompt_tokens(model), POLICIES[policy])
    assert rel_err(ours, baseline(model, "forward")) < RTOL


@pytest.mark.parametrize("policy", ["baseline", *PREFILL_DIFFERS])
def test_prefill_equals_forward_at_last_position(model, policy):
    """The last-position head (and final-layer MLP) against the full forward; the cache where it belongs."""
    logits, cache = momjax.prefill(model, prompt_tokens(model), POLICIES[policy])
    assert logits.shape == (2, model.config.vocab_size) and logits.dtype == jnp.float32
    assert rel_err(logits, baseline(model, "forward")[:, -1]) < RTOL
    kind = "device" if policy == "baseline" else "pinned_host"
    assert {x.sharding.memory_kind for x in (*cache.k, *cache.v)} == {kind}
    assert cache.memory_kind == kind
    # The cache holds the same keys and values, wherever it lives (compared at the real tokens).
    _, k, v, start = baseline(model, "prefill")
    np.testing.assert_array_equal(np.asarray(cache.start), start)
    cfg = model.config
    assert len(cache.k) == cfg.num_layers and k.shape == (cfg.num_layers, 2, cfg.num_kv_heads, 128, cfg.head_dim)
    first = int(start.max())
    assert rel_err(np.stack(cache.k)[:, :, :, first:], k[:, :, :, first:]) < RTOL
    assert rel_err(np.stack(cache.v)[:, :, :, first:], v[:, :, :, first:]) < RTOL


@pytest.mark.parametrize("policy", PREFILL_DIFFERS)
def test_prefill_of_prompts_of_different_lengths(model, policy):
    logits, _ = momjax.prefill(model, mixed_prompts(model), POLICIES[policy])
    assert rel_err(logits, baseline(model, "prefill-mixed")) < RTOL
    # The longer row is the first row of prompt_tokens: padding must not change it.
    assert rel_err(logits[0], baseline(model, "forward")[0, -1]) < RTOL


def check_greedy(model, policy):
    out = momjax.generate(model, mixed_prompts(model), NEW_TOKENS, POLICIES[policy], temperature=0,
                          stop_tokens=[])
    assert out.tokens.tolist() == baseline(model, "greedy").tolist()
    assert out.lengths.tolist() == [NEW_TOKENS, NEW_TOKENS] and out.policy == policy


@pytest.mark.parametrize("policy", ["mom", "mom-stream"])
def test_greedy_tokens_equal_baseline(model, policy):
    check_greedy(model, policy)


@pytest.mark.parametrize("policy", ["mom-small", "mom-stream-small", "mom-mlp"])
def test_greedy_tokens_of_small_chunk_variants(zoo, policy):
    check_greedy(zoo.model("mistral-window"), policy)


def test_the_programs_not_run_above_are_the_ones_that_are(zoo):
    """The skips above rest on which knobs each program reads: check it on the lowered programs (tracing
    only, no compilation). If this fails, a program started reading another knob: test the pairs it names
    on every family."""
    cfg = zoo.model("mistral-window").config
    sds = jax.ShapeDtypeStruct
    params = abstract_params(cfg, "float32")
    tokens, start = sds((2, 128), jnp.int32), sds((2,), jnp.int32)

    def stages(policy, every_position):
        return "\n".join(s.lower().as_text() for s in G.prefill_stages(params, tokens, start, cfg, POLICIES[policy],
                                                                         every_position=every_position))

    def forward(policy):
        return stages(policy, True)

    def prefill(policy):
        return stages(policy, False)

    L, K, E = cfg.num_layers, cfg.num_kv_heads, cfg.head_dim
    prompt, tail = sds((2, K, 128, E), jnp.float32), sds((2, K, 1, E), jnp.float32)
    cache = momjax.KVCache(k=(prompt,) * L, v=(prompt,) * L, start=start, tail_k=(tail,) * L, tail_v=(tail,) * L,
                           length=sds((), jnp.int32))
    def decode(policy):
        return lower_decode_loop(params, cache, cfg, POLICIES[policy], NEW_TOKENS - 1, batch=2).as_text()

    assert forward("mom") == forward("baseline") == forward("mom-stream")
    assert forward("mom-stream-small") == forward("mom-small") != forward("mom")
    assert prefill("mom-stream-small") == prefill("mom-small") != prefill("mom")
    assert decode("mom-small") == decode("mom-mlp") == decode("mom")
    assert decode("mom-stream-small") == decode("mom-stream") != decode("mom")


ODD = P["mom"].replace(name="mom-odd", minisequence=12, q_block=5, kv_block=7)


def test_sizes_that_divide_nothing(zoo):
    """12-token mini-sequences (the 128 bucket grows to 132), 5-query and 7-key blocks (dividing neither)."""
    model = zoo.model("mistral-window")
    assert momjax.generation.bucket_length(PROMPT_LENS[0], ODD) == 132
    assert rel_err(momjax.forward(model, prompt_tokens(model), ODD), baseline(model, "forward")) < RTOL
    logits, cache = momjax.prefill(model, mixed_prompts(model), ODD)
    assert cache.prompt_length == cache.k[0].shape[2] == 132
    assert rel_err(logits, baseline(model, "prefill-mixed")) < RTOL


# ---------------------------------------------------------------------- compiled memory


MID = momjax.Config(vocab_size=1000, hidden_size=256, intermediate_size=2048, num_layers=2, num_heads=4,
                    num_kv_heads=2, head_dim=64, max_position_embeddings=8192)
MID_SEQ = 4096


def prefill_temp_bytes(policy) -> int:
    """The largest temp_size_in_bytes of the prefill's programs compiled for MID at MID_SEQ tokens, from
    abstract inputs only."""
    stages = G.prefill_stages(abstract_params(MID, "float32"), jax.ShapeDtypeStruct((1, MID_SEQ), jnp.int32),
                              jax.ShapeDtypeStruct((1,), jnp.int32), MID, policy)
    return max(s.lower().compile().memory_analysis().temp_size_in_bytes for s in stages)


def test_minisequences_lower_compiled_temp_bytes():
    """float32, hidden 256, ffn 2048, 4096 tokens: the whole-sequence MLP activations ([S, F] float32 is
    32 MiB each) dominate the baseline's temporaries; 512-token mini-sequences cut them 8x."""
    base = prefill_temp_bytes(P["baseline"])
    mom = prefill_temp_bytes(P["mom"].replace(minisequence=512))
    mlp_only = prefill_temp_bytes(P["mom"].replace(minisequence=512, minisequence_scope="mlp"))
    assert base > 2 * MID_SEQ * MID.intermediate_size * 4  # the [S, F] float32 activations are really there
    assert mom < 0.6 * base, (mom, base)
    assert mlp_only < 0.6 * base, (mlp_only, base)
