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

A trained model on real text (--models smollm2, opt-in: downloads 93 MB once): SmolLM2-135M-Instruct from its
Q4_1 GGUF file (momjax.gguf.fetch.fetch_smollm2), dequantized to float32, reading a real document (default: this
project's README.md). The first --text-prompt tokens of the document are prefilled, then the next
--text-steps tokens of the document itself are fed one at a time (teacher-forced with the text, not with
greedy choices), with the exact cache and with the int8 one. Besides the relative logit error and the
top-1 agreement of int8 against exact at every position, the perplexity of those document tokens is
reported for both caches, and its relative change.

    python benchmarks/int8_accuracy.py [--prompt 256] [--steps 256] [--models tiny,large]
    python benchmarks/int8_accuracy.py --models smollm2 [--text README.md] [--text-prompt 4096] [--text-steps 1024]

Writes benchmarks/results/int8_accuracy.json and int8_accuracy.png (--models smollm2: int8_accuracy_smollm2.json
and .png, unless --out says otherwise).
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


def measure_text(model, tokens: np.ndarray, prompt_len: int, steps: int) -> dict:
    """int8 against exact on a document: prefill tokens[:prompt_len], then feed the document's own next `steps`
    tokens; the logits at the prefill's last position and after each fed token but the last predict
    tokens[prompt_len:prompt_len + steps], whose perplexity is computed under both caches."""
    exact_policy = momjax.get_policy("mom")
    int8_policy = exact_policy.replace(kv_dtype="int8")
    prompt, forced = tokens[:prompt_len], tokens[prompt_len:prompt_len + steps]
    t0 = time.perf_counter()
    exact, _ = teacher_forced_logits(model, prompt, steps, exact_policy, forced=forced)
    int8, _ = teacher_forced_logits(model, prompt, steps, int8_policy, forced=forced)
    exact, int8 = exact[:steps], int8[:steps]  # the last step's logits predict a token past the window

    def nll(logits):  # per position, in float64
        z = logits.astype(np.float64)
        z = z - z.max(-1, keepdims=True)
        return np.log(np.exp(z).sum(-1)) - z[np.arange(len(forced)), forced]

    nll_exact, nll_int8 = nll(exact), nll(int8)
    err = np.linalg.norm(int8 - exact, axis=-1) / np.linalg.norm(exact, axis=-1)
    agree = np.argmax(int8, -1) == np.argmax(exact, -1)
    ppl_exact, ppl_int8 = float(np.exp(nll_exact.mean())), float(np.exp(nll_int8.mean()))
    cfg = model.config
    return dict(
        config=dict(hidden=cfg.hidden_size, layers=cfg.num_layers, heads=cfg.num_heads, kv_heads=cfg.num_kv_heads,
                    head_dim=cfg.head_dim, vocab=cfg.vocab_size, dtype=str(model.dtype)),
        prompt_tokens=int(prompt_len),
        positions=len(err),
        max_rel_logit_error=float(err.max()),
        mean_rel_logit_error=float(err.mean()),
        top1_agreement=float(agree.mean()),
        perplexity_exact=ppl_exact,
        perplexity_int8=ppl_int8,
        perplexity_rel_change=ppl_int8 / ppl_exact - 1.0,
        max_abs_nll_change=float(np.abs(nll_int8 - nll_exact).max()),
        exact_top1_is_next_token=float((np.argmax(exact, -1) == forced).mean()),
        rel_logit_error_per_position=[round(float(e), 6) for e in err],
        seconds=time.perf_counter() - t0,
    )


def run_smollm2(args, log) -> dict:
    """{name: measure_text result} for SmolLM2-135M-Instruct on the document args.text."""
    import hashlib

    from momjax.gguf.fetch import SMOLLM2, fetch_smollm2

    path = fetch_smollm2(log=log)
    model = momjax.load(path, progress=False)
    tok = momjax.load_tokenizer(path)
    with open(args.text, encoding="utf-8") as f:
        text = f.read()
    tokens = np.asarray(tok.encode(text), np.int64)
    need = args.text_prompt + args.text_steps
    if len(tokens) < need:
        raise SystemExit(f"error: {args.text} is {len(tokens)} tokens; --text-prompt + --text-steps needs {need}")
    r = measure_text(model, tokens, args.text_prompt, args.text_steps)
    r["model"] = f"SmolLM2-135M-Instruct ({SMOLLM2['file']}, dequantized to float32)"
    r["text"] = dict(path=os.path.relpath(os.path.abspath(args.text), os.path.dirname(HERE)), tokens=len(tokens),
                     sha256=hashlib.sha256(text.encode()).hexdigest())
    return {"smollm2-135m-instruct": r}


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
    trained = any("perplexity_exact" in r for r in results.values())
    ax.set_title("int8 KV cache vs unquantised, teacher-forced (" + ("SmolLM2-135M on real text" if trained
                                                                     else "random weights") + ")")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompt", type=int, default=256, help="prompt tokens")
    parser.add_argument("--steps", type=int, default=256, help="teacher-forced decode steps")
    parser.add_argument("--models", default="tiny,large", help="comma list of: tiny, large, smollm2 (downloads)")
    parser.add_argument("--text", default=os.path.join(os.path.dirname(HERE), "README.md"),
                        help="smollm2: the document to read (default: this project's README.md)")
    parser.add_argument("--text-prompt", type=int, default=4096, help="smollm2: document tokens prefilled")
    parser.add_argument("--text-steps", type=int, default=1024, help="smollm2: document tokens then fed one by one")
    parser.add_argument("--out", default=None, help="default: results/int8_accuracy.json (smollm2: "
                                                    "results/int8_accuracy_smollm2.json)")
    parser.add_argument("--no-plot", action="store_true")
    args = parser.parse_args(argv)
    which = args.models.split(",")
    if not set(which) <= {"tiny", "large", "smollm2"} or min(args.prompt, args.steps, args.text_prompt,
                                                             args.text_steps) < 1:
        print("error: --models takes tiny, large and/or smollm2; --prompt, --steps, --text-prompt and --text-steps "
              "must be positive", file=sys.stderr)
        return 2
    if "smollm2" in which and len(which) > 1:
        print("error: run --models smollm2 on its own (its figures are on real text, in their own file)",
              file=sys.stderr)
        return 2
    smollm2 = which == ["smollm2"]
    args.out = args.out or os.path.join(HERE, "results", "int8_accuracy_smollm2.json" if smollm2 else
                                        "int8_accuracy.json")

    log = lambda *a: print(*a, flush=True)
    results = {}
    if smollm2:
        results = run_smollm2(args, log)
        for name, r in results.items():
            log(f"{name}: max rel logit error {r['max_rel_logit_error']:.4f}, mean {r['mean_rel_logit_error']:.4f}, "
                f"top-1 agreement {100 * r['top1_agreement']:.2f}% over {r['positions']} positions; perplexity "
                f"{r['perplexity_exact']:.4f} exact, {r['perplexity_int8']:.4f} int8 "
                f"({100 * r['perplexity_rel_change']:+.3f}%)")
    with tempfile.TemporaryDirectory() as folder:
        for name, path in ({} if smollm2 else build_checkpoints(which, folder)).items():
            model = momjax.load(path, progress=False)
            r = measure(model, args.prompt, args.steps)
            results[name] = r
            log(f"{name}: max rel logit error {r['max_rel_logit_error']:.4f}, mean {r['mean_rel_logit_error']:.4f}, "
                f"top-1 agreement {100 * r['top1_agreement']:.1f}% over {r['positions']} positions")
    method = ("teacher-forced: both caches fed the unquantised model's greedy tokens; relative logit error "
              "||l_int8 - l|| / ||l|| per position; policy mom, float32 weights, random prompt (seed 0)")
    if smollm2:
        method = ("teacher-forced with the document: its first text_prompt tokens prefilled, its next text_steps "
                  "tokens fed one at a time to both caches; relative logit error ||l_int8 - l|| / ||l|| and top-1 "
                  "agreement at each position predicting a document token, and the perplexity of those tokens "
                  "under each cache; policy mom, weights dequantized from Q4_1 to float32")
    out = dict(
        benchmark="int8_accuracy",
        command=" ".join([os.path.basename(sys.argv[0])] + (sys.argv[1:] if argv is None else list(argv))),
        method=method,
        **(dict(text_prompt_tokens=args.text_prompt, text_steps=args.text_steps) if smollm2 else
           dict(prompt_tokens=args.prompt, decode_steps=args.steps)),
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
