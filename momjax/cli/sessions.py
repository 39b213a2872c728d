"""Sessions on the command line: checking a session file's path before any work, opening it, streaming an answer
into a session (Ctrl-C stops the answer cleanly), the summary line, and `momjax generate --prompt-cache FILE`
(reuse FILE's longest matching prefix, then save the cache there, as llama.cpp's --prompt-cache does).
`momjax chat` (momjax.cli.chat) uses the same pieces.

A session file option writes only to a path that does not exist yet or holds a momjax session file: anything
else (the user's text file, a folder, a read-only place) is refused with one line naming the option, before
the model is loaded. A session file that cannot be used with this model (another model, dtype or K/V dtype) is
refused and kept, unless --replace-session says to start a new one there.
"""

from __future__ import annotations

import os
import sys

from momjax.chat import common_prefix, rewind_to_shared
from momjax.cli.common import Interrupts, UsageError, log
from momjax.errors import SessionError


def add_session_args(p) -> None:
    p.add_argument("--replace-session", action="store_true",
                   help="start a new session where the session file cannot be used with this model (another "
                        "model, dtype or K/V dtype) instead of refusing; files that are not momjax sessions are "
                        "never replaced")


def check_session_path(path: str, option: str) -> str:
    """The absolute path the option may write a session to; UsageError (one line) otherwise."""
    from momjax.session_file import check_writable

    try:
        return check_writable(path, option)
    except SessionError as e:
        raise UsageError(str(e)) from None


def load_or_new_session(model, path: str | None, policy, capacity: int, option: str, replace: bool = False):
    """The session saved at path (if there is one), else a new one: (session, loaded). A session file that cannot
    be used with this model is refused and kept, unless replace."""
    import momjax

    if path and os.path.isfile(path):
        try:
            return momjax.Session.load(model, path, policy=policy, capacity=capacity), True
        except momjax.SessionError as e:
            if not replace:
                raise UsageError(f"{option} {path} cannot be used here ({' '.join(str(e).split())}); it was left as "
                                 "it is. Use another file, or pass --replace-session to start a new session "
                                 "there") from None
            log(f"momjax: {path} cannot be used here ({e}); --replace-session: a new session will replace it")
    return momjax.Session(model, policy, capacity=capacity), False


def summary(stats: dict, session) -> str:
    steps = stats.get("new_tokens", 0) - 1
    rate = f"{steps / stats['decode_s']:.1f} tokens/s" if steps > 0 and stats.get("decode_s", 0) > 0 else "n/a"
    compiling = stats.get("feed_compile_s", 0.0) + stats.get("decode_compile_s", 0.0)
    return (f"[{stats.get('fed', 0)} tokens fed, {stats.get('new_tokens', 0)} new, first token in "
            f"{stats.get('time_to_first_token_s', float('nan')):.3f} s, decode {rate}, {compiling:.2f} s compiling, "
            f"session {session.length} tokens]")


def stream_answer(session, tok, ids: list[int], args, out) -> tuple[list[int], dict, bool]:
    """Rewind the session to what it shares with ids, stream the answer to the rest: (answer ids, stats, whether
    Ctrl-C stopped it). Ctrl-C is taken between chunks, never inside a computation: the session keeps what was
    answered so far."""
    keep = rewind_to_shared(session, ids)
    stats: dict = {}
    stream, answer = tok.stream(), []
    tokens = session.stream(ids[keep:], args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                            top_p=args.top_p, seed=args.seed, stats=stats)
    with Interrupts() as interrupts:
        try:
            for new in tokens:
                answer.extend(new)
                piece = stream.push(new)
                if piece:
                    out.write(piece)
                    out.flush()
                if interrupts.requested:
                    break
        finally:
            tokens.close()  # the answer so far goes into the cache now, with Ctrl-C still held back
    out.write(stream.flush() + "\n")
    out.flush()
    return answer, stats, interrupts.requested


def generate_with_prompt_cache(args, model, tok, ids: list[int], policy) -> int:
    """`momjax generate --prompt-cache FILE`: reuse FILE's longest matching prefix, then save the cache there."""
    from momjax.policy import describe_policy

    session, _ = load_or_new_session(model, args.prompt_cache, policy, len(ids) + args.max_new_tokens,
                                     "--prompt-cache", args.replace_session)
    reused = min(common_prefix(session.tokens, ids), len(ids) - 1)
    answer, stats, interrupted = stream_answer(session, tok, ids, args, sys.stdout)
    session.save(args.prompt_cache)
    print(f"prompt tokens:        {len(ids)} ({reused} reused from {args.prompt_cache})\n"
          f"new tokens:           {len(answer)}" + (" (interrupted)" if interrupted else "") + "\n"
          f"time to first token:  {stats['time_to_first_token_s']:.3f} s ({stats['feed_compile_s']:.3f} s of it "
          "compiling)\n"
          f"decode:               {summary(stats, session)}\n"
          f"policy:               {describe_policy(session.policy, model.config.num_layers)}", file=sys.stderr)
    if interrupted:
        log(f"momjax: interrupted; the cache was saved to {args.prompt_cache}")
        return 130
    return 0
