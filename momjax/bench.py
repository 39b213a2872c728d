"""momjax against transformers on CPU, on the same random ~40M-parameter Llama (`momjax bench`).

1. Generation: a 512-token prompt, 48 new tokens, greedy, batch 1. `momjax.generate(policy="mom")` and
   transformers' `model.generate` (PyTorch, its default attention) run interleaved several times on the
   same weights; the table gives medians, their ratio and, separately, momjax's first-call compile time.
2. Long prefill: a 4096-token prompt through `momjax.prefill` with `mom` and with `baseline`, and through
   transformers (`logits_to_keep=1`, its default sdpa attention), interleaved; medians and ratios.
3. Decode against this machine's memory bandwidth. In every generation round, right after momjax's run,
   the script measures the bandwidth (a sum over a 256 MiB array, and a matrix-vector product over it; the
   larger) and runs a program that does nothing but the decode step's matrix-vector products over the
   model's own weights (`MatvecOnly`). The roofline is that round's bandwidth divided by the bytes a decode
   step must read (every weight once, one embedding row, and the K/V cache); the figures reported are the
   medians of the per-round ratios, so both sides of each ratio saw the same machine load.

Both libraries get the same two threads (torch.set_num_threads; XLA's CPU client uses the machine's
cores), each in its own process: transformers runs in a spawned worker that answers timing requests, so
the two thread pools never share a process. Needs torch and transformers (`pip install momjax[test]`),
which momjax itself never imports. The command line (`momjax bench`) is momjax.cli.bench.
"""

from __future__ import annotations

import os
import platform
import statistics
import sys
import tempfile
import time

import numpy as np

# The benchmark model: Llama shapes, GQA 8 heads / 4 KV heads, float32, random weights.
MODEL = {
    "vocab_size": 8192, "hidden_size": 512, "intermediate_size": 1536, "num_hidden_layers": 8,
    "num_attention_heads": 8, "num_key_value_heads": 4, "max_position_embeddings": 8192, "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0, "tie_word_embeddings": False, "bos_token_id": None, "eos_token_id": None,
}
PROMPT_TOKENS, NEW_TOKENS, LONG_PROMPT_TOKENS = 512, 48, 4096
THREADS = 2
TARGET_SPEEDUP = 1.25  # momjax generate at least this much faster than transformers
TARGET_PREFILL_RATIO = 1.10  # mom prefill at most this much slower than baseline
TARGET_PREFILL_VS_TORCH = 1.0  # mom prefill at most this much slower than transformers
TARGET_ROOFLINE = 0.9  # decode at least this fraction of the bandwidth roofline
RESULTS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks", "results")


def machine() -> dict:
    """This machine, as the CPU benchmarks' results record it."""
    import jax

    return dict(platform=platform.platform(), processor=platform.processor(), cpus=os.cpu_count(),
                jax=jax.__version__)


def spread(values: list[float]) -> dict:
    """The median, range and every value of a benchmark's per-round figures."""
    return dict(median=statistics.median(values), min=min(values), max=max(values), per_round=values)


def write_result(path: str, result: dict) -> None:
    """A benchmark's result as indented JSON at path (its folder made if needed)."""
    import json

    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(result, f, indent=2)


def available(module: str) -> bool:
    """Whether a module can be imported, without importing it (this process never runs torch)."""
    import importlib.util

    if module in sys.modules:
        return sys.modules[module] is not None
    return importlib.util.find_spec(module) is not None


def build_checkpoint(folder: str, seed: int = 0):
    """A random float32 LlamaForCausalLM saved with save_pretrained; returns the PyTorch model too."""
    import torch
    import transformers

    config = transformers.LlamaConfig(**MODEL)
    torch.manual_seed(seed)
    hf = transformers.LlamaForCausalLM(config).to(torch.float32).eval()
    hf.generation_config.eos_token_id = None
    hf.generation_config.pad_token_id = 0
    hf.save_pretrained(folder, safe_serialization=True)
    return hf


def load_models(*weights: str) -> dict:
    """The benchmark model (`build_checkpoint`) loaded once per weights placement ("device", "host"), the
    checkpoint written to a temporary folder that is gone afterwards: {placement: momjax.Model}."""
    import momjax

    with tempfile.TemporaryDirectory() as tmp:
        build_checkpoint(tmp)
        return {w: momjax.load(tmp, weights=w, progress=False) for w in weights or ("device",)}


def _torch_worker(conn, folder: str) -> None:
    """The transformers side, in its own process: builds and saves the checkpoint, then times requests.

    Its own process so that XLA's and torch's thread pools never share one, and so that this (parent)
    process never loads torch. On a 2-core machine that other jobs also use, torch's two OpenMP threads
    are very sensitive to being descheduled (the same generate call measured 1.0 s and 6.6 s minutes
    apart); the 1-thread runs and the CPU times are reported beside them for that reason.
    """
    import torch
    import transformers

    hf = build_checkpoint(folder)
    conn.send({"parameters": sum(p.numel() for p in hf.parameters()), "attention": hf.config._attn_implementation,
               "torch": torch.__version__, "transformers": transformers.__version__})
    while True:
        request = conn.recv()
        if request is None:
            return
        kind, prompt, threads = request
        torch.set_num_threads(threads)
        ids = torch.as_tensor(np.asarray(prompt)[None], dtype=torch.long)
        t0, c0 = time.perf_counter(), time.process_time()
        with torch.inference_mode():
            if kind == "generate":
                out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS,
                                  do_sample=False, pad_token_id=0)[0, len(prompt):].tolist()
            else:  # "prefill": the prompt's forward pass with the cache, last-position logits (as generate does)
                hf(ids, use_cache=True, logits_to_keep=1)
                out = None
        conn.send((time.perf_counter() - t0, time.process_time() - c0, out))


class TorchSide:
    """A transformers worker process; `run(kind, prompt, threads)` -> (wall s, CPU s, new tokens or None)."""

    def __init__(self, folder: str):
        import multiprocessing

        ctx = multiprocessing.get_context("spawn")  # a fresh interpreter: no JAX threads, no forked state
        self.conn, child = ctx.Pipe()
        self.process = ctx.Process(target=_torch_worker, args=(child, folder), daemon=True)
        self.process.start()
        self.info = self.conn.recv()

    def run(self, kind: str, prompt, threads: int = THREADS):
        self.conn.send((kind, [int(t) for t in prompt], threads))
        return self.conn.recv()

    def close(self):
        self.conn.send(None)
        self.process.join(timeout=30)


def _median(xs) -> float:
    return float(statistics.median(xs))


def bench_generate(model, torch_side: TorchSide, prompt: np.ndarray, reps: int, log) -> dict:
    """Wall time of one greedy generation, momjax (mom) and transformers interleaved; after each momjax run,
    this machine's bandwidth and the matrix-vector-only program (see the module docstring, item 3)."""
    import momjax

    step_bytes = decode_bytes(model, PROMPT_TOKENS + NEW_TOKENS // 2)  # the average context while decoding
    bandwidth, matvec_only = Bandwidth(), MatvecOnly(model, NEW_TOKENS - 1)

    def run_momjax():
        t0, c0 = time.perf_counter(), time.process_time()
        gen = momjax.generate(model, prompt[None], NEW_TOKENS, policy="mom", stop_tokens=[])
        return time.perf_counter() - t0, time.process_time() - c0, gen

    first_momjax, _, gen = run_momjax()  # compiles prefill and the decode loop
    first_hf, _, hf_tokens = torch_side.run("generate", prompt)
    torch_side.run("generate", prompt, 1)
    ours = gen.as_lists()[0]
    keys = ("momjax", "transformers", "transformers_1_thread", "momjax_cpu", "transformers_cpu",
            "transformers_1_thread_cpu", "momjax_ttft", "momjax_decode", "transformers_prefill", "bandwidth",
            "bandwidth_matvec", "matvec_only_tokens_per_s")
    times = {k: [] for k in keys}
    for r in range(reps):
        wall, cpu, gen = run_momjax()
        times["momjax"].append(wall)
        times["momjax_cpu"].append(cpu)
        times["momjax_ttft"].append(gen.time_to_first_token_s)
        times["momjax_decode"].append(gen.decode_s)
        probe = bandwidth.measure()
        times["bandwidth"].append(probe["bytes_per_s"])
        times["bandwidth_matvec"].append(probe["by_program"]["matvec"])
        times["matvec_only_tokens_per_s"].append(matvec_only.tokens_per_s())
        for name, threads in (("transformers", THREADS), ("transformers_1_thread", 1)):
            wall, cpu, _ = torch_side.run("generate", prompt, threads)
            times[name].append(wall)
            times[name + "_cpu"].append(cpu)
        times["transformers_prefill"].append(torch_side.run("prefill", prompt)[0])
        log(f"  generate rep {r + 1}/{reps}: momjax {times['momjax'][-1]:.3f} s, transformers "
            f"{times['transformers'][-1]:.3f} s ({THREADS} threads), {times['transformers_1_thread'][-1]:.3f} s "
            f"(1 thread); load average {os.getloadavg()[0]:.1f}")
    med = {k: _median(v) for k, v in times.items()}
    decode_tps = [(NEW_TOKENS - 1) / t for t in times["momjax_decode"]]
    per_round = {
        "roofline_tokens_per_s": [bw / step_bytes["bytes_per_token"] for bw in times["bandwidth"]],
        "matvec_roofline_tokens_per_s": [bw / step_bytes["bytes_per_token"] for bw in times["bandwidth_matvec"]],
    }
    per_round["roofline_fraction"] = [d / r for d, r in zip(decode_tps, per_round["roofline_tokens_per_s"])]
    per_round["matvec_roofline_fraction"] = [d / r for d, r in zip(decode_tps,
                                                                   per_round["matvec_roofline_tokens_per_s"])]
    per_round["of_matvec_only"] = [d / m for d, m in zip(decode_tps, times["matvec_only_tokens_per_s"])]
    decode = {"step": step_bytes, "per_round": per_round, **{k: _median(v) for k, v in per_round.items()}}
    diverge = next((i for i, (a, b) in enumerate(zip(ours, hf_tokens)) if a != b), None)
    return {
        "prompt_tokens": PROMPT_TOKENS, "new_tokens": NEW_TOKENS, "policy": "mom", "reps": reps,
        "times_s": times, "median_s": med,
        "speedup": med["transformers"] / med["momjax"],
        "speedup_vs_1_thread": med["transformers_1_thread"] / med["momjax"],
        "momjax_first_call_s": first_momjax, "momjax_compile_s": first_momjax - med["momjax"],
        "transformers_first_call_s": first_hf,
        "momjax_decode_tokens_per_s": (NEW_TOKENS - 1) / med["momjax_decode"],
        "transformers_decode_tokens_per_s": (NEW_TOKENS - 1) / (med["transformers"] - med["transformers_prefill"]),
        "same_tokens": ours == hf_tokens, "first_difference_at": diverge, "decode_vs_bandwidth": decode,
    }


def bench_long_prefill(model, torch_side: TorchSide, prompt: np.ndarray, reps: int, log) -> dict:
    """Wall time of a long prefill (logits and the KV cache ready): momjax mom and baseline, and transformers
    (its forward pass with the cache, last-position logits), interleaved."""
    import jax

    import momjax

    def run(policy):
        t0 = time.perf_counter()
        out = momjax.prefill(model, prompt[None], policy=policy)
        jax.block_until_ready(out)
        return time.perf_counter() - t0

    first = {p: run(p) for p in ("baseline", "mom")}  # compile
    torch_side.run("prefill", prompt)
    times = {"baseline": [], "mom": [], "transformers": []}
    for r in range(reps):
        for policy in (("baseline", "mom") if r % 2 == 0 else ("mom", "baseline")):
            times[policy].append(run(policy))
        times["transformers"].append(torch_side.run("prefill", prompt)[0])
        log(f"  prefill rep {r + 1}/{reps}: baseline {times['baseline'][-1]:.3f} s, mom {times['mom'][-1]:.3f} s, "
            f"transformers {times['transformers'][-1]:.3f} s; load average {os.getloadavg()[0]:.1f}")
    med = {k: _median(v) for k, v in times.items()}
    return {"prompt_tokens": len(prompt), "reps": reps, "times_s": times, "median_s": med,
            "ratio_mom_over_baseline": med["mom"] / med["baseline"],
            "ratio_mom_over_transformers": med["mom"] / med["transformers"], "first_call_s": first}


class Bandwidth:
    """This machine's memory read bandwidth: a float32 sum over a 256 MiB array, and a matrix-vector product
    over the same array (what decode does), best of `reps` each; the larger is the bandwidth."""

    def __init__(self):
        import jax
        import jax.numpy as jnp

        n, d = 65536, 1024  # 256 MiB of float32: far larger than any CPU cache
        self.w = jnp.asarray(np.random.default_rng(0).standard_normal((n, d), np.float32))
        self.v = jnp.ones((1, n), jnp.float32)
        self.programs = {"matvec": jax.jit(lambda v, w: v @ w), "sum": jax.jit(lambda v, w: jnp.sum(w))}
        for f in self.programs.values():
            f(self.v, self.w).block_until_ready()

    def measure(self, reps: int = 10) -> dict:
        best = {}
        for name, f in self.programs.items():
            ts = []
            for _ in range(reps):
                t0 = time.perf_counter()
                f(self.v, self.w).block_until_ready()
                ts.append(time.perf_counter() - t0)
            best[name] = self.w.nbytes / min(ts)
        return {"bytes_per_s": max(best.values()), "by_program": best}


class MatvecOnly:
    """A program that does only a decode step's matrix-vector products, over the model's own weights and as
    decode computes them (`momjax.model`'s `linear`, `mlp` and `lm_head`), for `steps` steps: per layer q, k, v, o, gate, up and down,
    then the LM head, each product's input taken from the one before so none can be skipped; no attention,
    norms, rope, cache or sampling. Decode's time beyond it is everything else the step does.

    With `cache` (a prefilled KVCache with a tail, as decode reads it) each layer also runs decode's attention
    (`momjax.attention.decode_attention`) over that layer's cached K/V, its output feeding the o product: the
    step's products and attention, still without norms, rope, tail writes or sampling."""

    def __init__(self, model, steps: int, cache=None):
        import jax
        import jax.numpy as jnp

        from momjax.attention import decode_attention
        from momjax.model import linear, lm_head, mlp

        params, cfg = model.params, model.config
        D, H, K, E = params.embed.shape[1], cfg.num_heads, cfg.num_kv_heads, cfg.head_dim

        def attend(l, q, k, v, i):  # q [1, 1, H*E], k and v [1, 1, K*E] -> [1, 1, H*E]
            step = jnp.minimum(i, cache.tail_k[l].shape[2])
            o = decode_attention(q.reshape(1, 1, H, E), cache.k[l], cache.v[l], cache.tail_k[l], cache.tail_v[l],
                                 k.reshape(1, 1, K, E), v.reshape(1, 1, K, E), cache.prompt_end + step, step,
                                 cache.start, window=cfg.sliding_window, prompt_end=cache.end)
            return o.reshape(1, 1, H * E)

        def step(x, i):  # x [1, 1, D]
            for l, lp in enumerate(params.layers):
                q = linear(x, lp.wq.reshape(D, -1))
                k, v = linear(x, lp.wk.reshape(D, -1)), linear(x, lp.wv.reshape(D, -1))
                if cache is None:
                    h = x + linear(q, lp.wo.reshape(q.shape[-1], D)) + 1e-6 * (k.sum() + v.sum())
                else:
                    h = x + linear(attend(l, q, k, v, i), lp.wo.reshape(H * E, D))
                x = h + mlp(lp, h)
            return lm_head(params, x)

        def run(x):
            def body(i, x):
                return x + 1e-6 * step(x, i).max().astype(x.dtype)  # the next step depends on this one
            return jax.lax.fori_loop(0, steps, body, x)

        self.steps = steps
        self.step_logits = jax.jit(step)  # one step's logits from x [1, 1, D] at step i (for checks)
        self.program = jax.jit(run)
        self.x = jnp.ones((1, 1, D), model.dtype)
        self.program(self.x).block_until_ready()

    def tokens_per_s(self) -> float:
        t0 = time.perf_counter()
        self.program(self.x).block_until_ready()
        return self.steps / (time.perf_counter() - t0)


def decode_bytes(model, context: int) -> dict:
    """The bytes one decode step must read: every weight once except the embedding table, of which one row
    (the LM head reads the whole table when it is tied), plus the K/V of `context` tokens."""
    import jax

    cfg, params = model.config, model.params
    weight_bytes = sum(x.nbytes for x in jax.tree.leaves(params)) - params.embed.nbytes
    embed_bytes = params.embed.nbytes if params.lm_head is None else params.embed.nbytes // params.embed.shape[0]
    kv_bytes = cfg.kv_bytes_per_token(model.dtype) * context
    return {"bytes_per_token": int(weight_bytes + embed_bytes + kv_bytes), "weight_bytes": int(weight_bytes),
            "embedding_bytes": int(embed_bytes), "kv_bytes": int(kv_bytes), "context": context}


def table(result: dict) -> str:
    g, p = result["generate"], result["long_prefill"]
    m = g["median_s"]
    rows = [
        (f"generate: {g['prompt_tokens']}-token prompt, {g['new_tokens']} new tokens, greedy, float32, "
         f"{result['threads']} threads, median of {g['reps']}"),
        f"  {'':<28}{'momjax (mom)':>14}{'transformers':>14}",
        f"  {'wall time':<28}{m['momjax']:>12.3f} s{m['transformers']:>12.3f} s",
        f"  {'process CPU time':<28}{m['momjax_cpu']:>12.3f} s{m['transformers_cpu']:>12.3f} s",
        f"  {'wall time, torch 1 thread':<28}{'':>14}{m['transformers_1_thread']:>12.3f} s",
        f"  {'CPU time, torch 1 thread':<28}{'':>14}{m['transformers_1_thread_cpu']:>12.3f} s",
        f"  {'prefill (time to 1st token)':<28}{m['momjax_ttft']:>12.3f} s{m['transformers_prefill']:>12.3f} s",
        (f"  {'decode':<28}{g['momjax_decode_tokens_per_s']:>8.1f} tok/s"
         f"{g['transformers_decode_tokens_per_s']:>8.1f} tok/s"),
        f"  {'first call':<28}{g['momjax_first_call_s']:>12.3f} s{g['transformers_first_call_s']:>12.3f} s",
        f"  momjax speedup {g['speedup']:.2f}x (target >= {TARGET_SPEEDUP}x; {g['speedup_vs_1_thread']:.2f}x against "
        f"torch on 1 thread); momjax compile "
        f"{g['momjax_compile_s']:.1f} s, first call only; same tokens: {g['same_tokens']}"
        + ("" if g["same_tokens"] else f" (first difference at new token {g['first_difference_at']})"),
        f"prefill: {p['prompt_tokens']}-token prompt, median of {p['reps']}",
        (f"  momjax baseline {p['median_s']['baseline']:.3f} s, mom {p['median_s']['mom']:.3f} s, transformers "
         f"{p['median_s']['transformers']:.3f} s"),
        (f"  mom/baseline {p['ratio_mom_over_baseline']:.3f} (target <= {TARGET_PREFILL_RATIO}), mom/transformers "
         f"{p['ratio_mom_over_transformers']:.3f} (target <= {TARGET_PREFILL_VS_TORCH})"),
    ]
    d, m = g["decode_vs_bandwidth"], g["median_s"]
    rows += [
        (f"decode against memory bandwidth (medians of per-round figures, measured after each momjax run): "
         f"bandwidth {m['bandwidth'] / 1e9:.1f} GB/s (matrix-vector product {m['bandwidth_matvec'] / 1e9:.1f}); "
         f"a decode step reads {d['step']['bytes_per_token'] / 1e6:.1f} MB, so the roofline is "
         f"{d['roofline_tokens_per_s']:.1f} tok/s"),
        (f"  momjax decode = {d['roofline_fraction']:.2f} of the roofline (target >= {TARGET_ROOFLINE}), "
         f"{d['matvec_roofline_fraction']:.2f} of the matrix-vector bandwidth's"),
        (f"  the step's matrix-vector products alone run at {m['matvec_only_tokens_per_s']:.1f} tok/s; decode is "
         f"{d['of_matvec_only']:.2f} of that"),
    ]
    load = result.get("load_average_at_end", [0])[0]
    if load > result["cpu_count"]:
        rows.append(f"note: load average {load:.1f} on {result['cpu_count']} cores: wall times include waiting for a "
                    "core, and torch's OpenMP threads slow down sharply when cores are oversubscribed; the CPU times "
                    "and the 1-thread row are the fairer comparison")
    return "\n".join(rows)


def run(reps: int, log) -> dict:
    """The whole benchmark (see the module docstring): its result, as `table` prints it and the JSON holds it."""
    import jax

    import momjax

    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as folder:
        log(f"building a random Llama ({MODEL['num_hidden_layers']} layers, hidden {MODEL['hidden_size']}, "
            f"vocab {MODEL['vocab_size']}) with transformers (in its own process) and saving it")
        torch_side = TorchSide(folder)
        try:
            info = torch_side.info
            model = momjax.load(folder, progress=False)
            log(f"{info['parameters'] / 1e6:.1f}M parameters; transformers attention: {info['attention']}")
            gen = bench_generate(model, torch_side, rng.integers(0, MODEL["vocab_size"], PROMPT_TOKENS), reps, log)
            long = bench_long_prefill(model, torch_side, rng.integers(0, MODEL["vocab_size"], LONG_PROMPT_TOKENS),
                                      reps, log)
        finally:
            torch_side.close()
    fraction = gen["decode_vs_bandwidth"]["roofline_fraction"]
    return {
        "benchmark": "cpu_vs_transformers", "model": MODEL, "parameters": info["parameters"], "dtype": "float32",
        "threads": THREADS, "cpu_count": os.cpu_count(), "platform": platform.platform(),
        "jax": jax.__version__, "torch": info["torch"], "transformers": info["transformers"],
        "transformers_attention": info["attention"], "transformers_process": "separate (spawned)",
        "load_average_at_end": os.getloadavg(),
        "generate": gen, "long_prefill": long, "roofline_fraction": fraction,
        "targets": {"speedup_min": TARGET_SPEEDUP, "prefill_ratio_max": TARGET_PREFILL_RATIO,
                    "prefill_vs_transformers_max": TARGET_PREFILL_VS_TORCH, "roofline_fraction_min": TARGET_ROOFLINE,
                    "speedup_met": gen["speedup"] >= TARGET_SPEEDUP,
                    "speedup_vs_torch_1_thread_met": gen["speedup_vs_1_thread"] >= TARGET_SPEEDUP,
                    "prefill_ratio_met": long["ratio_mom_over_baseline"] <= TARGET_PREFILL_RATIO,
                    "prefill_vs_transformers_met": long["ratio_mom_over_transformers"] <= TARGET_PREFILL_VS_TORCH,
                    "roofline_met": fraction >= TARGET_ROOFLINE},
    }
