"""A conversation over a Session: chat messages rendered with the tokenizer's template, and only what the cache
does not already hold fed to it.

A document is the head of every conversation: a system message, or, for templates without a system role, the
start of the first user message. Each turn renders the whole conversation with the template and keeps the
longest prefix the cache shares with it (the rest is rewound), so whatever the template does with earlier
answers, the cache always equals a one-shot prefill of the rendered text. The command line's `momjax chat`
(momjax.cli.chat) and `generate --prompt-cache` print around this.
"""

from __future__ import annotations

from momjax.errors import TokenizerError


def common_prefix(a: list[int], b: list[int]) -> int:
    """How many leading tokens a and b share."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def rewind_to_shared(session, ids: list[int]) -> int:
    """Rewind the session to what it shares with ids, keeping at least one token of ids to feed; returns the
    number of tokens kept (reused from the cache)."""
    keep = min(common_prefix(session.tokens, ids), len(ids) - 1)
    session.rewind(keep)
    return keep


class Conversation:
    """Chat messages and their rendering with the tokenizer's template; the document as a system message, or at
    the head of the first user message when the template has no system role."""

    def __init__(self, tok, document: str | None):
        if not tok.has_chat_template:
            raise TokenizerError(f"the tokenizer in {tok.path} has no chat template; momjax chat needs one "
                                 "(use momjax generate for plain text)")
        self.tok = tok
        self.document = document
        self.messages: list[dict] = []
        self.system = False
        if document:
            try:
                tok.render_chat([{"role": "system", "content": document}, {"role": "user", "content": "?"}])
                self.system = True
            except Exception:  # noqa: BLE001 - templates raise their own errors for a role they do not take
                self.system = False

    def _full(self, messages) -> list[dict]:
        if not self.document:
            return messages
        if self.system:
            return [{"role": "system", "content": self.document}, *messages]
        first = dict(messages[0], content=f"{self.document}\n\n{messages[0]['content']}")
        return [first, *messages[1:]]

    def tokens(self, user_text: str) -> list[int]:
        """The whole conversation with a new user message, ready for the answer."""
        return self.tok.render_chat(self._full([*self.messages, {"role": "user", "content": user_text}]))

    def document_tokens(self) -> list[int]:
        """What every conversation over the document starts with: prefilled before the first question."""
        if not self.document:
            return []
        a, b = (self.tok.render_chat(self._full([{"role": "user", "content": q}])) for q in ("A", "B"))
        return a[: common_prefix(a, b)]

    def done_tokens(self) -> list[int]:
        """The conversation so far (no generation prompt), or the document's tokens before the first turn."""
        if self.messages:
            return self.tok.render_chat(self._full(self.messages), generation_prompt=False)
        return self.document_tokens()

    def add_turn(self, user_text: str, answer_text: str) -> None:
        self.messages += [{"role": "user", "content": user_text}, {"role": "assistant", "content": answer_text}]

    def drop_last_turn(self) -> None:
        self.messages = self.messages[:-2]

    def reset(self) -> None:
        self.messages = []

    def state(self) -> dict:
        """What a session file keeps of the conversation (Session.info["chat"])."""
        return {"document": self.document, "system": self.system, "messages": self.messages}

    def restore(self, saved: dict) -> None:
        self.document = saved.get("document", self.document)
        self.system = saved.get("system", self.system)
        self.messages = list(saved.get("messages", []))
