"""The GPU tier: every program momjax runs, compiled by XLA's GPU compiler for an A100 80GB, an H100 and an H200,
no GPU.

Needs `pip install 'momjax[gpu-plan]'`; run by .ci/gpu_tier, not by `pytest tests`. Any failure of the GPU
compiler (host offload, layouts, a fusion it cannot emit) fails a test here, since nothing is caught.

1. Tiny shapes (fast): each policy's prefill and decode step (memory_report), and the jitted programs
   `generate` runs (the whole-sequence forward and the decode loop), for both GPUs, in bfloat16.
2. Llama-3.1-8B at 128k tokens in bfloat16: the compiled figures against `estimate`, and the prompt's KV
   in host memory for `mom` and `mom-stream`, put there by the compiled program itself.
3. The planner's answer for Llama-3.1-8B on an A100 80GB, confirmed by compiled programs.
4. mom-host (momjax.offload_programs): its programs for every GPU, nothing on the device growing with the context,
   and the long-context targets on the GPUs people have (RTX 4090, T4, one A100) with weights in host memory.
"""

import jax
import jax.numpy as jnp
import pytest

import momjax
from momjax import generation as G
from momjax import memory, targets
from momjax.decoding import decode_program
from momjax.params import abstract_params

GPUS = ("a100-80gb", "h100", "h200")
POLICIES = tuple(momjax.POLICIES)
LAYER_POLICIES = tuple(n for n, p in momjax.POLICIES.items() if not p.on_host)  # prefill: generation.py's per-layer program
GiB = 2**30
TINY = momjax.Config(vocab_size=512, hidden_size=128, intermediate_size=384, num_layers=2, num_heads=4,
                     num_kv_heads=2, head_dim=32)
TINY_LEN = 4096  # two 2048-token mini-sequences for mom and mom-stream


@pytest.mark.parametrize("gpu", GPUS)
@pytest.mark.parametrize("policy", LAYER_POLICIES)
@pytest.mark.parametrize("phase", ("prefill", "decode"))
def test_tiny_programs_compile_for_the_gpu(gpu, policy, phase):
    r = memory.memory_report(TINY, TINY_LEN, policy, dtype="bfloat16", phase=phase, target=gpu)
    assert r["source"] == f"xla-gpu:{gpu}"
    assert r["device_bytes"] > r["weight_bytes"]
    on_host = (momjax.get_policy(policy).kv_prefill if phase == "prefill" else
               momjax.get_policy(policy).kv_decode) == "pinned_host"
    prompt_kv = 2 * TINY.num_layers * TINY.num_kv_heads * TINY_LEN * TINY.head_dim * 2
    assert r["host_bytes"] == (prompt_kv if on_host else 0), r


@pytest.mark.parametrize("gpu", GPUS)
@pytest.mark.parametrize("policy", LAYER_POLICIES)
def test_tiny_generate_programs_compile_for_the_gpu(gpu, policy):
    """The forward pass over every position and the sampling decode loop that `generate` jits."""
    policy = momjax.get_policy(policy)
    dev = momjax.cache.sharding("device")  # this machine's: targets.compile moves every argument to the GPU
    params = abstract_params(TINY, jnp.bfloat16, sharding=dev)
    tokens = jax.ShapeDtypeStruct((2, TINY_LEN), jnp.int32, sharding=dev)
    start = jax.ShapeDtypeStruct((2,), jnp.int32, sharding=dev)
    stages = G.prefill_stages(params, tokens, start, TINY, policy, every_position=True)
    for stage in stages:
        _, analysis = targets.compile(stage.fn, *stage.args, target=gpu, **stage.static)
        assert analysis["source"] == f"xla-gpu:{gpu}" and analysis["device_bytes"] > 0, stage.name

    cache = memory.abstract_cache(TINY, TINY_LEN, 16, jnp.bfloat16, policy, 2)  # its tail: 15 new tokens
    scalar = lambda dtype, shape=(): jax.ShapeDtypeStruct(shape, dtype, sharding=dev)
    key = jax.random.PRNGKey(0)
    top_k = 40  # static
    sampling = (scalar(key.dtype, key.shape), scalar(jnp.float32), top_k, scalar(jnp.float32), scalar(jnp.int32, (8,)),
                scalar(jnp.int32))
    fn, args, static = decode_program(params, cache, scalar(jnp.int32, (2,)), scalar(jnp.bool_, (2,)), sampling,
                                      TINY, policy, 15)
    _, decode = targets.compile(fn, *args, target=gpu, **static)
    prompt_kv = 2 * TINY.num_layers * 2 * TINY.num_kv_heads * TINY_LEN * TINY.head_dim * 2
    assert decode["host_bytes"] == (prompt_kv if policy.kv_decode == "pinned_host" else 0)


@pytest.fixture(scope="module")
def llama_128k():
    out = {}
    for gpu in GPUS:
        for policy in POLICIES:
            for phase in ("prefill", "decode"):
                out[gpu, policy, phase] = memory.memory_report("llama-3.1-8b", 131072, policy, dtype="bfloat16",
                                                               phase=phase, target=gpu)
    return out


def test_llama_128k_figures_agree_with_the_estimate(llama_128k):
    for (gpu, policy, phase), r in llama_128k.items():
        est = memory.estimate("llama-3.1-8b", 131072, policy, dtype="bfloat16", phase=phase)
        assert r["host_bytes"] == est["host_bytes"] and r["kv_bytes"] == est["kv_bytes"], (gpu, policy, phase)
        if (policy, phase) == ("baseline", "prefill"):
            # The GPU compiler fuses the MLP's gate and product, which the estimate counts as separate
            # [S, F] temporaries: the estimate is an upper bound there (40.6 vs 44.4 GiB), not within 5%.
            assert r["weight_bytes"] + r["kv_bytes"] < r["device_bytes"] <= est["device_bytes"], (gpu, r, est)
        else:
            err = abs(r["device_bytes"] / est["device_bytes"] - 1)
            assert err < 0.05, (gpu, policy, phase, r["device_bytes"] / GiB, est["device_bytes"] / GiB)


def test_llama_128k_kv_goes_to_host_memory(llama_128k):
    kv = 16 * GiB  # 32 layers x 8 KV heads x 128 x 131072 tokens x 2 (K, V) x 2 bytes
    for gpu in GPUS:
        mom = llama_128k[gpu, "mom", "prefill"]
        assert mom["device_bytes"] <= 18.4 * GiB and mom["host_bytes"] == kv, (gpu, mom)
        # Put on the host by the compiled program itself, not by momjax's counting.
        assert mom["host_argument_counted_bytes"] == 0
        stream = llama_128k[gpu, "mom-stream", "decode"]
        assert stream["host_bytes"] == kv and stream["host_argument_counted_bytes"] == kv
        assert stream["device_bytes"] < llama_128k[gpu, "mom", "decode"]["device_bytes"] - 0.9 * kv
        base = llama_128k[gpu, "baseline", "prefill"]
        assert base["host_bytes"] == 0 and base["device_bytes"] >= base["weight_bytes"] + kv
    programs = memory.compile_program(momjax.preset("llama-3.1-8b"), 131072, momjax.get_policy("mom"), "bfloat16",
                                      "prefill", target="h100")
    layer = next(b for stage, _, _, b in programs if stage.name == "layer")
    assert layer["host_output_bytes"] * 32 == kv  # the GPU compiler's own count of each layer's offloaded K/V


def test_plan_on_an_a100_is_confirmed_by_compiled_programs():
    result = momjax.plan("llama-3.1-8b", "80GiB", "1TiB", dtype="bfloat16", target="a100-80gb")
    ctx = result["max_context"]
    assert set(result["source"].values()) == {"xla-gpu:a100-80gb"}
    assert ctx["mom-stream"] >= 3_300_000 and ctx["baseline"] < ctx["mom"] < ctx["mom-stream"]
    for phase in ("prefill", "decode"):
        r = memory.memory_report("llama-3.1-8b", ctx["mom-stream"], "mom-stream", dtype="bfloat16", phase=phase,
                                 target="a100-80gb")
        assert r["device_bytes"] <= 80 * GiB


def _streamed(cache, to_host):
    """The cache with every layer's prompt K/V (and int8 scales) put in pinned host memory inside the program: a
    deviceless compile cannot be given host-resident arguments, but it compiles this placement as a GPU does."""
    fields = ("k", "v", "k_scale", "v_scale")
    return cache.replace(**{f: tuple(to_host(a) for a in getattr(cache, f)) for f in fields})


@pytest.mark.parametrize("kv_dtype", (None, "int8"))
def test_streamed_decode_holds_one_layer_of_the_cache_at_a_time(kv_dtype):
    """mom-stream decoding must bring one layer's K/V to the device at a time. On an H200 the step once started
    every layer's copy at its top (XLA had dropped the barrier's unused tie to the previous layer's attention),
    holding the whole cache on the device: the step's temporaries were the whole cache. Read from the step and
    from the decode loop compiled for the H200, with the cache placed on the host inside the program."""
    from momjax.cache import to_memory_kind

    cfg = TINY.replace(num_layers=6, hidden_size=256, num_heads=4, num_kv_heads=2, head_dim=64)
    S = 8192
    policy = momjax.get_policy("mom-stream").replace(kv_device_layers=0, kv_dtype=kv_dtype)
    dev = momjax.cache.sharding("device")
    params = abstract_params(cfg, jnp.bfloat16, sharding=dev)
    on_device = policy.replace(kv_prefill="device", kv_decode="device", kv_device_layers=None)
    cache = memory.abstract_cache(cfg, S, 8, jnp.bfloat16, on_device, 1)
    layer = sum(memory.shapes.nbytes(a) for a in cache.layer(0) if a is not None)
    to_host = lambda a: to_memory_kind(a, "pinned_host")
    token = jax.ShapeDtypeStruct((1,), jnp.int32, sharding=dev)

    def step(params, token, cache):
        return momjax.model.decode_step(params, token, _streamed(cache, to_host), cfg, policy)

    _, analysis = targets.compile(jax.jit(step), params, token, cache, target="h200")
    # One streamed layer in flight, plus the step's small temporaries; the whole cache would be 6 layers.
    assert analysis["temp_bytes"] < 1.6 * layer, (analysis["temp_bytes"] / layer)

    def loop(params, cache, token):
        sampling = (jax.random.PRNGKey(0), jnp.float32(0), 0, jnp.float32(1), jnp.full((8,), -1, jnp.int32),
                    jnp.int32(0))
        fn, args, static = decode_program(params, _streamed(cache, to_host), token, jnp.zeros((1,), bool), sampling,
                                          cfg, policy, 8)
        return fn(*args, **static)

    _, analysis = targets.compile(jax.jit(loop), params, cache, token, target="h200")
    assert analysis["temp_bytes"] < 2.2 * layer, (analysis["temp_bytes"] / layer)


# ---------------------------------------------------------------------- several GPUs (issue: tensor parallelism)


def test_llama_70b_on_8_h100s_fits_a_million_tokens_with_mom():
    """Llama-3.1-70B in bfloat16 split over 8 H100s (topology 1x1x8, deviceless): `mom` holds 1,048,576 tokens per
    the compiled prefill and decode programs, each device's bytes within its 80 GiB."""
    for phase in ("prefill", "decode"):
        r = memory.memory_report("llama-3.1-70b", 1_048_576, "mom", dtype="bfloat16", phase=phase, target="h100",
                                 devices=8)
        e = memory.estimate("llama-3.1-70b", 1_048_576, "mom", dtype="bfloat16", phase=phase, devices=8)
        assert r["source"] == "xla-gpu:h100" and r["devices"] == 8
        assert r["device_bytes"] <= 80 * GiB, r["device_bytes"] / GiB
        assert abs(r["device_bytes"] - e["device_bytes"]) < 0.1 * r["device_bytes"]
    assert r["allreduce_bytes"] == e["allreduce_bytes"] or abs(r["allreduce_bytes"] / e["allreduce_bytes"] - 1) < 0.01


def test_llama_70b_fits_two_h100s_with_mom_stream():
    for phase in ("prefill", "decode"):
        r = memory.memory_report("llama-3.1-70b", 65536, "mom-stream", dtype="bfloat16", phase=phase, target="h100",
                                 devices=2)
        assert r["device_bytes"] <= 80 * GiB, r["device_bytes"] / GiB


def test_decode_on_8_gpus_holds_two_all_reduces_per_layer_and_gathers_nothing():
    """The decode step compiled for 8 H100s: the residual stream's two all-reduces per layer and the split
    embedding lookup's one; no all-gather (XLA's GPU compiler gathered the whole embedding table every step until
    the lookup was written with shard_map)."""
    import re

    cfg = TINY.replace(num_heads=8, num_kv_heads=8, head_dim=16)
    (_, compiled, _, _), = memory.compile_program(cfg, 1024, momjax.get_policy("mom"), "bfloat16", "decode",
                                                  target="h100", devices=8)
    text = compiled.as_text()
    ops = re.findall(r"\} (all-reduce|all-gather|reduce-scatter|all-to-all|collective-permute)(?:-start)?\(", text)
    assert ops.count("all-reduce") == 2 * cfg.num_layers + 1, ops
    assert set(ops) == {"all-reduce"}, ops


@pytest.mark.parametrize("gpu", GPUS + ("rtx4090", "l4", "t4"))
@pytest.mark.parametrize("phase", ("prefill", "decode"))
def test_mom_host_programs_compile_and_do_not_grow_with_the_context(gpu, phase):
    host = momjax.POLICIES["mom-host"]
    short, long = (memory.memory_report(TINY, n, host, dtype="bfloat16", phase=phase, target=gpu)
                   for n in (TINY_LEN, 16 * TINY_LEN))
    assert short["source"] == f"xla-gpu:{gpu}" and short["device_bytes"] == long["device_bytes"]
    kv = lambda n: 2 * TINY.num_layers * TINY.num_kv_heads * n * TINY.head_dim * 2
    residual = (TINY_LEN + 2048) * TINY.hidden_size * 2 if phase == "prefill" else 0  # and one chunk written back
    assert short["host_bytes"] == kv(TINY_LEN) + residual and long["kv_bytes"] >= kv(16 * TINY_LEN)


def test_mom_host_reaches_headinfers_context_on_an_rtx_4090():
    """Llama-3.1-8B bf16 on a 24 GB RTX 4090 with 2 TiB of host memory: at least 4,096K tokens exact and 6M with
    int8 K/V (HeadInfer measured 4,096K on the card), the device bytes the same at 128k and 4M."""
    cfg, host = momjax.preset("llama-3.1-8b"), momjax.POLICIES["mom-host"]
    fits = lambda p: memory.max_context(cfg, p, 24 * GiB, 2**41, "bfloat16", source="xla", target="rtx4090",
                                        resolution=1 << 20)
    assert fits(host) >= 4_194_304 and fits(host.replace(kv_dtype="int8")) >= 6_000_000
    device = [max(memory.memory_report(cfg, n, host, dtype="bfloat16", phase=ph, target="rtx4090")["device_bytes"]
                  for ph in ("prefill", "decode")) for n in (131072, 4_194_304)]
    assert abs(device[1] - device[0]) < GiB and device[1] < 24 * GiB


def test_mom_host_on_8_h100s_holds_llama_70b_the_same_at_128k_and_4m():
    """mom-host for Llama-3.1-70B bf16 split over 8 H100s (deviceless): the compiled programs' bytes per device are
    the same at 128k and 4M tokens, the estimate within 10% of them, and the decode step's all-reduces the same."""
    cfg, host = momjax.preset("llama-3.1-70b"), momjax.POLICIES["mom-host"]
    for phase in ("prefill", "decode"):
        r = [memory.memory_report(cfg, n, host, dtype="bfloat16", phase=phase, target="h100", devices=8)
             for n in (131072, 4_194_304)]
        e = memory.estimate(cfg, 4_194_304, host, dtype="bfloat16", phase=phase, devices=8)
        assert r[1]["source"] == "xla-gpu:h100" and r[1]["devices"] == 8
        assert abs(r[1]["device_bytes"] - r[0]["device_bytes"]) < GiB and r[1]["device_bytes"] < 80 * GiB
        assert abs(r[1]["device_bytes"] - e["device_bytes"]) < 0.1 * r[1]["device_bytes"], (r[1], e)
    assert r[1]["allreduce_bytes"] == e["allreduce_bytes"]


@pytest.mark.parametrize("model, gpu, hbm", [("llama-3.1-8b", "t4", 16), ("llama-3.1-70b", "a100-80gb", 80)])
def test_host_weights_run_big_models_on_small_gpus(model, gpu, hbm):
    """Weights in host memory: an 8B model on a 16 GB T4 and a 70B model on one A100 80GB, each to at least 1M
    tokens with 1 TiB of host memory, compiled for the GPU."""
    n = memory.max_context(momjax.preset(model), momjax.POLICIES["mom-host"], hbm * GiB, 2**40, "bfloat16",
                           source="xla", target=gpu, resolution=1 << 18, weights="host")
    assert n >= 2**20


@pytest.mark.parametrize("policy", ["mom", "mom-stream"])
def test_host_weights_with_other_policies_compile_for_a_t4(policy):
    """Weights in host memory with mom and mom-stream: an 8B model's programs at 32k tokens compiled for a 16 GB
    T4, with the weights' bytes taken off the device (two layers' and the LM head's stay) and put in host memory."""
    cfg = momjax.preset("llama-3.1-8b")
    for phase in ("prefill", "decode"):
        on_device, on_host = (memory.memory_report(cfg, 32768, policy, dtype="bfloat16", phase=phase, target="t4",
                                                   weights=w) for w in ("device", "host"))
        assert on_device["device_bytes"] > 16 * GiB > on_host["device_bytes"], phase
        assert on_host["host_bytes"] - on_device["host_bytes"] == on_device["weight_bytes"]
        assert on_host["source"] == "xla-gpu:t4"
