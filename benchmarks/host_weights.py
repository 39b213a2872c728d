"""Weights in host memory against weights on the device, for baseline, mom and mom-stream, on this CPU.

The benchmark model of `momjax bench` (a random ~40M-parameter Llama, float32), loaded twice: with
weights="device" and with weights="host" (pinned host memory; each layer's weights are brought over as its layer
runs, the next one's copy in flight). For each policy, interleaved round by round in one process: the prefill of a
4096-token prompt (time to first token) and the decode of 32 greedy tokens. The first run of each compiles and is
not counted. Reports per policy the host/device time ratios of prefill and of decode (median and range over
rounds) and whether the tokens are the same.

On a CPU "host" and "device" are the same memory, so the copies cost a memcpy, not a trip over a PCIe link: this
measures the cost of moving the weights layer by layer inside momjax, not a GPU's host link (`momjax plan
--weights host --target GPU` predicts that). Needs torch and transformers to build the checkpoint
(`pip install momjax[test]`).

    python benchmarks/host_weights.py [--rounds 5]

Writes benchmarks/results/host_weights.json.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import momjax  # noqa: E402
from momjax import bench  # noqa: E402

POLICIES = ("baseline", "mom", "mom-stream")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--tokens", type=int, default=bench.LONG_PROMPT_TOKENS)
    ap.add_argument("--new-tokens", type=int, default=33, help="the first token and 32 decoded ones")
    ap.add_argument("--out", default=os.path.join(bench.RESULTS, "host_weights.json"))
    args = ap.parse_args(argv)
    models = bench.load_models("device", "host")
    rng = np.random.default_rng(0)
    prompt = [rng.integers(0, models["device"].config.vocab_size, args.tokens).tolist()]

    def run(policy, weights):
        out = momjax.generate(models[weights], prompt, args.new_tokens, policy, temperature=0, stop_tokens=[])
        return out.time_to_first_token_s, out.decode_s, out.tokens[0].tolist()

    tokens = {(p, w): run(p, w)[2] for p in POLICIES for w in models}  # compiles every program
    times = {(p, w): ([], []) for p in POLICIES for w in models}
    for r in range(args.rounds):
        for key in times:
            prefill_s, decode_s, _ = run(*key)
            times[key][0].append(prefill_s)
            times[key][1].append(decode_s)
        print(f"round {r + 1}: " + ", ".join(f"{p}/{w} {t[0][-1]:.2f}+{t[1][-1]:.2f} s" for (p, w), t in times.items()),
              flush=True)
    result = {}
    for p in POLICIES:
        (dev_prefill, dev_decode), (host_prefill, host_decode) = times[(p, "device")], times[(p, "host")]
        result[p] = dict(
            prefill_seconds=dict(device=statistics.median(dev_prefill), host=statistics.median(host_prefill)),
            decode_seconds=dict(device=statistics.median(dev_decode), host=statistics.median(host_decode)),
            prefill_ratio_host_to_device=bench.spread([h / d for h, d in zip(host_prefill, dev_prefill)]),
            decode_ratio_host_to_device=bench.spread([h / d for h, d in zip(host_decode, dev_decode)]),
            same_tokens=tokens[(p, "host")] == tokens[(p, "device")] == tokens[("baseline", "device")])
    out = dict(machine=bench.machine(), model=bench.MODEL, prompt_tokens=args.tokens, new_tokens=args.new_tokens,
               rounds=args.rounds, policies=result,
               note="on a CPU host and device memory are the same: the ratios are the cost of momjax's per-layer "
                    "copies, not of a GPU's host link")
    bench.write_result(args.out, out)
    for p, r in result.items():
        a, b = r["prefill_ratio_host_to_device"], r["decode_ratio_host_to_device"]
        print(f"{p}: host weights take {a['median']:.2f}x the prefill time ({a['min']:.2f}-{a['max']:.2f}) and "
              f"{b['median']:.2f}x the decode time ({b['min']:.2f}-{b['max']:.2f}); same tokens: {r['same_tokens']}")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
