"""The benchmark scripts run end to end on CPU: gpu_long_context.py in its --tiny mode (every run in its own
subprocess, a largest-context search, JSON and PNG written), its search on a pretend probe, and the length
grid of memory_vs_context.py, and int8_accuracy.py's measurement on a tiny model."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")


def load_script(name: str):
    """A benchmark script as a module (benchmarks/ is not a package)."""
    spec = importlib.util.spec_from_file_location(name, os.path.join(BENCH, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


gpu_long_context = load_script("gpu_long_context")
memory_vs_context = load_script("memory_vs_context")
int8_accuracy = load_script("int8_accuracy")


def test_search_finds_the_largest_length_that_fits():
    seen = []

    def probe(n):
        seen.append(n)
        return n <= 3000, None

    found = gpu_long_context.search_max_context(probe, 0, None, 256, 1 << 20, log=lambda *a: None)
    assert found["max_context"] == 2816 and found["first_miss"] == 3072
    assert found["stopped_by"] == "bisection"
    assert seen == [256, 512, 1024, 2048, 4096, 3072, 2560, 2816]


def test_search_starts_from_known_lengths_and_stops_on_timeout_or_ceiling():
    found = gpu_long_context.search_max_context(lambda n: (True, None), 512, None, 256, 2048, log=print)
    assert found["max_context"] == 2048 and found["stopped_by"].startswith("ceiling")
    found = gpu_long_context.search_max_context(lambda n: (False, "timeout"), 512, None, 256, 1 << 20, log=print)
    assert found == {"max_context": 512, "first_miss": None, "stopped_by": "timeout",
                     "probes": [{"seq_len": 1024, "fits": False, "stop": "timeout"}]}
    found = gpu_long_context.search_max_context(lambda n: (n < 700, None), 512, 1024, 256, 1 << 20, log=print)
    assert (found["max_context"], found["first_miss"]) == (512, 768)


def test_gpu_check_tiny_runs_every_stage(tmp_path):
    """benchmarks/gpu_check.py --tiny: every stage in its own process on this CPU with tiny shapes, each recorded
    in the JSON with its figures (so the script that a GPU run depends on never rots without a GPU)."""
    cmd = [sys.executable, os.path.join(BENCH, "gpu_check.py"), "--tiny", "--budget-s", "240", str(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=400, check=False)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    with open(tmp_path / "gpu_check.json") as f:
        result = json.load(f)
    stages = result["stages"]
    assert set(stages) == {"env", "exact", "programs", "long", "transformers", "cudnn"}, stages.keys()
    assert result["ok"], json.dumps(result)[:3000]
    assert stages["env"]["backend"] == "cpu" and "pinned_host" in stages["env"]["memory_kinds"]
    family = stages["exact"]["families"]["llama-gqa"]
    assert all(family["exact_equal_transformers"].values()) and family["memory_kinds_as_expected"]
    assert all(all(v for k, v in s.items() if k != "buffer_memory_kind") for s in family["session"].values())
    stream = stages["long"]["mom-stream"]["runs"][0]
    assert stream["prompt_kv_memory_kind"] == "pinned_host"
    assert [d["kv_device_layers"] for d in stream["decode"]] == [0, 2]  # every layer streamed, then the plan's
    assert all(d["decode_tokens_per_s"] > 0 for d in stream["decode"])
    assert stages["cudnn"]["cudnn"]["runs"] is False  # no cuDNN on a CPU: recorded, not raised
    assert stages["cudnn"]["xla"]["rel_err_vs_momjax"] < 1e-5
    assert (tmp_path / "decode_step_mom_stream.hlo.txt.gz").stat().st_size > 1000


def test_memory_vs_context_lengths_are_log_spaced_up_to_the_limit():
    assert memory_vs_context.lengths_up_to(110_592) == [8192, 16384, 32768, 65536, 110_592]
    assert memory_vs_context.lengths_up_to(65536) == [8192, 16384, 32768, 65536]
    capped = memory_vs_context.lengths_up_to(10 * 2**20)
    assert capped[-1] == memory_vs_context.CAP and len(capped) == 10
    assert memory_vs_context.lengths_up_to(5_666_816, cap=5_666_816, factor=4) == [
        8192, 32768, 131072, 524288, 2097152, 5_666_816]


def test_gpu_long_context_tiny_mode_writes_results(tmp_path):
    cmd = [sys.executable, os.path.join(BENCH, "gpu_long_context.py"), "--tiny", "--policies", "baseline",
           "--lengths", "256", "--new-tokens", "4", "--ceiling", "512", "--out-dir", str(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    path = tmp_path / "gpu_long_context_tiny_cpu.json"
    assert path.is_file() and (tmp_path / "gpu_long_context_tiny_cpu.png").stat().st_size > 10_000
    result = json.loads(path.read_text())

    for key in ("command", "machine", "model", "dtype", "runs", "max_context", "new_tokens", "transformers_setup"):
        assert key in result, key
    assert result["tiny"] is True and result["machine"]["device_kind"] == "cpu" and result["machine"]["jax"]
    runs = {(r["system"], r["policy"], r["seq_len"]): r for r in result["runs"]}
    assert set(runs) == {("momjax", "baseline", 256), ("transformers", "offloaded", 256)}
    for r in runs.values():
        assert r["ok"], r
        for key in ("peak_bytes", "ttft_s", "decode_tokens_per_s", "decode_s"):
            assert r[key] > 0, (key, r)
        assert len(r["first_tokens"]) == 4
    # The pretend 8 MiB budget holds baseline at 256 tokens but not at 512 (XLA's figure is ~16 MiB there).
    assert result["max_context"]["momjax/baseline"]["max_context"] == 256
    assert result["max_context"]["momjax/baseline"]["first_miss"] == 512
    assert result["max_context"]["transformers/offloaded"]["max_context"] == 512


@pytest.mark.parametrize("text", ["RESOURCE_EXHAUSTED: Out of memory while trying to allocate", "CUDA out of memory."])
def test_out_of_memory_errors_are_recognised(text):
    assert gpu_long_context._is_oom(RuntimeError(text))
    assert not gpu_long_context._is_oom(ValueError("shapes do not match"))


def test_int8_accuracy_measures_a_tiny_model(zoo, tmp_path):
    r = int8_accuracy.measure(zoo.model("llama-gqa"), prompt_len=8, steps=3)
    assert r["positions"] == 4 and len(r["rel_logit_error_per_position"]) == 4
    # int8 changes the logits, a little: neither zero (the quantised cache is really read) nor large.
    assert 0 < r["mean_rel_logit_error"] <= r["max_rel_logit_error"] < 0.05
    assert 0 <= r["top1_agreement"] <= 1
    int8_accuracy.plot({"llama-gqa": r}, str(tmp_path / "p.png"))
    assert (tmp_path / "p.png").stat().st_size > 5000


@pytest.mark.parametrize("family", ["llama-gqa", "qwen2"])  # untied and tied embeddings
def test_decode_bytes_reads_one_embedding_row_unless_tied(zoo, family):
    import jax
    import numpy as np

    from momjax import bench

    model = zoo.model(family)
    params, cfg = model.params, model.config
    step = bench.decode_bytes(model, context=40)
    every = sum(x.nbytes for x in jax.tree.leaves(params))
    row = cfg.hidden_size * 4  # float32
    kv = 40 * cfg.num_layers * 2 * cfg.num_kv_heads * cfg.head_dim * 4
    if params.lm_head is None:  # tied: the LM head reads the whole table
        assert step["bytes_per_token"] == every + kv
    else:
        assert step["bytes_per_token"] == every - params.embed.nbytes + row + kv
    assert step["kv_bytes"] == kv
    only = bench.MatvecOnly(model, steps=3)
    assert only.tokens_per_s() > 0 and np.isfinite(only.tokens_per_s())


def test_decode_breakdown_attention_program_reads_the_cache(zoo, tmp_path):
    """benchmarks/decode_breakdown.py's products + attention program really attends over the cache it is
    given (a different cache gives a different result), and its measurement and plot run end to end."""
    import jax.numpy as jnp
    import numpy as np

    from momjax import bench

    breakdown = load_script("decode_breakdown")
    model = zoo.model("llama-gqa")
    prompt = np.arange(1, 17) % model.config.vocab_size
    cache = breakdown.decode_cache(model, prompt)
    with_cache = bench.MatvecOnly(model, steps=3, cache=cache)
    other = cache.replace(v=tuple(v * 3.0 + 1.0 for v in cache.v))
    with_other = bench.MatvecOnly(model, steps=3, cache=other)
    a, b = (np.asarray(p.step_logits(p.x, jnp.int32(1))) for p in (with_cache, with_other))
    assert np.all(np.isfinite(a)) and not np.allclose(a, b, atol=1e-4)
    result = breakdown.measure(model, rounds=1, log=lambda *a: None, prompt_tokens=64)
    ms = result["step_ms"]
    assert ms["decode"] == pytest.approx(ms["products"] + ms["attention"] + ms["rest"], abs=2e-3)
    assert ms["roofline"] > 0 and 0 < result["fraction_of_roofline"]["products"]
    breakdown.plot(result, str(tmp_path / "b.png"))
    assert (tmp_path / "b.png").stat().st_size > 5000
