"""A conversation turn over a kept document with mom-host's session against mom's, on this CPU.

The benchmark model of `momjax bench` (a random ~40M-parameter Llama, float32). Each policy's Session is fed a
4096-token document once; then, interleaved round by round in one process, each rewinds to the document and
answers a 32-token question with 16 greedy tokens (the question's feed, the decode that streams the cache, and
the answer's feed: what a chat turn costs). The first turn of each compiles and is not counted. Reports the
document's feed times, each round's turn times and ratios with their median and range, and whether the two
policies gave the same answer. Needs torch and transformers to build the checkpoint (`pip install momjax[test]`).

    python benchmarks/host_session.py [--rounds 5]

Writes benchmarks/results/host_session.json.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import momjax  # noqa: E402
from momjax import bench  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--tokens", type=int, default=bench.LONG_PROMPT_TOKENS)
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--out", default=os.path.join(bench.RESULTS, "host_session.json"))
    args = ap.parse_args(argv)
    model = bench.load_models("device")["device"]
    rng = np.random.default_rng(0)
    document = rng.integers(0, model.config.vocab_size, args.tokens).tolist()
    question = rng.integers(0, model.config.vocab_size, 32).tolist()
    sessions, feed_s, answers = {}, {}, {}
    for name in ("mom", "mom-host"):
        s = momjax.Session(model, name)
        t0 = time.perf_counter()
        s.feed(document).block_until_ready()
        feed_s[name] = time.perf_counter() - t0  # compiling included
        sessions[name] = s

    def turn(name):
        s = sessions[name]
        s.rewind(len(document))
        t0 = time.perf_counter()
        out = s.generate(question, args.new_tokens, temperature=0, stop_tokens=[])
        return time.perf_counter() - t0, out.tokens[0].tolist()

    for name in sessions:  # compiles the question's feed, the decode and the answer's feed
        answers[name] = turn(name)[1]
    times = {name: [] for name in sessions}
    for r in range(args.rounds):
        for name in sessions:
            times[name].append(turn(name)[0])
        print(f"round {r + 1}: " + ", ".join(f"{n} {times[n][-1]:.3f} s" for n in sessions), flush=True)
    ratios = [h / m for h, m in zip(times["mom-host"], times["mom"])]
    out = dict(
        machine=bench.machine(),
        document_tokens=args.tokens, question_tokens=len(question), new_tokens=args.new_tokens, rounds=args.rounds,
        model=bench.MODEL, document_feed_seconds_with_compiling=feed_s, turn_seconds=times,
        median_turn_seconds={n: statistics.median(t) for n, t in times.items()},
        turn_ratio_mom_host_to_mom=bench.spread(ratios),
        same_answers=answers["mom"] == answers["mom-host"],
    )
    bench.write_result(args.out, out)
    r = out["turn_ratio_mom_host_to_mom"]
    print(f"a turn with mom-host takes {r['median']:.2f}x mom's (per round {r['min']:.2f}-{r['max']:.2f}); same "
          f"answers: {out['same_answers']}")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
