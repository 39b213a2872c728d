"""`momjax chat`: a multi-turn conversation over stdin/stdout that keeps the KV cache between turns.

Each line read is a user message; the answer streams out, and a summary line per turn goes to stderr. A
--document is prefilled once, before the first question (momjax.chat.Conversation says where it goes).
Commands: /save [FILE], /reset (back to just the document), /rewind (drop the last turn), /quit.
"""

from __future__ import annotations

import select
import sys
import time

from momjax.chat import Conversation, common_prefix
from momjax.cli.common import (
    MODEL_HELP,
    UsageError,
    add_device_args,
    add_policy_args,
    add_sampling_args,
    add_weights_arg,
    check_model_path,
    check_numbers,
    loaded_weight_bytes,
    log,
    note_dtype,
    note_sampling,
    read_text_file,
    resolve_policy,
    start_devices,
)
from momjax.cli.sessions import add_session_args, check_session_path, load_or_new_session, stream_answer, summary
from momjax.loading import folder_config

COMMANDS = "/save [FILE], /reset, /rewind, /quit"
LONG_CONTEXT = 2**31 - 1  # --allow-long-context: no limit of momjax's own (memory still bounds it)


def add_parser(sub, common) -> None:
    p = sub.add_parser("chat", parents=[common], help="chat over stdin/stdout, keeping the KV cache between turns")
    p.add_argument("--model", required=True, metavar="PATH", help=MODEL_HELP)
    p.add_argument("--document", metavar="FILE", default=None, help="a text file to prefill once and chat about")
    p.add_argument("--session", metavar="FILE", default=None,
                   help="load the session from FILE if it exists, and save it there on exit (a new file, or a "
                        "momjax session file: any other file is refused)")
    add_session_args(p)
    add_policy_args(p)
    add_device_args(p)
    add_weights_arg(p)
    add_sampling_args(p, 256, "longest answer per turn")
    p.add_argument("--allow-long-context", action="store_true",
                   help="let the conversation run past the model's trained context (outputs may degrade)")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    p.set_defaults(run=run)


def run(args) -> int:
    import jax

    import momjax
    from momjax.tokenizer import load_tokenizer

    check_model_path(args.model)
    check_numbers(args)
    document = None
    if args.document is not None:
        document = read_text_file(args.document, "document")
        if not document.strip():
            raise UsageError(f"document {args.document} is empty")
    if args.session:  # before any work: a path that cannot take the session is refused now
        args.session = check_session_path(args.session, "--session")
    note_sampling(args)
    tok = load_tokenizer(args.model)
    cfg = folder_config(args.model)
    note_dtype(args.dtype or cfg.dtype)
    mesh = start_devices(args, cfg)  # before anything touches a device
    model = momjax.load(args.model, dtype=args.dtype, mesh=mesh, weights=args.weights, progress=not args.quiet,
                        max_context=LONG_CONTEXT if args.allow_long_context else None)
    convo = Conversation(tok, document)
    doc_ids = convo.document_tokens()
    capacity = len(doc_ids) + 8 * args.max_new_tokens
    policy = resolve_policy(args, model.config, capacity, model.dtype, None if args.quiet else log,
                            loaded_weight_bytes=loaded_weight_bytes(model))
    session, loaded = load_or_new_session(model, args.session, policy, capacity, "--session", args.replace_session)
    if loaded:
        saved = session.info.get("chat", {})
        if document is not None and saved.get("document") not in (None, document):
            raise UsageError(f"session {args.session} holds a conversation over another document; drop --document "
                             "or use another --session file")
        convo.restore(saved)
        log(f"momjax: session {args.session} loaded ({session.length} tokens, {len(convo.messages) // 2} turns)")
    elif doc_ids:
        t0 = time.perf_counter()
        jax.block_until_ready(session.feed(doc_ids))  # the feed runs asynchronously: wait for it before the clock
        log(f"momjax: document prefilled: {len(doc_ids)} tokens in {time.perf_counter() - t0:.2f} s "
            f"({session.last_feed_compile_s:.2f} s of it compiling)")

    def sync():
        """Rewind the cache to what the remaining conversation shares with it (after /reset or /rewind)."""
        session.rewind(min(common_prefix(session.tokens, convo.done_tokens()), session.length))

    def save(path, option="/save") -> bool:
        if not path:
            log("momjax: give a file: /save FILE (or start with --session FILE)")
            return False
        try:
            path = check_session_path(path, option)
            session.info = {"chat": convo.state()}
            session.save(path)
        except (momjax.MomjaxError, OSError) as e:  # said, and the chat goes on: nothing typed so far is lost
            log(f"momjax: error: {' '.join(str(e).split())}")
            return False
        log(f"momjax: saved {session.length} tokens to {path}")
        return True

    code = _converse(args, tok, session, convo, sync, save)
    if args.session:
        save(args.session, "--session")
    if code:
        log("momjax: interrupted")
    return code


def _converse(args, tok, session, convo, sync, save) -> int:
    """The conversation loop, until end of input or /quit (0), or Ctrl-C at the prompt (130). Ctrl-C while an
    answer streams stops that answer and comes back to the prompt."""
    import momjax

    interactive = sys.stdin.isatty()
    if interactive:
        log(f"momjax chat: type a message; commands: {COMMANDS}; Ctrl-C stops an answer")
    try:  # a Ctrl-C outside a streaming answer (which holds it back): at the prompt, or between turns
        while True:
            if interactive:
                sys.stdout.write("> ")
                sys.stdout.flush()
            line = _prompt_line(interactive)
            if not line:
                return 0
            text = line.rstrip("\n")
            if not text.strip():
                continue
            if text.startswith("/"):
                if not _command(text, args, session, convo, sync, save):
                    return 0
                continue
            try:
                answer, stats, interrupted = stream_answer(session, tok, convo.tokens(text), args, sys.stdout)
            except momjax.InputError as e:  # e.g. the conversation outgrew the context: say so, keep going
                log(f"momjax: error: {' '.join(str(e).split())}")
                continue
            convo.add_turn(text, tok.decode(answer))
            log(summary(stats, session) + (" (stopped by Ctrl-C)" if interrupted else ""))
    except KeyboardInterrupt:
        sys.stdout.write("\n")
        return 130


def _prompt_line(interactive: bool) -> str:
    """The next line of input. At a terminal it waits in short selects rather than one blocking read: the kernel
    may hand Ctrl-C to any of the process's threads (JAX runs many), and then only Python's flag is set, which a
    main thread blocked in read() would not look at until Enter was pressed."""
    if interactive:
        while not select.select([sys.stdin], [], [], 0.2)[0]:
            pass
    return sys.stdin.readline()


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
