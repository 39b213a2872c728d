"""Long prompts on one GPU: real peak memory, time to first token, decode speed and the largest context.

Measures, on a random Llama-3.1-8B-shaped model in bfloat16 (no download), each momjax policy against
transformers (LlamaForCausalLM with sdpa attention, last-position logits and the offloaded KV cache that
`generate(cache_implementation="offloaded")` uses: `DynamicCache(offloading=True)`):

- peak device memory: `jax.devices()[0].memory_stats()["peak_bytes_in_use"]` for momjax,
  `torch.cuda.max_memory_allocated()` for transformers. Each run is its own subprocess, so peaks never
  carry over from one run to the next;
- time to first token: the prefill, after a warm-up (momjax: the prefill programs are compiled ahead of time at
  the same shape, before the weights are allocated, so compiler autotuning cannot set the prefill's peak, and
  the decode loop before it runs, its compile time apart; transformers: eager kernels, warmed up on a
  1024-token prompt);
- decode tokens/s over --new-tokens greedy steps after the prompt;
- the largest context that runs, found by doubling then bisecting with one subprocess per probe
  (an out-of-memory error, or a peak over --budget-bytes, is a miss; a probe past --probe-timeout ends
  the search, and the JSON says so).

Results are written after every run to benchmarks/results/gpu_long_context_<device>.json and .png, so a
run cut short keeps what it measured; --resume skips what the JSON already holds. One command is limited
to ~10 minutes on the lent machines: split the work with --systems, --policies, --lengths and --resume.

    python benchmarks/gpu_long_context.py --systems momjax --policies baseline mom --no-search
    python benchmarks/gpu_long_context.py --resume --systems transformers
    python benchmarks/gpu_long_context.py --tiny          # tiny model on CPU: tests the whole script

On CPU (--tiny) there are no allocator statistics: the "peak" is XLA's compiled-program figure
(`momjax.memory_report`, float32) for momjax and the process's max RSS growth for transformers. Those are
stand-ins that exercise the code, not measurements of a GPU.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import re
import subprocess
import sys
import time

GIB = 2**30
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from provenance import git_state

RESULTS = os.path.join(HERE, "results")
POLICIES = ("baseline", "mom", "mom-stream")
SYSTEMS = ("momjax", "transformers")
GPU_LENGTHS = (32768, 65536, 131072, 262144, 524288)
TINY_LENGTHS = (256, 512)
TINY_MINISEQUENCE = 128  # so the tiny prompts really are split into mini-sequences
TINY_BUDGET = 8 * 2**20  # a pretend device budget for the tiny search (CPU has none)
RESULT_TAG = "RESULT "


# ---------------------------------------------------------------------- shapes


def model_config(tiny: bool):
    """The momjax Config: Llama-3.1-8B's shapes, or a tiny Llama for CPU tests."""
    import momjax

    cfg = momjax.preset("llama-3.1-8b")
    if tiny:
        cfg = cfg.replace(vocab_size=512, hidden_size=128, intermediate_size=384, num_layers=2, num_heads=4,
                          num_kv_heads=2, head_dim=32, eos_token_ids=(), bos_token_id=None)
    return cfg.replace(max_position_embeddings=1 << 24)  # lengths past the trained one are allowed here


def hf_llama_config(cfg):
    """The same architecture as a transformers LlamaConfig."""
    from transformers import LlamaConfig

    rope = {"rope_type": cfg.rope_type, "rope_theta": cfg.rope_theta}
    if cfg.rope_type == "llama3":
        rope.update(factor=cfg.rope_factor, low_freq_factor=cfg.rope_low_freq_factor,
                    high_freq_factor=cfg.rope_high_freq_factor,
                    original_max_position_embeddings=cfg.rope_original_max_position)
    return LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads,
        head_dim=cfg.head_dim, rms_norm_eps=cfg.rms_norm_eps, rope_parameters=rope,
        max_position_embeddings=cfg.max_position_embeddings, tie_word_embeddings=cfg.tie_embeddings,
        attn_implementation="sdpa",
    )


def momjax_policy(name: str, tiny: bool):
    import momjax

    policy = momjax.get_policy(name)
    if tiny and policy.minisequence is not None:
        policy = policy.replace(minisequence=TINY_MINISEQUENCE)
    return policy


# ---------------------------------------------------------------------- workers (one run per process)


def _is_oom(err: BaseException) -> bool:
    text = f"{type(err).__name__}: {err}"
    return bool(re.search(r"RESOURCE_EXHAUSTED|out of memory|OutOfMemory|Cannot allocate|failed to allocate", text,
                          re.IGNORECASE))


def _max_rss_bytes() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def worker_info() -> dict:
    """What machine this is, asked in a subprocess so the parent never takes GPU memory itself."""
    import jax

    dev = jax.devices()[0]
    stats = dev.memory_stats() or {}
    return {"backend": jax.default_backend(), "device_kind": dev.device_kind, "jax": jax.__version__,
            "device_bytes_limit": stats.get("bytes_limit"), "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
            "python": platform.python_version()}


def _random_params(cfg, dtype):
    """`init_random` on a one-layer copy of cfg, repeated over the layers: the same kind of random weights,
    without the float32 temporaries of initialising every stacked leaf at once (they would set the peak)."""
    import jax
    import jax.numpy as jnp

    from momjax.params import init_random

    one = init_random(cfg.replace(num_layers=1), seed=0, dtype=dtype)
    layers = tuple(jax.tree.map(lambda x: jnp.array(x, copy=True), one.layers[0]) for _ in range(cfg.num_layers))
    return jax.block_until_ready(one.replace(layers=layers))


def worker_momjax(spec: dict) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np

    import momjax
    from momjax import generation as G
    from momjax.cache import place_for_decode, sharding
    from momjax.checks import Sampling
    from momjax.decoding import DecodeStats, decode_stream
    from momjax.params import abstract_params

    tiny, S, N = spec["tiny"], spec["seq_len"], spec["new_tokens"]
    cfg = model_config(tiny)
    dtype = jnp.dtype(spec["dtype"])
    policy = momjax_policy(spec["policy"], tiny)
    dev = jax.devices()[0]
    on_device = sharding("device")

    # Compile both programs from abstract inputs first (the warm-up at this shape; nothing is allocated yet).
    t0 = time.perf_counter()
    params_abs = abstract_params(cfg, dtype, sharding=on_device)
    padded = G.bucket_length(S, policy)
    tok_abs = jax.ShapeDtypeStruct((1, padded), jnp.int32, sharding=on_device)
    start_abs = jax.ShapeDtypeStruct((1,), jnp.int32, sharding=on_device)
    programs = G.compile_prefill(params_abs, tok_abs, start_abs, cfg, policy)
    compile_s = time.perf_counter() - t0

    params = _random_params(cfg, dtype)
    stats = dev.memory_stats()
    weights_in_use = stats["bytes_in_use"] if stats else None
    peak_after_init = stats["peak_bytes_in_use"] if stats else None
    prompt = np.random.default_rng(0).integers(0, cfg.vocab_size, size=(1, S), dtype=np.int32)
    tokens, start = G.left_pad([prompt[0].tolist()], padded)
    tokens, start = jax.device_put(tokens, on_device), jax.device_put(start, on_device)
    jax.block_until_ready(jnp.ones((256, 256), dtype) @ jnp.ones((256, 256), dtype))  # runtime and BLAS set up

    t0 = time.perf_counter()
    logits, cache = G.prefill_fn(params, tokens, start, cfg, policy, compiled=programs)
    logits.block_until_ready()
    ttft = time.perf_counter() - t0
    stats = dev.memory_stats()
    peak_prefill = stats["peak_bytes_in_use"] if stats else None

    t0 = time.perf_counter()
    cache = jax.block_until_ready(place_for_decode(cache, policy))  # mom: the one copy back to the device
    copy_back_s = time.perf_counter() - t0
    decoding = DecodeStats()  # momjax's one decode loop, in one chunk; Sampling(): greedy, never stops early
    out = np.concatenate(list(decode_stream(params, cache, logits, Sampling(), cfg, policy, N, stats=decoding,
                                            streamed=False)), axis=1)
    decode_s = decoding.decode_s
    compile_s += decoding.decode_compile_s
    stats = dev.memory_stats()

    result = {"ttft_s": ttft, "decode_s": decode_s, "decode_tokens_per_s": (N - 1) / decode_s if N > 1 else None,
              "kv_copy_back_s": copy_back_s, "compile_s": compile_s, "padded_len": padded,
              "first_tokens": out[0, :8].tolist(), "weights_in_use_bytes": weights_in_use,
              "peak_after_init_bytes": peak_after_init}
    if stats:
        result.update(peak_bytes=stats["peak_bytes_in_use"], peak_prefill_bytes=peak_prefill,
                      peak_source="jax memory_stats()['peak_bytes_in_use']")
    else:  # CPU: no allocator statistics; XLA's figure for the same two programs stands in
        pre = momjax.memory_report(cfg, S, policy, dtype, "prefill")["device_bytes"]
        dec = momjax.memory_report(cfg, padded, policy, dtype, "decode", new_tokens=N)["device_bytes"]
        result.update(peak_bytes=max(pre, dec), peak_prefill_bytes=pre,
                      peak_source="XLA memory_analysis of the compiled prefill and decode (CPU has no allocator stats)")
    return result


def worker_transformers(spec: dict) -> dict:
    import numpy as np
    import torch
    from transformers import DynamicCache, LlamaForCausalLM

    tiny, S, N = spec["tiny"], spec["seq_len"], spec["new_tokens"]
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    dtype = getattr(torch, spec["dtype"])
    if not cuda:
        torch.set_num_threads(1)
    hf_cfg = hf_llama_config(model_config(tiny))
    torch.manual_seed(0)
    rss0 = _max_rss_bytes()
    t0 = time.perf_counter()
    with torch.device(device):
        model = LlamaForCausalLM._from_config(hf_cfg, attn_implementation="sdpa", dtype=dtype).eval()
    init_s = time.perf_counter() - t0

    def sync():
        if cuda:
            torch.cuda.synchronize()

    def run(length, steps):
        ids = torch.from_numpy(np.random.default_rng(0).integers(0, hf_cfg.vocab_size, (1, length))).to(device)
        # What generate(cache_implementation="offloaded") builds: every layer's K/V moved to the CPU after
        # its update and the next layer prefetched on a side stream. Offloading needs CUDA streams.
        cache = DynamicCache(config=model.config, offloading=cuda)
        sync()
        t0 = time.perf_counter()
        out = model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
        nxt = out.logits[:, -1].argmax(-1, keepdim=True)
        sync()
        ttft = time.perf_counter() - t0
        peak_prefill = torch.cuda.max_memory_allocated() if cuda else None
        generated = [nxt]
        t0 = time.perf_counter()
        for _ in range(steps - 1):  # greedy decode, as generate does it
            out = model(input_ids=nxt, past_key_values=cache, use_cache=True)
            nxt = out.logits[:, -1].argmax(-1, keepdim=True)
            generated.append(nxt)
        sync()
        decode_s = time.perf_counter() - t0
        return ttft, decode_s, peak_prefill, torch.cat(generated, 1)[0, :8].tolist()

    with torch.inference_mode():
        run(min(S, 1024), 3)  # warm-up: cuBLAS/SDPA kernels, the offloading streams
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        weights_in_use = torch.cuda.memory_allocated() if cuda else None
        ttft, decode_s, peak_prefill, first = run(S, N)
    import transformers

    result = {"ttft_s": ttft, "decode_s": decode_s, "decode_tokens_per_s": (N - 1) / decode_s if N > 1 else None,
              "init_s": init_s, "torch": torch.__version__, "transformers": transformers.__version__,
              "torch_device": torch.cuda.get_device_name(0) if cuda else "cpu", "first_tokens": first, "weights_in_use_bytes": weights_in_use,
              "kv_offloaded": cuda, "attn_implementation": model.config._attn_implementation}
    if cuda:
        result.update(peak_bytes=torch.cuda.max_memory_allocated(), peak_prefill_bytes=peak_prefill,
                      peak_source="torch.cuda.max_memory_allocated()")
    else:
        result.update(peak_bytes=_max_rss_bytes() - rss0, peak_prefill_bytes=None,
                      peak_source="growth of the process's max RSS (CPU; no allocator stats)")
    return result


def worker(spec: dict) -> dict:
    t0 = time.perf_counter()
    try:
        if spec["system"] == "info":
            out = worker_info()
        elif spec["system"] == "momjax":
            out = worker_momjax(spec)
        else:
            out = worker_transformers(spec)
        out["ok"] = True
    except Exception as e:  # noqa: BLE001 - an OOM is a result here, not a failure of the benchmark
        out = {"ok": False, "error": "oom" if _is_oom(e) else "error", "message": f"{type(e).__name__}: {e}"[:2000]}
    out["wall_s"] = time.perf_counter() - t0
    return out


# ---------------------------------------------------------------------- the parent: subprocesses, search, files


def child_env() -> dict:
    env = dict(os.environ)
    env.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.95")  # JAX's default 0.75 would cap the search
    env.setdefault("XLA_PJRT_GPU_HOST_MEMORY_LIMIT_GB", "100")  # pinned host pool (default 64 GB)
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    return env


def run_worker(spec: dict, timeout: float) -> dict:
    """One measurement in a fresh process; OOMs, crashes and timeouts come back as results."""
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", json.dumps(spec)]
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=timeout, env=child_env())
    except subprocess.TimeoutExpired:
        return {"ok": False, "error": "timeout", "message": f"no result within {timeout:.0f} s",
                "wall_s": time.perf_counter() - t0}
    for line in proc.stdout.splitlines()[::-1]:
        if line.startswith(RESULT_TAG):
            return json.loads(line[len(RESULT_TAG):])
    tail = (proc.stderr or proc.stdout)[-2000:]
    oom = re.search(r"out of memory|RESOURCE_EXHAUSTED|Killed", tail, re.IGNORECASE)
    return {"ok": False, "error": "oom" if oom else "crash", "message": f"exit code {proc.returncode}: {tail}",
            "wall_s": time.perf_counter() - t0}


def fits(result: dict, budget: int | None) -> bool:
    return bool(result.get("ok")) and (budget is None or result["peak_bytes"] <= budget)


def run_probe(spec: dict, budget: int | None, timeout: float, log, n: int) -> tuple[bool, str | None]:
    """One search step: does a prompt of n tokens run (and stay under the budget)? A timeout or an error other
    than running out of memory ends the search (longer prompts would only take longer)."""
    r = run_worker({**spec, "seq_len": n}, timeout)
    ok = fits(r, budget)
    tag = "fits" if ok else r.get("error") or f"peak {gib(r['peak_bytes'])} over the budget"
    log(f"    probe {spec['system']} {spec['policy']} {n:,} tokens: {tag} [{r['wall_s']:.0f} s]")
    if r.get("error") == "timeout":
        return False, "timeout"
    if r.get("error") in ("error", "crash"):
        return False, "error: " + r["message"][:300]
    return ok, None


def search_max_context(probe, known_ok: int, known_miss: int | None, resolution: int, ceiling: int, log) -> dict:
    """Largest length (to `resolution`) where probe(n) fits: doubling from known_ok, then bisection.

    probe(n) -> (fits: bool, stop: str | None); stop ends the search (a timeout: longer probes would too).
    """
    lo, hi, probes = known_ok, known_miss, []
    while hi is None:
        n = lo * 2 if lo else resolution
        if n > ceiling:
            return {"max_context": lo, "first_miss": None, "stopped_by": f"ceiling {ceiling}", "probes": probes}
        ok, stop = probe(n)
        probes.append({"seq_len": n, "fits": ok, "stop": stop})
        if stop:
            return {"max_context": lo, "first_miss": None, "stopped_by": stop, "probes": probes}
        lo, hi = (n, None) if ok else (lo, n)
    while hi - lo > resolution:
        mid = (lo + hi) // 2 // resolution * resolution
        if mid <= lo:
            break
        ok, stop = probe(mid)
        probes.append({"seq_len": mid, "fits": ok, "stop": stop})
        if stop:
            return {"max_context": lo, "first_miss": hi, "stopped_by": stop, "probes": probes}
        lo, hi = (mid, hi) if ok else (lo, mid)
    log(f"    largest context: {lo:,} tokens (first miss {hi:,})")
    return {"max_context": lo, "first_miss": hi, "stopped_by": "bisection", "probes": probes}




def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")


def gib(n) -> str:
    return "-" if n is None else f"{n / GIB:.2f} GiB" if n >= GIB / 4 else f"{n / 2**20:.2f} MiB"


def plot(results: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    colors = {"baseline": "tab:red", "mom": "tab:blue", "mom-stream": "tab:green", "offloaded": "tab:purple"}
    fig, axes = plt.subplots(1, 3, figsize=(17, 4.8))
    series = {}
    for r in results["runs"]:
        if r.get("ok"):
            series.setdefault((r["system"], r["policy"]), []).append(r)
    unit, scale = ("GiB", GIB) if not results["tiny"] else ("MiB", 2**20)
    for (system, policy), runs in sorted(series.items()):
        runs.sort(key=lambda r: r["seq_len"])
        x = [r["seq_len"] for r in runs]
        style = "o-" if system == "momjax" else "s--"
        offloaded = all(r.get("kv_offloaded") for r in runs)
        label = f"momjax {policy}" if system == "momjax" else (
            f"transformers (sdpa, {'offloaded' if offloaded else 'dynamic, not offloaded'} KV cache)")
        c = colors.get(policy, "gray")
        axes[0].plot(x, [r["peak_bytes"] / scale for r in runs], style, color=c, label=label)
        axes[1].plot(x, [r["ttft_s"] for r in runs], style, color=c, label=label)
        axes[2].plot(x, [r["decode_tokens_per_s"] or float("nan") for r in runs], style, color=c, label=label)
        found = results["max_context"].get(f"{system}/{policy}")
        if found and found["max_context"]:
            axes[0].axvline(found["max_context"], color=c, ls=":", lw=1)
    if results.get("budget_bytes"):
        limit, what = results["budget_bytes"], "budget"
    else:
        limit, what = results["machine"].get("device_bytes_limit"), "JAX allocator limit"
    if limit:
        axes[0].axhline(limit / scale, color="black", ls="--", lw=1, label=f"{what} {limit / scale:.1f} {unit}")
    for ax, ylabel, title in zip(
        axes, (f"peak device memory ({unit})", "time to first token (s)", "decode speed (tokens/s)"),
        ("peak memory (dotted: largest context found)", "prefill time (time to first token)", "greedy decode")):
        ax.set_xscale("log", base=2)
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v / 1024:g}k" if v >= 1024 else f"{v:g}"))
        ax.set_xlabel("prompt length (tokens, log scale)")
        ax.set_ylabel(ylabel)
        ax.set_title(title, fontsize=10)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    m = results["machine"]
    fig.suptitle(f"{results['model']} ({results['dtype']}, random weights) on {m.get('device_kind')}, batch 1"
                 + ("  [tiny CPU stand-in: not GPU measurements]" if results["tiny"] else ""), fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="tiny Llama on CPU, short prompts (tests the script)")
    parser.add_argument("--systems", nargs="+", choices=SYSTEMS, default=list(SYSTEMS))
    parser.add_argument("--policies", nargs="+", choices=POLICIES, default=list(POLICIES))
    parser.add_argument("--lengths", nargs="+", type=int, help=f"prompt lengths (default {GPU_LENGTHS}; tiny "
                        f"{TINY_LENGTHS})")
    parser.add_argument("--new-tokens", type=int, help="decode steps per run (default 64; tiny 8)")
    parser.add_argument("--no-search", dest="search", action="store_false", help="skip the largest-context search")
    parser.add_argument("--resolution", type=int, help="search resolution in tokens (default 8192; tiny 256)")
    parser.add_argument("--ceiling", type=int, help="longest length tried (default 4M; tiny 4096)")
    parser.add_argument("--budget-bytes", type=int, help="count a peak above this as a miss (default: none on GPU, "
                        f"{TINY_BUDGET} with --tiny, since a CPU never runs out)")
    parser.add_argument("--probe-timeout", type=float, help="seconds per subprocess (default 540; tiny 120)")
    parser.add_argument("--resume", action="store_true", help="keep the runs already in the JSON and skip them")
    parser.add_argument("--out-dir", default=RESULTS)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.worker:
        print(RESULT_TAG + json.dumps(worker(json.loads(args.worker))), flush=True)
        return 0

    tiny = args.tiny
    lengths = sorted(args.lengths or (TINY_LENGTHS if tiny else GPU_LENGTHS))
    new_tokens = args.new_tokens or (8 if tiny else 64)
    resolution = args.resolution or (256 if tiny else 8192)
    ceiling = args.ceiling or (4096 if tiny else 4 * 2**20)
    budget = args.budget_bytes if args.budget_bytes is not None else (TINY_BUDGET if tiny else None)
    timeout = args.probe_timeout or (120 if tiny else 540)
    dtype = {"momjax": "float32" if tiny else "bfloat16", "transformers": "float32" if tiny else "bfloat16"}

    def log(*a):
        print(*a, flush=True)

    info = run_worker({"system": "info"}, timeout)
    if not info.get("ok"):
        log(f"could not start JAX in a subprocess: {info.get('message')}")
        return 1
    if not tiny and info["backend"] != "gpu":
        log(f"no GPU here (JAX backend {info['backend']!r}): run with --tiny to test the script on CPU")
        return 2
    name = ("tiny_" if tiny else "") + slug(info["device_kind"])
    json_path = os.path.join(args.out_dir, f"gpu_long_context_{name}.json")
    png_path = os.path.join(args.out_dir, f"gpu_long_context_{name}.png")
    os.makedirs(args.out_dir, exist_ok=True)

    results = {"runs": [], "max_context": {}}
    if args.resume and os.path.isfile(json_path):
        with open(json_path) as f:
            results = json.load(f)
    results.update({
        "command": "python " + " ".join([os.path.relpath(os.path.abspath(__file__))] + (argv or sys.argv[1:])),
        "git": git_state(),
        "machine": info, "tiny": tiny,
        "model": "tiny Llama (2 layers, hidden 128)" if tiny else "Llama-3.1-8B shapes",
        "dtype": dtype["momjax"], "batch": 1, "new_tokens": new_tokens, "budget_bytes": budget,
        "budget_applies_to": "every run" if not tiny or args.budget_bytes is not None else "momjax runs (tiny mode)",
        "env": {k: child_env()[k] for k in ("XLA_PYTHON_CLIENT_MEM_FRACTION", "XLA_PJRT_GPU_HOST_MEMORY_LIMIT_GB")},
        "transformers_setup": "LlamaForCausalLM random init, sdpa, logits_to_keep=1 in prefill, "
                              "DynamicCache(offloading=True) = generate(cache_implementation='offloaded'); "
                              "no offloading on CPU",
        "momjax_setup": "prefill programs compiled ahead of time at the same shape before the weights exist, the decode "
                        "loop before it runs (compile time apart); "
                        "weights init_random on one layer, repeated over the layers"
                        + (f"; tiny: mini-sequence {TINY_MINISEQUENCE}" if tiny else ""),
    })

    def save():
        with open(json_path, "w") as f:
            json.dump(results, f, indent=1)
        plot(results, png_path)

    def done(system, policy, n):
        return any(r["system"] == system and r["policy"] == policy and r["seq_len"] == n for r in results["runs"])

    log(f"{results['model']} on {info['device_kind']} ({info['backend']}), {results['dtype']}, "
        f"{new_tokens} new tokens; results -> {json_path}")
    jobs = [("momjax", p) for p in args.policies] * ("momjax" in args.systems)
    jobs += [("transformers", "offloaded")] * ("transformers" in args.systems)
    for system, policy in jobs:
        spec = {"system": system, "policy": policy, "tiny": tiny, "dtype": dtype[system], "new_tokens": new_tokens}
        # On CPU the transformers "peak" is RSS growth, not comparable with the tiny budget: no budget for it.
        budget_here = None if tiny and system == "transformers" and args.budget_bytes is None else budget
        missed_at = None
        for n in lengths:
            if done(system, policy, n):
                continue
            if missed_at is not None:
                log(f"  {system:<12}{policy:<11}{n:>9,}  skipped: {missed_at:,} tokens already did not fit")
                continue
            r = run_worker({**spec, "seq_len": n}, timeout)
            r.update(system=system, policy=policy, seq_len=n)
            results["runs"].append(r)
            if r["ok"]:
                log(f"  {system:<12}{policy:<11}{n:>9,}  peak {gib(r['peak_bytes']):>11}  ttft {r['ttft_s']:8.3f} s  "
                    f"decode {r['decode_tokens_per_s'] or 0:8.1f} tok/s  [{r['wall_s']:.0f} s]")
            else:
                log(f"  {system:<12}{policy:<11}{n:>9,}  {r['error']}: {r['message'][:200]}")
            if not fits(r, budget_here) and r.get("error") != "timeout":
                missed_at = n
            save()

        key = f"{system}/{policy}"
        if not args.search or key in results["max_context"]:
            continue
        mine = [r for r in results["runs"] if r["system"] == system and r["policy"] == policy]
        ok = [r["seq_len"] for r in mine if fits(r, budget_here)]
        miss = [r["seq_len"] for r in mine if not fits(r, budget_here) and r.get("error") != "timeout"]
        lo = max([n for n in ok if not miss or n < min(miss)], default=0)

        probe = functools.partial(run_probe, {**spec, "new_tokens": min(new_tokens, 16)}, budget_here, timeout, log)
        results["max_context"][key] = search_max_context(probe, lo, min(miss) if miss else None, resolution,
                                                         ceiling, log)
        save()

    save()
    log(f"wrote {json_path} and {png_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
