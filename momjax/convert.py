"""Convert a Hugging Face safetensors checkpoint folder into a momjax Orbax folder.

The conversion streams: tensors are read one at a time, cast, and assembled into one stacked [L, ...]
leaf at a time, which is written to its own Orbax checkpoint and freed before the next leaf starts.
Peak memory is about the largest leaf plus Orbax's write buffers, never the whole model
(benchmarks/convert_rss.py measures it). All names, shapes and file sizes are checked from the
safetensors headers before any data is read.

The result is written into `.DST.partial-<pid>` beside DST and renamed to DST only when complete
(after `--verify`, if asked), so an interrupted or failed conversion leaves nothing behind. DST also
gets the checkpoint's config.json, generation_config.json and tokenizer files, so it loads on its own.

    python convert/hf_to_orbax.py SRC DST [--dtype float32|bfloat16|float16] [--force] [--verify]
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys

import numpy as np

from momjax.checkpoint import CheckpointError, atomic_folder, stream_hf_leaves, write_orbax
from momjax.config import SUPPORTED_DTYPES, Config, ConfigError

# Files copied next to the params when present: everything a tokenizer or generation config may need.
COPIED_FILES = (
    "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "tokenizer.model",
    "special_tokens_map.json", "added_tokens.json", "vocab.json", "vocab.txt", "merges.txt",
    "chat_template.jinja", "chat_template.json",
)
VERIFY_TOKENS = 8


def convert(src: str, dst: str, dtype: str | None = None, force: bool = False, verify: bool = False,
            progress: bool = True) -> str:
    """Convert HF folder src into Orbax folder dst; returns dst's absolute path.

    dtype: "float32" | "bfloat16" | "float16" | None (the checkpoint's torch_dtype).
    force: replace an existing dst (only once the new one is complete).
    verify: compare a short forward pass of src and the converted params; they must be exactly equal.
    Raises CheckpointError / ConfigError on bad input, before anything is written.
    """
    if not os.path.isdir(src):
        raise CheckpointError(f"{src} is not a folder; pass a Hugging Face checkpoint folder (config.json + "
                              "*.safetensors)")
    if os.path.abspath(src) == os.path.abspath(dst):
        raise CheckpointError("the destination must differ from the source folder")
    if dtype is not None and dtype not in SUPPORTED_DTYPES:
        raise CheckpointError(f"dtype {dtype!r} is not supported; choose one of {', '.join(SUPPORTED_DTYPES)}")
    cfg = Config.from_folder(src)
    dtype = dtype or cfg.dtype
    leaves = stream_hf_leaves(src, cfg, dtype, progress, desc="converting")  # checks every header first
    with atomic_folder(dst, force) as tmp:
        write_orbax(tmp, cfg.replace(dtype=dtype), leaves)
        for name in COPIED_FILES:
            if os.path.isfile(os.path.join(src, name)):
                shutil.copy2(os.path.join(src, name), os.path.join(tmp, name))
        if verify:
            verify_conversion(src, tmp, dtype)
    return os.path.abspath(dst)


def verify_conversion(src: str, converted: str, dtype: str) -> None:
    """Exactly equal float32 logits of a short forward pass from src (cast to dtype) and the converted folder."""
    import momjax

    cfg = Config.from_folder(src)
    tokens = (np.arange(1, VERIFY_TOKENS + 1, dtype=np.int64) * 7919 % cfg.vocab_size)[None]
    model = momjax.load(src, dtype=dtype, progress=False)
    expected = np.asarray(momjax.forward(model, tokens))
    del model  # one model in memory at a time
    got = np.asarray(momjax.forward(momjax.load(converted, progress=False), tokens))
    if got.shape != expected.shape or not np.array_equal(got, expected):
        diff = float(np.max(np.abs(got - expected))) if got.shape == expected.shape else float("inf")
        raise CheckpointError(f"verification failed: logits from {src} and its conversion differ by up to {diff:g}; "
                              "the converted folder was not kept. Please report this as a momjax bug")


def main(argv: list[str] | None = None) -> int:
    """Command line: convert SRC DST. Exit 0 on success, 2 on bad input (one line on stderr), 130 if interrupted."""
    parser = argparse.ArgumentParser(prog="hf_to_orbax", description=__doc__.split("\n\n")[0])
    parser.add_argument("src", metavar="SRC", help="Hugging Face checkpoint folder (config.json + *.safetensors)")
    parser.add_argument("dst", metavar="DST", help="Orbax folder to create")
    parser.add_argument("--dtype", choices=SUPPORTED_DTYPES, default=None,
                        help="dtype to store (default: the checkpoint's torch_dtype)")
    parser.add_argument("--force", action="store_true", help="replace DST if it exists")
    parser.add_argument("--verify", action="store_true",
                        help="compare a short forward pass of SRC and DST (loads the model twice, one at a time)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    try:
        out = convert(args.src, args.dst, dtype=args.dtype, force=args.force, verify=args.verify,
                      progress=not args.quiet)
    except (CheckpointError, ConfigError) as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"interrupted; nothing was written to {args.dst}", file=sys.stderr)
        return 130
    print(f"wrote {out}" + (" (verified: logits equal)" if args.verify else ""))
    return 0
