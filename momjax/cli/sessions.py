"""Sessions on the command line: opening a session file, streaming an answer into a session, the summary line,
and `momjax generate --prompt-cache FILE` (reuse FILE's longest matching prefix, then save the cache there, as
llama.cpp's --prompt-cache does). `momjax chat` (momjax.cli.chat) uses the same pieces."""

from __future__ import annotations

import os
import sys

from momjax.chat import rewind_to_shared
from momjax.cli.common import UsageError, log


def load_or_new_session(model, path: str | None, policy, capacity: int):
    """The session saved at path (if it exists and fits this model), else a new one. (session, loaded)"""
    import momjax

    if path and os.path.isfile(path):
        try:
            return momjax.Session.load(model, path, policy=policy, capacity=capacity), True
        except momjax.SessionError as e:
            log(f"momjax: {path} not reused ({e}); it will be replaced")
    return momjax.Session(model, policy, capacity=capacity), False


def summary(stats: dict, session) -> str:
    steps = stats.get("new_tokens", 0) - 1
    rate = f"{steps / stats['decode_s']:.1f} tokens/s" if steps > 0 and stats.get("decode_s", 0) > 0 else "n/a"
    return (f"[{stats.get('fed', 0)} tokens fed, {stats.get('new_tokens', 0)} new, first token in "
            f"{stats.get('time_to_first_token_s', float('nan')):.3f} s, decode {rate}, session {session.length} "
            f"tokens]")


def stream_answer(session, tok, ids: list[int], args, out) -> tuple[list[int], dict]:
    """Rewind the session to what it shares with ids, stream the answer to the rest; (answer ids, stats)."""
    keep = rewind_to_shared(session, ids)
    stats: dict = {}
    stream, answer = tok.stream(), []
    for new in session.stream(ids[keep:], args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                              top_p=args.top_p, seed=args.seed, stats=stats):
        answer.extend(new)
        piece = stream.push(new)
        if piece:
            out.write(piece)
            out.flush()
    out.write(stream.flush() + "\n")
    out.flush()
    return answer, stats


def generate_with_prompt_cache(args, model, tok, ids: list[int], policy) -> int:
    """`momjax generate --prompt-cache FILE`: reuse FILE's longest matching prefix, then save the cache there."""
    from momjax.chat import common_prefix
    from momjax.policy import describe_policy

    folder = os.path.dirname(os.path.abspath(args.prompt_cache))
    if not os.path.isdir(folder):
        raise UsageError(f"--prompt-cache {args.prompt_cache}: folder {folder} does not exist")
    session, _ = load_or_new_session(model, args.prompt_cache, policy, len(ids) + args.max_new_tokens)
    reused = min(common_prefix(session.tokens, ids), len(ids) - 1)
    answer, stats = stream_answer(session, tok, ids, args, sys.stdout)
    session.save(args.prompt_cache)
    print(f"prompt tokens:        {len(ids)} ({reused} reused from {args.prompt_cache})\n"
          f"new tokens:           {len(answer)}\n"
          f"time to first token:  {stats['time_to_first_token_s']:.3f} s\n"
          f"decode:               {summary(stats, session)}\n"
          f"policy:               {describe_policy(session.policy, model.config.num_layers)}", file=sys.stderr)
    return 0
