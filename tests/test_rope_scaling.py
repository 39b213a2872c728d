"""YaRN and dynamic NTK rope scaling against transformers, float32, beyond the original context.

Tiny random Llama and Qwen2 checkpoints (written with save_pretrained, so config.json holds transformers 5's
`rope_parameters`, loaded with momjax.load) whose original context is 32 or 64 tokens: the prompts (75 and 37
tokens, one 128-token bucket; 60 and 37 where decoding is to cross the original length) and the decoding go
past it. Every policy runs, `mom` and `mom-stream`
with 16-token mini-sequences so that a prompt is split into chunks that must all use the whole prompt's
frequencies.

transformers' reference is its greedy generate with the KV cache (`hf_generate`: the whole left-padded batch
in one forward, then one forward per token with position ids from the attention mask), checked against
`model.generate` itself. For dynamic NTK the cache matters: a full forward over prompt + generated tokens
would recompute every key with the latest frequencies, which generate never does. transformers' rotary
module also remembers the longest length it has seen (until a call shorter than max_position_embeddings);
`fresh_rope` gives every reference the state of a freshly loaded model, which is what momjax computes.
"""

from __future__ import annotations

import copy

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tiny
import torch
import transformers
from conftest import load_model, random_tokens, rel_err

import momjax
from momjax import Config, ConfigError
from momjax import generation as G
from momjax.cache import place_for_decode
from momjax.hf.config import from_hf
from momjax.rope import rope_frequencies, rope_inv_freq

RTOL = 1e-5
PROMPT_LENS = (75, 37)
NEW = 16
SMALL = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, bos_token_id=None, eos_token_id=None, tie_word_embeddings=False)

FAMILIES = {
    # Qwen2.5's model-card spelling (legacy "type"), attention factor from the factor alone: 0.1 ln 4 + 1.
    "llama-yarn": (transformers.LlamaConfig, dict(
        SMALL, max_position_embeddings=128, rope_theta=10000.0,
        rope_scaling={"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32})),
    # Every yarn knob set: mscale / mscale_all_dim give an attention factor below 1, other betas, no truncation.
    "qwen2-yarn": (transformers.Qwen2Config, dict(
        SMALL, hidden_size=96, num_attention_heads=6, max_position_embeddings=256, tie_word_embeddings=True,
        rope_parameters={"rope_type": "yarn", "rope_theta": 1000000.0, "factor": 8.0,
                         "original_max_position_embeddings": 32, "mscale": 0.707, "mscale_all_dim": 1.0,
                         "beta_fast": 16.0, "beta_slow": 2.0, "truncate": False})),
    # Dynamic NTK scales from max_position_embeddings: 32, so the whole prompt is past it.
    "llama-dynamic": (transformers.LlamaConfig, dict(
        SMALL, max_position_embeddings=32, rope_theta=10000.0, rope_scaling={"rope_type": "dynamic", "factor": 2.0})),
    # 64: the 100-token forward is past it, and decoding after a 60-token prompt crosses it.
    "qwen2-dynamic": (transformers.Qwen2Config, dict(
        SMALL, hidden_size=96, num_attention_heads=6, max_position_embeddings=64, rope_theta=1000000.0,
        rope_scaling={"type": "dynamic", "factor": 4.0})),
}
POLICIES = {
    "baseline": momjax.POLICIES["baseline"],
    "mom": momjax.POLICIES["mom"].replace(minisequence=16),
    "mom-stream": momjax.POLICIES["mom-stream"].replace(minisequence=16),
}


class RopeZoo:
    def __init__(self, tmp_path_factory):
        self.tmp, self.hf, self.models = tmp_path_factory, {}, {}

    def get(self, family: str):
        """(transformers model, momjax Model loaded from its save_pretrained folder)."""
        if family not in self.models:
            hf = tiny.build_hf_model(family, families=FAMILIES)
            folder = tiny.save_checkpoint(hf, str(self.tmp.mktemp(family)))
            model = load_model(folder)
            model.max_context = 1024  # dynamic NTK exists to run past max_position_embeddings
            self.hf[family], self.models[family] = hf, model
        return self.hf[family], self.models[family]


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    return RopeZoo(tmp_path_factory)


def fresh_rope(emb):
    """transformers' rotary module (model.model.rotary_emb) as a freshly loaded model has it: dynamic NTK keeps
    the longest length it has seen."""
    emb.inv_freq = emb.original_inv_freq.clone()
    emb.max_seq_len_cached = emb.original_max_seq_len


def left_padded(prompts):
    S = max(map(len, prompts))
    ids, mask = torch.zeros(len(prompts), S, dtype=torch.long), torch.zeros(len(prompts), S, dtype=torch.long)
    for b, p in enumerate(prompts):
        ids[b, S - len(p):], mask[b, S - len(p):] = torch.tensor(p), 1
    return ids, mask


def hf_generate(hf_model, prompts, n: int):
    """transformers' greedy generate with its KV cache, written out: (tokens [B, n], logits [n, B, V]) where
    logits[i] chose token i. Positions come from the attention mask, as generate computes them."""
    fresh_rope(hf_model.model.rotary_emb)
    ids, mask = left_padded(prompts)
    position = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)
    tokens, logits, cache = [], [], None
    with torch.no_grad():
        for _ in range(n):
            out = hf_model(input_ids=ids, attention_mask=mask, position_ids=position, cache=cache, use_cache=True)
            cache = out.cache
            logits.append(out.logits[:, -1].float().numpy())
            tokens.append(logits[-1].argmax(-1))
            ids = torch.as_tensor(tokens[-1])[:, None]
            mask = torch.cat([mask, torch.ones(len(prompts), 1, dtype=torch.long)], dim=1)
            position = mask.sum(-1, keepdim=True) - 1
    return np.stack(tokens, axis=1), np.stack(logits)


def prompts_for(model, lens=PROMPT_LENS, seed=1):
    toks = random_tokens(model.config.vocab_size, (len(lens), max(lens)), seed)
    return [toks[b, :n].tolist() for b, n in enumerate(lens)]


def decode_lengths(family):
    """The prompts each family decodes: qwen2-dynamic's longest (60) crosses max_position_embeddings (64) at the
    fifth new token, so prefill runs unscaled and decoding switches to scaled frequencies."""
    return (60, 37) if family == "qwen2-dynamic" else PROMPT_LENS


# ---------------------------------------------------------------------- frequencies


ROPES = [
    {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32},
    {"rope_type": "yarn", "factor": 4.0},  # the original length defaults to max_position_embeddings
    {"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 32, "beta_fast": 16, "beta_slow": 2,
     "truncate": False},
    {"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 32, "mscale": 0.707,
     "mscale_all_dim": 1.0},
    {"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 32, "mscale": 0.707},  # alone: unused
    {"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 32, "attention_factor": 1.3},
    {"rope_type": "yarn", "factor": None, "original_max_position_embeddings": 32},  # factor: 128 / 32
    {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64, "beta_fast": 4, "beta_slow": 4},
    {"rope_type": "yarn", "factor": 0.5, "original_max_position_embeddings": 32},  # factor <= 1: attention factor 1
    {"rope_type": "dynamic", "factor": 2.0},
    {"rope_type": "dynamic", "factor": 3.5},
]


@pytest.mark.parametrize("family", ["llama", "qwen2"])
@pytest.mark.parametrize("rope", ROPES, ids=lambda r: "-".join(f"{k}={v}" for k, v in r.items() if k != "type"))
def test_frequencies_and_attention_factor_match_transformers(family, rope):
    """momjax's inverse frequencies and cos/sin factor against the rotary module of a transformers model built
    from the same config.json; dynamic NTK at lengths below, at and past max_position_embeddings (128)."""
    cls = transformers.LlamaConfig if family == "llama" else transformers.Qwen2Config
    hf_config = cls(**dict(SMALL, max_position_embeddings=128, rope_theta=10000.0 if family == "llama" else 1e6),
                    rope_scaling=copy.deepcopy(rope))
    emb = transformers.AutoModelForCausalLM.from_config(hf_config).model.rotary_emb
    cfg = from_hf(hf_config.to_dict())
    assert cfg.rope_type == rope.get("rope_type", rope.get("type"))
    assert cfg.rope_attention_factor == emb.attention_scaling
    if cfg.rope_type == "yarn":  # computed once, in float32 as transformers does: the same bits
        np.testing.assert_array_equal(rope_inv_freq(cfg), emb.inv_freq.numpy())
        return
    for length in (20, 128, 129, 200, 1000, 100_000):
        fresh_rope(emb)
        emb(torch.zeros(1, length, 1), torch.arange(length)[None])  # transformers' update from this forward
        ours = np.asarray(rope_frequencies(cfg, jnp.int32(length)))
        assert np.max(np.abs(ours / emb.inv_freq.numpy() - 1)) < 1e-6, length  # float32 pow: a few ulp
        if length <= 128:
            np.testing.assert_array_equal(ours, rope_inv_freq(cfg))
        else:
            assert np.max(np.abs(ours / rope_inv_freq(cfg) - 1)) > 1e-3  # really scaled


# ---------------------------------------------------------------------- against transformers, end to end


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request):
    return request.param


def test_forward_logits_match_transformers(zoo, family):
    hf_model, model = zoo.get(family)
    assert model.config.rope_type == family.split("-")[1]
    toks = random_tokens(model.config.vocab_size, (2, 100), seed=3)
    fresh_rope(hf_model.model.rotary_emb)
    assert rel_err(momjax.forward(model, toks), tiny.hf_logits(hf_model, toks).numpy()) < RTOL


@pytest.mark.parametrize("policy", list(POLICIES))
def test_greedy_matches_transformers(zoo, family, policy):
    """A batch of two prompts of different lengths, left-padded as transformers' generate pads them (for dynamic
    NTK the batch's longest row sets the length, in momjax as in transformers)."""
    hf_model, model = zoo.get(family)
    prompts = prompts_for(model, decode_lengths(family))
    expected, expected_logits = hf_generate(hf_model, prompts, NEW)
    out = momjax.generate(model, prompts, NEW, policy=POLICIES[policy], temperature=0, stop_tokens=[])
    assert out.tokens.tolist() == expected.tolist()
    first_logits, _ = momjax.prefill(model, prompts, POLICIES[policy])  # the same prefill programs as generate's
    assert rel_err(first_logits, expected_logits[0]) < RTOL


def test_reference_is_transformers_generate(zoo):
    """hf_generate is what transformers' own generate does (greedy, KV cache, left padding), for dynamic NTK too."""
    for family in ("llama-dynamic", "qwen2-dynamic"):
        hf_model, model = zoo.get(family)
        prompts = prompts_for(model, decode_lengths(family))
        ids, mask = left_padded(prompts)
        fresh_rope(hf_model.model.rotary_emb)
        with torch.no_grad():
            out = hf_model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False,
                                    pad_token_id=0)
        assert out[:, ids.shape[1]:].tolist() == hf_generate(hf_model, prompts, NEW)[0].tolist(), family


@pytest.mark.parametrize("family", ["llama-dynamic", "qwen2-dynamic", "qwen2-yarn"])
def test_decode_step_logits_match_transformers(zoo, family):
    """Prefill in 16-token chunks (mom), then one decode step at a time: every step's logits against
    transformers' cached step. With dynamic NTK each step uses its own length while the K/V cached before it
    keep theirs (qwen2-dynamic: prefill unscaled, steps past 64 tokens scaled)."""
    hf_model, model = zoo.get(family)
    policy = POLICIES["mom"]
    prompts = prompts_for(model, decode_lengths(family))
    tokens, expected = hf_generate(hf_model, prompts, NEW)
    logits, cache = momjax.prefill(model, prompts, policy)
    # Every leaf committed to the device, as the step's outputs are, so that step 2 reuses step 1's compilation.
    cache = jax.device_put(place_for_decode(cache, policy).with_tail(NEW), jax.devices()[0])
    steps = [np.asarray(logits)]
    for i in range(NEW - 1):  # transformers' tokens, so that each step's logits are compared on the same input
        logits, cache = G.decode_step_fn(model.params, jnp.asarray(tokens[:, i].astype(np.int32)), cache,
                                         cfg=model.config, policy=policy)
        steps.append(np.asarray(logits))
    for i, step_logits in enumerate(steps):
        assert rel_err(step_logits, expected[i]) < RTOL, f"step {i}"


def test_dynamic_session_feeds_match_transformers_cache(zoo):
    """A Session feed is a transformers forward over its cache: its new tokens use the length at the end of the
    feed and the cached K/V keep theirs. So with dynamic NTK past max_position_embeddings (32) a document fed in
    two parts gives transformers' cached result, not that of one forward over the whole document (which
    computes the first part's K/V at the longer length). A one-shot generate is a Session's first feed."""
    hf_model, model = zoo.get("llama-dynamic")
    first, second, question = (random_tokens(model.config.vocab_size, (20,), seed).tolist() for seed in (5, 6, 7))
    session = momjax.Session(model, policy=POLICIES["mom"], capacity=128)
    fed = [np.asarray(session.feed(first)), np.asarray(session.feed(second))]  # ends at 20 (unscaled), 40 (scaled)
    answer = session.generate(question, 8, temperature=0, stop_tokens=[])

    fresh_rope(hf_model.model.rotary_emb)
    cache, expected = None, []
    with torch.no_grad():
        for part in (first, second, question):
            out = hf_model(input_ids=torch.tensor([part]), cache=cache, use_cache=True)
            cache = out.cache
            expected.append(out.logits[0, -1].numpy())
        tokens = [int(expected[-1].argmax())]
        for _ in range(7):
            out = hf_model(input_ids=torch.tensor([[tokens[-1]]]), cache=cache, use_cache=True)
            cache = out.cache
            tokens.append(int(out.logits[0, -1].argmax()))
        fresh_rope(hf_model.model.rotary_emb)
        one_forward = hf_model(input_ids=torch.tensor([first + second])).logits[0, -1].numpy()
    for i in range(2):
        assert rel_err(fed[i], expected[i]) < RTOL, f"feed {i}"
    assert answer.tokens[0].tolist() == tokens
    assert rel_err(fed[1], one_forward) > 10 * RTOL  # the first part's K/V differ


def test_estimate_and_plan_ignore_rope_scaling():
    """Rope scaling changes no shape: memory figures and plans are those of the same model without it."""
    from test_hf_config import QWEN25_7B_INSTRUCT

    plain = from_hf(QWEN25_7B_INSTRUCT)
    for rope in ({"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768},
                 {"type": "dynamic", "factor": 4.0}):
        scaled = from_hf({**QWEN25_7B_INSTRUCT, "rope_scaling": rope})
        assert scaled != plain
        for policy in POLICIES:
            for phase in ("prefill", "decode"):
                assert momjax.estimate(scaled, 131072, policy, phase=phase) == \
                    momjax.estimate(plain, 131072, policy, phase=phase)
        assert momjax.plan(scaled, "80GiB", "1TiB", source="estimate", context=131072) == \
            momjax.plan(plain, "80GiB", "1TiB", source="estimate", context=131072)


# ---------------------------------------------------------------------- config.json


def qwen_with(rope, **changes) -> dict:
    """Qwen2.5-7B-Instruct's hub config.json with a rope_scaling object (and other fields changed)."""
    from test_hf_config import QWEN25_7B_INSTRUCT

    return {**QWEN25_7B_INSTRUCT, "rope_scaling": rope, **changes}


QWEN_CARD_YARN = {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}  # Qwen2.5's model cards


def test_yarn_read_from_the_model_card_spelling():
    from test_hf_config import to_transformers5

    cfg = from_hf(qwen_with(QWEN_CARD_YARN))
    assert (cfg.rope_type, cfg.rope_factor, cfg.rope_original_max_position, cfg.rope_theta) == (
        "yarn", 4.0, 32768, 1000000.0)
    assert cfg.rope_attention_factor == pytest.approx(0.1 * np.log(4.0) + 1)
    assert (cfg.rope_beta_fast, cfg.rope_beta_slow, cfg.rope_truncate) == (32.0, 1.0, True)
    assert cfg.max_position_embeddings == 32768
    # transformers 5's spelling, and transformers' own rewrite of the hub file, read the same.
    assert from_hf(to_transformers5(qwen_with(QWEN_CARD_YARN))) == cfg
    from test_hf_config import QWEN25_7B_INSTRUCT

    written = transformers.Qwen2Config(**{**QWEN25_7B_INSTRUCT, "rope_scaling": dict(QWEN_CARD_YARN)}).to_dict()
    assert "rope_parameters" in written and from_hf(written) == cfg


def test_yarn_fields_read():
    rope = {"rope_type": "yarn", "factor": 8, "original_max_position_embeddings": 4096, "beta_fast": 16,
            "beta_slow": 2, "mscale": 0.707, "mscale_all_dim": 1.0, "truncate": False}
    cfg = from_hf(qwen_with(rope))
    assert (cfg.rope_factor, cfg.rope_original_max_position, cfg.rope_beta_fast, cfg.rope_beta_slow) == (
        8.0, 4096, 16.0, 2.0)
    assert not cfg.rope_truncate
    assert cfg.rope_attention_factor == pytest.approx((0.0707 * np.log(8) + 1) / (0.1 * np.log(8) + 1))
    assert from_hf(qwen_with({**rope, "attention_factor": 1.25})).rope_attention_factor == 1.25
    # Nulls are absent fields, as transformers reads them: the defaults, and the factor from the two lengths.
    nulls = from_hf(qwen_with({**QWEN_CARD_YARN, "beta_fast": None, "attention_factor": None}))
    assert nulls == from_hf(qwen_with(QWEN_CARD_YARN))
    ratio = from_hf(qwen_with({**QWEN_CARD_YARN, "factor": None}, max_position_embeddings=131072))
    assert ratio.rope_factor == 4.0
    # Without original_max_position_embeddings transformers starts from max_position_embeddings.
    assert from_hf(qwen_with({"type": "yarn", "factor": 4.0})).rope_original_max_position == 32768


@pytest.mark.parametrize("rope_type", ["yarn", "llama3"])
def test_top_level_original_max_position_wins_as_in_transformers(rope_type):
    """transformers lets a top-level original_max_position_embeddings override the rope object's."""
    rope = {"rope_type": rope_type, "factor": 4.0, "original_max_position_embeddings": 32}
    if rope_type == "llama3":
        rope.update(low_freq_factor=1.0, high_freq_factor=4.0)
    hf = dict(SMALL, max_position_embeddings=128, rope_theta=10000.0, rope_scaling=rope,
              original_max_position_embeddings=16)
    emb = transformers.AutoModelForCausalLM.from_config(transformers.LlamaConfig(**copy.deepcopy(hf))).model.rotary_emb
    cfg = from_hf({**hf, "architectures": ["LlamaForCausalLM"], "model_type": "llama"})
    assert cfg.rope_original_max_position == 16
    np.testing.assert_allclose(rope_inv_freq(cfg), emb.inv_freq.numpy(), rtol=1e-6)


def test_dynamic_read():
    cfg = from_hf(qwen_with({"type": "dynamic", "factor": 2.0}))
    assert (cfg.rope_type, cfg.rope_factor, cfg.max_position_embeddings) == ("dynamic", 2.0, 32768)
    # original_max_position_embeddings equal to max_position_embeddings changes nothing, so it is accepted.
    same = {"rope_type": "dynamic", "factor": 2.0, "original_max_position_embeddings": 32768}
    assert from_hf(qwen_with(same)) == cfg


@pytest.mark.parametrize("rope, changes, field", [
    ({"type": "yarn", "original_max_position_embeddings": 32768}, {}, "needs a 'factor'"),
    ({"type": "dynamic"}, {}, "needs a 'factor'"),
    ({"type": "dynamic", "factor": None}, {}, "rope_scaling.factor"),
    ({**QWEN_CARD_YARN, "factor": 0}, {}, "rope_scaling.factor"),
    ({**QWEN_CARD_YARN, "factor": -4.0}, {}, "rope_scaling.factor"),
    ({"type": "dynamic", "factor": 0.0}, {}, "rope_scaling.factor"),
    ({**QWEN_CARD_YARN, "factor": "4"}, {}, "rope_scaling.factor"),
    ({**QWEN_CARD_YARN, "original_max_position_embeddings": 0}, {}, "rope_scaling.original_max_position_embeddings"),
    ({**QWEN_CARD_YARN, "original_max_position_embeddings": 32768.5}, {},
     "rope_scaling.original_max_position_embeddings"),
    ({**QWEN_CARD_YARN, "beta_fast": 1, "beta_slow": 32}, {}, "rope_scaling.beta_fast"),
    ({**QWEN_CARD_YARN, "beta_fast": 0}, {}, "rope_scaling.beta_fast"),
    ({**QWEN_CARD_YARN, "beta_slow": -1}, {}, "rope_scaling.beta_slow"),
    ({**QWEN_CARD_YARN, "attention_factor": 0}, {}, "rope_scaling.attention_factor"),
    ({**QWEN_CARD_YARN, "mscale": -1.0, "mscale_all_dim": 1.0}, {}, "rope_scaling.mscale"),
    ({**QWEN_CARD_YARN, "truncate": None}, {}, "rope_scaling.truncate"),
    ({**QWEN_CARD_YARN, "truncate": "yes"}, {}, "rope_scaling.truncate"),
    ({**QWEN_CARD_YARN, "low_freq_factor": 1.0}, {}, "low_freq_factor"),  # not yarn's: would be dropped
    ({"type": "dynamic", "factor": 2.0, "beta_fast": 32}, {}, "beta_fast"),
    ({"type": "dynamic", "factor": 2.0, "original_max_position_embeddings": 4096}, {},
     "rope_scaling.original_max_position_embeddings"),  # transformers ignores it: refuse rather than mislead
    ({"type": "dynamic", "factor": 2.0}, {"max_position_embeddings": None}, "max_position_embeddings"),
    ({"type": "yarn", "factor": 4.0}, {"max_position_embeddings": None}, "max_position_embeddings"),
])
def test_bad_rope_scaling_refused_naming_the_field(rope, changes, field):
    with pytest.raises(ConfigError, match=field):
        from_hf({k: v for k, v in qwen_with(rope, **changes).items() if v is not None})


@pytest.mark.parametrize("changes, field", [
    ({"rope_beta_fast": 1.0, "rope_beta_slow": 2.0}, "rope_beta_fast"),
    ({"rope_attention_factor": 0.0}, "rope_attention_factor"),
    ({"rope_beta_slow": float("nan")}, "rope_beta_slow"),
    ({"rope_truncate": 1}, "rope_truncate"),
])
def test_config_checks_its_yarn_fields(changes, field):
    with pytest.raises(ConfigError, match=field):
        momjax.preset("qwen2.5-7b").replace(rope_type="yarn", **changes)


def test_json_of_models_without_yarn_is_unchanged():
    """The yarn fields are written only when set, so a saved session's or converted folder's config of any
    other model still matches the one read now."""
    yarn_keys = {"rope_beta_fast", "rope_beta_slow", "rope_truncate", "rope_attention_factor"}
    for name in momjax.PRESETS:
        cfg = momjax.preset(name)
        assert not yarn_keys & set(cfg.to_json()) and Config.from_json(cfg.to_json()) == cfg
    dynamic = from_hf(qwen_with({"type": "dynamic", "factor": 2.0}))
    assert not yarn_keys & set(dynamic.to_json())
    yarn = from_hf(qwen_with({**QWEN_CARD_YARN, "beta_slow": 2, "truncate": False}))
    assert {"rope_attention_factor", "rope_beta_slow", "rope_truncate"} <= set(yarn.to_json())
    assert Config.from_json(yarn.to_json()) == yarn


def test_rope_scaling_extends_the_context_a_model_accepts():
    """Qwen2.5's model card: yarn with factor 4 over 32k means 128k; dynamic NTK scales max_position_embeddings."""
    from test_hf_config import QWEN25_7B_INSTRUCT

    yarn = from_hf({**QWEN25_7B_INSTRUCT, "rope_scaling": {"type": "yarn", "factor": 4.0,
                                                            "original_max_position_embeddings": 32768}})
    assert yarn.context_length == 131072
    dynamic = from_hf({**QWEN25_7B_INSTRUCT, "rope_scaling": {"type": "dynamic", "factor": 2.0}})
    assert dynamic.context_length == 65536
    assert from_hf(QWEN25_7B_INSTRUCT).context_length == 32768
