"""Part of the KV cache on the device while decoding (MemoryPolicy.kv_device_layers with mom-stream), the
bytes a decode step brings across the host link, read from the compiled program, and the planner's decode
speed and recommended policy.

kv_device_layers = N keeps the first N layers' prompt K/V on the device and streams the rest: every N from 0
(today's mom-stream) to L (like mom) must give baseline's greedy tokens, and the bytes across the bus per step
must fall linearly with N, as the compiled program says and as the shapes say.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from conftest import NEW_TOKENS, mixed_prompts

import momjax
from momjax import memory
from momjax.cache import place_for_decode
from momjax.errors import InputError

STREAM = momjax.POLICIES["mom-stream"]
FAMILY = "llama31-mha"  # 3 layers: N = 0, 1, 2, 3 cover none, some and all resident


def test_every_number_of_resident_layers_gives_baseline_tokens(zoo):
    model = zoo.model(FAMILY)
    L = model.config.num_layers
    assert L == 3
    prompts = mixed_prompts(model)
    expected = momjax.generate(model, prompts, NEW_TOKENS, "baseline", stop_tokens=[]).tokens
    for n in range(L + 1):
        policy = STREAM.replace(name=f"mom-stream-{n}", kv_device_layers=n)
        out = momjax.generate(model, prompts, NEW_TOKENS, policy, stop_tokens=[]).tokens
        np.testing.assert_array_equal(out, expected, err_msg=f"kv_device_layers={n}")


def test_resident_layers_are_on_the_device_and_the_rest_on_the_host(zoo):
    model = zoo.model(FAMILY)
    _, cache = momjax.prefill(model, mixed_prompts(model), STREAM)
    assert {x.sharding.memory_kind for x in cache.k + cache.v} == {"pinned_host"}
    placed = place_for_decode(cache, STREAM.replace(kv_device_layers=2))
    assert [x.sharding.memory_kind for x in placed.k] == ["device", "device", "pinned_host"]
    assert [x.sharding.memory_kind for x in placed.v] == ["device", "device", "pinned_host"]
    np.testing.assert_array_equal(np.asarray(placed.k[0]), np.asarray(cache.k[0]))
    mom = place_for_decode(cache, momjax.POLICIES["mom"])
    assert {x.sharding.memory_kind for x in mom.k + mom.v} == {"device"}


def test_host_to_device_bytes_from_the_compiled_step_equal_the_shapes_and_fall_linearly():
    cfg = dataclasses.replace(momjax.preset("llama-3.1-8b"), num_layers=4)
    S, B = 4096, 1
    layer_kv = 2 * B * cfg.num_kv_heads * S * cfg.head_dim * 4  # float32 K and V of one layer
    measured = []
    for n in range(cfg.num_layers + 1):
        r = memory.memory_report(cfg, S, STREAM.replace(kv_device_layers=n), "float32", "decode")
        assert r["host_to_device_bytes"] == (cfg.num_layers - n) * layer_kv
        assert r["host_bytes"] == (cfg.num_layers - n) * layer_kv
        e = memory.estimate(cfg, S, STREAM.replace(kv_device_layers=n), "float32", "decode")
        assert e["host_to_device_bytes"] == r["host_to_device_bytes"]
        # Everything else the step reads (weights, resident K/V, tail) is its device arguments.
        assert abs(r["device_read_bytes"] - e["device_read_bytes"]) < 1024
        measured.append(r["host_to_device_bytes"])
    assert np.all(np.diff(measured) == -layer_kv)
    assert memory.memory_report(cfg, S, "mom", "float32", "decode")["host_to_device_bytes"] == 0


def test_resident_layers_out_of_range_or_without_streaming_are_refused(zoo):
    model = zoo.model(FAMILY)
    with pytest.raises(InputError, match="between 0 and the model's 3 layers, got 4"):
        momjax.generate(model, [[1, 2, 3]], 2, STREAM.replace(kv_device_layers=4))
    with pytest.raises(ValueError, match="streams the KV cache from the host"):
        momjax.POLICIES["mom"].replace(kv_device_layers=1)
    with pytest.raises(ValueError, match="whole number of layers"):
        STREAM.replace(kv_device_layers=-1)
    with pytest.raises(ValueError, match="kv_dtype must be None"):
        STREAM.replace(kv_dtype="fp8")


def test_decode_speed_is_the_larger_of_device_and_link_time():
    t = momjax.targets.get("a100-80gb")
    step = dict(device_read_bytes=int(40e9), host_to_device_bytes=0)
    assert memory.decode_speed(step, t)["decode_tokens_per_s"] == pytest.approx(t.memory_bandwidth / 40e9)
    step = dict(device_read_bytes=int(16e9), host_to_device_bytes=int(10e9))
    speed = memory.decode_speed(step, t)
    link = 10e9 / t.host_link_bandwidth + 10e9 / t.memory_bandwidth
    assert speed["bound"] == "host link"
    assert speed["decode_tokens_per_s"] == pytest.approx(1 / link)
    assert speed["decode_tokens_per_s_serial"] < speed["decode_tokens_per_s"]
    assert memory.decode_speed(step, None) == {}


def test_plan_recommends_the_fastest_policy_that_fits():
    kw = dict(dtype="bfloat16", source="estimate", target="a100-80gb")
    short = memory.plan("llama-3.1-8b", None, "1TiB", context=131072, **kw)
    assert short["recommended"]["policy"] in ("baseline", "mom") and short["recommended"]["kv_dtype"] is None
    long = memory.plan("llama-3.1-8b", None, "1TiB", context=2**20, **kw)
    rec = long["recommended"]
    assert rec["policy"] == "mom-stream" and 0 < rec["kv_device_layers"] < 32
    assert not long["decode"]["mom"]["fits"]
    # More resident layers would not fit; one fewer is slower.
    one_more = STREAM.replace(kv_device_layers=rec["kv_device_layers"] + 1)
    assert memory.estimate("llama-3.1-8b", 2**20, one_more, "bfloat16", "decode")["device_bytes"] > 80 * 2**30
    all_streamed = memory.decode_speed(memory.estimate("llama-3.1-8b", 2**20, STREAM, "bfloat16", "decode"),
                                       "a100-80gb")["decode_tokens_per_s"]
    assert rec["decode_tokens_per_s"] >= 1.5 * all_streamed
    # int8 K/V: the recommendation may use it, and it is faster.
    q = memory.plan("llama-3.1-8b", None, "1TiB", kv_dtype="int8", context=2**20, **kw)
    assert q["recommended"]["kv_dtype"] == "int8"
    assert q["recommended"]["decode_tokens_per_s"] >= 5
    assert q["max_context"]["mom"] >= 900_000


def test_plan_refuses_what_cannot_be_answered():
    kw = dict(dtype="bfloat16", source="estimate", target="a100-80gb")
    with pytest.raises(InputError, match="context 100,000,000 tokens fits no policy"):
        memory.plan("llama-3.1-8b", None, "1TiB", context=100_000_000, **kw)
    with pytest.raises(InputError, match="kv_dtype must be None"):
        memory.plan("llama-3.1-8b", None, kv_dtype="int4", **kw)
    with pytest.raises(InputError, match="context must be a positive number"):
        memory.plan("llama-3.1-8b", None, context=0, **kw)


# ---------------------------------------------------------------------- command line


@pytest.fixture(scope="module")
def demo_folder(tmp_path_factory) -> str:
    from momjax import demo_model as demo

    return demo.write_checkpoint(str(tmp_path_factory.mktemp("kv-layers-cli")))


def _run(argv, capsys):
    from momjax.cli import main

    code = main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_cli_resident_layers_and_auto_give_the_same_text(demo_folder, capsys):
    base = ["generate", "--model", demo_folder, "--prompt", "Hello there", "--max-new-tokens", "6"]
    code, want, err = _run(base + ["--policy", "baseline", "--quiet"], capsys)
    assert code == 0, err
    code, out, err = _run(base + ["--policy", "mom-stream", "--kv-device-layers", "3", "--quiet"], capsys)
    assert code == 0, err
    assert out == want
    assert "mom-stream (3 of 4 layers' K/V on the device)" in err
    # auto on a CPU: this machine's RAM holds everything, so the fastest is a policy with the cache on the device.
    code, out, err = _run(base + ["--policy", "auto"], capsys)
    assert code == 0, err
    assert out == want
    assert "--policy auto chose baseline" in err


@pytest.mark.parametrize("extra, needle", [
    (["--policy", "mom", "--kv-device-layers", "2"], "streams the KV cache from the host"),
    (["--policy", "mom-stream", "--kv-device-layers", "9"], "between 0 and the model's 4 layers, got 9"),
    (["--policy", "auto", "--kv-device-layers", "2"], "chosen by --policy auto"),
    (["--policy", "auto", "--hbm", "1MiB"], "--policy auto: the weights alone need"),
    (["--kv-dtype", "int4"], "invalid choice"),
])
def test_cli_bad_policy_arguments_are_one_line(demo_folder, capsys, extra, needle):
    argv = ["generate", "--model", demo_folder, "--prompt", "Hello", "--max-new-tokens", "2", "--quiet", *extra]
    code, out, err = _run(argv, capsys)
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], err
    assert out == ""


def test_cli_plan_context_prints_the_decode_table(capsys):
    code, out, err = _run(["plan", "--model", "llama-3.1-8b", "--hbm", "80GiB", "--host-memory", "1TiB",
                           "--kv-dtype", "int8", "--context", "1048576"], capsys)
    assert code == 0, err
    assert "decoding after a 1,048,576-token prompt" in out
    assert "recommended: mom-stream with kv_device_layers=" in out and "int8 K/V" in out
    code, out, err = _run(["plan", "--model", "llama-3.1-8b", "--hbm", "80GiB", "--context", "900000000"], capsys)
    assert code == 2 and "fits no policy" in err


def test_cli_int8_kv_matches_the_api(demo_folder, capsys):
    from momjax.tokenizer import load_tokenizer

    model = momjax.load(demo_folder, progress=False)
    tok = load_tokenizer(demo_folder)
    policy = STREAM.replace(kv_dtype="int8", kv_device_layers=2)
    want = tok.decode(momjax.generate(model, [tok.encode("Hello there")], 6, policy).as_lists()[0])
    code, out, err = _run(["generate", "--model", demo_folder, "--prompt", "Hello there", "--max-new-tokens", "6",
                           "--policy", "mom-stream", "--kv-dtype", "int8", "--kv-device-layers", "2"], capsys)
    assert code == 0, err
    assert out == want + "\n"
    assert "mom-stream (2 of 4 layers' K/V on the device), int8 K/V" in err
