"""The OpenAI HTTP API's shapes: request bodies checked into a `Request`, and the response, chunk and error bodies.

Nothing here runs the model or touches a socket: `parse_chat` and `parse_completion` take the decoded JSON body
and return a `Request` or raise `APIError` (a 4xx with OpenAI's `{"error": {...}}` body); the builders return
the dicts that app.py serializes.
"""

from __future__ import annotations

import math
import secrets
import time
from dataclasses import dataclass, field

MAX_STOP_STRINGS = 4  # as OpenAI: up to four stop sequences
MAX_SEED = 2**63


class APIError(Exception):
    """A request the server refuses: its HTTP status and OpenAI's error fields."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error", headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


@dataclass
class Request:
    """One generation request, checked: what engine.py needs to run it."""

    kind: str  # "chat" or "completion"
    model: str | None
    messages: list[dict] | None = None  # chat: {"role", "content"} with content as text
    prompt: str | list[int] | None = None  # completion: text or token ids
    max_tokens: int | None = None  # None: the server's default (within the context)
    max_tokens_param: str = "max_tokens"  # the field it came from, for errors
    temperature: float = 1.0
    top_p: float | None = None
    top_k: int | None = None
    seed: int = 0
    stop: list[str] = field(default_factory=list)
    stream: bool = False
    include_usage: bool = False


def _bad(message: str, param: str | None, code: str | None = None) -> APIError:
    return APIError(400, message, param, code)


def _number(body: dict, name: str, default, low: float, high: float, integer: bool = False):
    """body[name] checked to lie in [low, high] (a JSON number; null means the default)."""
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (integer and not isinstance(value, int)):
        raise _bad(f"'{name}' must be {'an integer' if integer else 'a number'}, got {value!r}", name,
                   "invalid_type")
    if not (math.isfinite(value) and low <= value <= high):
        raise _bad(f"'{name}' must be between {low} and {high}, got {value!r}", name, "invalid_value")
    return value


def _stop(body: dict) -> list[str]:
    stop = body.get("stop")
    if stop is None:
        return []
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops):
        raise _bad("'stop' must be a non-empty string or a list of them", "stop", "invalid_type")
    if len(stops) > MAX_STOP_STRINGS:
        raise _bad(f"'stop' takes at most {MAX_STOP_STRINGS} strings, got {len(stops)}", "stop", "invalid_value")
    return stops


def _unsupported(body: dict) -> None:
    """Fields whose answer would silently differ from what the client asked for: refused, not ignored."""
    for name in ("logprobs", "echo", "tools", "functions"):
        if body.get(name) not in (None, False, 0, []):
            raise _bad(f"'{name}' is not supported by momjax serve", name, "unsupported_parameter")
    fmt = body.get("response_format")
    if fmt is not None and (not isinstance(fmt, dict) or fmt.get("type") != "text"):
        raise _bad("'response_format' other than {\"type\": \"text\"} is not supported by momjax serve",
                   "response_format", "unsupported_parameter")
    if body.get("best_of") not in (None, 1):
        raise _bad("'best_of' other than 1 is not supported", "best_of", "unsupported_parameter")


def _common(body, kind: str, max_context: int) -> Request:
    """The fields chat and completion requests share."""
    if not isinstance(body, dict):
        raise _bad("the request body must be a JSON object", None, "invalid_type")
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise _bad("'model' must be a string", "model", "invalid_type")
    n = _number(body, "n", 1, 1, 128, integer=True)
    if n != 1:
        raise _bad(f"only n=1 is supported, got n={n}", "n", "unsupported_value")
    max_tokens = _number(body, "max_tokens", None, 1, max_context, integer=True)
    param = "max_tokens"
    if kind == "chat" and body.get("max_completion_tokens") is not None:
        max_tokens = _number(body, "max_completion_tokens", None, 1, max_context, integer=True)
        param = "max_completion_tokens"
    _unsupported(body)
    temperature = float(_number(body, "temperature", 1.0, 0.0, 2.0))
    top_p = float(_number(body, "top_p", 1.0, 0.0, 1.0))
    if top_p == 0.0:
        raise _bad("'top_p' must be greater than 0", "top_p", "invalid_value")
    top_k = _number(body, "top_k", None, 1, 2**31 - 1, integer=True)
    seed = _number(body, "seed", None, -MAX_SEED, MAX_SEED - 1, integer=True)
    stream = body.get("stream", False)
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise _bad("'stream' must be true or false", "stream", "invalid_type")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise _bad("'stream_options' must be an object", "stream_options", "invalid_type")
    if body.get("stream_options") is not None and not stream:
        raise _bad("'stream_options' is only allowed when 'stream' is true", "stream_options", "invalid_value")
    greedy = temperature == 0.0
    return Request(kind=kind, model=model, max_tokens=max_tokens, max_tokens_param=param, temperature=temperature,
                   top_p=None if greedy or top_p == 1.0 else top_p, top_k=None if greedy else top_k,
                   seed=secrets.randbits(62) if seed is None else seed, stop=_stop(body), stream=stream,
                   include_usage=bool(options.get("include_usage", False)))


def _content(message: dict, i: int) -> str:
    """A message's content as text: a string, or a list of text parts (what newer clients send)."""
    content = message.get("content")
    if content is None and message.get("role") == "assistant":
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) for p in content):
        if any(p.get("type") != "text" or not isinstance(p.get("text"), str) for p in content):
            raise _bad(f"messages[{i}].content: only text parts are supported", f"messages[{i}].content",
                       "unsupported_value")
        return "".join(p["text"] for p in content)
    raise _bad(f"messages[{i}].content must be a string or a list of text parts", f"messages[{i}].content",
               "invalid_type")


def parse_chat(body, max_context: int) -> Request:
    """A /v1/chat/completions body."""
    req = _common(body, "chat", max_context)
    messages = body.get("messages")
    if messages is None:
        raise _bad("'messages' is required", "messages", "missing_required_parameter")
    if not isinstance(messages, list) or not messages:
        raise _bad("'messages' must be a non-empty list of messages", "messages", "invalid_value")
    req.messages = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not m["role"]:
            raise _bad(f"messages[{i}] must be an object with a 'role' string", f"messages[{i}]", "invalid_type")
        req.messages.append({"role": m["role"], "content": _content(m, i)})
    return req


def parse_completion(body, max_context: int) -> Request:
    """A /v1/completions body: one prompt, as text or token ids (a list of one of either is accepted too)."""
    req = _common(body, "completion", max_context)
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # a batch of one
    if prompt is None:
        raise _bad("'prompt' is required", "prompt", "missing_required_parameter")
    if isinstance(prompt, list) and prompt and all(isinstance(t, list) for t in prompt):
        raise _bad("only one prompt per request is supported", "prompt", "unsupported_value")
    ids = isinstance(prompt, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt)
    if not (isinstance(prompt, str) or ids) or not prompt:
        raise _bad("'prompt' must be a non-empty string or a non-empty list of token ids", "prompt",
                   "invalid_value")
    req.prompt = prompt
    return req


# ---------------------------------------------------------------------- responses


def new_id(kind: str) -> str:
    return ("chatcmpl-" if kind == "chat" else "cmpl-") + secrets.token_hex(12)


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached_tokens}}


def completion_body(kind: str, rid: str, model: str, text: str, finish_reason: str, use: dict) -> dict:
    """The whole (non-streamed) response."""
    if kind == "chat":
        choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                  "finish_reason": finish_reason}
        obj = "chat.completion"
    else:
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}
        obj = "text_completion"
    return {"id": rid, "object": obj, "created": int(time.time()), "model": model, "choices": [choice],
            "usage": use}


def chunk_body(kind: str, rid: str, model: str, created: int, text: str | None, finish_reason: str | None,
               include_usage: bool, first: bool = False) -> dict:
    """One streamed chunk: a piece of text, or the last one (finish_reason set, no text)."""
    if kind == "chat":
        delta = {} if text is None else {"content": text}
        if first:
            delta = {"role": "assistant", **delta}
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        obj = "chat.completion.chunk"
    else:
        choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish_reason}
        obj = "text_completion"
    body = {"id": rid, "object": obj, "created": created, "model": model, "choices": [choice]}
    if include_usage:
        body["usage"] = None
    return body


def usage_chunk(kind: str, rid: str, model: str, created: int, use: dict) -> dict:
    """The chunk after the last when stream_options.include_usage: no choices, the usage."""
    obj = "chat.completion.chunk" if kind == "chat" else "text_completion"
    return {"id": rid, "object": obj, "created": created, "model": model, "choices": [], "usage": use}


def models_body(name: str, created: int) -> dict:
    return {"object": "list", "data": [{"id": name, "object": "model", "created": created, "owned_by": "momjax"}]}
