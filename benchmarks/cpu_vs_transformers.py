"""momjax vs transformers on CPU: generation with a 512-token prompt, and mom vs baseline prefill at 4096.

The benchmark lives in momjax/bench.py so that `momjax bench` runs it from an installed package too;
this script is the same command. Results: benchmarks/results/cpu_vs_transformers.json.

    python benchmarks/cpu_vs_transformers.py [--quick] [--reps N] [--out FILE]
"""

import sys

from momjax.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))
