"""Tensor parallelism on a mesh of 1, 2 and 4 virtual CPU devices (conftest.py starts JAX with four).

Each family runs split over the mesh and on one device: greedy tokens identical, logits within float tolerance,
for every policy (mom-host too), int8 K/V and kv_device_layers, sampling with a seed, weights in host memory, and
Sessions (feed, generate, rewind, save on one mesh and load on another). The compiled decode step (and mom-host's
programs) are read: each layer holds exactly the two all-reduces tensor parallelism needs, and nothing gathers a
weight, a key or a value. Families with 2 KV heads run on 2 devices,
families with 4 KV heads on 4; a degree that does not divide the heads is refused (KV heads are not replicated).
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import transformers
from conftest import hf_greedy, random_tokens, rel_err

import momjax
import tiny
from momjax import generation as G
from momjax.cache import place_for_decode
from momjax.mesh import in_mesh

# Families with 4 KV heads, so that 4 devices split them: Qwen2 (biases; a vocabulary of 320 splits on 4) and
# Mistral (sliding window; a vocabulary of 258 does not split on 4, so the LM head splits on its hidden axis).
WIDE = {
    "qwen2-k4": (transformers.Qwen2Config, dict(
        vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=8,
        num_key_value_heads=4, max_position_embeddings=512, rms_norm_eps=1e-6, rope_theta=1000000.0,
        bos_token_id=1, eos_token_id=2, tie_word_embeddings=True)),
    "mistral-k4": (transformers.MistralConfig, dict(
        vocab_size=258, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=8,
        num_key_value_heads=4, max_position_embeddings=512, sliding_window=7, rope_theta=10000.0,
        bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)),
}
# (family, tensor-parallel degree): every family on 2 devices, one of each on 4.
CASES = [("llama-gqa", 2), ("qwen2", 2), ("mistral-window", 2), ("llama31-mha", 4), ("qwen2-k4", 4),
         ("mistral-k4", 4)]
POLICIES = ["baseline", "mom", "mom-stream"]
NEW = 8


@pytest.fixture(scope="module")
def wide(tmp_path_factory):
    """family -> (HF model, checkpoint folder) for the WIDE families."""
    out = {}
    for name in WIDE:
        hf = tiny.build_hf_model(name, families=WIDE)
        out[name] = (hf, tiny.save_checkpoint(hf, str(tmp_path_factory.mktemp(name))))
    return out


def folder_of(zoo, wide, family):
    return wide[family][1] if family in wide else zoo.folder(family)


def hf_of(zoo, wide, family):
    return wide[family][0] if family in wide else zoo.hf(family)


def load(folder, tp=None, weights="device"):
    return momjax.load(folder, dtype="float32", progress=False, mesh=None if tp is None else momjax.make_mesh(tp=tp),
                       weights=weights)


@pytest.mark.parametrize("family,tp", CASES)
def test_every_policy_on_a_mesh_equals_one_device_and_transformers(zoo, wide, family, tp):
    folder = folder_of(zoo, wide, family)
    one, split = load(folder), load(folder, tp)
    prompts = [random_tokens(one.config.vocab_size, (40,), 1).tolist(), random_tokens(one.config.vocab_size, (23,),
                                                                                     2).tolist()]
    reference = hf_greedy(hf_of(zoo, wide, family), prompts[0], NEW)
    for policy in POLICIES:
        tokens = momjax.generate(split, prompts, NEW, policy=policy, stop_tokens=[]).as_lists()
        assert tokens == momjax.generate(one, prompts, NEW, policy=policy, stop_tokens=[]).as_lists(), policy
        assert tokens[0] == reference, policy
        full = np.asarray(prompts[0])[None]
        assert rel_err(momjax.forward(split, full, policy=policy), momjax.forward(one, full, policy=policy)) < 1e-5


# mom-host with chunks of 16 tokens and blocks of 8: several of each, and prompts (40, 23) they do not divide.
SMALL_HOST = momjax.POLICIES["mom-host"].replace(minisequence=16, host_block=8)


@pytest.mark.parametrize("family,tp", [("mistral-window", 2), ("qwen2-k4", 4)])
def test_mom_host_and_host_weights_on_a_mesh_equal_one_device(zoo, wide, family, tp):
    """mom-host (its blocks split on the KV heads, each device streaming its own from its host memory) and weights
    in host memory (each device's share brought over layer by layer) give one device's baseline tokens."""
    folder = folder_of(zoo, wide, family)
    one, split, split_host = load(folder), load(folder, tp), load(folder, tp, weights="host")
    prompts = [random_tokens(one.config.vocab_size, (40,), 1).tolist(), random_tokens(one.config.vocab_size, (23,),
                                                                                     2).tolist()]
    expected = momjax.generate(one, prompts, NEW, policy="baseline", stop_tokens=[]).as_lists()
    assert expected[0] == hf_greedy(hf_of(zoo, wide, family), prompts[0], NEW)
    for model, policy in ((split, SMALL_HOST), (split_host, SMALL_HOST), (split_host, "mom")):
        assert momjax.generate(model, prompts, NEW, policy=policy, stop_tokens=[]).as_lists() == expected, policy
    _, cache = momjax.prefill(split, prompts, policy=SMALL_HOST)
    block = cache.blocks[0][0][0][0]
    assert block.sharding.spec[1] == "tp" and block.sharding.memory_kind == "pinned_host"
    assert {s.data.shape[1] for s in block.addressable_shards} == {one.config.num_kv_heads // tp}
    wq = split_host.params.layers[0].wq
    assert wq.sharding.memory_kind == "pinned_host" and wq.sharding.spec[1] == "tp"
    full = np.asarray(prompts[0])[None]
    assert rel_err(momjax.forward(split_host, full, policy="mom"), momjax.forward(one, full, policy="mom")) < 1e-5


def test_each_device_holds_its_share_of_every_split_weight(zoo, wide):
    model = load(folder_of(zoo, wide, "qwen2-k4"), 4)
    cfg, lp = model.config, model.params.layers[0]
    expected = {"wq": (cfg.hidden_size, 2, cfg.head_dim), "wk": (cfg.hidden_size, 1, cfg.head_dim),
                "wo": (2, cfg.head_dim, cfg.hidden_size), "w_up": (cfg.hidden_size, cfg.intermediate_size // 4),
                "w_down": (cfg.intermediate_size // 4, cfg.hidden_size), "bq": (2, cfg.head_dim)}
    for name, shape in expected.items():
        shards = getattr(lp, name).addressable_shards
        assert sorted(s.device.id for s in shards) == [0, 1, 2, 3], name
        assert {s.data.shape for s in shards} == {shape}, name
    assert {s.data.shape for s in model.params.embed.addressable_shards} == {(cfg.vocab_size // 4, cfg.hidden_size)}
    # A vocabulary that does not divide: the embedding is whole on each device, the LM head split on its input.
    odd = load(folder_of(zoo, wide, "mistral-k4"), 4)
    assert {s.data.shape for s in odd.params.embed.addressable_shards} == {odd.params.embed.shape}
    assert {s.data.shape for s in odd.params.lm_head.addressable_shards} == {(odd.config.hidden_size // 4, 258)}


def collectives(text: str) -> dict:
    ops = re.findall(r"= \S+ (all-reduce|all-gather|reduce-scatter|all-to-all|collective-permute)(?:-start)?\(", text)
    return {op: ops.count(op) for op in set(ops)}


@pytest.mark.parametrize("policy", ["mom", "mom-stream"])
def test_decode_step_has_two_all_reduces_per_layer_and_gathers_no_weight(zoo, wide, policy):
    model = load(folder_of(zoo, wide, "qwen2-k4"), 4)
    cfg, pol = model.config, momjax.get_policy(policy)
    _, cache = momjax.prefill(model, [[5] * 40], policy=pol)
    assert cache.k[0].sharding.spec[1] == "tp" and cache.k[0].sharding.memory_kind == "pinned_host"
    cache = place_for_decode(cache, pol).with_tail(4)
    assert cache.tail_k[0].sharding.spec[1] == "tp"
    with in_mesh(model.mesh):
        text = G.decode_step_fn.lower(model.params, jnp.zeros((1,), jnp.int32), cache, cfg=cfg,
                                      policy=pol).compile().as_text()
    found = collectives(text)
    # Two all-reduces of the residual stream per layer; the vocabulary-split LM head adds none (its logits stay
    # split), the embedding lookup one (each device holds a quarter of the rows).
    residual = re.findall(rf"f32\[1,1,{cfg.hidden_size}\]\{{[^}}]*\}} all-reduce\(", text)
    assert len(residual) == 2 * cfg.num_layers, found
    assert found.get("all-reduce") == 2 * cfg.num_layers + 1, found
    assert found.get("all-gather", 0) == 0 and found.get("all-to-all", 0) == 0, found
    assert found.get("collective-permute", 0) == 0, found


def test_mom_host_programs_and_a_host_weights_decode_step_gather_nothing(zoo, wide, monkeypatch):
    """mom-host's programs on 4 devices: the layer's finish holds the two all-reduces, attending to a streamed block
    nothing, and computing a chunk's q/k/v one all-gather (its residual, split on D in host memory); a decode step
    with the weights in host memory copies each device's share over (the same all-reduces as with the weights on
    the device, and no gather)."""
    from momjax import offload_programs

    model = load(folder_of(zoo, wide, "qwen2-k4"), 4)
    cfg = model.config
    found = {}
    for name in ("qkv_fn", "attend_fn", "finish_fn", "dec_qkv_fn", "dec_attend_fn", "dec_finish_fn"):
        def record(*args, _fn=getattr(offload_programs, name), _name=name, **kwargs):
            if _name not in found:
                found[_name] = collectives(_fn.lower(*args, **kwargs).compile().as_text())
            return _fn(*args, **kwargs)
        monkeypatch.setattr(offload_programs, name, record)
    momjax.generate(model, [[5] * 40], 3, policy=SMALL_HOST, stop_tokens=[])
    assert found["finish_fn"] == found["dec_finish_fn"] == {"all-reduce": 2}, found
    assert found["qkv_fn"] == {"all-gather": 1} and found["attend_fn"] == found["dec_attend_fn"] == {}, found
    assert found["dec_qkv_fn"] in ({}, {"all-reduce": 1}), found  # the first layer's looks the token up
    host = load(folder_of(zoo, wide, "qwen2-k4"), 4, weights="host")
    pol = momjax.get_policy("mom-stream")
    _, cache = momjax.prefill(host, [[5] * 40], policy=pol)
    cache = place_for_decode(cache, pol).with_tail(4)
    with in_mesh(host.mesh):
        text = G.decode_step_fn.lower(host.params, jnp.zeros((1,), jnp.int32), cache, cfg=cfg,
                                      policy=pol).compile().as_text()
    assert collectives(text) == {"all-reduce": 2 * cfg.num_layers + 1}, collectives(text)


@pytest.mark.parametrize("policy", [*POLICIES, "mom-host"])
def test_int8_kv_device_layers_and_sampling_on_a_mesh(zoo, policy):
    one, split = load(zoo.folder("llama-gqa")), load(zoo.folder("llama-gqa"), 2)
    prompts = [random_tokens(one.config.vocab_size, (37,), 3).tolist()] * 2
    pol = momjax.get_policy(policy).replace(kv_dtype="int8")
    if policy in ("mom-stream", "mom-host"):
        pol = pol.replace(kv_device_layers=1)
    args = dict(policy=pol, stop_tokens=[])
    assert momjax.generate(split, prompts, NEW, **args).as_lists() == momjax.generate(one, prompts, NEW,
                                                                                       **args).as_lists()
    sampled = dict(policy=policy, temperature=0.9, top_k=20, top_p=0.9, seed=7, stop_tokens=[])
    assert momjax.generate(split, prompts, NEW, **sampled).as_lists() == momjax.generate(one, prompts, NEW,
                                                                                          **sampled).as_lists()


@pytest.mark.parametrize("policy", [*POLICIES, "mom-host"])
def test_session_on_a_mesh_saves_and_loads_across_device_counts(zoo, wide, tmp_path, policy):
    folder = folder_of(zoo, wide, "llama31-mha")
    one, two, four = load(folder), load(folder, 2), load(folder, 4)
    doc, question = random_tokens(one.config.vocab_size, (45,), 4).tolist(), [7, 8, 9]
    expected = momjax.generate(one, [doc + question], NEW, policy=policy, stop_tokens=[]).as_lists()
    s = momjax.Session(four, policy=policy)
    s.feed(doc)
    assert s.generate(question, NEW, stop_tokens=[]).as_lists() == expected
    s.rewind(len(doc))
    assert s.generate(question, NEW, stop_tokens=[]).as_lists() == expected
    s.rewind(len(doc))
    s.save(str(tmp_path / "four.session"))
    for model in (one, two):  # saved on 4 devices, loaded on 1 and on 2
        loaded = momjax.Session.load(model, str(tmp_path / "four.session"))
        assert loaded.generate(question, NEW, stop_tokens=[]).as_lists() == expected
    back = momjax.Session(one, policy=policy)  # and the reverse: saved on 1, loaded on 4
    back.feed(doc)
    back.save(str(tmp_path / "one.session"))
    assert momjax.Session.load(four, str(tmp_path / "one.session")).generate(
        question, NEW, stop_tokens=[]).as_lists() == expected


def test_a_mesh_the_model_cannot_use_is_refused(zoo):
    folder = zoo.folder("llama-gqa")  # 4 query heads, 2 KV heads
    with pytest.raises(momjax.InputError, match=r"degree of 4 does not divide .* 2 KV heads.*degrees that work: 1, 2"):
        load(folder, 4)
    with pytest.raises(momjax.InputError, match="no 'tp' axis"):
        momjax.load(folder, progress=False, mesh=jax.make_mesh((2,), ("x",)))
    with pytest.raises(momjax.InputError, match=r"needs 8 devices; 4 are visible"):
        momjax.make_mesh(tp=8)
    with pytest.raises(momjax.InputError, match="tp must be a positive number"):
        momjax.make_mesh(tp=0)
    with pytest.raises(momjax.InputError, match="a 'dp' axis of 2 devices .* is not supported yet"):
        momjax.load(folder, progress=False, mesh=momjax.make_mesh(tp=2, dp=2))
    with pytest.raises(momjax.InputError, match="mesh must be a jax.sharding.Mesh"):
        momjax.load(folder, progress=False, mesh="tp=2")


# ---------------------------------------------------------------------- the command line


@pytest.fixture(scope="module")
def demo_folder(tmp_path_factory) -> str:
    """The demo checkpoint (4 query heads, 2 KV heads) with its tokenizer and chat template."""
    from momjax import demo_model

    return demo_model.write_checkpoint(str(tmp_path_factory.mktemp("mesh-cli")))


def cli(argv, capsys, stdin: str | None = None, monkeypatch=None) -> tuple[int, str, str]:
    from momjax.cli import main

    if stdin is not None:
        import io

        monkeypatch.setattr("sys.stdin", io.StringIO(stdin))
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("policy", ["mom-stream", "auto"])
def test_generate_and_chat_on_two_devices_print_what_one_device_prints(demo_folder, capsys, monkeypatch, policy):
    base = ["generate", "--model", demo_folder, "--prompt", "Tell me about meshes.", "--max-new-tokens", "12",
            "--quiet", "--policy", policy]
    code, one, err = cli(base, capsys)
    assert code == 0, err
    code, two, err = cli([*base, "--devices", "2"], capsys)
    assert code == 0, err
    assert two == one and one.strip()
    chat = ["chat", "--model", demo_folder, "--max-new-tokens", "8", "--quiet", "--policy", policy]
    code, one, err = cli(chat, capsys, "Hello\nAnd again\n/quit\n", monkeypatch)
    assert code == 0, err
    code, two, err = cli([*chat, "--devices", "2"], capsys, "Hello\nAnd again\n/quit\n", monkeypatch)
    assert code == 0, err
    assert two == one


@pytest.mark.parametrize("argv,needle", [
    (["--devices", "4"], "--devices 4: a tensor-parallel degree of 4 does not divide this model's 4 query heads and 2 "
                         "KV heads"),
    (["--devices", "8"], "--devices 8: a mesh of tp=8 x dp=1 needs 8 devices; 4 are visible"),
    (["--devices", "0"], "--devices 0: tp must be a positive number of devices"),
    (["--coordinator", "127.0.0.1:1"], "needs all three of --coordinator HOST:PORT, --num-processes N and "
                                       "--process-id I"),
])
def test_bad_device_arguments_are_one_line_errors(demo_folder, capsys, argv, needle):
    code, out, err = cli(["generate", "--model", demo_folder, "--prompt", "hi", *argv], capsys)
    assert code == 2 and out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("momjax: error: ") and needle in lines[0], err


# ---------------------------------------------------------------------- plans for a mesh


@pytest.mark.parametrize("devices", [2, 4])
@pytest.mark.parametrize("phase,policy", [("prefill", "mom"), ("decode", "mom"), ("decode", "mom-stream")])
def test_memory_report_on_several_devices_is_per_device_and_the_estimate_follows_it(devices, phase, policy):
    cfg = momjax.Config(vocab_size=1024, hidden_size=256, intermediate_size=768, num_layers=4, num_heads=8,
                        num_kv_heads=4, head_dim=32, max_position_embeddings=8192)
    one = momjax.memory_report(cfg, 4096, policy, dtype="float32", phase=phase)
    split = momjax.memory_report(cfg, 4096, policy, dtype="float32", phase=phase, devices=devices)
    guess = momjax.estimate(cfg, 4096, policy, dtype="float32", phase=phase, devices=devices)
    assert split["devices"] == devices and split["weight_bytes"] < one["weight_bytes"] / devices * 1.1
    assert split["kv_bytes"] == one["kv_bytes"] // devices  # each device holds its KV heads' share
    assert split["host_bytes"] == one["host_bytes"]  # host memory counted for all devices together
    assert split["device_bytes"] < one["device_bytes"]
    assert abs(guess["device_bytes"] - split["device_bytes"]) < 0.15 * split["device_bytes"], (guess, split)
    if phase == "decode":
        assert split["host_to_device_bytes"] == one["host_to_device_bytes"] // devices
        # the two all-reduces per layer and the embedding's, [1, D] float32 each, as a ring sends them
        ring = 2 * (devices - 1) / devices
        assert split["allreduce_bytes"] == guess["allreduce_bytes"] == int((2 * 4 + 1) * 256 * 4 * ring)


@pytest.mark.parametrize("phase", ["prefill", "decode"])
@pytest.mark.parametrize("weights", ["device", "host"])
def test_mom_host_and_host_weights_memory_on_several_devices_is_per_device(phase, weights):
    """mom-host's compiled programs on 2 devices: each holds about half of what one device holds, the estimate
    follows them, and a decode step's all-reduces (read from the compiled programs) are the estimate's."""
    cfg = momjax.Config(vocab_size=1024, hidden_size=256, intermediate_size=768, num_layers=4, num_heads=8,
                        num_kv_heads=4, head_dim=32, max_position_embeddings=8192)
    policy = momjax.POLICIES["mom-host"].replace(minisequence=512)
    args = dict(dtype="float32", phase=phase, weights=weights)
    one = momjax.memory_report(cfg, 4096, policy, **args)
    split = momjax.memory_report(cfg, 4096, policy, devices=2, **args)
    guess = momjax.estimate(cfg, 4096, policy, devices=2, **args)
    assert split["devices"] == 2 and split["kv_bytes"] == one["kv_bytes"] // 2
    assert 0.45 * one["device_bytes"] < split["device_bytes"] < 0.55 * one["device_bytes"], (one, split)
    assert abs(guess["device_bytes"] - split["device_bytes"]) < 0.05 * split["device_bytes"], (guess, split)
    assert guess["host_bytes"] == split["host_bytes"]
    if phase == "decode":
        assert split["host_to_device_bytes"] == guess["host_to_device_bytes"] < 0.55 * one["host_to_device_bytes"]
        assert split["allreduce_bytes"] == guess["allreduce_bytes"] > 0


def test_plan_on_several_devices_and_its_errors(capsys):
    with pytest.raises(momjax.InputError, match=r"weights alone need .* more than the 80.00 GiB device budget"):
        momjax.plan("llama-3.1-70b", "80GiB", "1TiB", source="estimate")
    two = momjax.plan("llama-3.1-70b", "80GiB", "1TiB", source="estimate", devices=2)
    eight = momjax.plan("llama-3.1-70b", "80GiB", "1TiB", source="estimate", devices=8, target="h100",
                        context=131072)
    assert 0 < two["max_context"]["mom"] < eight["max_context"]["mom"]
    assert eight["max_context"]["mom"] >= 1_000_000 and eight["limits"]["mom-stream"] == "host"
    # mom-host on 8 devices: host memory bounds it too, which also holds the residual stream (once, split on D).
    assert eight["limits"]["mom-host"] == "host"
    assert 0.9 * eight["max_context"]["mom-stream"] < eight["max_context"]["mom-host"]
    assert two["max_context"]["mom-stream"] > 0
    speed = eight["decode"]["mom"]
    assert speed["interconnect_s"] > 0 and speed["decode_tokens_per_s"] < 1 / (speed["device_s"] + speed["link_s"])
    with pytest.raises(momjax.InputError, match="degree of 3 does not divide"):
        momjax.plan("llama-3.1-70b", "80GiB", source="estimate", devices=3)
    with pytest.raises(momjax.InputError, match="devices must be a positive number"):
        momjax.estimate("llama-3.1-8b", 1024, devices=0)
    with pytest.raises(momjax.TargetError, match="compiling for 8 devices needs 8 of this machine's; it has 4"):
        momjax.memory_report("llama-3.2-1b", 1024, devices=8)
    code, out, err = cli(["plan", "--model", "llama-3.1-70b", "--hbm", "80GiB", "--host-memory", "1TiB",
                          "--devices", "8"], capsys)
    assert code == 0, err
    assert "8 devices, tensor-parallel: each device budget 80.00 GiB" in out and "16.43 GiB per device" in out


def test_the_server_on_two_devices_answers_as_one_device_does(demo_folder):
    """momjax serve --devices 2: the OpenAI client's answers over a kept document equal one device's generate."""
    from test_serve import DOCUMENT, ask, client, live, make_engine

    from momjax.tokenizer import load_tokenizer

    tok = load_tokenizer(demo_folder)
    one, two = load(demo_folder), load(demo_folder, 2)
    messages = [{"role": "system", "content": DOCUMENT}]
    with live(make_engine(two, tok)) as url:
        c = client(url)
        for question in ("What do mini-sequences keep?", "Say it again, shorter."):
            messages.append({"role": "user", "content": question})
            r = ask(c, messages, max_tokens=10)
            want = momjax.generate(one, [tok.render_chat(messages)], 10, "mom").as_lists()[0]
            assert r.choices[0].message.content == tok.decode(want)
            messages.append({"role": "assistant", "content": r.choices[0].message.content})
        assert r.usage.prompt_tokens_details.cached_tokens > 0
