"""mom-host's prefill against mom's on this CPU: the extra copies must not swamp the work.

The benchmark model of `momjax bench` (a random ~40M-parameter Llama, float32), a 4096-token prompt, `momjax.prefill`
with `mom` and with `mom-host` (its default 2048-token chunks and blocks; then 512-token blocks: four times the
streamed copies), interleaved in one process for several rounds after one warm-up call each (compiling). Reports
each round's times and ratios, their medians and ranges, and that the logits agree. Needs torch and transformers to
build the checkpoint (`pip install momjax[test]`).

    python benchmarks/host_prefill.py [--rounds 7]

Writes benchmarks/results/host_prefill.json.
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

TARGET = 1.5  # mom-host's prefill at most this many times mom's


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--tokens", type=int, default=bench.LONG_PROMPT_TOKENS)
    ap.add_argument("--out", default=os.path.join(bench.RESULTS, "host_prefill.json"))
    args = ap.parse_args(argv)
    model = bench.load_models("device")["device"]
    tokens = np.random.default_rng(0).integers(0, model.config.vocab_size, (1, args.tokens)).astype(np.int32)
    policies = {"mom": momjax.POLICIES["mom"], "mom-host": momjax.POLICIES["mom-host"],
                "mom-host, 512-token blocks": momjax.POLICIES["mom-host"].replace(host_block=512)}

    def run(policy):
        t0 = time.perf_counter()
        logits, cache = momjax.prefill(model, tokens, policy)
        logits.block_until_ready()
        return time.perf_counter() - t0, np.asarray(logits)

    warm = {name: run(p)[1] for name, p in policies.items()}  # compiles
    agree = {name: float(np.max(np.abs(warm[name] - warm["mom"])) / np.max(np.abs(warm["mom"]))) for name in warm}
    times = {name: [] for name in policies}
    for r in range(args.rounds):
        for name, p in policies.items():
            times[name].append(run(p)[0])
        print(f"round {r + 1}: " + ", ".join(f"{n} {times[n][-1]:.3f} s" for n in policies), flush=True)
    ratios = {n: [t / m for t, m in zip(times[n], times["mom"])] for n in policies if n != "mom"}
    out = dict(
        machine=bench.machine(),
        prompt_tokens=args.tokens, rounds=args.rounds, model=bench.MODEL, seconds=times,
        median_seconds={n: statistics.median(t) for n, t in times.items()},
        ratio_to_mom={n: bench.spread(r) for n, r in ratios.items()},
        max_relative_logit_difference_to_mom=agree, target_ratio=TARGET,
        meets_target=statistics.median(ratios["mom-host"]) <= TARGET,
    )
    bench.write_result(args.out, out)
    for n, r in out["ratio_to_mom"].items():
        print(f"{n}: {r['median']:.2f}x mom's prefill (per round {r['min']:.2f}-{r['max']:.2f}); logits differ by "
              f"{agree[n]:.1e} of their largest")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
