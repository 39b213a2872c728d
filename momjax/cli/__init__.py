"""The `momjax` command: demo, generate, chat, serve, plan, convert, bench. One module per command; nothing in the
library imports this package.

`main` is the one place where errors become what a user sees: every MomjaxError (bad input: a missing folder,
no tokenizer, an empty or too long prompt, an unknown policy, a budget too small for the weights), and the
environment's refusals (a full disk, a read-only folder), print one line `momjax: error: ...` on stderr and
exit with status 2; Ctrl-C exits with 130; running out of device memory is one line, not a traceback.
"""

from __future__ import annotations

import argparse
import os
import sys

from momjax.cli import bench, chat, convert, demo, generate, plan, serve
from momjax.cli.common import COMPILE_CACHE_ENV, Parser, UsageError, enable_compile_cache
from momjax.errors import MomjaxError

COMMANDS = (demo, generate, chat, serve, plan, convert, bench)


def build_parser() -> Parser:
    parser = Parser(prog="momjax", description="Run Llama, Qwen2 and Mistral checkpoints in JAX "
                                               "with MOM memory policies for long prompts.")
    cache_help = f"keep compiled programs in DIR across runs (default: ${COMPILE_CACHE_ENV})"
    parser.add_argument("--compile-cache", metavar="DIR", default=os.environ.get(COMPILE_CACHE_ENV), help=cache_help)
    common = Parser(add_help=False)  # the same switch after the command name: `momjax generate --compile-cache D`
    common.add_argument("--compile-cache", metavar="DIR", default=argparse.SUPPRESS, help=cache_help)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for command in COMMANDS:
        command.add_parser(sub, common)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = build_parser().parse_args(argv)
        if args.compile_cache:
            enable_compile_cache(args.compile_cache)
        return args.run(args)
    except (MomjaxError, OSError, UnicodeDecodeError) as e:  # OSError: a full disk, a read-only or vanished folder
        message = " ".join(str(e).split()) or type(e).__name__
        print(f"momjax: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("momjax: interrupted", file=sys.stderr)
        return 130
    except MemoryError:
        print("momjax: error: out of memory; ask for fewer new tokens or a shorter prompt, or use policy mom-stream",
              file=sys.stderr)
        return 2
    except Exception as e:  # XLA reports a failed allocation as a runtime error: one line, not a traceback
        if "RESOURCE_EXHAUSTED" not in str(e):
            raise
        print(f"momjax: error: out of memory ({' '.join(str(e).split())[:200]}); ask for fewer new tokens or a "
              "shorter prompt, or use policy mom-stream", file=sys.stderr)
        return 2


__all__ = ["UsageError", "build_parser", "main"]
