"""`momjax convert SRC DST` (and convert/hf_to_orbax.py): a Hugging Face checkpoint folder or a GGUF file to an
Orbax folder, atomically (momjax.convert). Exit 0 on success, 2 on bad input or a failed write (one line on
stderr), 130 on SIGINT and 143 on SIGTERM (one line; nothing is left behind)."""

from __future__ import annotations

import signal
import sys

from momjax.config import SUPPORTED_DTYPES


def add_parser(sub, common) -> None:
    p = sub.add_parser("convert", parents=[common],
                       help="convert a Hugging Face checkpoint or a GGUF file to an Orbax folder",
                       description="Convert a Hugging Face safetensors checkpoint folder, or a GGUF file, into a "
                                   "momjax Orbax folder.")
    p.add_argument("src", metavar="SRC",
                   help="Hugging Face checkpoint folder (config.json + *.safetensors) or a .gguf file")
    p.add_argument("dst", metavar="DST", help="Orbax folder to create")
    p.add_argument("--dtype", choices=SUPPORTED_DTYPES, default=None,
                   help="dtype to store (default: the checkpoint's torch_dtype; for GGUF its float type, or float32 "
                        "when quantized)")
    p.add_argument("--force", action="store_true", help="replace DST if it is a previous momjax conversion")
    p.add_argument("--replace-any-folder", action="store_true",
                   help="with --force: replace DST whatever it holds (its contents are deleted)")
    p.add_argument("--verify", action="store_true",
                   help="compare a short forward pass of SRC and DST (loads the model twice, one at a time)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(run=run)


def run(args) -> int:
    from momjax.convert import Interrupted, convert

    try:
        out = convert(args.src, args.dst, dtype=args.dtype, force=args.force, verify=args.verify,
                      progress=not args.quiet, replace_any=args.replace_any_folder)
    except KeyboardInterrupt as e:
        signum = e.signum if isinstance(e, Interrupted) else signal.SIGINT
        print(f"momjax: interrupted ({signal.Signals(signum).name}); nothing was written to {args.dst}",
              file=sys.stderr)
        return 128 + int(signum)
    print(f"wrote {out}" + (" (verified: logits equal)" if args.verify else ""))
    return 0
