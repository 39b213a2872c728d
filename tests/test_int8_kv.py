"""int8 KV cache (MemoryPolicy(kv_dtype="int8")): the quantiser's error bound, every policy giving the same
greedy tokens as every other with int8 (a token's K/V are the same whichever program produced them), logits
close to the unquantised cache's, a session feed equal to a one-shot generate, the cache's bytes, and a
forward pass that stays exact.

The no-dequantised-copy check on the compiled decode loop is in test_decode_layout.py.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import NEW_TOKENS, mixed_prompts, prompt_tokens, random_tokens

import momjax
from momjax import generation as G
from momjax.cache import dequantize_kv, quantize_kv
from momjax.memory.shapes import nbytes as _nbytes
from momjax.params import abstract_params

P = momjax.POLICIES
SMALL = {"minisequence": 8, "q_block": 4, "kv_block": 8}
INT8 = {
    "baseline": P["baseline"].replace(kv_dtype="int8"),
    "mom": P["mom"].replace(kv_dtype="int8"),
    "mom-stream": P["mom-stream"].replace(kv_dtype="int8"),
    # Chunked prefill and blockwise attention over several int8 key blocks, on tiny prompts.
    "mom-small": P["mom"].replace(name="mom-small", kv_dtype="int8", **SMALL),
    # One layer's K/V resident on the device, the other streamed.
    "mom-stream-resident": P["mom-stream"].replace(name="mom-stream-resident", kv_dtype="int8", kv_device_layers=1),
}
FAMILIES = ["llama-gqa", "qwen2", "mistral-window"]

_GREEDY: dict = {}


def greedy(model, policy):
    """Greedy tokens of mixed_prompts, computed once per (model, policy)."""
    key = (id(model), policy)
    if key not in _GREEDY:
        _GREEDY[key] = momjax.generate(model, mixed_prompts(model), NEW_TOKENS, policy, temperature=0,
                                       stop_tokens=[]).tokens
    return _GREEDY[key]


def rel_norm(actual, expected) -> float:
    """||actual - expected|| / ||expected|| over the last axis, largest over the rows."""
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    return float(np.max(np.linalg.norm(actual - expected, axis=-1) / np.linalg.norm(expected, axis=-1)))


def test_quantize_round_trip_error_and_zero_rows():
    x = jax.random.normal(jax.random.PRNGKey(0), (3, 2, 5, 64), jnp.float32) * jnp.array([1e-3, 1.0, 30.0])[
        :, None, None, None]
    x = x.at[1, 0, 2].set(0.0)  # an all-zero row
    q, scale = quantize_kv(x)
    assert q.dtype == jnp.int8 and scale.dtype == jnp.float32 and scale.shape == x.shape[:-1]
    q, scale, x = np.asarray(q), np.asarray(scale), np.asarray(x)
    assert np.abs(q.astype(np.int32)).max() == 127 and q.min() >= -127
    err = np.abs(x - q * scale[..., None])
    assert np.all(err <= scale[..., None] / 2 * (1 + 1e-6))
    assert np.all(q[1, 0, 2] == 0) and np.all(np.asarray(dequantize_kv(q, scale))[1, 0, 2] == 0)
    nonzero = np.ones(scale.shape, bool)
    nonzero[1, 0, 2] = False
    np.testing.assert_allclose(scale[nonzero], np.abs(x).max(-1)[nonzero] / 127, rtol=1e-6)
    # bfloat16 input: the scale is computed in float32 and the bound holds against the bf16 values.
    qb, sb = quantize_kv(jnp.asarray(x, jnp.bfloat16))
    xb = np.asarray(jnp.asarray(x, jnp.bfloat16), np.float32)
    assert np.all(np.abs(xb - np.asarray(qb) * np.asarray(sb)[..., None]) <= np.asarray(sb)[..., None] / 2 * 1.001)


@pytest.mark.parametrize("family", FAMILIES)
def test_mom_equals_baseline_with_int8(zoo, family):
    model = zoo.model(family)
    assert greedy(model, INT8["mom"]).tolist() == greedy(model, INT8["baseline"]).tolist()


@pytest.mark.parametrize("policy", ["mom-stream", "mom-small", "mom-stream-resident"])
def test_other_policies_equal_baseline_with_int8(zoo, policy):
    """Streaming decode (all layers, or all but the first); chunked prefill with small attention blocks (mom-stream's prefill is mom's, and decode
    reads no chunk sizes: test_policies.py checks both): mistral-window (sliding window, GQA)."""
    model = zoo.model("mistral-window")
    assert greedy(model, INT8[policy]).tolist() == greedy(model, INT8["baseline"]).tolist()


@pytest.mark.parametrize("family", FAMILIES)
def test_int8_cache_is_int8_and_close_to_the_exact_one(zoo, family):
    """The prefill's cache is int8 with float32 scales where the policy puts it, the last-position logits
    are within a few percent of the unquantised cache's, and the greedy tokens mostly agree."""
    model = zoo.model(family)
    cfg = model.config
    exact_logits, exact = momjax.prefill(model, prompt_tokens(model), "mom")
    logits, cache = momjax.prefill(model, prompt_tokens(model), INT8["mom"])
    assert cache.quantized and not exact.quantized
    assert {x.dtype for x in (*cache.k, *cache.v)} == {jnp.dtype(jnp.int8)}
    assert {(x.dtype, x.shape) for x in (*cache.k_scale, *cache.v_scale)} == {
        (jnp.dtype(jnp.float32), (2, cfg.num_kv_heads, 128))}
    assert {x.sharding.memory_kind for x in (*cache.k, *cache.v, *cache.k_scale, *cache.v_scale)} == {"pinned_host"}
    # The first layer's K/V come from the same inputs in both (later layers' inputs differ by the quantisation
    # of earlier ones): there the int8 cache is the exact one within half a step. Real tokens only, not padding.
    first = int(np.asarray(cache.start).max())
    for q, s, x in ((cache.k[0], cache.k_scale[0], exact.k[0]), (cache.v[0], cache.v_scale[0], exact.v[0])):
        err = np.abs(np.asarray(dequantize_kv(q, s)) - np.asarray(x))[:, :, first:]
        assert np.all(err <= np.asarray(s)[:, :, first:, None] / 2 * 1.001 + 1e-7)
    assert rel_norm(logits, exact_logits) < 0.05
    base = greedy(model, P["mom"])
    ours = greedy(model, INT8["mom"])
    assert np.mean(ours == base) >= 0.75, (ours, base)
    assert ours[:, :3].tolist() == base[:, :3].tolist()


def test_session_feed_equals_one_shot_generate_with_int8(zoo):
    """Document, then question: the same greedy tokens as one generate over both, with the int8 cache."""
    model = zoo.model("llama-gqa")
    policy = INT8["mom"]
    doc = random_tokens(model.config.vocab_size, (50,), 5).tolist()
    question = random_tokens(model.config.vocab_size, (9,), 6).tolist()
    one_shot = momjax.generate(model, [doc + question], 10, policy, stop_tokens=[]).tokens
    session = momjax.Session(model, policy, capacity=64)
    session.feed(doc)
    assert session.generate(question, 10, stop_tokens=[]).tokens.tolist() == one_shot.tolist()
    assert jax.tree.leaves(session._k[0])[0].dtype == jnp.int8


def test_int8_session_files_need_an_int8_policy(zoo, tmp_path):
    model = zoo.model("llama-gqa")
    session = momjax.Session(model, INT8["baseline"])
    session.feed([5, 6, 7, 8])
    path = str(tmp_path / "s.session")
    session.save(path)
    loaded = momjax.Session.load(model, path)
    assert loaded.policy.kv_dtype == "int8" and loaded.tokens == [5, 6, 7, 8]
    for a, b in zip(jax.tree.leaves(loaded._k), jax.tree.leaves(session._k)):
        np.testing.assert_array_equal(np.asarray(a)[:, :, :4], np.asarray(b)[:, :, :4])
    with pytest.raises(momjax.SessionError, match="kv_dtype='int8'"):
        momjax.Session.load(model, path, policy="baseline")


def test_forward_stays_exact(zoo):
    model = zoo.model("llama-gqa")
    exact = np.asarray(momjax.forward(model, prompt_tokens(model), "baseline"))
    np.testing.assert_array_equal(np.asarray(momjax.forward(model, prompt_tokens(model), INT8["baseline"])), exact)


def test_int8_cache_bytes_are_at_most_052_of_bf16():
    """Llama-3.1-8B (head_dim 128), bfloat16: the K/V (scales included) the per-layer prefill program
    returns (its lowered output shapes, no compilation), and the decode cache memory reports compile."""
    from momjax.memory import abstract_cache as _abstract_cache

    cfg = momjax.preset("llama-3.1-8b")
    sds = jax.ShapeDtypeStruct
    params = abstract_params(cfg, "bfloat16")
    tokens, start = sds((1, 4096), jnp.int32), sds((1,), jnp.int32)

    def layer_kv_bytes(policy):
        (stage,) = [s for s in G.prefill_stages(params, tokens, start, cfg, policy) if s.name == "layer"]
        _, k, v = stage.lower().out_info
        return _nbytes((k, v))

    exact, int8 = layer_kv_bytes(P["mom"]), layer_kv_bytes(INT8["mom"])
    assert exact == 2 * 4096 * cfg.num_kv_heads * cfg.head_dim * 2
    assert int8 <= 0.52 * exact, int8 / exact
    caches = [_abstract_cache(cfg, 4096, 64, jnp.bfloat16, policy, 1) for policy in (P["mom"], INT8["mom"])]
    full = [_nbytes((c.k, c.v, c.tail_k, c.tail_v, c.k_scale, c.v_scale, c.tail_k_scale, c.tail_v_scale))
            for c in caches]
    assert full[1] <= 0.52 * full[0], full[1] / full[0]


def test_a_tail_in_the_wrong_form_is_refused(zoo):
    model = zoo.model("llama-gqa")
    _, cache = momjax.prefill(model, [[5, 6, 7]], INT8["baseline"])
    cache = cache.with_tail(4)
    with pytest.raises(TypeError, match="cache.tails"):
        cache.with_tails(cache.tail_k, cache.tail_v)
    assert cache.with_tails(*cache.tails).tail_k_scale == cache.tail_k_scale
