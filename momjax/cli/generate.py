"""`momjax generate`: text from a checkpoint folder, streamed to stdout, and a summary on stderr.

The prefill's programs are compiled ahead of time, so the summary reports compile time apart from prefill and
decoding; prompts of LONG_PREFILL tokens or more show the prefill's progress layer by layer. Decoding goes
through the library's one decode loop (momjax.decoding), so the tokens are `momjax.generate`'s for the same
seed. `--prompt-cache FILE` reuses the longest prefix of the prompt that FILE holds and saves the cache there
afterwards (momjax.cli.sessions).
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass

from momjax.cli.common import (
    MODEL_HELP,
    Interrupts,
    PrefillProgress,
    UsageError,
    add_device_args,
    add_policy_args,
    add_sampling_args,
    add_weights_arg,
    check_model_path,
    check_numbers,
    log,
    note_dtype,
    note_sampling,
    peak_device_memory,
    read_prompt,
    resolve_policy,
    start_devices,
)
from momjax.cli.sessions import add_session_args, check_session_path, generate_with_prompt_cache

LONG_PREFILL = 8192  # prompts at least this long show per-layer prefill progress


@dataclass
class StreamStats:
    """Timings of one streamed generation (filled in as it runs). Compilation is timed on its own."""

    prompt_tokens: int
    policy: str
    new_tokens: int = 0
    time_to_first_token_s: float = float("nan")  # prefill compile + prefill + first sample
    prefill_compile_s: float = 0.0
    decode_compile_s: float = 0.0
    decode_s: float = 0.0  # the decode steps after the first token, compilation excluded
    stopped_at: int | None = None  # the stop token (EOS) that ended the generation, if one did

    @property
    def decode_tokens_per_s(self) -> float:
        steps = self.new_tokens - 1
        return steps / self.decode_s if steps > 0 and self.decode_s > 0 else float("nan")


def stream_tokens(model, prompt: list[int], max_new_tokens: int, policy="mom", temperature: float = 0.0,
                  top_k: int | None = None, top_p: float | None = None, seed: int = 0, stop_tokens=None,
                  stats: StreamStats | None = None, progress: PrefillProgress | bool | None = None):
    """Yield lists of new token ids for one prompt as they are decoded (a stop token ends it, included).

    The same tokens as `momjax.generate(model, [prompt], ...)`. progress: per-layer prefill progress on stderr
    (a PrefillProgress, True for a new one, or None for prompts of LONG_PREFILL tokens or more). The caller
    checks the context length.
    """
    from momjax.mesh import iterate_in

    return iterate_in(model.mesh, _stream_tokens(model, prompt, max_new_tokens, policy, temperature, top_k, top_p,
                                                 seed, stop_tokens, stats, progress))


def _stream_tokens(model, prompt, max_new_tokens, policy, temperature, top_k, top_p, seed, stop_tokens, stats,
                   progress):
    from momjax import checks
    from momjax import generation as G
    from momjax.decoding import DecodeStats, decode_stream, prefill
    from momjax.mesh import inputs_on
    from momjax.policy import get_policy

    policy = get_policy(policy)
    cfg = model.config
    (prompt,) = checks.prompts([prompt], cfg.vocab_size)
    sampling = checks.sampling(cfg.vocab_size, cfg.eos_token_ids, temperature, top_k, top_p, seed, stop_tokens)
    stats = stats if stats is not None else StreamStats(len(prompt), policy.name)
    if progress is None:
        progress = len(prompt) >= LONG_PREFILL
    on_layer = (progress if isinstance(progress, PrefillProgress) else PrefillProgress()) if progress else None
    tokens, start = G.left_pad([prompt], G.bucket_length(len(prompt), policy))
    tokens, start = inputs_on(model.mesh, tokens), inputs_on(model.mesh, start)
    t0 = time.perf_counter()
    # What momjax.prefill runs (mom-host compiles its small programs on first use instead).
    programs = None if policy.on_host else G.compile_prefill(model.params, tokens, start, cfg, policy)
    stats.prefill_compile_s = time.perf_counter() - t0
    if on_layer is not None:
        on_layer.start(cfg.num_layers)
    logits, cache = prefill(model.params, tokens, start, cfg, policy, on_layer=on_layer, compiled=programs)
    decoding = DecodeStats()
    for chunk in decode_stream(model.params, cache, logits, sampling, cfg, policy, max_new_tokens, stats=decoding):
        if stats.new_tokens == 0:
            if on_layer is not None:
                on_layer.close()  # before the caller prints the first token
            stats.time_to_first_token_s = time.perf_counter() - t0
        stats.new_tokens = decoding.new_tokens
        stats.decode_s, stats.decode_compile_s = decoding.decode_s, decoding.decode_compile_s
        stats.stopped_at = decoding.stopped_at
        yield chunk[0].tolist()


def add_parser(sub, common) -> None:
    p = sub.add_parser("generate", parents=[common], help="generate text from a checkpoint folder, streamed to stdout")
    p.add_argument("--model", required=True, metavar="PATH", help=MODEL_HELP)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="prompt text")
    src.add_argument("--prompt-file", metavar="FILE", help="file with the prompt text ('-' for stdin)")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the tokenizer's chat template")
    add_sampling_args(p, 128)
    add_policy_args(p)
    add_weights_arg(p)
    add_device_args(p)
    p.add_argument("--allow-long-context", action="store_true",
                   help="accept prompts longer than the model's trained context")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    p.add_argument("--prompt-cache", metavar="FILE", default=None,
                   help="reuse the longest prompt prefix cached in FILE, then save the cache there (a new file, or "
                        "a momjax session file: any other file is refused)")
    add_session_args(p)
    p.set_defaults(run=run)


def run(args) -> int:
    import momjax
    from momjax.loading import folder_config
    from momjax.memory import check_fits
    from momjax.mesh import tp_degree
    from momjax.policy import describe_policy
    from momjax.tokenizer import load_tokenizer

    check_model_path(args.model)
    check_numbers(args)
    if args.prompt_cache:  # before any work: a path that cannot take the cache is refused now, not after the run
        args.prompt_cache = check_session_path(args.prompt_cache, "--prompt-cache")
    note_sampling(args)
    cfg = folder_config(args.model)  # before the tokenizer and the weights: a bad config fails fast
    text = read_prompt(args)
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

    check_context(cfg.context_length)  # before the weights are read: refuse what cannot run, fast
    mesh = start_devices(args, cfg)  # before anything touches a device
    policy = resolve_policy(args, cfg, total, args.dtype or cfg.dtype, None if args.quiet else log)
    check_fits(cfg, len(ids), args.max_new_tokens, policy, args.dtype or cfg.dtype, devices=tp_degree(mesh),
               weights=args.weights)
    note_dtype(args.dtype or cfg.dtype)
    model = momjax.load(args.model, dtype=args.dtype, mesh=mesh, weights=args.weights, progress=not args.quiet,
                        max_context=max(cfg.context_length, total))

    if args.prompt_cache:
        return generate_with_prompt_cache(args, model, tok, ids, policy)
    stats = StreamStats(len(ids), describe_policy(policy, cfg.num_layers))
    stream = tok.stream()
    tokens = stream_tokens(model, ids, args.max_new_tokens, policy=policy, temperature=args.temperature,
                           top_k=args.top_k, top_p=args.top_p, seed=args.seed, stats=stats,
                           progress=None if not args.quiet else False)
    with Interrupts() as interrupts:  # Ctrl-C ends the text between chunks, never inside a computation
        for new in tokens:
            piece = stream.push(new)
            if piece:
                sys.stdout.write(piece)
                sys.stdout.flush()
            if interrupts.requested:
                break
        tokens.close()
    sys.stdout.write(stream.flush() + "\n")
    sys.stdout.flush()
    if interrupts.requested:
        ended = "interrupted"
    elif stats.stopped_at is not None:
        ended = f"stopped at the end-of-sequence token {stats.stopped_at}"
    else:
        ended = f"reached --max-new-tokens {args.max_new_tokens}"
    ttft, decode = stats.time_to_first_token_s, stats.decode_tokens_per_s
    print(f"prompt tokens:        {stats.prompt_tokens}\n"
          f"new tokens:           {stats.new_tokens} ({ended})\n"
          f"time to first token:  {ttft:.3f} s ({stats.prefill_compile_s:.3f} s of it compiling)\n"
          f"decode:               {decode:.1f} tokens/s (compiled in {stats.decode_compile_s:.3f} s)\n"
          f"policy:               {stats.policy}\n"
          f"peak device memory:   {peak_device_memory()}", file=sys.stderr)
    if interrupts.requested:
        log("momjax: interrupted")
        return 130
    return 0
