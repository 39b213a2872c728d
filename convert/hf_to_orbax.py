"""Convert a Hugging Face safetensors checkpoint folder into a momjax Orbax folder.

    python convert/hf_to_orbax.py SRC DST [--dtype float32|bfloat16|float16] [--force [--replace-any-folder]]
                                  [--verify] [--compile-cache DIR] [--quiet]

The same as `momjax convert SRC DST ...` (momjax/cli/convert.py).
"""

import os
import sys

try:
    import momjax.cli
except ImportError:  # run from a source checkout without `pip install -e .`
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import momjax.cli

if __name__ == "__main__":
    sys.exit(momjax.cli.main(["convert", *sys.argv[1:]]))
