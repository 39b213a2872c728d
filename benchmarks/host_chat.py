"""A long chat over a kept document with mom-host: merging short feeds' small blocks against not merging them.

The benchmark model of `momjax bench` (a random ~40M-parameter Llama, float32). Two mom-host Sessions are fed the
same 4096-token document; then, turn by turn and interleaved in one process, each answers the same short
questions (16 tokens, 8 greedy tokens each). One merges its trailing small blocks once a few have built up
(HostCache.compact, what a Session does); the other never merges (momjax.offload.COMPACT_AFTER raised for it), so
each turn adds two blocks (the question's, the answer's) that every later decode step streams. Reports, per
turn, both sessions' turn times and block counts, the ratio over the last turns (median and range), and whether
the answers were the same. Needs torch and transformers to build the checkpoint (`pip install momjax[test]`).

    python benchmarks/host_chat.py [--turns 32] [--last 8]

Writes benchmarks/results/host_chat.json.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import momjax  # noqa: E402
from momjax import bench, offload  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--turns", type=int, default=32)
    ap.add_argument("--last", type=int, default=8, help="turns at the end whose times are compared")
    ap.add_argument("--tokens", type=int, default=bench.LONG_PROMPT_TOKENS)
    ap.add_argument("--question-tokens", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=8)
    ap.add_argument("--out", default=os.path.join(bench.RESULTS, "host_chat.json"))
    args = ap.parse_args(argv)
    model = bench.load_models("device")["device"]
    rng = np.random.default_rng(0)
    document = rng.integers(0, model.config.vocab_size, args.tokens).tolist()
    questions = [rng.integers(0, model.config.vocab_size, args.question_tokens).tolist() for _ in range(args.turns)]
    merge_after = {"merged": offload.COMPACT_AFTER, "unmerged": 10**9}
    sessions = {name: momjax.Session(model, "mom-host") for name in merge_after}
    for s in sessions.values():
        s.feed(document)
    times = {name: [] for name in sessions}
    blocks = {name: [] for name in sessions}
    same = True
    for t, question in enumerate(questions):
        answers = {}
        for name, s in sessions.items():
            offload.COMPACT_AFTER = merge_after[name]  # read by each feed (HostCache.compact's default)
            t0 = time.perf_counter()
            answers[name] = s.generate(question, args.new_tokens, temperature=0, stop_tokens=[]).tokens[0].tolist()
            times[name].append(time.perf_counter() - t0)
            blocks[name].append(len(s._host.spans))
        same &= answers["merged"] == answers["unmerged"]
        print(f"turn {t + 1}: " + ", ".join(f"{n} {times[n][-1]:.3f} s ({blocks[n][-1]} blocks)" for n in sessions),
              flush=True)
    offload.COMPACT_AFTER = merge_after["merged"]
    last = slice(len(questions) - args.last, None)
    ratios = [u / m for u, m in zip(times["unmerged"][last], times["merged"][last])]
    out = dict(
        machine=bench.machine(), model=bench.MODEL, document_tokens=args.tokens,
        question_tokens=args.question_tokens, new_tokens=args.new_tokens, turns=args.turns, compared_turns=args.last,
        merge_after_blocks=merge_after["merged"], turn_seconds=times, blocks_per_layer=blocks,
        unmerged_to_merged_turn_time=bench.spread(ratios), same_answers=bool(same),
    )
    bench.write_result(args.out, out)
    r = out["unmerged_to_merged_turn_time"]
    print(f"after {args.turns} turns: {blocks['merged'][-1]} blocks merged, {blocks['unmerged'][-1]} unmerged; the last "
          f"{args.last} turns take {r['median']:.2f}x as long unmerged (per turn {r['min']:.2f}-{r['max']:.2f}); "
          f"same answers: {same}")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
