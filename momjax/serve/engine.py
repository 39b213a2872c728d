"""The model's side of the server: a request's prompt as token ids, and its answer as text pieces, served from the
kept session that shares the prompt's longest prefix.

Everything here is synchronous and runs in the server's worker thread, one request at a time (app.py holds the
lock). `Job.pieces` takes the kept session sharing the longest prefix with the prompt (cache.SessionStore),
feeds only the rest, streams the answer through `Session.stream` and the tokenizer's streamed decoder, holds
back text that may be the start of a stop string, and stops on a stop token, a stop string, max_tokens, or
when its caller closes it (a client that went away). The session, now holding the prompt and the answer
generated so far, is kept for the next request. Every step is what a fresh session would compute, so the
greedy tokens equal `momjax.generate`'s on the same prompt.
"""

from __future__ import annotations

import threading
import time

from momjax.errors import MomjaxError
from momjax.serve.cache import SessionStore
from momjax.serve.protocol import APIError, Request

DEFAULT_MAX_TOKENS = 1024  # a request without max_tokens gets this many at most (or what the context leaves)


class StopText:
    """Text pieces cut at the first stop string: pieces that might begin one are held back until they cannot."""

    def __init__(self, stops: list[str]):
        self.stops = stops
        self.hold = max((len(s) for s in stops), default=1) - 1
        self.pending = ""

    def push(self, piece: str) -> tuple[str, bool]:
        """(text that can be sent now, whether a stop string was reached)."""
        self.pending += piece
        hits = [i for i in (self.pending.find(s) for s in self.stops) if i >= 0]
        if hits:
            out, self.pending = self.pending[: min(hits)], ""
            return out, True
        cut = max(len(self.pending) - self.hold, 0)
        out, self.pending = self.pending[:cut], self.pending[cut:]
        return out, False

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out


class Engine:
    """One model, its tokenizer and policy, and the kept sessions."""

    def __init__(self, model, tokenizer, policy, store: SessionStore, name: str,
                 default_max_tokens: int = DEFAULT_MAX_TOKENS):
        self.model, self.tokenizer, self.policy, self.store, self.name = model, tokenizer, policy, store, name
        self.default_max_tokens = default_max_tokens
        self.stop_ids = set(model.config.eos_token_ids)
        # One tokenizer call at a time: requests are tokenized in worker threads while another request's answer
        # is decoded, and one Hugging Face fast tokenizer used from two threads at once can fail ("Already
        # borrowed", when a call changes its truncation or padding settings).
        self.tokenizer_lock = threading.Lock()
        self.created = int(time.time())

    @property
    def max_context(self) -> int:
        return self.model.max_context

    def prompt_ids(self, req: Request) -> list[int]:
        """The request's prompt as token ids: chat messages rendered with the checkpoint's chat template, text
        encoded as the tokenizer does (with its BOS), token ids checked against the vocabulary."""
        if req.kind == "chat":
            if not self.tokenizer.has_chat_template:
                raise APIError(400, "this model's tokenizer has no chat template; use /v1/completions", "messages",
                               "no_chat_template")
            try:
                with self.tokenizer_lock:
                    ids = self.tokenizer.render_chat(req.messages)
            except Exception as e:  # noqa: BLE001 - templates raise their own errors (an unknown role, an order)
                raise APIError(400, f"the chat template cannot render these messages: {e}", "messages",
                               "invalid_value") from None
        elif isinstance(req.prompt, str):
            with self.tokenizer_lock:
                ids = self.tokenizer.encode(req.prompt)
        else:
            ids = list(req.prompt)
            vocab = self.model.config.vocab_size
            if any(not 0 <= t < vocab for t in ids):
                raise APIError(400, f"'prompt' holds token ids outside the vocabulary [0, {vocab})", "prompt",
                               "invalid_value")
        if not ids:
            raise APIError(400, "the prompt is empty once tokenized", "prompt" if req.kind != "chat" else "messages",
                           "invalid_value")
        return ids

    def max_tokens(self, req: Request, prompt_tokens: int) -> int:
        """The request's max_tokens, checked against the context: the prompt and the answer must fit in it."""
        room = self.max_context - prompt_tokens
        param = req.max_tokens_param
        if req.max_tokens is None:
            if room < 1:
                raise APIError(400, f"the prompt has {prompt_tokens} tokens; this model's context is "
                                    f"{self.max_context} tokens, which leaves no room for an answer", "messages"
                               if req.kind == "chat" else "prompt", "context_length_exceeded")
            return min(self.default_max_tokens, room)
        if req.max_tokens > room:
            raise APIError(400, f"this model's context is {self.max_context} tokens; the prompt has "
                                f"{prompt_tokens} tokens and {req.max_tokens} were asked for the answer. Ask for "
                                f"fewer tokens or send a shorter prompt", param, "context_length_exceeded")
        return req.max_tokens

    def job(self, req: Request) -> Job:
        """The request, checked and tokenized, ready to run (APIError for what cannot run)."""
        ids = self.prompt_ids(req)
        return Job(self, req, ids, self.max_tokens(req, len(ids)))


class Job:
    """One request's run: `pieces()` yields its answer's text; afterwards cached, completion_tokens and
    finish_reason say what happened."""

    def __init__(self, engine: Engine, req: Request, ids: list[int], max_tokens: int):
        self.engine, self.req, self.ids, self.max_tokens = engine, req, ids, max_tokens
        self.cached = 0  # prompt tokens the kept session already held
        self.completion_tokens = 0
        self.finish_reason = "length"
        self.stats: dict = {}

    def usage(self) -> dict:
        from momjax.serve.protocol import usage

        return usage(len(self.ids), self.completion_tokens, self.cached)

    def pieces(self):
        """The answer's text, piece by piece (run in the worker thread). Closing the generator stops the
        answer: what was generated so far stays in the kept session."""
        e, req = self.engine, self.req
        session, name, self.cached = e.store.take(self.ids, capacity=len(self.ids) + self.max_tokens)
        tokens = session.stream(self.ids[self.cached:], self.max_tokens, temperature=req.temperature, top_k=req.top_k,
                                top_p=req.top_p, seed=req.seed, stats=self.stats)
        decoder, stop = e.tokenizer.stream(), StopText(req.stop)
        failed = True
        try:
            yield from self._decode(tokens, decoder, stop)
            failed = False
        except GeneratorExit:
            failed = False
            raise
        except MomjaxError as err:
            raise APIError(400, str(err), None, "invalid_request") from None
        finally:
            try:
                tokens.close()  # feeds the answer generated so far into the session
            finally:
                if failed:
                    e.store.discard(name)
                else:
                    e.store.keep(session, name, fed=len(self.ids) - self.cached)

    def _decode(self, tokens, decoder, stop: StopText):
        stop_ids, lock = self.engine.stop_ids, self.engine.tokenizer_lock

        def text_of(new=None) -> str:
            with lock:
                return decoder.flush() if new is None else decoder.push(new)

        for new in tokens:
            end = next((i for i, t in enumerate(new) if t in stop_ids), None)
            if end is not None:
                new = new[: end + 1]
            self.completion_tokens += len(new)
            text, hit = stop.push(text_of(new))
            if text:
                yield text
            if hit:  # a stop string: what followed it is dropped
                self.finish_reason = "stop"
                return
            if end is not None:  # a stop token
                self.finish_reason = "stop"
                break
            if self.completion_tokens >= self.max_tokens:
                break
        text, hit = stop.push(text_of())  # characters still incomplete, and text held back for stop strings
        rest = text if hit else text + stop.flush()
        if hit:
            self.finish_reason = "stop"
        if rest:
            yield rest
