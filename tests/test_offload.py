"""mom-host (momjax.offload): the residual stream and the K/V in host memory, the K/V streamed back in blocks.

Exactness: the same greedy tokens as `baseline` for every family in tiny.FAMILIES (conftest's two prompts of 75
and 37 tokens, left-padded to one 128-token bucket), with chunks and blocks small enough that every prompt spans
many of them: 8-token chunks, 4-token blocks (neither divides the prompts), one KV head per block, 4-query and
2-key attention tiles. Other chunk/block/head splits, resident layers and int8 K/V on the sliding-window family
(the most masking). Memory: nothing on the device grows with the context, and the blocks live in pinned host
memory. Weights in host memory. Bad input: one clear error each, before anything is allocated.
"""

from __future__ import annotations

import dataclasses
import io
import json

import jax
import numpy as np
import pytest
from conftest import NEW_TOKENS, mixed_prompts, prompt_tokens, rel_err

import momjax
from momjax import checks, offload
from momjax.errors import InputError
from momjax.memory import check_fits, estimate, memory_report, plan

HOST = momjax.POLICIES["mom-host"]
SMALL = HOST.replace(name="mom-host-small", minisequence=8, host_block=4, host_heads=1, q_block=4, kv_block=2)
RTOL = 1e-5


def greedy(model, policy, prompts=None):
    out = momjax.generate(model, prompts or mixed_prompts(model), NEW_TOKENS, policy, temperature=0, stop_tokens=[])
    return out.tokens.tolist()


def test_greedy_tokens_and_logits_equal_baseline(model):
    assert greedy(model, SMALL) == greedy(model, "baseline")
    ours, cache = momjax.prefill(model, prompt_tokens(model), SMALL)
    base, _ = momjax.prefill(model, prompt_tokens(model), "baseline")
    assert rel_err(ours, base) < RTOL
    assert isinstance(cache, offload.HostCache) and cache.heads == 1
    assert cache.spans == [(j * 4, j * 4 + 4) for j in range(128 // 4)] and cache.length == 128
    kinds = {a.sharding.memory_kind for layer in cache.blocks for bj in layer for bg in bj for a in bg}
    assert kinds == {"pinned_host"}
    assert len(cache.blocks) == model.config.num_layers and len(cache.blocks[0]) == 128 // 4


@pytest.mark.parametrize("knobs", [
    dict(minisequence=16, host_block=16, kv_block=4, q_block=8),  # one block per chunk, all KV heads
    dict(minisequence=32, host_block=8, host_heads=2, kv_block=8),  # several blocks per chunk
    dict(minisequence=8, host_block=2, kv_device_layers=1),  # the first layer's blocks kept on the device
    dict(minisequence=128),  # the whole prompt in one chunk
])
def test_chunk_and_block_sizes_give_baseline_tokens(zoo, knobs):
    model = zoo.model("mistral-window")
    assert greedy(model, HOST.replace(**knobs)) == greedy(model, "baseline")


def test_int8_tokens_equal_across_policies(zoo):
    model = zoo.model("mistral-window")
    int8 = lambda p: momjax.get_policy(p).replace(kv_dtype="int8")
    ours = greedy(model, SMALL.replace(kv_dtype="int8"))
    assert ours == greedy(model, int8("mom")) == greedy(model, int8("mom-stream"))
    cache = momjax.prefill(model, prompt_tokens(model), SMALL.replace(kv_dtype="int8"))[1]
    assert cache.quantized and cache.blocks[0][0][0][0].dtype == np.int8


def test_sampled_tokens_equal_mom_stream(zoo):
    """The same keys draw the same tokens: mom-host samples token t with the key mom-stream's loop uses."""
    model = zoo.model("llama-gqa")
    sample = lambda p: momjax.generate(model, mixed_prompts(model), 8, p, temperature=0.8, top_k=20, seed=3,
                                       stop_tokens=[]).tokens.tolist()
    assert sample(SMALL) == sample("mom-stream")


HOST_WEIGHTS_POLICIES = ["baseline", "mom", momjax.POLICIES["mom-stream"].replace(kv_device_layers=1), SMALL]


@pytest.mark.parametrize("family", ["qwen2", "mistral-window"])  # tied embeddings and biases; sliding window
def test_weights_in_host_memory_give_baseline_tokens_with_every_policy(zoo, family):
    """Host weights with every policy: prefill and decode bring each layer over as it runs; the tokens are
    baseline's with the weights on the device, and so are forward's logits."""
    model = momjax.load(zoo.folder(family), weights="host", progress=False)
    on_device = zoo.model(family)
    assert model.weights == "host" and model.params.layers[0].wq.sharding.memory_kind == "pinned_host"
    want = greedy(on_device, "baseline")
    for policy in HOST_WEIGHTS_POLICIES:
        assert greedy(model, policy) == want, policy
    assert np.array_equal(np.asarray(momjax.forward(model, prompt_tokens(model), "mom")),
                          np.asarray(momjax.forward(on_device, prompt_tokens(model), "mom")))
    # The weights stayed where they were loaded.
    assert {a.sharding.memory_kind for a in jax.tree.leaves(model.params)} == {"pinned_host"}


def test_host_weights_decode_step_copies_the_weights_in_its_program(zoo):
    """The decode step of a host-weights model takes every weight as a host argument (none is put on the device
    before it runs) and copies them inside the program; device weights are device arguments."""
    from momjax import generation as G
    from momjax.decoding import decode_program
    from momjax.memory.shapes import nbytes
    from momjax.targets import host_parameter_bytes

    host = momjax.load(zoo.folder("llama-gqa"), weights="host", progress=False)
    device = zoo.model("llama-gqa")
    analyses = {}
    for model in (host, device):
        logits, cache = momjax.prefill(model, prompt_tokens(model), "mom-stream")
        token = jax.numpy.zeros((cache.start.shape[0],), jax.numpy.int32)
        sampling = checks.sampling(model.config.vocab_size, model.config.eos_token_ids, 0.0, None, None, 0, [])
        fn, args, static = decode_program(model.params, cache.with_tail(4), token, token == 1, sampling.program_args(),
                                          model.config, momjax.POLICIES["mom-stream"], 4)
        analyses[model.weights] = host_parameter_bytes(fn.lower(*args, **static).compile())
    assert G.decode_chunk_fn is fn
    # The same step, the same prompt K/V in host memory; with host weights every weight is a host argument too.
    assert analyses["host"] - analyses["device"] == nbytes(host.params) > 0


def test_host_weights_refusals(zoo):
    """A model whose params are on the device but that says they are in host memory (or the reverse), and host
    weights over a mesh: refused with one clear error each."""
    model = momjax.load(zoo.folder("qwen2"), weights="host", progress=False)
    on_device = zoo.model("qwen2")
    for wrong in (dataclasses.replace(on_device, weights="host"), dataclasses.replace(model, weights="device")):
        for call in (lambda m: momjax.generate(m, mixed_prompts(m), 2, SMALL),
                     lambda m: momjax.generate(m, mixed_prompts(m), 2, "mom"),
                     lambda m: momjax.forward(m, prompt_tokens(m)),
                     lambda m: momjax.Session(m, "mom-stream")):
            with pytest.raises(InputError, match="load it again with momjax.load"):
                call(wrong)


def test_nothing_on_the_device_grows_with_the_context():
    cfg = momjax.Config(vocab_size=1000, hidden_size=256, intermediate_size=512, num_layers=2, num_heads=4,
                        num_kv_heads=2, head_dim=64)
    policy = HOST.replace(minisequence=512)
    for phase in ("prefill", "decode"):
        short, long = (memory_report(cfg, n, policy, phase=phase) for n in (4096, 65536))
        assert short["device_bytes"] == long["device_bytes"], phase
        assert long["host_bytes"] >= 16 * short["host_bytes"] * 0.9  # the K/V (and residual) moved with the length
        assert long["kv_bytes"] == 16 * short["kv_bytes"] if phase == "prefill" else True
        for n in (4096, 65536):
            est = estimate(cfg, n, policy, phase=phase)
            xla = memory_report(cfg, n, policy, phase=phase)
            assert est["host_bytes"] == xla["host_bytes"] and est["kv_bytes"] == xla["kv_bytes"]
            assert abs(est["device_bytes"] / xla["device_bytes"] - 1) < 0.15
    mom = memory_report(cfg, 65536, "mom", phase="prefill")
    assert memory_report(cfg, 65536, policy, phase="prefill")["device_bytes"] < 0.6 * mom["device_bytes"]


def test_host_weights_take_the_weights_off_the_device():
    on_device = estimate("llama-3.1-8b", 1 << 20, "mom-host", dtype="bfloat16", phase="decode")
    on_host = estimate("llama-3.1-8b", 1 << 20, "mom-host", dtype="bfloat16", phase="decode", weights="host")
    assert on_device["device_bytes"] - on_host["device_bytes"] > 12 * 2**30
    assert on_host["host_bytes"] - on_device["host_bytes"] == on_device["weight_bytes"]
    assert on_host["host_to_device_bytes"] > on_device["host_to_device_bytes"] + 13 * 2**30  # every layer, every step


def test_plans_reach_the_targets_by_the_estimate():
    """The issue's targets, by the closed-form estimate (benchmarks/small_gpus.py compiles them for the GPUs)."""
    gib, tib = 2**30, 2**40
    on_4090 = plan("llama-3.1-8b", 24 * gib, 2 * tib)["max_context"]
    assert on_4090["mom-host"] >= 4_194_304 > on_4090["mom-stream"]
    assert plan("llama-3.1-8b", 24 * gib, 2 * tib, kv_dtype="int8")["max_context"]["mom-host"] >= 6_000_000
    t4 = plan("llama-3.1-8b", 16 * gib, tib, weights="host")
    longest = t4["max_context"]
    assert set(longest) == {"baseline", "mom", "mom-stream", "mom-host"}  # host weights run with every policy
    assert longest["mom-host"] >= 2**20 and longest["mom-host"] > longest["mom-stream"] > longest["mom"] > 0
    assert plan("llama-3.1-70b", 80 * gib, tib, weights="host")["max_context"]["mom-host"] >= 2**20
    decode = plan("llama-3.1-8b", 24 * gib, 2 * tib, kv_dtype="int8", context=2**20, target="rtx4090",
                  source="estimate")
    rec = decode["recommended"]
    assert rec["policy"] == "mom-host" and "only mom-host fits" in rec["why"]
    assert 1 / decode["decode"]["mom-host int8"]["decode_tokens_per_s"] < 6.41  # HeadInfer's measured s/token
    assert decode["decode"]["mom-host int8"]["prefill_s"] > 0


def test_bad_knobs_are_refused_when_the_policy_is_made():
    for knob in ("host_block", "host_heads"):
        for bad in (0, -4, 2.5, True):
            with pytest.raises(InputError, match=f"{knob} must be a positive whole number"):
                HOST.replace(**{knob: bad})
        with pytest.raises(InputError, match="knob of the 'mom-host' policy"):
            momjax.POLICIES["mom-stream"].replace(**{knob: 4})
    with pytest.raises(InputError, match="must divide the mini-sequence length"):
        HOST.replace(minisequence=8, host_block=3)


def test_bad_requests_are_refused_before_anything_runs(zoo, monkeypatch):
    model = zoo.model("llama-gqa")  # 2 KV heads
    ran = []
    monkeypatch.setattr(offload.P, "embed_fn", lambda *a: ran.append(a))
    with pytest.raises(InputError, match="host_heads \\(3\\) must divide the model's 2 KV heads"):
        momjax.generate(model, mixed_prompts(model), 2, HOST.replace(host_heads=3))
    # Host memory too small for the context: the estimate's K/V and residual stream exceed this machine's RAM.
    cfg = momjax.preset("llama-3.1-8b")
    with pytest.raises(InputError, match="cannot fit.*mom-host"):
        check_fits(cfg, 50_000_000, 16, HOST, "bfloat16")
    assert not ran


def test_host_heads_that_a_mesh_cannot_split_are_refused_before_anything_runs(zoo, monkeypatch):
    """On a mesh each device streams its own KV heads, so a block holds all of them: host_heads=1 of 2 is refused
    by generate, Session and memory_report, before any program runs."""
    model = momjax.load(zoo.folder("llama-gqa"), mesh=momjax.make_mesh(tp=2), progress=False)
    ran = []
    monkeypatch.setattr(offload.P, "embed_fn", lambda *a: ran.append(a))
    needle = "host_heads=1 with the model split over 2 devices: each device already streams only its own 1 KV heads"
    with pytest.raises(InputError, match=needle):
        momjax.generate(model, mixed_prompts(model), 2, HOST.replace(host_heads=1))
    with pytest.raises(InputError, match=needle):
        momjax.Session(model, HOST.replace(host_heads=1))
    with pytest.raises(InputError, match="host_heads=2 with the model split over 2 devices"):
        memory_report("llama-3.1-8b", 4096, HOST.replace(host_heads=2), devices=2)
    assert not ran


# ---------------------------------------------------------------------- sessions


def feed_in_pieces(session, tokens, piece=7):
    """Feed in 7-token pieces: each is padded to a 16-token bucket (two 8-token chunks, the second all padding)
    and leaves a 4-token block that ends partway, which the next piece's keys overlap."""
    for i in range(0, len(tokens), piece):
        session.feed(tokens[i:i + piece])


def ask(session, tokens, n=NEW_TOKENS) -> list[int]:
    return session.generate(tokens, n, temperature=0, stop_tokens=[]).tokens[0].tolist()


def test_session_equals_one_shot(model):
    """A document fed in pieces, then a question: baseline's one-shot greedy tokens, for every family; rewound to
    nothing, the other prompt likewise."""
    row0, row1 = mixed_prompts(model)
    want = greedy(model, "baseline")
    s = momjax.Session(model, SMALL)
    feed_in_pieces(s, row0[:60])
    assert s.length == 60 and s.buffer_memory_kind == "pinned_host"
    assert ask(s, row0[60:]) == want[0]
    assert s.length == len(row0) + NEW_TOKENS  # the answer is kept
    s.rewind(0)
    assert s.capacity == 0 and s.nbytes == 0
    feed_in_pieces(s, row1[:30])
    assert ask(s, row1[30:]) == want[1]


def test_session_turns_rewind_save_and_load(zoo, tmp_path):
    """Turns, a rewind into the middle of a block, and a session file read back by mom-host and by mom (and mom's
    read back by mom-host): transformers' greedy tokens each time (sliding window, GQA)."""
    from conftest import hf_greedy

    model, hf = zoo.model("mistral-window"), zoo.hf("mistral-window")
    rng = np.random.default_rng(7)
    doc, q1, q2 = (rng.integers(4, model.config.vocab_size, n).tolist() for n in (70, 9, 5))
    s = momjax.Session(model, SMALL)
    feed_in_pieces(s, doc, piece=30)
    a1 = ask(s, q1, 6)
    assert a1 == hf_greedy(hf, doc + q1, 6)
    assert ask(s, q2, 6) == hf_greedy(hf, doc + q1 + a1 + q2, 6)
    s.rewind(len(doc) + 3)  # 73: inside the block that holds q1
    want = hf_greedy(hf, doc + q1[:3] + q2, 6)
    assert ask(s, q2, 6) == want
    s.rewind(len(doc) + 3)
    s.save(str(tmp_path / "host.session"))
    for policy in (None, "mom"):
        t = momjax.Session.load(model, str(tmp_path / "host.session"), policy=policy)
        assert t.policy.name == (policy or SMALL.name) and t.tokens == doc + q1[:3]
        assert ask(t, q2, 6) == want
        t.rewind(len(doc) + 3)
        t.save(str(tmp_path / "again.session"))
        u = momjax.Session.load(model, str(tmp_path / "again.session"), policy=SMALL)
        assert ask(u, q2, 6) == want


def test_a_long_chat_merges_its_small_blocks_and_answers_the_same(zoo):
    """Twelve short turns after a document: each feed (a question, an answer) leaves a block of a few positions;
    once four have built up they are merged into blocks of a long prompt's size (16 here), so the session holds
    about one block per 16 positions. Answers stay transformers' greedy tokens (sliding window), after a rewind
    into a merged block too."""
    from conftest import hf_greedy

    model, hf = zoo.model("mistral-window"), zoo.hf("mistral-window")
    policy = SMALL.replace(minisequence=16, host_block=16)
    rng = np.random.default_rng(11)
    doc = rng.integers(4, model.config.vocab_size, 40).tolist()
    s = momjax.Session(model, policy)
    s.feed(doc)
    tokens, most = list(doc), 0
    for turn in range(6):
        question = rng.integers(4, model.config.vocab_size, 2 + turn % 3).tolist()
        answer = ask(s, question, 3)
        assert answer == hf_greedy(hf, tokens + question, 3), turn
        tokens += question + answer
        most = max(most, len(s._host.spans))
    assert s.tokens == tokens
    assert most <= -(-len(tokens) // 16) + offload.COMPACT_AFTER, (most, len(tokens))
    assert all(end - first == 16 for first, end in s._host.spans[:-offload.COMPACT_AFTER])  # full, merged blocks
    s.rewind(len(doc) + 5)  # inside a merged block
    question = [5, 6, 7]
    assert ask(s, question, 3) == hf_greedy(hf, tokens[:len(doc) + 5] + question, 3)


def test_session_int8_and_host_weights(zoo):
    """With int8 K/V a mom-host session answers as a mom session does; with host weights, as baseline does."""
    model = zoo.model("llama-gqa")
    row0 = mixed_prompts(model)[0]
    answers = []
    for policy in (momjax.POLICIES["mom"].replace(kv_dtype="int8"), SMALL.replace(kv_dtype="int8")):
        s = momjax.Session(model, policy)
        feed_in_pieces(s, row0[:60])
        answers.append(ask(s, row0[60:]))
    assert answers[0] == answers[1]
    on_host = momjax.load(zoo.folder("llama-gqa"), weights="host", progress=False)
    s = momjax.Session(on_host, SMALL)
    feed_in_pieces(s, row0[:60])
    assert ask(s, row0[60:]) == greedy(model, "baseline")[0]


def _cli(argv, capsys):
    from momjax.cli import main

    code = main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_command_line(cli_model, capsys, tmp_path, monkeypatch):
    """generate --policy mom-host (and --prompt-cache, written then reused) prints mom's text, and so does
    --weights host with every policy, on one device and on two; chat keeps a mom-host session, and a session with
    --weights host; plan --weights host plans every policy."""
    base = ["generate", "--model", cli_model, "--prompt", "Hello there", "--max-new-tokens", "12", "--quiet"]
    code, want, err = _cli(base + ["--policy", "mom"], capsys)
    assert code == 0, err
    for extra in (["--policy", "mom-host"], ["--policy", "mom-host", "--weights", "host"], ["--weights", "host"],
                  ["--policy", "mom-stream", "--weights", "host"], ["--policy", "baseline", "--weights", "host"]):
        code, out, err = _cli(base + extra, capsys)
        assert code == 0 and out == want, err
    cache = str(tmp_path / "prompt.cache")
    for reused in ("0", "11"):  # the prompt's 12 tokens; the second run reuses all but the last
        code, out, err = _cli(base + ["--policy", "mom-host", "--prompt-cache", cache], capsys)
        assert code == 0 and out.startswith(want.rstrip("\n")) and f"({reused} reused from" in err, err
    code, out, err = _cli(base + ["--policy", "mom-host", "--weights", "host", "--devices", "2"], capsys)
    assert code == 0 and out == want, err  # split over two devices, the weights in their host memory
    monkeypatch.setattr("sys.stdin", io.StringIO("Hello there\n"))
    session = str(tmp_path / "chat.session")
    code, out, err = _cli(["chat", "--model", cli_model, "--policy", "mom-host", "--session", session,
                           "--max-new-tokens", "12", "--quiet"], capsys)
    assert code == 0 and out.strip() and momjax.Session.load(momjax.load(cli_model, progress=False), session,
                                                            policy="mom").policy.name == "mom", err
    monkeypatch.setattr("sys.stdin", io.StringIO("Hello there\n"))
    session = str(tmp_path / "chat-host-weights.session")
    code, out, err = _cli(["chat", "--model", cli_model, "--weights", "host", "--session", session,
                           "--max-new-tokens", "12", "--quiet"], capsys)
    assert code == 0 and out.strip() and momjax.Session.load(momjax.load(cli_model, progress=False), session).length
    code, out, err = _cli(["plan", "--model", "llama-3.1-8b", "--hbm", "16GiB", "--host-memory", "1TiB", "--weights",
                           "host", "--json"], capsys)
    assert code == 0, err
    assert list(json.loads(out)["max_context"]) == ["baseline", "mom", "mom-stream", "mom-host"]


@pytest.mark.parametrize("policy", ["baseline", "mom", "mom-stream"])
def test_host_weights_decode_bytes_match_the_compiled_step(policy):
    """What memory_report and estimate say a decode step with host weights brings over the host link is what the
    compiled step takes from host memory: every weight (the embedding for its lookup, the LM head and final norm
    included) and the prompt K/V the policy streams. The device keeps two layers' weights and the larger of the
    embedding and the LM head instead of all of them."""
    from momjax import generation as G
    from momjax import targets as T
    from momjax.cache import sharding
    from momjax.memory import abstract_cache
    from momjax.offload_programs import weight_bytes
    from momjax.params import abstract_params

    cfg = momjax.Config(vocab_size=4000, hidden_size=128, intermediate_size=256, num_layers=3, num_heads=4,
                        num_kv_heads=2, head_dim=32)
    policy = momjax.get_policy(policy)
    params = abstract_params(cfg, np.float32, sharding=sharding("pinned_host"))
    token = jax.ShapeDtypeStruct((1,), np.int32, sharding=sharding("device"))
    compiled, _ = T.compile(G.decode_step_fn, params, token, abstract_cache(cfg, 1024, 64, np.float32, policy, 1, None),
                            cfg=cfg, policy=policy)
    on_device = memory_report(cfg, 1024, policy, phase="decode", new_tokens=64)
    w = weight_bytes(cfg, "float32", "host")
    for report in (memory_report(cfg, 1024, policy, phase="decode", new_tokens=64, weights="host"),
                   estimate(cfg, 1024, policy, phase="decode", new_tokens=64, weights="host")):
        assert report["host_to_device_bytes"] == T.host_parameter_bytes(compiled), report["source"]
        assert report["weights"] == "host"
    report = memory_report(cfg, 1024, policy, phase="decode", new_tokens=64, weights="host")
    assert on_device["device_bytes"] - report["device_bytes"] == w["total"] - w["device"] > 0
    assert report["host_bytes"] - on_device["host_bytes"] == w["total"]
