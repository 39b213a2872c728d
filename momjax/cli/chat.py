"""`momjax chat`: a multi-turn conversation over stdin/stdout that keeps the KV cache between turns.

Each line read is a user message; the answer streams out, and a summary line per turn goes to stderr. A
--document is prefilled once, before the first question (momjax.chat.Conversation says where it goes).
Commands: /save [FILE], /reset (back to just the document), /rewind (drop the last turn), /quit.
"""

from __future__ import annotations

import sys
import time

from momjax.chat import Conversation, common_prefix
from momjax.cli.common import (
    UsageError,
    add_policy_args,
    add_sampling_args,
    check_model_folder,
    check_numbers,
    log,
    read_text_file,
    resolve_policy,
)
from momjax.cli.sessions import load_or_new_session, stream_answer, summary

COMMANDS = "/save [FILE], /reset, /rewind, /quit"


def add_parser(sub, common) -> None:
    p = sub.add_parser("chat", parents=[common], help="chat over stdin/stdout, keeping the KV cache between turns")
    p.add_argument("--model", required=True, metavar="DIR", help="Hugging Face or Orbax checkpoint folder")
    p.add_argument("--document", metavar="FILE", default=None, help="a text file to prefill once and chat about")
    p.add_argument("--session", metavar="FILE", default=None,
                   help="load the session from FILE if it exists, and save it there on exit")
    add_policy_args(p)
    add_sampling_args(p, 256, "longest answer per turn")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    p.set_defaults(run=run)


def run(args) -> int:
    import os

    import momjax
    from momjax.params import param_bytes
    from momjax.tokenizer import load_tokenizer

    check_model_folder(args.model)
    check_numbers(args)
    document = None
    if args.document is not None:
        document = read_text_file(args.document, "document")
        if not document.strip():
            raise UsageError(f"document {args.document} is empty")
    if args.session and not os.path.isdir(os.path.dirname(os.path.abspath(args.session))):
        raise UsageError(f"--session {args.session}: its folder does not exist")
    tok = load_tokenizer(args.model)
    model = momjax.load(args.model, dtype=args.dtype, progress=not args.quiet)
    convo = Conversation(tok, document)
    doc_ids = convo.document_tokens()
    capacity = len(doc_ids) + 8 * args.max_new_tokens
    policy = resolve_policy(args, model.config, capacity, model.dtype, None if args.quiet else log,
                            loaded_weight_bytes=param_bytes(model.config, model.dtype))
    session, loaded = load_or_new_session(model, args.session, policy, capacity)
    if loaded:
        saved = session.info.get("chat", {})
        if document is not None and saved.get("document") not in (None, document):
            raise UsageError(f"session {args.session} holds a conversation over another document; drop --document "
                             "or use another --session file")
        convo.restore(saved)
        doc_ids = convo.document_tokens()
        log(f"momjax: session {args.session} loaded ({session.length} tokens, {len(convo.messages) // 2} turns)")
    elif doc_ids:
        t0 = time.perf_counter()
        session.feed(doc_ids)
        log(f"momjax: document prefilled: {len(doc_ids)} tokens in {time.perf_counter() - t0:.2f} s")

    def sync():
        """Rewind the cache to what the remaining conversation shares with it (after /reset or /rewind)."""
        session.rewind(min(common_prefix(session.tokens, convo.done_tokens()), session.length))

    def save(path):
        if not path:
            log("momjax: give a file: /save FILE (or start with --session FILE)")
            return
        session.info = {"chat": convo.state()}
        session.save(path)
        log(f"momjax: saved {session.length} tokens to {path}")

    interactive = sys.stdin.isatty()
    if interactive:
        log(f"momjax chat: type a message; commands: {COMMANDS}")
    while True:
        if interactive:
            sys.stdout.write("> ")
            sys.stdout.flush()
        line = sys.stdin.readline()
        if not line:
            break
        text = line.rstrip("\n")
        if not text.strip():
            continue
        if text.startswith("/"):
            if not _command(text, args, session, convo, sync, save):
                break
            continue
        try:
            answer, stats = stream_answer(session, tok, convo.tokens(text), args, sys.stdout)
        except momjax.InputError as e:  # e.g. the conversation outgrew the context: say so, keep going
            log(f"momjax: error: {' '.join(str(e).split())}")
            continue
        convo.add_turn(text, tok.decode(answer))
        log(summary(stats, session))
    if args.session:
        save(args.session)
    return 0


def _command(text: str, args, session, convo, sync, save) -> bool:
    """Run a /command; False for /quit."""
    command, _, rest = text.strip().partition(" ")
    if command == "/quit":
        return False
    if command == "/save":
        save(rest.strip() or args.session)
    elif command == "/reset":
        convo.reset()
        sync()
        log(f"momjax: conversation reset (session {session.length} tokens)")
    elif command == "/rewind":
        convo.drop_last_turn()
        sync()
        log(f"momjax: last turn dropped (session {session.length} tokens)")
    else:
        log(f"momjax: unknown command {command}; commands: {COMMANDS}")
    return True
