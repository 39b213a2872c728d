"""`momjax chat` and `momjax generate --prompt-cache`: the command line over `momjax.Session`.

chat: a multi-turn conversation over stdin/stdout with the tokenizer's chat template; each line read is a
user message, the answer streams out, and the KV cache is kept between turns. A --document is prefilled
once, before the first question, as a system message (or, for templates without a system role, at the head
of the first user message). Each turn renders the whole conversation with the template and feeds only what
the cache does not already hold (the longest common prefix is kept, the rest rewound), so whatever the
template does with earlier answers, the cache always equals a one-shot prefill of the rendered text.
Commands: /save [FILE], /reset (back to just the document), /rewind (drop the last turn), /quit.

--prompt-cache FILE (generate): reuse the longest prefix of the prompt that FILE holds, and save the cache
(prompt and answer) there afterwards, as llama.cpp's --prompt-cache does.
"""

from __future__ import annotations

import os
import sys
import time

COMMANDS = "/save [FILE], /reset, /rewind, /quit"


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def _load_or_new_session(model, path: str | None, policy, capacity: int, log):
    """The session saved at path (if it exists and fits this model), else a new one."""
    import momjax

    if path and os.path.isfile(path):
        try:
            return momjax.Session.load(model, path, policy=policy, capacity=capacity), True
        except momjax.SessionError as e:
            log(f"momjax: {path} not reused ({e}); it will be replaced")
    return momjax.Session(model, policy, capacity=capacity), False


def _summary(stats: dict, fed: int, session) -> str:
    steps = stats.get("new_tokens", 0) - 1
    rate = f"{steps / stats['decode_s']:.1f} tokens/s" if steps > 0 and stats.get("decode_s", 0) > 0 else "n/a"
    return (f"[{fed} tokens fed, {stats.get('new_tokens', 0)} new, first token in "
            f"{stats.get('time_to_first_token_s', float('nan')):.3f} s, decode {rate}, session {session.length} "
            f"tokens]")


def _stream_answer(session, tok, ids: list[int], args, out) -> tuple[list[int], dict]:
    """Rewind the session to what it shares with ids, stream the answer to the rest; (answer ids, stats)."""
    keep = min(_common_prefix(session.tokens, ids), len(ids) - 1)  # feed at least one token
    session.rewind(keep)
    stats: dict = {"fed": len(ids) - keep}
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
    from momjax.cli import UsageError, describe_policy

    folder = os.path.dirname(os.path.abspath(args.prompt_cache))
    if not os.path.isdir(folder):
        raise UsageError(f"--prompt-cache {args.prompt_cache}: folder {folder} does not exist")
    log = lambda message: print(message, file=sys.stderr, flush=True)
    session, _ = _load_or_new_session(model, args.prompt_cache, policy, len(ids) + args.max_new_tokens, log)
    reused = min(_common_prefix(session.tokens, ids), len(ids) - 1)
    answer, stats = _stream_answer(session, tok, ids, args, sys.stdout)
    session.save(args.prompt_cache)
    print(f"prompt tokens:        {len(ids)} ({reused} reused from {args.prompt_cache})\n"
          f"new tokens:           {len(answer)}\n"
          f"time to first token:  {stats['time_to_first_token_s']:.3f} s\n"
          f"decode:               {_summary(stats, stats['fed'], session)}\n"
          f"policy:               {describe_policy(session.policy, model.config.num_layers)}", file=sys.stderr)
    return 0


class Conversation:
    """Chat messages and their rendering with the tokenizer's template; the document as a system message, or at
    the head of the first user message when the template has no system role."""

    def __init__(self, tok, document: str | None):
        from momjax.cli import UsageError

        if tok._fast or not tok.chat_template:
            raise UsageError(f"the tokenizer in {tok.path} has no chat template; momjax chat needs one "
                             "(use momjax generate for plain text)")
        self.tok = tok
        self.document = document
        self.messages: list[dict] = []
        self.system = False
        if document:
            try:
                self._render([{"role": "system", "content": document}, {"role": "user", "content": "?"}])
                self.system = True
            except Exception:  # noqa: BLE001 - templates raise their own errors for a role they do not take
                self.system = False

    def _render(self, messages, generation_prompt: bool = True) -> list[int]:
        text = self.tok.backend.apply_chat_template(messages, add_generation_prompt=generation_prompt, tokenize=False)
        return self.tok.encode(text, add_special_tokens=False)  # the template writes BOS itself

    def _full(self, messages) -> list[dict]:
        if not self.document:
            return messages
        if self.system:
            return [{"role": "system", "content": self.document}, *messages]
        first = dict(messages[0], content=f"{self.document}\n\n{messages[0]['content']}")
        return [first, *messages[1:]]

    def tokens(self, user_text: str) -> list[int]:
        """The whole conversation with a new user message, ready for the answer."""
        return self._render(self._full([*self.messages, {"role": "user", "content": user_text}]))

    def document_tokens(self) -> list[int]:
        """What every conversation over the document starts with: prefilled before the first question."""
        if not self.document:
            return []
        a, b = (self._render(self._full([{"role": "user", "content": q}])) for q in ("A", "B"))
        return a[: _common_prefix(a, b)]


def cmd_chat(args) -> int:
    import momjax
    from momjax.cli import UsageError, resolve_policy
    from momjax.params import param_bytes
    from momjax.tokenizer import load_tokenizer

    if not os.path.exists(args.model):
        raise UsageError(f"model {args.model} does not exist; pass a Hugging Face or Orbax checkpoint folder or a "
                         ".gguf file")
    if args.max_new_tokens < 1:
        raise UsageError(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}")
    if args.temperature < 0:
        raise UsageError(f"--temperature must be >= 0, got {args.temperature}")
    document = None
    if args.document is not None:
        if not os.path.isfile(args.document):
            raise UsageError(f"document {args.document} does not exist")
        with open(args.document, encoding="utf-8") as f:
            document = f.read()
        if not document.strip():
            raise UsageError(f"document {args.document} is empty")
    if args.session and not os.path.isdir(os.path.dirname(os.path.abspath(args.session))):
        raise UsageError(f"--session {args.session}: its folder does not exist")
    tok = load_tokenizer(args.model)
    model = momjax.load(args.model, dtype=args.dtype, progress=not args.quiet)
    log = lambda message: print(message, file=sys.stderr, flush=True)
    convo = Conversation(tok, document)
    doc_ids = convo.document_tokens()
    capacity = len(doc_ids) + 8 * args.max_new_tokens
    policy = resolve_policy(args, model.config, capacity, model.dtype, None if args.quiet else log,
                            loaded_weight_bytes=param_bytes(model.config, model.dtype))
    session, loaded = _load_or_new_session(model, args.session, policy, capacity, log)
    if loaded:
        saved = session.info.get("chat", {})
        if document is not None and saved.get("document") not in (None, document):
            raise UsageError(f"session {args.session} holds a conversation over another document; drop --document "
                             "or use another --session file")
        convo.document = saved.get("document", document)
        convo.system = saved.get("system", convo.system)
        convo.messages = list(saved.get("messages", []))
        doc_ids = convo.document_tokens()
        log(f"momjax: session {args.session} loaded ({session.length} tokens, {len(convo.messages) // 2} turns)")
    elif doc_ids:
        t0 = time.perf_counter()
        session.feed(doc_ids)
        log(f"momjax: document prefilled: {len(doc_ids)} tokens in {time.perf_counter() - t0:.2f} s")

    def sync():
        """Rewind the cache to what the remaining conversation shares with it (after /reset or /rewind)."""
        if convo.messages:
            done = convo._render(convo._full(convo.messages), generation_prompt=False)
        else:
            done = doc_ids
        session.rewind(min(_common_prefix(session.tokens, done), session.length))

    def save(path):
        if not path:
            log("momjax: give a file: /save FILE (or start with --session FILE)")
            return
        session.info = {"chat": {"document": convo.document, "system": convo.system, "messages": convo.messages}}
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
            command, _, rest = text.strip().partition(" ")
            if command == "/quit":
                break
            if command == "/save":
                save(rest.strip() or args.session)
            elif command == "/reset":
                convo.messages = []
                sync()
                log(f"momjax: conversation reset (session {session.length} tokens)")
            elif command == "/rewind":
                convo.messages = convo.messages[:-2]
                sync()
                log(f"momjax: last turn dropped (session {session.length} tokens)")
            else:
                log(f"momjax: unknown command {command}; commands: {COMMANDS}")
            continue
        ids = convo.tokens(text)
        try:
            answer, stats = _stream_answer(session, tok, ids, args, sys.stdout)
        except momjax.InputError as e:  # e.g. the conversation outgrew the context: say so, keep going
            log(f"momjax: error: {' '.join(str(e).split())}")
            continue
        convo.messages += [{"role": "user", "content": text},
                           {"role": "assistant", "content": tok.decode(answer)}]
        log(_summary(stats, stats["fed"], session))
    if args.session:
        save(args.session)
    return 0
