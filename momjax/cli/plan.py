"""`momjax plan`: the longest prompt each policy fits in a memory budget, and at --context the predicted decode
speed of each policy and the one to use."""

from __future__ import annotations

import json
import os
import sys

from momjax.cli.common import DTYPES, UsageError


def add_parser(sub, common) -> None:
    p = sub.add_parser("plan", parents=[common], help="longest context each policy fits in a memory budget")
    p.add_argument("--model", required=True, metavar="PRESET|PATH",
                   help="a preset name, a checkpoint folder or a .gguf file")
    p.add_argument("--hbm", default=None, help="accelerator memory, e.g. 80GiB (default: the --target's)")
    p.add_argument("--host-memory", default=None, help="host memory for the offloaded KV cache, e.g. 1TiB")
    p.add_argument("--dtype", choices=DTYPES, default=None,
                   help="weights dtype (default: a checkpoint folder's own; bfloat16 for a preset)")
    p.add_argument("--target", default=None, metavar="GPU",
                   help="confirm the plan with XLA's GPU compiler for this GPU, without a GPU: h100, h200, a100-80gb, "
                        "a100-40gb, l4, rtx4090 or t4 (needs pip install 'momjax[gpu-plan]'); default: the "
                        "closed-form estimate on a CPU")
    p.add_argument("--kv-dtype", choices=("int8",), default=None,
                   help="also plan int8 K/V (approximate: logits change slightly; about half the bytes)")
    p.add_argument("--context", type=int, default=None, metavar="TOKENS",
                   help="predict decode speed per policy at this many tokens and recommend one (speed needs a "
                        "--target: its memory and host link bandwidths)")
    p.add_argument("--devices", type=int, default=1, metavar="N",
                   help="plan the model split tensor-parallel over N devices: --hbm is each device's, --host-memory "
                        "all of theirs together (compiled for N GPUs of the --target without them)")
    p.add_argument("--weights", choices=("device", "host"), default="device",
                   help="host: plan the weights in host memory, streamed layer by layer (every policy, any --devices; "
                        "needs --host-memory)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(run=run)


def run(args) -> int:
    from momjax import memory
    from momjax.config import PRESETS
    from momjax.loading import folder_config
    from momjax.units import parse_bytes

    if args.model in PRESETS:
        cfg = PRESETS[args.model]
    elif os.path.exists(args.model):
        cfg = folder_config(args.model)  # a checkpoint folder or a .gguf file (another file is refused there)
    else:
        raise UsageError(f"{args.model} is neither a preset ({', '.join(PRESETS)}) nor a checkpoint folder or .gguf "
                         "file")
    dtype = args.dtype or cfg.dtype  # the presets are bfloat16 checkpoints
    if args.hbm is None and args.target in (None, "cpu"):
        raise UsageError("give --hbm (e.g. --hbm 80GiB) or a GPU --target whose memory size to use")
    try:
        hbm = None if args.hbm is None else parse_bytes(args.hbm)
        host = None if args.host_memory is None else parse_bytes(args.host_memory)
        result = memory.plan(cfg, hbm, host, dtype=dtype, target=args.target, kv_dtype=args.kv_dtype,
                             context=args.context, devices=args.devices, weights=args.weights)
    except ValueError as e:  # an unreadable size, a budget that cannot hold the weights, a missing GPU compiler
        raise UsageError(str(e)) from None
    notes = memory.plan_notes(cfg, result)
    if args.dtype is None and args.model not in PRESETS:
        notes.insert(0, f"note: planned in {dtype}, the checkpoint's dtype (--dtype to plan another)")
    if args.json:
        print(json.dumps(result, indent=2, default=str))
        for note in notes:  # stdout stays valid JSON
            print(note, file=sys.stderr)
    else:
        print("\n".join([memory.plan_table(result), *notes]))
    return 0
