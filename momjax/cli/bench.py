"""`momjax bench` (and benchmarks/cpu_vs_transformers.py): momjax against transformers on this CPU (momjax.bench)."""

from __future__ import annotations

import json
import os
import sys

from momjax.cli.common import UsageError


def add_parser(sub, common) -> None:
    p = sub.add_parser("bench", parents=[common], help="momjax vs transformers on CPU (needs momjax[test])")
    p.add_argument("--quick", action="store_true", help="2 repetitions instead of 5")
    p.add_argument("--reps", type=int, default=None)
    p.add_argument("--out", default=None,
                   help="JSON results file (default: benchmarks/results/cpu_vs_transformers.json in a checkout)")
    p.set_defaults(run=run)


def run(args) -> int:
    from momjax import bench

    for name in ("torch", "transformers"):
        if not bench.available(name):
            raise UsageError(f"momjax bench compares with transformers and needs {name}; run "
                             "`pip install momjax[test]` (on CPU machines install torch==2.13.0 first)")
    result = bench.run(args.reps or (2 if args.quick else 5), lambda *a: print(*a, file=sys.stderr, flush=True))
    print(bench.table(result))
    out = args.out or (os.path.join(bench.RESULTS, "cpu_vs_transformers.json") if os.path.isdir(bench.RESULTS) else None)
    if out:
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        with open(out, "w") as f:
            json.dump(result, f, indent=2)
        print(f"wrote {out}")
    return 0
