"""`momjax serve` as a chat front end uses it: a long document, then three questions, the whole conversation sent
again with every question. Measures each request's time to first token (streamed: from sending the request to
the first chunk with text) and the cached_tokens the server reports.

Model: the demo checkpoint (`momjax demo`'s random Llama: hidden 256, 4 layers, 4 query / 2 KV heads, head_dim
64, float32, byte-level tokenizer with a chat template, 4096 positions), served by `momjax serve` in its own
process (policy mom: kept caches in pinned host memory) and asked through the `openai` client. The document is
about DOC_TOKENS tokens of random words (one token per byte), sent as the system message; each answer is
NEW_TOKENS greedy tokens. Every round uses a new document, so its first question prefills it from scratch;
round 0 compiles the programs and is reported apart (`warmup`), the others are the figures.

Target (issue 24): the 2nd and 3rd questions' time to first token at most 0.2x the first's.

    python benchmarks/serve_prefix.py [--rounds 4] [--out benchmarks/results/serve_prefix.json]

Writes the JSON and a PNG beside it (matplotlib).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np
import openai

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)

from provenance import git_state  # noqa: E402

DOC_TOKENS = 3900  # the demo model holds 4096 positions: the document, three questions and their answers fit
NEW_TOKENS = 8
QUESTIONS = ("What is the first word of the document?", "Which words come up most often?",
             "Summarize the document in one line.")
WORDS = ("cache", "prefix", "token", "layer", "memory", "host", "device", "question", "answer", "document",
         "session", "server", "stream", "queue", "policy", "model", "context", "length", "bucket", "program")


def document(seed: int) -> str:
    """About DOC_TOKENS bytes of random words (one token each with the demo's byte-level tokenizer)."""
    rng = np.random.default_rng(seed)
    text = ""
    while len(text) < DOC_TOKENS - 40:
        text += " ".join(rng.choice(WORDS, 12)) + ". "
    return text[: DOC_TOKENS - 40]


def start_server(model_dir: str):
    """`momjax serve` in a subprocess on a free port: (process, base URL)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.Popen([sys.executable, "-m", "momjax.cli", "serve", "--model", model_dir, "--port", "0",
                             "--policy", "mom"], stdout=subprocess.PIPE, text=True, env=env)
    line = proc.stdout.readline()
    if " on http://" not in line:
        proc.terminate()
        raise SystemExit(f"the server did not start: {line!r}")
    return proc, line.split(" on ")[1].split()[0]


def ask(client, messages) -> dict:
    """One streamed request: time to first text, the answer, and the usage the server reports."""
    t0 = time.perf_counter()
    ttft, text, use = None, "", None
    for chunk in client.chat.completions.create(model="demo", messages=messages, max_tokens=NEW_TOKENS,
                                                temperature=0, stream=True, stream_options={"include_usage": True}):
        if chunk.choices and chunk.choices[0].delta.content:
            ttft = ttft if ttft is not None else time.perf_counter() - t0
            text += chunk.choices[0].delta.content
        if chunk.usage is not None:
            use = chunk.usage
    return dict(ttft_s=ttft if ttft is not None else time.perf_counter() - t0, total_s=time.perf_counter() - t0,
                answer=text, prompt_tokens=use.prompt_tokens, cached_tokens=use.prompt_tokens_details.cached_tokens)


def one_round(client, seed: int) -> dict:
    messages = [{"role": "system", "content": document(seed)}]
    asked = []
    for q in QUESTIONS:
        messages.append({"role": "user", "content": q})
        r = ask(client, messages)
        messages.append({"role": "assistant", "content": r["answer"]})
        asked.append(r)
    first = asked[0]["ttft_s"]
    return dict(seed=seed, document_chars=len(messages[0]["content"]), requests=asked,
                ttft_s=[r["ttft_s"] for r in asked], cached_tokens=[r["cached_tokens"] for r in asked],
                prompt_tokens=[r["prompt_tokens"] for r in asked],
                ratio_to_first=[r["ttft_s"] / first for r in asked[1:]])


def plot(result: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rounds = result["rounds"]
    fig, ax = plt.subplots(figsize=(7, 4))
    width = 0.8 / len(rounds)
    for i, r in enumerate(rounds):
        ax.bar(np.arange(3) + i * width, [t * 1000 for t in r["ttft_s"]], width, label=f"round {i + 1}")
    ax.set_xticks(np.arange(3) + 0.4 - width / 2, ["question 1\n(document prefill)", "question 2", "question 3"])
    ax.set_yscale("log")
    ax.set_ylabel("time to first token (ms, log)")
    ax.set_title(f"momjax serve, ~{DOC_TOKENS}-token document, whole history re-sent ({result['machine']['cpus']} CPUs)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=4, help="rounds after the warm-up round (default 4)")
    parser.add_argument("--out", default=os.path.join(HERE, "results", "serve_prefix.json"))
    args = parser.parse_args(argv)
    import jax

    from momjax import demo_model

    with tempfile.TemporaryDirectory(prefix="momjax-serve-bench-") as tmp:
        model_dir = demo_model.write_checkpoint(os.path.join(tmp, "demo"))
        proc, base = start_server(model_dir)
        try:
            client = openai.OpenAI(base_url=base, api_key="none", max_retries=0, timeout=600)
            warmup = one_round(client, seed=0)
            print(f"warm-up (compiling): TTFT {[round(t, 3) for t in warmup['ttft_s']]} s", flush=True)
            rounds = []
            for i in range(args.rounds):
                r = one_round(client, seed=i + 1)
                rounds.append(r)
                print(f"round {i + 1}: TTFT {[round(t, 3) for t in r['ttft_s']]} s, cached_tokens "
                      f"{r['cached_tokens']}, ratios {[round(x, 3) for x in r['ratio_to_first']]}", flush=True)
        finally:
            proc.terminate()
            proc.wait(60)
    ratios = [x for r in rounds for x in r["ratio_to_first"]]
    result = dict(
        benchmark="serve_prefix", server="momjax serve --policy mom (own process), openai client, streamed",
        model=dict(checkpoint="momjax demo", hidden=256, layers=4, heads=4, kv_heads=2, head_dim=64,
                   dtype="float32", tokenizer="byte-level with chat template"),
        document_tokens_about=DOC_TOKENS, new_tokens=NEW_TOKENS, questions=list(QUESTIONS),
        machine=dict(platform=platform.platform(), processor=platform.processor(), cpus=os.cpu_count(),
                     backend=jax.default_backend(), jax=jax.__version__),
        provenance=git_state(), warmup=warmup, rounds=rounds,
        median_first_ttft_s=statistics.median(r["ttft_s"][0] for r in rounds),
        median_later_ttft_s=statistics.median(t for r in rounds for t in r["ttft_s"][1:]),
        worst_ratio_to_first=max(ratios), median_ratio_to_first=statistics.median(ratios), target_ratio=0.2,
    )
    result["meets_target"] = result["worst_ratio_to_first"] <= 0.2
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    plot(result, os.path.splitext(args.out)[0] + ".png")
    print(f"first TTFT (median) {result['median_first_ttft_s']:.3f} s, later {result['median_later_ttft_s']:.3f} s; "
          f"ratio median {result['median_ratio_to_first']:.3f}, worst {result['worst_ratio_to_first']:.3f}; wrote "
          f"{args.out}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
