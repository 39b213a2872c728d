"""The `momjax` command: demo, generate, plan, convert, bench.

`generate` streams text as it is decoded: one prefill, then the decode loop runs in jitted chunks (a
`lax.while_loop` per chunk, compiled once) whose length grows until each chunk takes a fraction of a
second, so text appears promptly and throughput stays close to a single while_loop. It samples exactly as
`momjax.generate` does (same keys, same steps), so the two give the same tokens for the same seed.

Bad input (a missing folder, no tokenizer, an empty or too long prompt, an unknown policy, a budget
too small for the weights) prints one line on stderr and exits with status 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

COMPILE_CACHE_ENV = "MOMJAX_COMPILATION_CACHE"
LONG_PREFILL = 8192  # prompts at least this long show per-layer prefill progress
CHUNK_MAX = 64  # most tokens one decode chunk may produce (its output buffer)
CHUNK_SECONDS = 0.25  # grow chunks until one takes about this long
POLICY_NAMES = ("baseline", "mom", "mom-stream")
DTYPES = ("float32", "bfloat16", "float16")


class UsageError(ValueError):
    """A command-line request that cannot run as given (reported as one line, exit status 2)."""


def _error_types() -> tuple[type, ...]:
    """Exceptions that mean bad input: reported in one line with exit status 2, never as a traceback."""
    from momjax.api import InputError
    from momjax.config import ConfigError
    from momjax.tokenizer import TokenizerError

    types = [UsageError, InputError, ConfigError, TokenizerError, FileNotFoundError, NotADirectoryError,
             IsADirectoryError, PermissionError, UnicodeDecodeError]
    try:
        from momjax.checkpoint import CheckpointError

        types.append(CheckpointError)
    except ImportError:
        pass
    return tuple(types)


def enable_compile_cache(path: str) -> None:
    """Keep compiled programs in `path` across runs (JAX's persistent compilation cache), small ones too."""
    import jax

    os.makedirs(path, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", os.path.abspath(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)


# ---------------------------------------------------------------------- streaming decode


_COMPILED: dict = {}  # (program, static args, shapes, placements) -> compiled program


def _compiled(key, compile):
    """The compiled program(s) for key, running compile() on first use. Returns (programs, seconds compiling)."""
    if key in _COMPILED:
        return _COMPILED[key], 0.0
    t0 = time.perf_counter()
    _COMPILED[key] = compile()
    return _COMPILED[key], time.perf_counter() - t0


_PROGRESS = {"layers": 0, "done": 0, "t0": 0.0}


def _prefill_progress(layer) -> None:
    """Host callback after each prefill layer (one function object, so it never causes a recompile)."""
    i, n = int(layer) + 1, _PROGRESS["layers"]
    if i <= _PROGRESS["done"]:  # an unordered callback may arrive late: never step back
        return
    _PROGRESS["done"] = i
    end = "\n" if i == n else ""
    print(f"\rprefill: layer {i}/{n} ({time.perf_counter() - _PROGRESS['t0']:.1f} s)", end=end, file=sys.stderr,
          flush=True)


class StreamStats:
    """Timings of one streamed generation (filled in as it runs). Compilation is timed on its own."""

    def __init__(self, prompt_tokens: int, policy: str):
        self.prompt_tokens = prompt_tokens
        self.policy = policy
        self.new_tokens = 0
        self.time_to_first_token_s = float("nan")  # prefill compile + prefill + first sample
        self.prefill_compile_s = 0.0
        self.decode_compile_s = 0.0
        self.decode_s = 0.0  # the decode steps after the first token, compilation excluded

    @property
    def decode_tokens_per_s(self) -> float:
        steps = self.new_tokens - 1
        return steps / self.decode_s if steps > 0 and self.decode_s > 0 else float("nan")


def stream_tokens(model, prompt: list[int], max_new_tokens: int, policy="mom", temperature: float = 0.0,
                  top_k: int | None = None, top_p: float | None = None, seed: int = 0, stop_tokens=None,
                  stats: StreamStats | None = None, progress: bool | None = None):
    """Yield lists of new token ids for one prompt as they are decoded (a stop token ends it, included).

    The same tokens as `momjax.generate(model, [prompt], ...)`. progress: per-layer prefill progress on
    stderr (default: for prompts of LONG_PREFILL tokens or more; shorter ones compile without the callback).
    The caller checks the context length (model.max_context).
    """
    import jax
    import jax.numpy as jnp
    import numpy as np

    from momjax import generation as G
    from momjax.api import check_prompts, get_policy, sampling_args
    from momjax.cache import place_prompt

    policy = get_policy(policy)
    cfg = model.config
    (prompt,) = check_prompts(model, [prompt])
    first_token, decode_chunk = G.first_token_fn, G.decode_chunk_fn
    key, temperature, top_k, top_p, stop_ids, pad_id = sampling_args(model, temperature, top_k, top_p, seed,
                                                                      stop_tokens)
    stats = stats if stats is not None else StreamStats(len(prompt), policy.name)

    if progress is None:
        progress = len(prompt) >= LONG_PREFILL
    on_layer = _prefill_progress if progress else None
    tokens, start = G.left_pad([prompt], G.bucket_length(len(prompt), policy))
    tokens, start = jnp.asarray(tokens), jnp.asarray(start)
    t0 = time.perf_counter()
    # Compiled ahead of time (the same program momjax.prefill runs) so compilation is reported on its own.
    where = (str(model.dtype), model.params.embed.sharding.memory_kind)
    programs, stats.prefill_compile_s = _compiled(
        ("prefill", cfg, policy, tokens.shape, where),
        lambda: G.compile_prefill(model.params, tokens, start, cfg, policy))
    logits_shape = jax.ShapeDtypeStruct((1, cfg.vocab_size), jnp.float32)
    sample_first, seconds = _compiled(
        ("first", cfg.vocab_size, stop_ids.shape, top_k),
        lambda: first_token.lower(logits_shape, key, temperature, top_k, top_p, stop_ids).compile())
    stats.prefill_compile_s += seconds
    _PROGRESS.update(layers=cfg.num_layers, done=0, t0=time.perf_counter())
    logits, cache = G.prefill_fn(model.params, tokens, start, cfg, policy, on_layer=on_layer, compiled=programs)
    token, done = sample_first(logits, key, temperature, top_p, stop_ids)
    first = int(np.asarray(token)[0])
    stats.time_to_first_token_s = time.perf_counter() - t0
    stats.new_tokens = 1
    yield [first]
    if bool(np.asarray(done)[0]) or max_new_tokens == 1:
        return

    cache = place_prompt(cache, policy.kv_decode)  # mom: the one copy back to the device, as generate does
    cache = cache.with_tail(max(max_new_tokens - 1, 1))  # the tail generate uses: same shapes, same numbers
    tail_k, tail_v = cache.tail_k, cache.tail_v
    t = jnp.int32(1)
    step, stats.decode_compile_s = _compiled(
        ("decode", cfg, policy, cache.k[0].shape, tail_k[0].shape, cache.memory_kind, where, top_k),
        lambda: decode_chunk.lower(model.params, cache, tail_k, tail_v, token, t, done, t, key, temperature, top_k,
                                   top_p, stop_ids, pad_id, cfg=cfg, policy=policy, steps=CHUNK_MAX).compile())
    chunk = 1
    while stats.new_tokens < max_new_tokens:
        c0 = time.perf_counter()
        limit = jnp.int32(min(stats.new_tokens + chunk, max_new_tokens))
        out, n, t, done, tail_k, tail_v, token = step(model.params, cache, tail_k, tail_v, token, t, done, limit, key,
                                                      temperature, top_p, stop_ids, pad_id)
        new = np.asarray(out)[0, : int(n)].tolist()
        elapsed = time.perf_counter() - c0
        stats.decode_s += elapsed  # chunks only: the time the caller spends printing is not decoding
        stats.new_tokens += len(new)
        if new:
            yield new
        if bool(np.asarray(done)[0]) or not new:
            return
        if elapsed < CHUNK_SECONDS:
            chunk = min(2 * chunk, CHUNK_MAX)


# ---------------------------------------------------------------------- commands


def _peak_device_memory() -> str:
    import jax

    stats = jax.devices()[0].memory_stats()
    if not stats or "peak_bytes_in_use" not in stats:
        return f"n/a on {jax.default_backend().upper()}"
    from momjax.memory import format_bytes

    return format_bytes(stats["peak_bytes_in_use"])


def _read_prompt(args) -> str:
    if args.prompt_file is not None:
        if args.prompt_file == "-":
            text = sys.stdin.read()
        else:
            if not os.path.isfile(args.prompt_file):
                raise UsageError(f"prompt file {args.prompt_file} does not exist")
            with open(args.prompt_file, encoding="utf-8") as f:
                text = f.read()
    else:
        text = args.prompt
    if not text.strip():
        raise UsageError("the prompt is empty; give some text with --prompt or --prompt-file")
    return text


def cmd_generate(args) -> int:
    import momjax
    from momjax.config import Config
    from momjax.tokenizer import load_tokenizer

    if not os.path.isdir(args.model):
        raise UsageError(f"model folder {args.model} does not exist; pass a Hugging Face or Orbax checkpoint folder")
    if args.max_new_tokens < 1:
        raise UsageError(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}")
    if args.temperature < 0:
        raise UsageError(f"--temperature must be >= 0, got {args.temperature}")
    if args.top_k is not None and args.top_k < 1:
        raise UsageError(f"--top-k must be a positive integer, got {args.top_k}")
    if args.top_p is not None and not 0 < args.top_p <= 1:
        raise UsageError(f"--top-p must be in (0, 1], got {args.top_p}")
    text = _read_prompt(args)
    tok = load_tokenizer(args.model)  # before the weights: a folder without a tokenizer fails fast
    ids = tok.encode_chat(text) if args.chat else tok.encode(text)
    if not ids:
        raise UsageError("the prompt encodes to no tokens; give some text")

    total = len(ids) + args.max_new_tokens

    def check_context(context: int):
        if total > context and not args.allow_long_context:
            raise UsageError(
                f"the prompt ({len(ids)} tokens) + --max-new-tokens ({args.max_new_tokens}) = {total} tokens does not "
                f"fit the model's context of {context}; shorten it, or pass --allow-long-context to run past the "
                "trained length (outputs may degrade)")

    if os.path.isfile(os.path.join(args.model, "config.json")):
        check_context(Config.from_folder(args.model).max_position_embeddings)  # before the weights are read
    model = momjax.load(args.model, dtype=args.dtype, progress=not args.quiet)
    check_context(model.max_context)
    model.max_context = max(model.max_context, total)

    stats = StreamStats(len(ids), args.policy)
    stream = tok.stream()
    for new in stream_tokens(model, ids, args.max_new_tokens, policy=args.policy, temperature=args.temperature,
                             top_k=args.top_k, top_p=args.top_p, seed=args.seed, stats=stats,
                             progress=None if not args.quiet else False):
        piece = stream.push(new)
        if piece:
            sys.stdout.write(piece)
            sys.stdout.flush()
    sys.stdout.write(stream.flush() + "\n")
    sys.stdout.flush()
    print(f"prompt tokens:        {stats.prompt_tokens}\n"
          f"new tokens:           {stats.new_tokens}\n"
          f"time to first token:  {stats.time_to_first_token_s:.3f} s ({stats.prefill_compile_s:.3f} s of it compiling)\n"
          f"decode:               {stats.decode_tokens_per_s:.1f} tokens/s (compiled in {stats.decode_compile_s:.3f} s)\n"
          f"policy:               {args.policy}\n"
          f"peak device memory:   {_peak_device_memory()}", file=sys.stderr)
    return 0


def cmd_plan(args) -> int:
    from momjax import memory
    from momjax.config import PRESETS, Config

    if args.model in PRESETS:
        cfg = PRESETS[args.model]
    elif os.path.isdir(args.model):
        cfg = Config.from_folder(args.model)
    else:
        raise UsageError(f"{args.model} is neither a preset ({', '.join(PRESETS)}) nor a checkpoint folder")
    if args.hbm is None and args.target in (None, "cpu"):
        raise UsageError("give --hbm (e.g. --hbm 80GiB) or a GPU --target whose memory size to use")
    try:
        hbm = None if args.hbm is None else memory.parse_bytes(args.hbm)
        host = None if args.host_memory is None else memory.parse_bytes(args.host_memory)
        result = memory.plan(cfg, hbm, host, dtype=args.dtype, target=args.target)
    except ValueError as e:  # an unreadable size, a budget that cannot hold the weights, a missing GPU compiler
        raise UsageError(str(e)) from None
    if args.json:
        print(json.dumps(result, indent=2, default=str))
    else:
        print(memory.plan_table(result))
    return 0


def cmd_bench(args) -> int:
    from momjax import bench

    for name in ("torch", "transformers"):
        if not bench.available(name):
            raise UsageError(f"momjax bench compares with transformers and needs {name}; run "
                             "`pip install momjax[test]` (on CPU machines install torch==2.13.0 first)")

    return bench.main((["--quick"] if args.quick else []) + (["--out", args.out] if args.out else []))


def cmd_demo(args) -> int:
    from momjax import demo

    return demo.run(prompt=args.prompt, max_new_tokens=args.max_new_tokens, rebuild=args.rebuild)


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (raised as UsageError and reported by main) instead of two."""

    def error(self, message):
        raise UsageError(f"{message} (see {self.prog} --help)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="momjax", description="Run Llama, Qwen2 and Mistral checkpoints in JAX "
                                     "with MOM memory policies for long prompts.")
    cache_help = f"keep compiled programs in DIR across runs (default: ${COMPILE_CACHE_ENV})"
    parser.add_argument("--compile-cache", metavar="DIR", default=os.environ.get(COMPILE_CACHE_ENV), help=cache_help)
    common = _Parser(add_help=False)  # the same switch after the command name: `momjax generate --compile-cache D`
    common.add_argument("--compile-cache", metavar="DIR", default=argparse.SUPPRESS, help=cache_help)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("demo", parents=[common], help="build a small random model offline and run every policy on it")
    p.add_argument("--prompt", default=None, help="text to continue")
    p.add_argument("--max-new-tokens", type=int, default=24)
    p.add_argument("--rebuild", action="store_true", help="rebuild the cached demo checkpoint")

    p = sub.add_parser("generate", parents=[common], help="generate text from a checkpoint folder, streamed to stdout")
    p.add_argument("--model", required=True, metavar="DIR", help="Hugging Face or Orbax checkpoint folder")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="prompt text")
    src.add_argument("--prompt-file", metavar="FILE", help="file with the prompt text ('-' for stdin)")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the tokenizer's chat template")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--policy", choices=POLICY_NAMES, default="mom", help="memory policy (default: mom)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 is greedy (default)")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", choices=DTYPES, default=None, help="weights dtype (default: the checkpoint's)")
    p.add_argument("--allow-long-context", action="store_true",
                   help="accept prompts longer than the model's trained context")
    p.add_argument("--quiet", action="store_true", help="no progress output")

    p = sub.add_parser("plan", parents=[common], help="longest context each policy fits in a memory budget")
    p.add_argument("--model", required=True, metavar="PRESET|DIR", help="a preset name or a checkpoint folder")
    p.add_argument("--hbm", default=None, help="accelerator memory, e.g. 80GiB (default: the --target's)")
    p.add_argument("--host-memory", default=None, help="host memory for the offloaded KV cache, e.g. 1TiB")
    p.add_argument("--dtype", choices=DTYPES, default="bfloat16")
    p.add_argument("--target", default=None, metavar="GPU",
                   help="confirm the plan with XLA's GPU compiler for this GPU, without a GPU: h100, a100-80gb, "
                        "a100-40gb, l4, rtx4090 or t4 (needs pip install 'momjax[gpu-plan]'); default: the "
                        "closed-form estimate on a CPU")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")

    sub.add_parser("convert", help="convert a Hugging Face checkpoint to an Orbax folder (momjax convert -h)",
                   add_help=False)

    p = sub.add_parser("bench", parents=[common], help="momjax vs transformers on CPU (needs momjax[test])")
    p.add_argument("--quick", action="store_true", help="fewer repetitions")
    p.add_argument("--out", default=None, help="write the JSON results here")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    try:
        if argv and argv[0] == "convert":  # its own parser: `momjax convert SRC DST ...` = convert/hf_to_orbax.py
            from momjax import convert

            return convert.main(argv[1:])
        args = parser.parse_args(argv)
        if args.command == "demo" and args.prompt is None:
            from momjax.demo import DEFAULT_PROMPT

            args.prompt = DEFAULT_PROMPT
        if args.compile_cache:
            enable_compile_cache(args.compile_cache)
        command = {"demo": cmd_demo, "generate": cmd_generate, "plan": cmd_plan, "bench": cmd_bench}[args.command]
        return command(args)
    except _error_types() as e:
        message = " ".join(str(e).split()) or type(e).__name__
        print(f"momjax: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("momjax: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
