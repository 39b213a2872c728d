"""momjax against transformers on CPU, on the same random ~40M-parameter Llama (`momjax bench`).

1. Generation: a 512-token prompt, 48 new tokens, greedy, batch 1. `momjax.generate(policy="mom")` and
   transformers' `model.generate` (PyTorch, its default attention) run interleaved several times on the
   same weights; the table gives medians, their ratio and, separately, momjax's first-call compile time.
2. Long prefill: a 4096-token prompt through `momjax.prefill` with `mom` and with `baseline`,
   interleaved; the ratio of medians is what the mini-sequences and the host KV cache cost on CPU.

Both libraries get the same two threads (torch.set_num_threads; XLA's CPU client uses the machine's
cores). Needs torch and transformers (`pip install momjax[test]`), which momjax itself never imports.
"""

from __future__ import annotations

import argparse
import json
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
TARGET_SPEEDUP = 1.5  # momjax generate at least this much faster than transformers
TARGET_PREFILL_RATIO = 1.10  # mom prefill at most this much slower than baseline
RESULTS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks", "results")


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


def _median(xs) -> float:
    return float(statistics.median(xs))


def bench_generate(model, hf, prompt: np.ndarray, reps: int, log) -> dict:
    """Wall time of one greedy generation, momjax (mom) and transformers interleaved."""
    import torch

    import momjax

    ids = torch.as_tensor(prompt[None], dtype=torch.long)

    def run_momjax():
        t0 = time.perf_counter()
        gen = momjax.generate(model, prompt[None], NEW_TOKENS, policy="mom", stop_tokens=[])
        return time.perf_counter() - t0, gen

    def run_hf():
        t0 = time.perf_counter()
        with torch.inference_mode():
            out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS, do_sample=False,
                              pad_token_id=0)
        return time.perf_counter() - t0, out[0, len(prompt):].tolist()

    def hf_prefill():
        t0 = time.perf_counter()
        with torch.inference_mode():
            hf(ids, use_cache=True)
        return time.perf_counter() - t0

    first_momjax, gen = run_momjax()  # compiles prefill and the decode loop
    first_hf, hf_tokens = run_hf()
    ours = gen.as_lists()[0]
    times = {"momjax": [], "transformers": [], "momjax_ttft": [], "momjax_decode": [], "transformers_prefill": []}
    for r in range(reps):
        t, gen = run_momjax()
        times["momjax"].append(t)
        times["momjax_ttft"].append(gen.time_to_first_token_s)
        times["momjax_decode"].append(gen.decode_s)
        t, _ = run_hf()
        times["transformers"].append(t)
        times["transformers_prefill"].append(hf_prefill())
        log(f"  generate rep {r + 1}/{reps}: momjax {times['momjax'][-1]:.3f} s, "
            f"transformers {times['transformers'][-1]:.3f} s")
    med = {k: _median(v) for k, v in times.items()}
    diverge = next((i for i, (a, b) in enumerate(zip(ours, hf_tokens)) if a != b), None)
    return {
        "prompt_tokens": PROMPT_TOKENS, "new_tokens": NEW_TOKENS, "policy": "mom", "reps": reps,
        "times_s": times, "median_s": med,
        "speedup": med["transformers"] / med["momjax"],
        "momjax_first_call_s": first_momjax, "momjax_compile_s": first_momjax - med["momjax"],
        "transformers_first_call_s": first_hf,
        "momjax_decode_tokens_per_s": (NEW_TOKENS - 1) / med["momjax_decode"],
        "transformers_decode_tokens_per_s": (NEW_TOKENS - 1) / (med["transformers"] - med["transformers_prefill"]),
        "same_tokens": ours == hf_tokens, "first_difference_at": diverge,
    }


def bench_long_prefill(model, prompt: np.ndarray, reps: int, log) -> dict:
    """Wall time of a long prefill (logits and the KV cache ready), mom and baseline interleaved."""
    import jax

    import momjax

    def run(policy):
        t0 = time.perf_counter()
        out = momjax.prefill(model, prompt[None], policy=policy)
        jax.block_until_ready(out)
        return time.perf_counter() - t0

    first = {p: run(p) for p in ("baseline", "mom")}  # compile
    times = {"baseline": [], "mom": []}
    for r in range(reps):
        for policy in (("baseline", "mom") if r % 2 == 0 else ("mom", "baseline")):
            times[policy].append(run(policy))
        log(f"  prefill rep {r + 1}/{reps}: baseline {times['baseline'][-1]:.3f} s, mom {times['mom'][-1]:.3f} s")
    med = {k: _median(v) for k, v in times.items()}
    return {"prompt_tokens": len(prompt), "reps": reps, "times_s": times, "median_s": med,
            "ratio_mom_over_baseline": med["mom"] / med["baseline"], "first_call_s": first}


def table(result: dict) -> str:
    g, p = result["generate"], result["long_prefill"]
    m = g["median_s"]
    rows = [
        (f"generate: {g['prompt_tokens']}-token prompt, {g['new_tokens']} new tokens, greedy, float32, "
         f"{result['threads']} threads, median of {g['reps']}"),
        f"  {'':<28}{'momjax (mom)':>14}{'transformers':>14}",
        f"  {'wall time':<28}{m['momjax']:>12.3f} s{m['transformers']:>12.3f} s",
        f"  {'prefill (time to 1st token)':<28}{m['momjax_ttft']:>12.3f} s{m['transformers_prefill']:>12.3f} s",
        (f"  {'decode':<28}{g['momjax_decode_tokens_per_s']:>8.1f} tok/s"
         f"{g['transformers_decode_tokens_per_s']:>8.1f} tok/s"),
        f"  {'first call':<28}{g['momjax_first_call_s']:>12.3f} s{g['transformers_first_call_s']:>12.3f} s",
        f"  momjax speedup {g['speedup']:.2f}x (target >= {TARGET_SPEEDUP}x); momjax compile "
        f"{g['momjax_compile_s']:.1f} s, first call only; same tokens: {g['same_tokens']}"
        + ("" if g["same_tokens"] else f" (first difference at new token {g['first_difference_at']})"),
        f"prefill: {p['prompt_tokens']}-token prompt, median of {p['reps']}",
        (f"  baseline {p['median_s']['baseline']:.3f} s, mom {p['median_s']['mom']:.3f} s, "
         f"ratio mom/baseline {p['ratio_mom_over_baseline']:.3f} (target <= {TARGET_PREFILL_RATIO})"),
    ]
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="momjax bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="2 repetitions instead of 5")
    parser.add_argument("--reps", type=int, default=None)
    parser.add_argument("--out", default=None,
                        help="JSON results file (default: benchmarks/results/cpu_vs_transformers.json in a checkout)")
    args = parser.parse_args(argv)
    try:
        import torch
        import transformers
    except ImportError as e:
        print(f"momjax bench: needs {e.name}; run `pip install momjax[test]` (on CPU machines install "
              "torch==2.13.0 first)", file=sys.stderr)
        return 2
    import jax

    import momjax

    def log(*a):
        print(*a, file=sys.stderr, flush=True)

    reps = args.reps or (2 if args.quick else 5)
    torch.set_num_threads(THREADS)
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as folder:
        log(f"building a random Llama ({MODEL['num_hidden_layers']} layers, hidden {MODEL['hidden_size']}, "
            f"vocab {MODEL['vocab_size']}) with transformers and saving it")
        hf = build_checkpoint(folder)
        n_params = sum(p.numel() for p in hf.parameters())
        model = momjax.load(folder, progress=False)
        log(f"{n_params / 1e6:.1f}M parameters; transformers attention: {hf.config._attn_implementation}")
        gen = bench_generate(model, hf, rng.integers(0, MODEL["vocab_size"], PROMPT_TOKENS), reps, log)
        del hf
        long = bench_long_prefill(model, rng.integers(0, MODEL["vocab_size"], LONG_PROMPT_TOKENS), reps, log)
    result = {
        "benchmark": "cpu_vs_transformers", "model": MODEL, "parameters": n_params, "dtype": "float32",
        "threads": THREADS, "cpu_count": os.cpu_count(), "platform": platform.platform(),
        "jax": jax.__version__, "torch": torch.__version__, "transformers": transformers.__version__,
        "generate": gen, "long_prefill": long,
        "targets": {"speedup_min": TARGET_SPEEDUP, "prefill_ratio_max": TARGET_PREFILL_RATIO,
                    "speedup_met": gen["speedup"] >= TARGET_SPEEDUP,
                    "prefill_ratio_met": long["ratio_mom_over_baseline"] <= TARGET_PREFILL_RATIO},
    }
    print(table(result))
    out = args.out or (os.path.join(RESULTS, "cpu_vs_transformers.json") if os.path.isdir(RESULTS) else None)
    if out:
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        with open(out, "w") as f:
            json.dump(result, f, indent=2)
        print(f"wrote {out}")
    return 0
