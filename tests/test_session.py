"""Sessions (momjax.Session): feeding a cache in pieces, generating over it, rewinding it, saving and loading it
give exactly what one-shot `momjax.generate` gives on the concatenated tokens, for every family and policy;
bad input leaves a session unchanged; a feed never needs more device memory than a one-shot prefill.

One-shot references reuse conftest's prompts (two rows of 75 and 37 tokens, 16 new tokens, greedy, no stop
tokens), the very call test_policies makes, so their compilations are shared. Sessions cut those rows into a
document and a question; multi-turn references, whose prompts are new, come from transformers' greedy
decoding (equal to momjax.generate by test_golden) so no new one-shot program is compiled for them.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from conftest import FAMILY_NAMES, NEW_TOKENS, PROMPT_LENS, hf_greedy, mixed_prompts, rel_err

import momjax
from momjax import generation as G
from momjax.errors import SessionError
from momjax.memory import feed_memory_report

P = momjax.POLICIES
SMALL = P["mom"].replace(name="mom-small", minisequence=8, q_block=4, kv_block=8)
DOC = 60  # row 0: a 60-token document, then a 15-token question (75 tokens in all)
CAPACITY = 128

_ONE_SHOT: dict = {}


def one_shot(model) -> np.ndarray:
    """momjax.generate on conftest's two prompts (baseline, greedy, no stop tokens): [2, NEW_TOKENS]."""
    if id(model) not in _ONE_SHOT:
        out = momjax.generate(model, mixed_prompts(model), NEW_TOKENS, P["baseline"], temperature=0, stop_tokens=[])
        _ONE_SHOT[id(model)] = out.tokens
    return _ONE_SHOT[id(model)]


def feed(session, tokens):
    """Feed in pieces of at most 16 tokens: every piece runs the same compiled program (one length bucket)."""
    for i in range(0, len(tokens), 16):
        logits = session.feed(tokens[i:i + 16])
    return logits


def ask(session, tokens, n=NEW_TOKENS) -> list[int]:
    out = session.generate(tokens, n, temperature=0, stop_tokens=[])
    assert out.tokens.shape == (1, n) and out.lengths.tolist() == [n]
    return out.tokens[0].tolist()


# Every family with mom, and the other policies on mistral-window (sliding window, GQA: the most masking).
# What the cases leave out: feeds read every knob but kv_decode (mom-stream feeds as mom does) and decoding
# reads only kv_decode (baseline and mom decode alike), so each program here runs on the hardest family.
CASES = [(family, "mom") for family in FAMILY_NAMES]
CASES += [("mistral-window", "baseline"), ("mistral-window", "mom-stream")]


@pytest.mark.parametrize("family,policy", CASES)
def test_document_then_question_equals_one_shot(zoo, family, policy):
    """Feed a document in pieces, ask a question; rewind to 0 and do the other prompt: the one-shot greedy
    tokens. Pieces of at most 16 tokens into a 128-token buffer: one feed program, one decode program."""
    model = zoo.model(family)
    row0, row1 = mixed_prompts(model)
    s = momjax.Session(model, policy, capacity=CAPACITY)
    logits = feed(s, row0[:DOC])
    assert logits.shape == (model.config.vocab_size,) and s.length == DOC and s.capacity == CAPACITY
    kind = "device" if policy == "baseline" else "pinned_host"
    assert {b.sharding.memory_kind for b in (*s._k, *s._v)} == {kind}  # the cache stays where the policy says
    assert ask(s, row0[DOC:]) == one_shot(model)[0].tolist()
    assert s.length == PROMPT_LENS[0] + NEW_TOKENS  # the answer is kept
    s.rewind(0)
    feed(s, row1[:30])
    assert ask(s, row1[30:]) == one_shot(model)[1].tolist()


def test_turns_rewind_and_growth(zoo):
    """Several turns and a rewind to just after the document, with 8-token mini-sequences and 4-query / 8-key
    attention blocks (feeds cross their edges), the buffers growing from 64 to 128 positions on the way."""
    model, hf = zoo.model("mistral-window"), zoo.hf("mistral-window")
    rng = np.random.default_rng(7)
    V = model.config.vocab_size
    doc, q1, q2 = (rng.integers(4, V, n).tolist() for n in (70, 9, 5))
    s = momjax.Session(model, SMALL)
    s.feed(doc[:40])
    assert s.capacity == 64
    s.feed(doc[40:])
    assert s.capacity == CAPACITY and s.tokens == doc
    a1 = ask(s, q1, 6)
    assert a1 == hf_greedy(hf, doc + q1, 6)
    a2 = ask(s, q2, 6)
    assert a2 == hf_greedy(hf, doc + q1 + a1 + q2, 6)
    s.rewind(len(doc))
    assert s.tokens == doc
    assert ask(s, q2, 6) == hf_greedy(hf, doc + q2, 6)


def test_sampling_and_stop_tokens_match_generate(zoo):
    """Sampled tokens equal momjax.generate's for the same seed; a stop token ends the answer, is kept in the
    cache, and nothing after it is."""
    model = zoo.model("llama-gqa")
    row0 = mixed_prompts(model)[0]
    settings = dict(temperature=0.9, top_p=0.9, seed=3, stop_tokens=[])
    ref = momjax.generate(model, [row0], NEW_TOKENS, "mom", **settings)
    s = momjax.Session(model, "mom", capacity=CAPACITY)
    feed(s, row0[:DOC])
    out = s.generate(row0[DOC:], NEW_TOKENS, **settings)
    assert out.tokens.tolist() == ref.tokens.tolist()
    stop = int(ref.tokens[0, 4])  # make the fifth sampled token a stop token
    s.rewind(DOC)
    out = s.generate(row0[DOC:], NEW_TOKENS, **{**settings, "stop_tokens": [stop]})
    first = ref.tokens[0].tolist().index(stop)
    assert out.lengths.tolist() == [first + 1] and s.tokens == row0 + ref.tokens[0, : first + 1].tolist()


def test_stream_yields_what_generate_returns(zoo):
    model = zoo.model("llama-gqa")
    row0 = mixed_prompts(model)[0]
    s = momjax.Session(model, "mom", capacity=CAPACITY)
    feed(s, row0[:DOC])
    stats: dict = {}
    pieces = list(s.stream(row0[DOC:], NEW_TOKENS, stop_tokens=[], stats=stats))
    assert [t for piece in pieces for t in piece] == one_shot(model)[0].tolist() and len(pieces) > 1
    assert stats["new_tokens"] == NEW_TOKENS and s.length == PROMPT_LENS[0] + NEW_TOKENS


def test_save_and_load_in_a_new_process(zoo, tmp_path):
    """A session saved here and loaded by another Python process answers as one-shot generate does."""
    model = zoo.model("mistral-window")
    row0 = mixed_prompts(model)[0]
    s = momjax.Session(model, "mom", capacity=CAPACITY)
    feed(s, row0[:DOC])
    path = str(tmp_path / "doc.session")
    s.save(path)
    assert os.listdir(tmp_path) == ["doc.session"]  # no temp file left behind
    script = f"""
import json, momjax
model = momjax.load({zoo.folder('mistral-window')!r}, progress=False)
s = momjax.Session.load(model, {path!r})
out = s.generate({row0[DOC:]!r}, {NEW_TOKENS}, stop_tokens=[])
print(json.dumps(dict(length=s.length, policy=s.policy.name, tokens=out.tokens[0].tolist())))
"""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300,
                          check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result == dict(length=PROMPT_LENS[0] + NEW_TOKENS, policy="mom", tokens=one_shot(model)[0].tolist())


def test_load_into_another_policy_and_save_empty(zoo, tmp_path):
    model = zoo.model("mistral-window")
    row0 = mixed_prompts(model)[0]
    s = momjax.Session(model, "baseline", capacity=CAPACITY)
    feed(s, row0[:DOC])
    s.save(str(tmp_path / "a.session"))
    t = momjax.Session.load(model, str(tmp_path / "a.session"), policy="mom-stream", capacity=CAPACITY)
    assert t.policy.name == "mom-stream" and t.tokens == row0[:DOC]
    assert {b.sharding.memory_kind for b in t._k} == {"pinned_host"}
    assert ask(t, row0[DOC:]) == one_shot(model)[0].tolist()
    momjax.Session(model).save(str(tmp_path / "empty.session"))
    assert momjax.Session.load(model, str(tmp_path / "empty.session")).length == 0


# ---------------------------------------------------------------------- bad input


def snapshot(s):
    return s.tokens, s.capacity, [np.asarray(b).copy() for b in s._k[:1]]


def assert_unchanged(s, before):
    tokens, capacity, k = before
    assert s.tokens == tokens and s.capacity == capacity
    np.testing.assert_array_equal(np.asarray(s._k[0]), k[0])


def test_bad_calls_raise_and_leave_the_session_unchanged(zoo):
    model = zoo.model("mistral-window")
    row0 = mixed_prompts(model)[0]
    s = momjax.Session(model, "mom", capacity=CAPACITY)
    feed(s, row0[:DOC])
    before = snapshot(s)
    V = model.config.vocab_size
    cases = [
        (lambda: s.feed([]), "nothing to feed"),
        (lambda: s.feed(np.zeros((0,), np.int32)), "nothing to feed"),
        (lambda: s.feed([5, V]), "outside the vocabulary"),
        (lambda: s.feed([[5, 6], [7, 8]]), "one conversation"),
        (lambda: s.feed(["a"]), "integer token ids"),
        (lambda: s.feed([5] * (model.max_context - DOC + 1)), "exceeds the model's context"),
        (lambda: s.generate([5], model.max_context - DOC), "exceeds the model's context"),
        (lambda: s.generate([5], 0), "max_new_tokens"),
        (lambda: s.generate([5], 4, temperature=-1), "temperature"),
        (lambda: s.generate([5], 4, top_k=0), "top_k"),
        (lambda: s.rewind(DOC + 1), "cannot rewind"),
        (lambda: s.rewind(-1), "cannot rewind"),
        (lambda: s.rewind(1.5), "number of tokens"),
        (lambda: s.feed([5], on_layer=3), "on_layer"),
        (lambda: momjax.Session("not a model"), "momjax.Model"),
    ]
    for call, message in cases:
        with pytest.raises(momjax.InputError, match=message):
            call()
        assert_unchanged(s, before)
    assert issubclass(SessionError, momjax.InputError)
    assert ask(s, row0[DOC:]) == one_shot(model)[0].tolist()  # still the right cache


def test_bad_session_files(zoo, tmp_path):
    """Another model, another dtype, damaged and foreign files: a SessionError naming what is wrong."""
    from safetensors.numpy import save_file

    model = zoo.model("mistral-window")
    row0 = mixed_prompts(model)[0]
    s = momjax.Session(model, "mom", capacity=CAPACITY)
    s.feed(row0[:16])
    good = str(tmp_path / "good.session")
    s.save(good)
    with open(good, "rb") as f:
        data = f.read()

    def write(name, content: bytes) -> str:
        path = str(tmp_path / name)
        with open(path, "wb") as f:
            f.write(content)
        return path

    def rewrite(name, change_meta=None, change_tensors=None) -> str:
        from safetensors import safe_open

        with safe_open(good, framework="np") as f:
            names = f.keys()
            meta, tensors = dict(f.metadata()), {k: f.get_tensor(k) for k in names}
        if change_meta:
            change_meta(meta)
        if change_tensors:
            change_tensors(tensors)
        path = str(tmp_path / name)
        save_file(tensors, path, metadata=meta)
        return path

    def bump_value(t):
        t["v.1"] = t["v.1"] + 1

    def drop_layer(t):
        del t["k.1"]

    other_family = zoo.model("llama-gqa")
    other_weights = momjax.Model(config=model.config, params=jax.tree.map(lambda w: w * 1.0001, model.params))
    bf16 = zoo.model("mistral-window", dtype="bfloat16")
    header = int.from_bytes(data[:8], "little") + 8
    flipped = bytearray(data)
    flipped[header + 100] ^= 0xFF  # one byte of tensor data
    cases = [
        (model, str(tmp_path / "missing.session"), "does not exist"),
        (model, write("truncated.session", data[: len(data) // 2]), "truncated"),
        (model, write("tiny.session", data[:5]), "truncated"),
        (model, write("text.session", b"not a session at all, just some text"), "truncated"),
        (model, write("flipped.session", bytes(flipped)), "corrupted"),
        (model, rewrite("tampered.session", change_tensors=bump_value), "corrupted"),
        (model, rewrite("layers.session", change_tensors=drop_layer), "cache layout"),
        (model, rewrite("version.session", lambda m: m.update(format_version="99")), "format version 99"),
        (model, rewrite("foreign.session", lambda m: m.update(format="other")), "not a momjax session"),
        (model, rewrite("meta.session", lambda m: m.pop("policy")), "damaged metadata"),
        (other_family, good, "another model architecture .*hidden_size|another model architecture"),
        (other_weights, good, "other weights"),
        (bf16, good, "float32, not bfloat16"),
    ]
    for target, path, message in cases:
        with pytest.raises(SessionError, match=message):
            momjax.Session.load(target, path)
    assert momjax.Session.load(model, good).tokens == row0[:16]


def test_save_is_atomic(zoo, tmp_path, monkeypatch):
    """A save that fails at the rename leaves the previous file intact and no temp file; a missing folder is a
    clear error."""
    model = zoo.model("mistral-window")
    row0 = mixed_prompts(model)[0]
    s = momjax.Session(model, "baseline", capacity=CAPACITY)
    s.feed(row0[:10])
    path = str(tmp_path / "s.session")
    s.save(path)
    with open(path, "rb") as f:
        before = f.read()
    s.feed(row0[10:20])

    def broken_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk full"):
        s.save(path)
    monkeypatch.undo()
    with open(path, "rb") as f:
        assert f.read() == before
    assert os.listdir(tmp_path) == ["s.session"]
    with pytest.raises(SessionError, match="does not exist"):
        s.save(str(tmp_path / "no" / "such" / "folder.session"))


# ---------------------------------------------------------------------- memory


MID = momjax.Config(vocab_size=512, hidden_size=128, intermediate_size=512, num_layers=2, num_heads=4,
                    num_kv_heads=2, head_dim=32, max_position_embeddings=16384)


@pytest.mark.parametrize("policy", ["baseline", "mom"])
def test_feed_needs_no_more_device_memory_than_one_shot_prefill(policy):
    """XLA's figures for the feed's compiled programs (abstract inputs, nothing allocated) against a one-shot
    prefill of the same total length: a question after a document, and a feed whose padding would run past
    the length bucket of the total (the buffer is that bucket; the padding is dropped). mom-stream
    feeds with the same programs as mom (decode placement is all that differs)."""
    for length, new in ((1000, 20), (1020, 3)):  # both one-shot totals fall in the 1024 bucket
        feed = feed_memory_report(MID, length, new, policy)
        prefill = momjax.memory_report(MID, length + new, policy)
        assert feed["capacity"] == G.bucket_length(length + new, P[policy])
        assert feed["device_bytes"] <= prefill["device_bytes"], (length, new, feed, prefill)


def test_padding_past_the_buffer_end_is_dropped(zoo):
    """3 tokens fed with 13 free positions left (the 16-token bucket does not fit): the cache equals a
    one-shot prefill's, and the valid keys before them are untouched."""
    model = zoo.model("llama-gqa")
    row0 = mixed_prompts(model)[0]
    tokens = (row0 * 2)[:118]
    s = momjax.Session(model, "baseline", capacity=CAPACITY)
    feed(s, tokens[:115])
    before = [np.asarray(k[:, :, :115]).copy() for k in s._k]
    s.feed(tokens[115:])  # 115 + 16 > 128: written at 112, its first 3 positions kept from the buffer
    assert s.capacity == CAPACITY
    for layer, k in enumerate(s._k):
        np.testing.assert_array_equal(np.asarray(k[:, :, :115]), before[layer])
    _, cache = momjax.prefill(model, [tokens], "baseline")  # left-padded to 128: 10 pad positions
    for got, want in ((s._k, cache.k), (s._v, cache.v)):
        for layer in range(model.config.num_layers):
            assert rel_err(np.asarray(got[layer])[:, :, :118], np.asarray(want[layer])[:, :, 10:]) < 1e-5
