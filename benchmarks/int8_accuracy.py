"""How much an int8 KV cache (MemoryPolicy(kv_dtype="int8")) changes the logits: measured, teacher-forced.

For each model a PROMPT-token random prompt is prefilled twice, with the unquantised cache and with the int8
one (policy `mom`), and then both are decoded for STEPS steps fed the same tokens: the unquantised model's
greedy choices, so both stay at the same positions whatever the int8 model would have picked. At each of
the STEPS + 1 positions (the prefill's last one and every decode step) we record the relative logit error
||l_int8 - l|| / ||l|| and whether the top-1 tokens agree, and report the max and mean error and the
top-1 agreement per model.

Models: the tiny random checkpoints of tests/tiny.py (Llama GQA, Llama 3.1 MHA, Llama MQA, Qwen2, Mistral with
a 7-token sliding window, Mistral NeMo; head dims 16 to 32), and a larger random Llama built with transformers'
own initialisation (seed 0): hidden 1024, 8 layers, 16 query / 4 KV heads of 64, ffn 2816, vocab 8192,
float32. All random weights: the figures describe the quantiser on these activations, not a trained model.

    python benchmarks/int8_accuracy.py [--prompt 256] [--steps 256] [--models tiny,large]

Writes benchmarks/results/int8_accuracy.json and int8_accuracy.png.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

import momjax
from momjax import generation as G
from momjax.cache import place_for_decode

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "tests"))

from provenance import git_state

LARGE = dict(vocab_size=8192, hidden_size=1024, intermediate_size=2816, num_hidden_layers=8, num_attention_heads=16,
             num_key_value_heads=4, head_dim=64, max_position_embeddings=4096, rope_theta=500000.0,
             bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)


def build_checkpoints(which: list[str], folder: str) -> dict[str, str]:
    """{model name: checkpoint folder} for the tiny families and/or the larger random Llama."""
    import tiny
    import torch
    import transformers

    out = {}
    if "tiny" in which:
        for family in tiny.FAMILIES:
            out[family] = tiny.save_checkpoint(tiny.build_hf_model(family), os.path.join(folder, family))
    if "large" in which:
        config = transformers.LlamaConfig(**LARGE)
        torch.manual_seed(0)
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
        out["llama-1024x8-gqa"] = tiny.save_checkpoint(model, os.path.join(folder, "large"))
    return out


def teacher_forced_logits(model, prompt: np.ndarray, steps: int, policy, forced=None):
    """Logits [steps + 1, V] at the prompt's last position and after each of `steps` fed tokens: `forced`
    [steps] (or, when None, this model's own greedy tokens, returned as the second value)."""
    cfg = model.config
    tokens, start = G.left_pad([prompt.tolist()], G.bucket_length(len(prompt), policy))
    logits, cache = G.prefill_fn(model.params, jnp.asarray(tokens), jnp.asarray(start), cfg, policy)
    cache = place_for_decode(cache, policy).with_tail(steps)
    out, fed = [np.asarray(logits[0])], []
    for i in range(steps):
        token = int(np.argmax(out[-1])) if forced is None else int(forced[i])
        fed.append(token)
        logits, cache = G.decode_step_fn(model.params, jnp.asarray([token], jnp.int32), cache, cfg=cfg,
                                         policy=policy)
        out.append(np.asarray(logits[0]))
    return np.stack(out), np.asarray(fed, np.int32)


def measure(model, prompt_len: int, steps: int, seed: int = 0) -> dict:
    exact_policy = momjax.get_policy("mom")
    int8_policy = exact_policy.replace(kv_dtype="int8")
    prompt = np.random.default_rng(seed).integers(4, model.config.vocab_size, prompt_len)
    t0 = time.perf_counter()
    exact, fed = teacher_forced_logits(model, prompt, steps, exact_policy)
    int8, _ = teacher_forced_logits(model, prompt, steps, int8_policy, forced=fed)
    err = np.linalg.norm(int8 - exact, axis=-1) / np.linalg.norm(exact, axis=-1)
    agree = np.argmax(int8, -1) == np.argmax(exact, -1)
    cfg = model.config
    return dict(
        config=dict(hidden=cfg.hidden_size, layers=cfg.num_layers, heads=cfg.num_heads, kv_heads=cfg.num_kv_heads,
                    head_dim=cfg.head_dim, vocab=cfg.vocab_size, sliding_window=cfg.sliding_window,
                    dtype=str(model.dtype)),
        positions=len(err),
        max_rel_logit_error=float(err.max()),
        mean_rel_logit_error=float(err.mean()),
        top1_agreement=float(agree.mean()),
        rel_logit_error_per_position=[round(float(e), 6) for e in err],
        seconds=time.perf_counter() - t0,
    )


def plot(results: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for name, r in results.items():
        ax.plot(r["rel_logit_error_per_position"], label=f"{name} (top-1 {100 * r['top1_agreement']:.1f}%)",
                lw=1)
    ax.set_xlabel("position after the prompt (0 = prefill's last position, then decode steps)")
    ax.set_ylabel("||logits_int8 - logits|| / ||logits||")
    ax.set_yscale("log")
    ax.set_title("int8 KV cache vs unquantised, teacher-forced (random weights)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompt", type=int, default=256, help="prompt tokens")
    parser.add_argument("--steps", type=int, default=256, help="teacher-forced decode steps")
    parser.add_argument("--models", default="tiny,large", help="comma list of: tiny, large")
    parser.add_argument("--out", default=os.path.join(HERE, "results", "int8_accuracy.json"))
    parser.add_argument("--no-plot", action="store_true")
    args = parser.parse_args(argv)
    which = args.models.split(",")
    if not set(which) <= {"tiny", "large"} or args.prompt < 1 or args.steps < 1:
        print("error: --models takes tiny and/or large; --prompt and --steps must be positive", file=sys.stderr)
        return 2

    log = lambda *a: print(*a, flush=True)
    results = {}
    with tempfile.TemporaryDirectory() as folder:
        for name, path in build_checkpoints(which, folder).items():
            model = momjax.load(path, progress=False)
            r = measure(model, args.prompt, args.steps)
            results[name] = r
            log(f"{name}: max rel logit error {r['max_rel_logit_error']:.4f}, mean {r['mean_rel_logit_error']:.4f}, "
                f"top-1 agreement {100 * r['top1_agreement']:.1f}% over {r['positions']} positions")
    out = dict(
        benchmark="int8_accuracy",
        command=" ".join([os.path.basename(sys.argv[0])] + (sys.argv[1:] if argv is None else list(argv))),
        method=("teacher-forced: both caches fed the unquantised model's greedy tokens; relative logit error "
                "||l_int8 - l|| / ||l|| per position; policy mom, float32 weights, random prompt (seed 0)"),
        prompt_tokens=args.prompt, decode_steps=args.steps,
        machine=dict(platform=platform.platform(), processor=platform.processor(), cpus=os.cpu_count(),
                     backend=jax.default_backend(), jax=jax.__version__),
        git=git_state(),
        results=results,
    )
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(out, f, indent=2)
    log(f"wrote {args.out}")
    if not args.no_plot:
        png = os.path.splitext(args.out)[0] + ".png"
        plot(results, png)
        log(f"wrote {png}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
