"""The `momjax` command: demo, generate, chat, plan, convert, bench (chat and --prompt-cache: chat.py).

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

    # OSError: a full disk, a read-only or vanished folder, a path that is a file: the environment, not a bug.
    types = [UsageError, InputError, ConfigError, TokenizerError, OSError, UnicodeDecodeError]
    try:
        from momjax.checkpoint import CheckpointError

        types.append(CheckpointError)
    except ImportError:
        pass
    return tuple(types)


def enable_compile_cache(path: str) -> None:
    """Keep compiled programs in `path` across runs (JAX's persistent compilation cache), small ones too.

    The folder must be writable: JAX would otherwise fail (or warn on every compile) only later, mid-run.
    """
    import jax

    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        raise UsageError(f"cannot create the compile cache folder {path} ({e.strerror or e}); pass a writable "
                         f"folder with --compile-cache or ${COMPILE_CACHE_ENV}") from None
    if not os.access(path, os.W_OK | os.X_OK) or not _writable(path):
        raise UsageError(f"the compile cache folder {path} is not writable; pass a writable folder with "
                         f"--compile-cache or ${COMPILE_CACHE_ENV}")
    jax.config.update("jax_compilation_cache_dir", os.path.abspath(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)


def _writable(folder: str) -> bool:
    """True when a file can be created in folder (os.access alone says yes on a read-only mount for root)."""
    import tempfile

    try:
        with tempfile.TemporaryFile(dir=folder):
            return True
    except OSError:
        return False


# ---------------------------------------------------------------------- streaming decode


_COMPILED: dict = {}  # (program, static args, shapes, placements) -> compiled program


def _compiled(key, compile):
    """The compiled program(s) for key, running compile() on first use. Returns (programs, seconds compiling)."""
    if key in _COMPILED:
        return _COMPILED[key], 0.0
    t0 = time.perf_counter()
    _COMPILED[key] = compile()
    return _COMPILED[key], time.perf_counter() - t0


class PrefillProgress:
    """The "prefill: layer i/L" line on stderr, driven by the model's per-layer callback.

    The model calls on_layer(i) once layer i (0-based) has finished, so the line shows i + 1 layers done:
    "layer L/L" appears only when the last layer is done. The line ends (a newline) then, or at close(),
    which the caller runs before it prints the first token, so the text never starts on the progress line.
    One instance serves every prefill: jit keys its programs on the callback, so it must not change.
    """

    def __init__(self, stream=None):
        self.stream = stream  # None: sys.stderr at the time of writing (tests swap it)
        self.layers, self.done, self.t0, self.open = 0, 0, 0.0, False

    def start(self, layers: int) -> None:
        self.layers, self.done, self.t0, self.open = layers, 0, time.perf_counter(), False

    def __call__(self, layer) -> None:
        i = int(layer) + 1
        if i <= self.done or self.done >= self.layers:  # a late or repeated callback, or after close(): ignore
            return
        self.done = i
        last = i == self.layers
        print(f"\rprefill: layer {i}/{self.layers} ({time.perf_counter() - self.t0:.1f} s)", end="\n" if last else "",
              file=self.stream or sys.stderr, flush=True)
        self.open = not last

    def close(self) -> None:
        """End the line if it is still open, and ignore any callback that arrives afterwards."""
        if self.open:
            print(file=self.stream or sys.stderr, flush=True)
        self.open, self.done = False, self.layers


_prefill_progress = PrefillProgress()


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
        self.stopped_at = None  # the stop token (EOS) that ended the generation, if one did

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
    from momjax.cache import place_for_decode

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
    _prefill_progress.start(cfg.num_layers)
    logits, cache = G.prefill_fn(model.params, tokens, start, cfg, policy, on_layer=on_layer, compiled=programs)
    token, done = sample_first(logits, key, temperature, top_p, stop_ids)
    first = int(np.asarray(token)[0])
    if on_layer is not None:
        _prefill_progress.close()  # before the caller prints the first token
    stats.time_to_first_token_s = time.perf_counter() - t0
    stats.new_tokens = 1
    if bool(np.asarray(done)[0]):
        stats.stopped_at = first
    yield [first]
    if stats.stopped_at is not None or max_new_tokens == 1:
        return

    cache = place_for_decode(cache, policy)  # mom: the one copy back to the device, as generate does
    cache = cache.with_tail(max(max_new_tokens - 1, 1))  # the tail generate uses: same shapes, same numbers
    tail_k, tail_v = cache.tails  # with int8 K/V: (values, scales) pairs
    t = jnp.int32(1)
    step, stats.decode_compile_s = _compiled(
        ("decode", cfg, policy, cache.k[0].shape, cache.tail_k[0].shape, cache.memory_kind, where, top_k),
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
        if bool(np.asarray(done)[0]) and new:
            stats.stopped_at = new[-1]
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


def _check_sampling_args(args) -> None:
    """Every numeric argument of generate, checked before anything is loaded."""
    import math

    if args.max_new_tokens < 1:
        raise UsageError(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}")
    if not math.isfinite(args.temperature) or args.temperature < 0:
        raise UsageError(f"--temperature must be a finite number >= 0 (0 is greedy), got {args.temperature}")
    if args.top_k is not None and args.top_k < 1:
        raise UsageError(f"--top-k must be a positive integer, got {args.top_k}")
    if args.top_p is not None and not 0 < args.top_p <= 1:  # NaN fails the comparison too
        raise UsageError(f"--top-p must be in (0, 1], got {args.top_p}")
    if not -(2**63) <= args.seed < 2**63:
        raise UsageError(f"--seed must be an integer in [-2**63, 2**63), got {args.seed}")


def _folder_config(path: str):
    """The Config of a HF folder (config.json), an Orbax folder (momjax_config.json) or a GGUF file (its
    metadata), weights unread."""
    from momjax.checkpoint import CONFIG_FILE, CheckpointError, is_orbax_folder
    from momjax.config import Config

    if os.path.isfile(path):
        from momjax import gguf

        return gguf.read_config(path)
    if is_orbax_folder(path):
        try:
            with open(os.path.join(path, CONFIG_FILE), encoding="utf-8") as f:
                return Config.from_json(json.load(f))
        except (ValueError, TypeError) as e:  # JSONDecodeError and ConfigError are ValueErrors
            raise CheckpointError(f"{path}/{CONFIG_FILE} is unreadable ({e}); convert the checkpoint again") from None
    return Config.from_folder(path)


def cmd_generate(args) -> int:
    import momjax
    from momjax.api import check_fits
    from momjax.tokenizer import load_tokenizer

    if not os.path.exists(args.model):
        raise UsageError(f"model {args.model} does not exist; pass a Hugging Face or Orbax checkpoint folder or a "
                         ".gguf file")
    _check_sampling_args(args)
    cfg = _folder_config(args.model)  # before the tokenizer and the weights: a bad config fails fast
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

    check_context(cfg.max_position_embeddings)  # before the weights are read: refuse what cannot run, fast
    log = None if args.quiet else (lambda message: print(message, file=sys.stderr, flush=True))
    policy = resolve_policy(args, cfg, total, args.dtype or cfg.dtype, log)
    check_fits(cfg, len(ids), args.max_new_tokens, policy, args.dtype or cfg.dtype)
    model = momjax.load(args.model, dtype=args.dtype, progress=not args.quiet)
    check_context(model.max_context)
    model.max_context = max(model.max_context, total)

    if args.prompt_cache:
        from momjax.chat import generate_with_prompt_cache

        return generate_with_prompt_cache(args, model, tok, ids, policy)
    stats = StreamStats(len(ids), describe_policy(policy, cfg.num_layers))
    stream = tok.stream()
    for new in stream_tokens(model, ids, args.max_new_tokens, policy=policy, temperature=args.temperature,
                             top_k=args.top_k, top_p=args.top_p, seed=args.seed, stats=stats,
                             progress=None if not args.quiet else False):
        piece = stream.push(new)
        if piece:
            sys.stdout.write(piece)
            sys.stdout.flush()
    sys.stdout.write(stream.flush() + "\n")
    sys.stdout.flush()
    if stats.stopped_at is not None:
        ended = f"stopped at the end-of-sequence token {stats.stopped_at}"
    else:
        ended = f"reached --max-new-tokens {args.max_new_tokens}"
    ttft, decode = stats.time_to_first_token_s, stats.decode_tokens_per_s
    print(f"prompt tokens:        {stats.prompt_tokens}\n"
          f"new tokens:           {stats.new_tokens} ({ended})\n"
          f"time to first token:  {ttft:.3f} s ({stats.prefill_compile_s:.3f} s of it compiling)\n"
          f"decode:               {decode:.1f} tokens/s (compiled in {stats.decode_compile_s:.3f} s)\n"
          f"policy:               {stats.policy}\n"
          f"peak device memory:   {_peak_device_memory()}", file=sys.stderr)
    return 0


def plan_notes(cfg, result: dict) -> list[str]:
    """What a plan does not say by itself: contexts past the trained length, and an unlimited host budget."""
    import textwrap

    notes = []
    trained = cfg.max_position_embeddings
    past = [name for name, n in result["max_context"].items() if n > trained]
    if past:
        notes.append(
            f"note: the model was trained on {trained:,} tokens (max_position_embeddings); longer contexts "
            f"({', '.join(past)}) run only on purpose (`generate --allow-long-context`, or `model.max_context` in "
            "Python) and may give degraded output")
    if result["host_bytes"] is None:
        notes.append(
            "note: no host budget was given (`--host-memory`), so host memory counts as unlimited; mom and "
            "mom-stream keep the KV cache there (mom-stream for the whole generation)")
    return [textwrap.fill(n, 110, subsequent_indent="      ", break_on_hyphens=False) for n in notes]


def cmd_plan(args) -> int:
    from momjax import memory
    from momjax.config import PRESETS, Config

    if args.model in PRESETS:
        cfg = PRESETS[args.model]
    elif os.path.isdir(args.model):
        cfg = Config.from_folder(args.model)
    elif os.path.isfile(args.model):
        cfg = _folder_config(args.model)  # a .gguf file
    else:
        raise UsageError(f"{args.model} is neither a preset ({', '.join(PRESETS)}) nor a checkpoint folder or "
                         ".gguf file")
    if args.hbm is None and args.target in (None, "cpu"):
        raise UsageError("give --hbm (e.g. --hbm 80GiB) or a GPU --target whose memory size to use")
    try:
        hbm = None if args.hbm is None else memory.parse_bytes(args.hbm)
        host = None if args.host_memory is None else memory.parse_bytes(args.host_memory)
        result = memory.plan(cfg, hbm, host, dtype=args.dtype, target=args.target, kv_dtype=args.kv_dtype,
                             context=args.context)
    except ValueError as e:  # an unreadable size, a budget that cannot hold the weights, a missing GPU compiler
        raise UsageError(str(e)) from None
    notes = plan_notes(cfg, result)
    if args.json:
        print(json.dumps(result, indent=2, default=str))
        for note in notes:  # stdout stays valid JSON
            print(note, file=sys.stderr)
    else:
        print("\n".join([memory.plan_table(result), *notes]))
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

    # Checked before anything is built, downloaded or loaded, with the same rules as generate.
    if args.max_new_tokens is not None and args.max_new_tokens < 1:
        raise UsageError(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}")
    if not args.real:
        if args.document is not None or args.question:
            raise UsageError("--document and --question go with --real (the random demo model cannot read)")
        if not args.prompt.strip():
            raise UsageError("the prompt is empty; give some text with --prompt (or leave it out for the default)")
        return demo.run(prompt=args.prompt, max_new_tokens=args.max_new_tokens or 24, rebuild=args.rebuild)
    if args.prompt_given:
        raise UsageError("--prompt is for the random demo; with --real ask with --question (and --document FILE)")
    document = source = None
    if args.document is not None:
        if not os.path.isfile(args.document):
            raise UsageError(f"document {args.document} does not exist")
        with open(args.document, encoding="utf-8") as f:
            document = f.read()
        if not document.strip():
            raise UsageError(f"document {args.document} is empty")
        source = args.document
    questions = args.question or demo.REAL_QUESTIONS
    if not all(q.strip() for q in questions):
        raise UsageError("a --question is empty; give some text")
    return demo.run_real(document, questions, args.max_new_tokens or demo.REAL_NEW_TOKENS, source=source)


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

    p = sub.add_parser("demo", parents=[common], help="build a small random model offline and run every policy on "
                                                      "it (--real: a real model reading a document)")
    p.add_argument("--prompt", default=None, help="text to continue")
    p.add_argument("--max-new-tokens", type=int, default=None, help="default 24 (--real: 40)")
    p.add_argument("--rebuild", action="store_true", help="rebuild the cached demo checkpoint")
    p.add_argument("--real", action="store_true",
                   help="download SmolLM2-135M-Instruct once (93 MB) and ask it about a long document in a Session "
                        "with every policy")
    p.add_argument("--document", metavar="FILE", default=None,
                   help="with --real: the document (default: the Apache License 2.0 text jax ships)")
    p.add_argument("--question", action="append", default=None, metavar="TEXT",
                   help="with --real: a question (repeat for several; default: two about the license)")

    p = sub.add_parser("generate", parents=[common], help="generate text from a checkpoint folder, streamed to stdout")
    p.add_argument("--model", required=True, metavar="DIR", help="Hugging Face or Orbax checkpoint folder, or a "
                                                                 ".gguf file")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="prompt text")
    src.add_argument("--prompt-file", metavar="FILE", help="file with the prompt text ('-' for stdin)")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the tokenizer's chat template")
    p.add_argument("--max-new-tokens", type=int, default=128)
    _add_policy_args(p)
    p.add_argument("--temperature", type=float, default=0.0, help="0 is greedy (default)")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", choices=DTYPES, default=None, help="weights dtype (default: the checkpoint's)")
    p.add_argument("--allow-long-context", action="store_true",
                   help="accept prompts longer than the model's trained context")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    p.add_argument("--prompt-cache", metavar="FILE", default=None,
                   help="reuse the longest prompt prefix cached in FILE, then save the cache there")
    _add_chat_parser(sub, common)

    p = sub.add_parser("plan", parents=[common], help="longest context each policy fits in a memory budget")
    p.add_argument("--model", required=True, metavar="PRESET|DIR", help="a preset name or a checkpoint folder")
    p.add_argument("--hbm", default=None, help="accelerator memory, e.g. 80GiB (default: the --target's)")
    p.add_argument("--host-memory", default=None, help="host memory for the offloaded KV cache, e.g. 1TiB")
    p.add_argument("--dtype", choices=DTYPES, default="bfloat16")
    p.add_argument("--target", default=None, metavar="GPU",
                   help="confirm the plan with XLA's GPU compiler for this GPU, without a GPU: h100, a100-80gb, "
                        "a100-40gb, l4, rtx4090 or t4 (needs pip install 'momjax[gpu-plan]'); default: the "
                        "closed-form estimate on a CPU")
    p.add_argument("--kv-dtype", choices=("int8",), default=None,
                   help="also plan int8 K/V (approximate: logits change slightly; about half the bytes)")
    p.add_argument("--context", type=int, default=None, metavar="TOKENS",
                   help="predict decode speed per policy at this many tokens and recommend one (speed needs a "
                        "--target: its memory and host link bandwidths)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")

    sub.add_parser("convert", help="convert a Hugging Face checkpoint or a GGUF file to an Orbax folder (momjax "
                                   "convert -h)",
                   add_help=False)

    p = sub.add_parser("bench", parents=[common], help="momjax vs transformers on CPU (needs momjax[test])")
    p.add_argument("--quick", action="store_true", help="fewer repetitions")
    p.add_argument("--out", default=None, help="write the JSON results here")
    return parser


def _add_policy_args(p) -> None:
    p.add_argument("--policy", choices=POLICY_NAMES + ("auto",), default="mom",
                   help="memory policy (default: mom); auto: the fastest that fits this prompt (momjax plan), in "
                        "--hbm or the device's memory")
    p.add_argument("--kv-dtype", choices=("int8",), default=None,
                   help="int8 K/V cache: about half the memory, approximate (logits change slightly)")
    p.add_argument("--kv-device-layers", type=int, default=None, metavar="N",
                   help="with mom-stream: keep the first N layers' prompt K/V on the device, stream the rest")
    p.add_argument("--hbm", default=None, help="device memory --policy auto may use, e.g. 20GiB (default: the "
                                               "device's memory; this machine's RAM on a CPU)")


def resolve_policy(args, cfg, context: int, dtype, log=None, loaded_weight_bytes: int = 0):
    """The MemoryPolicy the command line asks for. --policy auto asks momjax.plan for the fastest policy that
    fits `context` tokens in --hbm (or the device's free memory, counting the model's weights as free when
    they are already loaded there, loaded_weight_bytes; the RAM on a CPU), with int8 K/V allowed when
    --kv-dtype int8 is given, and says which it chose on stderr."""
    from momjax import memory
    from momjax import targets as T
    from momjax.api import memory_limits
    from momjax.config import get_policy

    if args.policy != "auto":
        try:
            policy = get_policy(args.policy).replace(kv_dtype=args.kv_dtype, kv_device_layers=args.kv_device_layers)
            policy.check_layers(cfg.num_layers)
        except ValueError as e:
            raise UsageError(f"--kv-device-layers: {e}") from None
        return policy
    if args.kv_device_layers is not None:
        raise UsageError("--kv-device-layers is chosen by --policy auto; give one or the other")
    import jax

    device_limit, ram = memory_limits()
    device = jax.devices()[0]
    free = None
    if device_limit is not None:  # a GPU: what is free now, plus the weights if they are already loaded there
        stats = device.memory_stats() or {}
        free = device_limit - stats.get("bytes_in_use", 0) + loaded_weight_bytes
    kind = device.device_kind if device_limit is not None else None
    target = T.from_device_kind(kind) if kind else None
    try:
        hbm = memory.parse_bytes(args.hbm) if args.hbm is not None else (free or ram)
        if hbm is None:
            raise UsageError("--policy auto needs --hbm here (this machine does not say how much memory it has)")
        result = memory.plan(cfg, hbm, ram, dtype=str(dtype), source="estimate", target=target,
                             kv_dtype=args.kv_dtype, context=context, new_tokens=max(args.max_new_tokens, 1))
    except ValueError as e:  # no policy fits, an unreadable --hbm, weights larger than the budget
        raise UsageError(f"--policy auto: {e}") from None
    rec = result["recommended"]
    policy = get_policy(rec["policy"]).replace(kv_dtype=rec["kv_dtype"], kv_device_layers=rec["kv_device_layers"])
    if log is not None:
        log(f"momjax: --policy auto chose {describe_policy(policy, cfg.num_layers)} for {context:,} tokens in "
            f"{memory.format_bytes(hbm)}" + (f" (predicted {rec['decode_tokens_per_s']:.1f} tokens/s on "
                                             f"{result['target']['name']})" if target else ""))
    return policy


def describe_policy(policy, num_layers: int) -> str:
    """e.g. "mom-stream (30 of 32 layers' K/V on the device), int8 K/V"."""
    text = policy.name
    if policy.kv_decode == "pinned_host" and policy.kv_device_layers:
        text += f" ({policy.device_layers(num_layers)} of {num_layers} layers' K/V on the device)"
    if policy.kv_dtype:
        text += f", {policy.kv_dtype} K/V"
    return text


def _add_chat_parser(sub, common) -> None:
    p = sub.add_parser("chat", parents=[common], help="chat over stdin/stdout, keeping the KV cache between turns")
    p.add_argument("--model", required=True, metavar="DIR", help="Hugging Face or Orbax checkpoint folder, or a "
                                                                 ".gguf file")
    p.add_argument("--document", metavar="FILE", default=None, help="a text file to prefill once and chat about")
    p.add_argument("--session", metavar="FILE", default=None,
                   help="load the session from FILE if it exists, and save it there on exit")
    _add_policy_args(p)
    p.add_argument("--max-new-tokens", type=int, default=256, help="longest answer per turn")
    p.add_argument("--temperature", type=float, default=0.0, help="0 is greedy (default)")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", choices=DTYPES, default=None, help="weights dtype (default: the checkpoint's)")
    p.add_argument("--quiet", action="store_true", help="no progress output")


def _cmd_chat(args) -> int:
    from momjax.chat import cmd_chat

    return cmd_chat(args)


def _command_index(argv: list[str]) -> int | None:
    """Where the command name is in argv, skipping the global `--compile-cache DIR` (or `=DIR`)."""
    i = 0
    while i < len(argv):
        if argv[i] == "--compile-cache":
            i += 2
        elif argv[i].startswith("--compile-cache="):
            i += 1
        else:
            return i
    return None


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    try:
        command_at = _command_index(argv)
        if command_at is not None and argv[command_at] == "convert":
            # Its own parser (`momjax convert SRC DST ...` = convert/hf_to_orbax.py); a --compile-cache given
            # before the command name is handed on to it.
            from momjax import convert

            return convert.main(argv[command_at + 1:] + argv[:command_at])
        args = parser.parse_args(argv)
        if args.command == "demo":
            args.prompt_given = args.prompt is not None
            if args.prompt is None:
                from momjax.demo import DEFAULT_PROMPT

                args.prompt = DEFAULT_PROMPT
        if args.compile_cache:
            enable_compile_cache(args.compile_cache)
        command = {"demo": cmd_demo, "generate": cmd_generate, "plan": cmd_plan, "bench": cmd_bench,
                   "chat": _cmd_chat}[args.command]
        return command(args)
    except _error_types() as e:
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


if __name__ == "__main__":
    sys.exit(main())
