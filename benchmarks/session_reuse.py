"""A long document prefilled once, then several questions: time to first token with a `momjax.Session`
against re-prefilling the document with every question (one-shot `momjax.generate`).

Model: the demo-sized random Llama of `momjax bench` (hidden 512, 8 layers, 8 query / 4 KV heads, ffn 1536,
vocab 8192, float32). A 4000-token document, then QUESTIONS questions of 20 tokens, each answered with
NEW_TOKENS greedy tokens; the session rewinds to just after the document before each question. Everything
is compiled by a warm-up round first, so the times are run times. Each question's answer is checked to equal
the one-shot answer (greedy tokens identical).

Target (issue 13): a question's time to first token at most 0.2x the document's prefill time.

    python benchmarks/session_reuse.py [--policies mom,baseline,mom-stream] [--questions 5]

Writes benchmarks/results/session_reuse.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

import jax
import numpy as np

import momjax
from momjax.params import init_random

HERE = os.path.dirname(os.path.abspath(__file__))
DOC_TOKENS = 4000
QUESTION_TOKENS = 20
NEW_TOKENS = 8
CONFIG = momjax.Config(vocab_size=8192, hidden_size=512, intermediate_size=1536, num_layers=8, num_heads=8,
                       num_kv_heads=4, head_dim=64, max_position_embeddings=8192)


def run_policy(model, doc, questions, policy: str, log) -> dict:
    capacity = DOC_TOKENS + QUESTION_TOKENS + NEW_TOKENS

    def session_round():
        s = momjax.Session(model, policy, capacity=capacity)
        t0 = time.perf_counter()
        jax.block_until_ready(s.feed(doc))
        doc_s = time.perf_counter() - t0
        answers, ttft = [], []
        for q in questions:
            s.rewind(DOC_TOKENS)
            g = s.generate(q, NEW_TOKENS, stop_tokens=[])
            answers.append(g.tokens[0].tolist())
            ttft.append(g.time_to_first_token_s)
        return doc_s, ttft, answers

    def one_shot(q):
        g = momjax.generate(model, [doc + q], NEW_TOKENS, policy, stop_tokens=[])
        return g.time_to_first_token_s, g.tokens[0].tolist()

    log(f"{policy}: warming up (compiling)")
    session_round()
    one_shot(questions[0])
    log(f"{policy}: timing")
    doc_s, session_ttft, answers = session_round()
    reprefill = [one_shot(q) for q in questions]
    same = [a == r[1] for a, r in zip(answers, reprefill)]
    result = dict(
        document_prefill_s=doc_s,
        question_ttft_session_s=session_ttft,
        question_ttft_reprefill_s=[r[0] for r in reprefill],
        median_question_ttft_session_s=statistics.median(session_ttft),
        median_question_ttft_reprefill_s=statistics.median(r[0] for r in reprefill),
        ratio_to_document_prefill=statistics.median(session_ttft) / doc_s,
        target_ratio=0.2,
        answers_equal_one_shot=all(same),
    )
    result["meets_target"] = result["ratio_to_document_prefill"] <= 0.2
    log(f"{policy}: document prefill {doc_s:.2f} s; question TTFT with the session "
        f"{result['median_question_ttft_session_s'] * 1000:.0f} ms (median), re-prefilling "
        f"{result['median_question_ttft_reprefill_s']:.2f} s; ratio {result['ratio_to_document_prefill']:.3f}; "
        f"answers equal one-shot: {all(same)}")
    return result


def gpu_prediction(preset="llama-3.1-8b", contexts=(131072, 524288), targets=("h100", "a100-80gb")) -> dict:
    """A bandwidth-bound prediction of a question's time to first token with a session, on the GPU targets of
    momjax.targets (bfloat16; no GPU run): what the feed has to move dominates, the 20 new tokens' compute
    does not (about 2 x 8e9 x 20 = 3.2e11 FLOPs).

    baseline: the cache stays on the device; the feed reads the weights and the cached K/V once from device
      memory: (weights + KV) / memory bandwidth. Only where a baseline prefill of the context fits the device.
    mom, mom-stream: each layer's cached K/V crosses the host link to the device and back (XLA cannot update
      a host buffer in place): from KV / link (the two directions overlapped) to 2 KV / link (not overlapped).
    """
    from momjax import memory
    from momjax import targets as T
    from momjax.params import param_bytes

    cfg = momjax.preset(preset)
    weights = param_bytes(cfg, "bfloat16")
    per_token = cfg.kv_bytes_per_token("bfloat16")
    out = {}
    for name in targets:
        t = T.get(name)
        for n in contexts:
            kv = n * per_token
            # baseline holds the cache on the device: only where its one-shot prefill fits in the first place
            fits = memory.estimate(cfg, n, "baseline", dtype="bfloat16")["device_bytes"] <= t.memory_bytes
            out[f"{name}/{n}"] = dict(
                kv_bytes=kv, weight_bytes=weights,
                baseline_s=(weights + kv) / t.memory_bandwidth if fits else None,
                mom_s=[kv / t.host_link_bandwidth, 2 * kv / t.host_link_bandwidth],
                memory_bandwidth=t.memory_bandwidth, host_link=t.host_link, host_link_bandwidth=t.host_link_bandwidth)
    method = ("bandwidth-bound: baseline (weights + KV) / memory bandwidth; mom and mom-stream KV / host link "
              "(directions overlapped) to 2 KV / host link (not overlapped)")
    return dict(preset=preset, dtype="bfloat16", method=method, cases=out)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--policies", default="mom,baseline,mom-stream")
    parser.add_argument("--questions", type=int, default=5)
    parser.add_argument("--out", default=os.path.join(HERE, "results", "session_reuse.json"))
    args = parser.parse_args(argv)

    log = lambda *a: print(*a, flush=True)
    model = momjax.Model(config=CONFIG, params=init_random(CONFIG, seed=0, dtype="float32"))
    rng = np.random.default_rng(0)
    doc = rng.integers(4, CONFIG.vocab_size, DOC_TOKENS).tolist()
    questions = [rng.integers(4, CONFIG.vocab_size, QUESTION_TOKENS).tolist() for _ in range(args.questions)]
    results = {p: run_policy(model, doc, questions, p, log) for p in args.policies.split(",")}
    out = dict(
        benchmark="session_reuse",
        model=dict(hidden=512, layers=8, heads=8, kv_heads=4, ffn=1536, vocab=8192, dtype="float32"),
        document_tokens=DOC_TOKENS, question_tokens=QUESTION_TOKENS, new_tokens=NEW_TOKENS,
        questions=args.questions,
        machine=dict(platform=platform.platform(), processor=platform.processor(), cpus=os.cpu_count(),
                     backend=jax.default_backend(), jax=jax.__version__),
        results=results,
        gpu_prediction=gpu_prediction(),
    )
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(out, f, indent=2)
    log(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
