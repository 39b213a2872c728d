"""Bad inputs raise momjax.InputError with a message that says what is wrong, before anything reaches JAX;
and sampling (temperature, top_k, top_p, seed) behaves.

One model (llama-gqa) and conftest's generation shapes, so every generate call here reuses the
compilation of test_golden / test_policies (temperature, top_k, top_p, seed and stop ids are traced).
"""

from __future__ import annotations

import dataclasses
import time

import jax.numpy as jnp
import numpy as np
import pytest
from conftest import NEW_TOKENS, PROMPT_LENS, mixed_prompts, prompt_tokens

import momjax
import momjax.cli
import momjax.convert
from momjax import InputError, memory

FAMILY = "llama-gqa"


@pytest.fixture(scope="module")
def model(zoo):
    return zoo.model(FAMILY)


@pytest.fixture(scope="module")
def greedy(model):
    return momjax.generate(model, mixed_prompts(model), NEW_TOKENS, temperature=0, stop_tokens=[]).tokens


def all_entry_points(model, tokens):
    """forward, prefill and generate called on the same tokens: each must raise the same InputError."""
    return [
        lambda: momjax.forward(model, tokens),
        lambda: momjax.prefill(model, tokens),
        lambda: momjax.generate(model, tokens, 4),
    ]


# ---------------------------------------------------------------------- prompts


@pytest.mark.parametrize("tokens, words", [
    ([[]], "prompt 0 is empty"),
    ([[5, 6], []], "prompt 1 is empty"),
    (np.zeros((1, 0), np.int32), "prompt 0 is empty"),
    ([], "no prompts given"),
    (np.zeros((0, 4), np.int32), "no prompts given"),
])
def test_empty_prompts_and_batches(model, tokens, words):
    for call in all_entry_points(model, tokens):
        with pytest.raises(InputError, match=words):
            call()


@pytest.mark.parametrize("bad", [257, 1000, -1])
def test_token_ids_outside_the_vocabulary(model, bad):
    assert model.config.vocab_size == 257
    for tokens in ([[5, bad, 7]], np.array([[5, bad, 7]]), [5, bad]):
        for call in all_entry_points(model, tokens):
            with pytest.raises(InputError, match=r"outside the vocabulary \[0, 257\)") as e:
                call()
            assert str(bad) in str(e.value) and "tokenizer" in str(e.value)


@pytest.mark.parametrize("tokens", [
    np.array([[5.0, 6.0]]), jnp.array([[5.0, 6.0]]), np.array([[5, 6]], np.float32), [[5.0, 6.0]], [5, 6.5],
    [["a", "b"]], ["hello"],
])
def test_non_integer_tokens(model, tokens):
    for call in all_entry_points(model, tokens):
        with pytest.raises(InputError, match="integer"):
            call()


def test_tokens_of_the_wrong_rank(model):
    with pytest.raises(InputError, match=r"\[batch, length\]"):
        momjax.forward(model, np.zeros((1, 2, 3), np.int32))


def test_forward_needs_rows_of_one_length(model):
    with pytest.raises(InputError, match="one length"):
        momjax.forward(model, [[5, 6, 7], [5, 6]])


def test_accepted_token_forms_agree(model):
    """A [B, S] numpy or jax array, a list of lists and, for one prompt, a flat list are the same input."""
    toks = prompt_tokens(model)
    ref = np.asarray(momjax.forward(model, toks))
    np.testing.assert_array_equal(np.asarray(momjax.forward(model, jnp.asarray(toks))), ref)
    np.testing.assert_array_equal(np.asarray(momjax.forward(model, toks.tolist())), ref)
    np.testing.assert_array_equal(np.asarray(momjax.forward(model, toks.astype(np.int64))), ref)
    one = np.asarray(momjax.forward(model, toks[0].tolist()))  # [1, S]
    assert one.shape == (1, PROMPT_LENS[0], model.config.vocab_size)


# ---------------------------------------------------------------------- context length


def test_context_limit_and_raising_it(model, greedy):
    assert model.max_context == model.config.max_position_embeddings == 512
    prompts = mixed_prompts(model)
    need = PROMPT_LENS[0] + NEW_TOKENS
    short = dataclasses.replace(model, max_context=need - 1)
    with pytest.raises(InputError, match="exceeds the model's context") as e:
        momjax.generate(short, prompts, NEW_TOKENS, temperature=0, stop_tokens=[])
    msg = str(e.value)
    assert f"{PROMPT_LENS[0]} tokens" in msg and f"= {need}" in msg and f"model.max_context = {need}" in msg
    short.max_context = need  # as the message says
    out = momjax.generate(short, prompts, NEW_TOKENS, temperature=0, stop_tokens=[])
    np.testing.assert_array_equal(out.tokens, greedy)
    # forward and prefill check the prompt alone.
    short.max_context = PROMPT_LENS[0] - 1
    for call in (lambda: momjax.forward(short, prompt_tokens(model)), lambda: momjax.prefill(short, prompts)):
        with pytest.raises(InputError, match="exceeds the model's context"):
            call()


# ---------------------------------------------------------------------- generation settings


@pytest.mark.parametrize("kwargs, words", [
    ({"max_new_tokens": 0}, "max_new_tokens must be a positive integer"),
    ({"max_new_tokens": -3}, "max_new_tokens must be a positive integer"),
    ({"max_new_tokens": 2.5}, "max_new_tokens must be a positive integer"),
    ({"temperature": -0.5}, "temperature must be a finite number >= 0"),
    ({"top_p": 0.0}, r"top_p must be in \(0, 1\]"),
    ({"top_p": 1.5}, r"top_p must be in \(0, 1\]"),
    ({"top_p": -0.1}, r"top_p must be in \(0, 1\]"),
    ({"top_k": 0}, "top_k must be a positive integer"),
    ({"top_k": -2}, "top_k must be a positive integer"),
    ({"stop_tokens": [2, 257]}, "stop_tokens outside the vocabulary"),
    ({"stop_tokens": [-1]}, "stop_tokens outside the vocabulary"),
])
def test_bad_generation_settings(model, kwargs, words):
    kwargs = {"max_new_tokens": NEW_TOKENS, **kwargs}
    with pytest.raises(InputError, match=words):
        momjax.generate(model, mixed_prompts(model), **kwargs)


def test_unknown_policy_name_is_an_input_error(model):
    prompts = mixed_prompts(model)
    calls = [lambda: momjax.forward(model, prompt_tokens(model), "nope"),
             lambda: momjax.prefill(model, prompts, "nope"),
             lambda: momjax.generate(model, prompts, NEW_TOKENS, policy="nope")]
    for call in calls:
        with pytest.raises(InputError, match="unknown policy") as e:
            call()
        assert all(name in str(e.value) for name in ("baseline", "mom", "mom-stream"))


def test_bad_load_dtype(model):
    with pytest.raises(InputError, match="dtype"):
        momjax.load(model.path, dtype="int8")


# ---------------------------------------------------------------------- sampling


def sample(model, **kwargs):
    kwargs = {"temperature": 1.0, "stop_tokens": [], **kwargs}
    return momjax.generate(model, mixed_prompts(model), NEW_TOKENS, **kwargs).tokens


def test_seeded_sampling_is_reproducible(model, greedy):
    a, b, c = sample(model, seed=0), sample(model, seed=0), sample(model, seed=1)
    np.testing.assert_array_equal(a, b)
    assert (a != c).any(), "different seeds gave the same 32 sampled tokens"
    assert (a != greedy).any(), "temperature 1 gave exactly the greedy tokens"


def test_greedy_ignores_the_seed(model, greedy):
    np.testing.assert_array_equal(sample(model, temperature=0.0, seed=7), greedy)


@pytest.mark.parametrize("kwargs", [{"top_k": 1}, {"top_p": 1e-6}, {"top_k": 1, "top_p": 0.5},
                                    {"temperature": 1e-6}])
def test_degenerate_sampling_is_greedy(model, greedy, kwargs):
    for seed in (0, 1):
        np.testing.assert_array_equal(sample(model, seed=seed, **kwargs), greedy)


@pytest.mark.parametrize("kwargs", [{"temperature": 5.0}, {"temperature": 50.0, "top_p": 1.0},
                                    {"temperature": 2.0, "top_k": 300}])
def test_sampled_tokens_are_in_the_vocabulary(model, kwargs):
    for seed in range(3):
        toks = sample(model, seed=seed, **kwargs)
        assert toks.shape == (2, NEW_TOKENS)
        assert toks.min() >= 0 and toks.max() < model.config.vocab_size


def test_top_k_and_top_p_restrict_the_first_token(model):
    """The first token is sampled from the prefill logits: it must be among their top k / in their nucleus."""
    logits = np.asarray(momjax.prefill(model, mixed_prompts(model))[0], np.float64)  # [2, V]
    temperature = 2.0
    top5 = np.argsort(-logits, axis=-1)[:, :5]
    probs = np.exp((logits - logits.max(-1, keepdims=True)) / temperature)
    probs /= probs.sum(-1, keepdims=True)
    order = np.argsort(-probs, axis=-1)
    mass_before = np.cumsum(np.take_along_axis(probs, order, -1), -1) - np.take_along_axis(probs, order, -1)
    nucleus = [set(order[b][mass_before[b] < 0.3]) for b in range(2)]
    seen_k, seen_p = [set(), set()], [set(), set()]
    for seed in range(8):
        first_k = sample(model, seed=seed, temperature=temperature, top_k=5)[:, 0]
        first_p = sample(model, seed=seed, temperature=temperature, top_p=0.3)[:, 0]
        for b in range(2):
            assert first_k[b] in top5[b], (seed, b)
            assert first_p[b] in nucleus[b], (seed, b)
            seen_k[b].add(int(first_k[b]))
            seen_p[b].add(int(first_p[b]))
    assert any(len(s) > 1 for s in seen_k), "top_k=5 at temperature 2 never sampled more than one token"


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
