"""Golden tests: momjax against transformers' PyTorch model, float32, for every family in tiny.FAMILIES.

Every model is loaded with `momjax.load` from a real `save_pretrained` folder (some sharded, one set saved
in bfloat16). Everything runs in conftest's one 128-token bucket (prompts of 75 and 37 tokens, 16 new
tokens, forward passes of 75 to 100 tokens), so compilations are shared between tests and with
test_policies. The lengths also put positions past mistral-window's 7-token window and past llama31-mha's
original_max_position_embeddings of 64, where llama3 rope scaling changes the frequencies.
"""

from __future__ import annotations

import copy
import glob
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tiny
import torch
from conftest import LONG_LEN, PROMPT_LENS, SHARDED, load_model, long_tokens, mixed_prompts, prompt_tokens, rel_err
from conftest import NEW_TOKENS as NEW
from conftest import hf_greedy as hf_greedy_uncached

import momjax
from momjax import generation as G
from momjax.cache import place_for_decode

RTOL = 1e-5


_HF_GREEDY: dict = {}


def hf_greedy(hf_model, prompt: list[int], n: int = NEW) -> list[int]:
    key = (id(hf_model), tuple(prompt), n)
    if key not in _HF_GREEDY:
        _HF_GREEDY[key] = hf_greedy_uncached(hf_model, prompt, n)
    return _HF_GREEDY[key]


# ---------------------------------------------------------------------- loading


def test_checkpoint_folder_and_loaded_model(family, checkpoint_dir, model, hf_model):
    files = sorted(os.path.basename(f) for f in glob.glob(os.path.join(checkpoint_dir, "*.safetensors")))
    if family in SHARDED:  # the loader must follow the index over several shards
        assert len(files) > 1 and os.path.isfile(os.path.join(checkpoint_dir, "model.safetensors.index.json"))
    else:
        assert files == ["model.safetensors"]
    cfg, hf_cfg = model.config, hf_model.config
    assert (cfg.vocab_size, cfg.hidden_size, cfg.num_layers) == (
        hf_cfg.vocab_size, hf_cfg.hidden_size, hf_cfg.num_hidden_layers)
    assert (cfg.num_heads, cfg.num_kv_heads) == (hf_cfg.num_attention_heads, hf_cfg.num_key_value_heads)
    assert cfg.head_dim == hf_model.model.layers[0].self_attn.head_dim
    assert cfg.sliding_window == getattr(hf_cfg, "sliding_window", None)
    assert cfg.tie_embeddings == hf_cfg.tie_word_embeddings and cfg.qkv_bias == (family == "qwen2")
    assert model.params.embed.dtype == jnp.float32 and cfg.dtype == "float32"
    np.testing.assert_array_equal(np.asarray(model.params.embed), hf_model.model.embed_tokens.weight.detach().numpy())
    assert (model.params.lm_head is None) == cfg.tie_embeddings


# ---------------------------------------------------------------------- logits


def test_forward_logits_match_hf(model, hf_model):
    toks = prompt_tokens(model)  # [2, 75]
    ours = momjax.forward(model, toks)
    assert ours.shape == (2, PROMPT_LENS[0], model.config.vocab_size) and ours.dtype == jnp.float32
    assert rel_err(ours, tiny.hf_logits(hf_model, toks).numpy()) < RTOL


def test_longer_input_keeps_prefix_logits(model):
    short = momjax.forward(model, prompt_tokens(model))  # 53 padding tokens in the 128 bucket
    long = momjax.forward(model, long_tokens(model))  # 28 padding tokens
    assert long.shape[1] == LONG_LEN
    assert rel_err(np.asarray(long)[:, :PROMPT_LENS[0]], short) < RTOL


def test_prefill_then_decode_steps_equal_one_forward(model):
    """Prefill (mom policy, host cache copied back as generate does) then N decode steps, each step's
    logits against one forward pass over prompt + generated tokens at the same positions."""
    policy = momjax.POLICIES["mom"]
    prompt = prompt_tokens(model, seed=2)  # [2, 75]
    logits, cache = momjax.prefill(model, prompt, policy)
    cache = place_for_decode(cache, policy).with_tail(NEW)
    # Commit every leaf to the device, as the step's outputs are, so that step 2 reuses step 1's compilation.
    cache = jax.device_put(cache, jax.devices()[0])
    steps = [np.asarray(logits)]
    tokens = [np.argmax(steps[-1], axis=-1).astype(np.int32)]
    for _ in range(NEW - 1):
        logits, cache = G.decode_step_fn(model.params, jnp.asarray(tokens[-1]), cache, cfg=model.config,
                                         policy=policy)
        steps.append(np.asarray(logits))
        tokens.append(np.argmax(steps[-1], axis=-1).astype(np.int32))
    assert int(cache.length) == NEW - 1
    seq = np.concatenate([prompt, np.stack(tokens, axis=1)], axis=1)  # [2, 75 + 16], one 128 bucket
    full = np.asarray(momjax.forward(model, seq))
    S = prompt.shape[1]
    for i, step_logits in enumerate(steps):
        assert rel_err(step_logits, full[:, S - 1 + i]) < RTOL, f"decode step {i}"


def test_decode_step_fn_takes_a_with_tail_cache(zoo):
    """The documented way to decode by hand: prefill, room for new tokens with with_tail, decode_step_fn."""
    model = zoo.model("llama-gqa")
    policy = momjax.POLICIES["baseline"]
    logits, cache = momjax.prefill(model, prompt_tokens(model, seed=2), policy)
    cache = cache.with_tail(NEW)
    token = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits, cache = G.decode_step_fn(model.params, token, cache, cfg=model.config, policy=policy)
    assert logits.shape == (2, model.config.vocab_size) and int(cache.length) == 1


def test_bf16_checkpoint_loaded_as_float32(zoo, family, hf_model):
    folder = zoo.folder(family, "bfloat16")
    model = zoo.model(family, "bfloat16", dtype="float32")
    assert model.config.dtype == "bfloat16" and model.params.embed.dtype == jnp.float32
    assert load_model(folder).params.embed.dtype == jnp.bfloat16  # dtype=None keeps the checkpoint's
    # Round the weights only: model.to(bfloat16) would also round the rotary inv_freq buffers, which
    # momjax (like transformers loading a bf16 checkpoint) computes in float32 from the config.
    rounded = copy.deepcopy(hf_model)
    with torch.no_grad():
        for p in rounded.parameters():
            p.copy_(p.to(torch.bfloat16).to(torch.float32))
    np.testing.assert_array_equal(np.asarray(model.params.layers[0].w_gate),
                                  rounded.model.layers[0].mlp.gate_proj.weight.detach().numpy().T)
    toks = prompt_tokens(model)
    assert rel_err(momjax.forward(model, toks), tiny.hf_logits(rounded, toks).numpy()) < RTOL


# ---------------------------------------------------------------------- greedy generation


def test_greedy_single_prompt_matches_hf(zoo):
    """One prompt given as a flat list (one family: every family is checked in the batch test below)."""
    model, hf_model = zoo.model("mistral-window"), zoo.hf("mistral-window")
    prompt = mixed_prompts(model)[0]
    out = momjax.generate(model, prompt, NEW, temperature=0, stop_tokens=[])  # a flat list is one prompt
    assert out.tokens.shape == (1, NEW)
    assert out.tokens[0].tolist() == hf_greedy(hf_model, prompt)
    assert out.lengths.tolist() == [NEW]


def test_greedy_batch_of_different_lengths_matches_hf(model, hf_model):
    prompts = mixed_prompts(model)
    out = momjax.generate(model, prompts, NEW, temperature=0, stop_tokens=[])
    assert out.tokens.shape == (2, NEW) and out.lengths.tolist() == [NEW, NEW]
    for b, prompt in enumerate(prompts):  # each row as if it were generated alone
        assert out.tokens[b].tolist() == hf_greedy(hf_model, prompt), f"row {b} ({len(prompt)} tokens)"
    assert out.as_lists() == out.tokens.tolist() and out.prompt_tokens == sum(PROMPT_LENS)


# ---------------------------------------------------------------------- stop tokens

EOS_FAMILY = "llama31-mha"  # two EOS ids in config.json and generation_config.json


def expected_stop(reference: list[int], stops) -> int:
    """Valid length of a row that stops at the first of `stops` (the stop token included)."""
    hits = [i for i, t in enumerate(reference) if t in stops]
    return hits[0] + 1 if hits else len(reference)


def check_stopped(out, references, stops):
    assert out.pad_id == stops[0]
    for b, ref in enumerate(references):
        n = expected_stop(ref, stops)
        assert out.lengths[b] == n, f"row {b}"
        assert out.tokens[b, :n].tolist() == ref[:n], f"row {b}"
        assert (out.tokens[b, n:] == out.pad_id).all(), f"row {b} is not padded after its stop token"
        assert out.as_lists()[b] == ref[:n]


def test_default_stop_tokens_are_the_checkpoints_eos(zoo):
    model = zoo.model(EOS_FAMILY)
    assert model.config.eos_token_ids == (2, 3)
    prompts = mixed_prompts(model)
    out = momjax.generate(model, prompts, NEW, temperature=0)
    refs = [hf_greedy(zoo.hf(EOS_FAMILY), p) for p in prompts]
    assert {2, 3} & set(refs[0]) and not {2, 3} & set(refs[1]), "premise: only row 0's greedy reaches an EOS id"
    check_stopped(out, refs, [2, 3])


def test_generation_config_eos_stops_by_default(zoo, tmp_path):
    """A checkpoint whose generation_config.json names the token greedy produces at step 3 as EOS."""
    hf_model = zoo.hf(EOS_FAMILY)
    folder = shutil.copytree(zoo.folder(EOS_FAMILY), tmp_path / "ckpt")
    prompts = mixed_prompts(zoo.model(EOS_FAMILY))
    refs = [hf_greedy(hf_model, p) for p in prompts]
    eos = [refs[0][3], 2]
    gen_path = folder / "generation_config.json"
    gen = json.loads(gen_path.read_text())
    gen["eos_token_id"] = eos
    gen_path.write_text(json.dumps(gen))
    model = load_model(str(folder))
    assert model.config.eos_token_ids == tuple(eos)
    out = momjax.generate(model, prompts, NEW, temperature=0)
    check_stopped(out, refs, eos)
    assert out.lengths[0] <= 4


def test_each_row_stops_on_its_own(zoo):
    model, hf_model = zoo.model(EOS_FAMILY), zoo.hf(EOS_FAMILY)
    prompts = mixed_prompts(model)
    refs = [hf_greedy(hf_model, p) for p in prompts]
    # One stop token: the one row 0 produces at step 3 (row 1 stops only if it produces it too).
    stops = [refs[0][3]]
    out = momjax.generate(model, prompts, NEW, temperature=0, stop_tokens=stops)
    check_stopped(out, refs, stops)
    assert out.lengths[0] <= 4
    # One stop token per row, at different steps: rows stop independently.
    stops = [refs[0][3], refs[1][6]]
    out = momjax.generate(model, prompts, NEW, temperature=0, stop_tokens=stops)
    check_stopped(out, refs, stops)
    assert expected_stop(refs[1], stops) <= 7
    # Never stopping early: stop_tokens=[] gives full rows even though the EOS ids exist.
    out = momjax.generate(model, prompts, NEW, temperature=0, stop_tokens=[])
    assert out.lengths.tolist() == [NEW, NEW]


@pytest.mark.parametrize("policy", ["baseline", "mom-stream"])
def test_stop_tokens_with_other_policies(zoo, policy):
    model, hf_model = zoo.model(EOS_FAMILY), zoo.hf(EOS_FAMILY)
    prompts = mixed_prompts(model)
    refs = [hf_greedy(hf_model, p) for p in prompts]
    stops = [refs[1][4], refs[0][1]]
    out = momjax.generate(model, prompts, NEW, policy=policy, temperature=0, stop_tokens=stops)
    check_stopped(out, refs, stops)
    assert out.policy == policy
