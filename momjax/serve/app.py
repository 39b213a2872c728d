"""The HTTP side of `momjax serve`: a Starlette app speaking the OpenAI API over one Engine.

Routes: POST /v1/chat/completions, POST /v1/completions (JSON, or server-sent events with `stream: true`),
GET /v1/models, GET /health. With an API key every route needs `Authorization: Bearer KEY` (compared in
constant time). Bodies are bounded (413), and every refused request gets a 4xx with OpenAI's `{"error": {...}}`
body; an unexpected failure is a 500 with the same shape, its traceback on the server's stderr only.

One model runs one request at a time: a request first takes a place in the queue (`Gate.ticket`; with
`max_queue` requests already waiting it is refused with 429 and Retry-After), then waits for the lock and runs
its JAX work in a worker thread, so the event loop keeps answering. A streamed answer runs chunk by chunk; when
its client goes away, Starlette cancels the response, and the generator is closed in the worker thread
(the answer so far is kept in the session) before the next request gets the lock.
"""

from __future__ import annotations

import hmac
import json
import sys
import time
import traceback

import anyio
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route

from momjax.errors import MomjaxError
from momjax.serve import protocol as P
from momjax.serve.engine import Engine, Job

MAX_BODY = 16 * 2**20  # bytes of one request body (a 1M-token document is about 4 MiB of text)
RETRY_AFTER_S = 1


def error_response(e: P.APIError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status, headers=e.headers)


class Ticket:
    """One request's place: waiting in the queue until `async with` admits it, and released exactly once."""

    def __init__(self, gate: Gate):
        self.gate, self.waiting, self.admitted = gate, True, False

    def leave_queue(self) -> None:
        if self.waiting:
            self.waiting = False
            self.gate.waiting -= 1

    async def __aenter__(self):
        try:
            await self.gate.lock.acquire()
        finally:
            self.leave_queue()
        self.admitted = True
        self.gate.running = True
        return self

    async def __aexit__(self, *exc):
        self.gate.running = False
        self.gate.lock.release()
        return False


class Gate:
    """The queue in front of the model: one request runs, at most max_queue wait."""

    def __init__(self, max_queue: int):
        self.lock = anyio.Lock()
        self.max_queue = max_queue
        self.waiting = 0
        self.running = False

    def ticket(self) -> Ticket:
        if self.waiting >= self.max_queue:
            raise P.APIError(429, f"the server is busy ({self.waiting} requests waiting); retry shortly", None,
                             "rate_limit_exceeded", type="rate_limit_error",
                             headers={"Retry-After": str(RETRY_AFTER_S)})
        self.waiting += 1
        return Ticket(self)


class EventStream(StreamingResponse):
    """Server-sent events whose generator is always closed, and whose queue place is always given back, however
    the response ends (done, failed, or the client gone)."""

    def __init__(self, content, ticket: Ticket):
        super().__init__(content, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.ticket = ticket

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            with anyio.CancelScope(shield=True):
                await self.body_iterator.aclose()
            self.ticket.leave_queue()


def sse(body) -> str:
    return f"data: {json.dumps(body, separators=(',', ':'))}\n\n"


async def read_json(request, limit: int):
    """The request body as JSON, refused with 413 past limit bytes and 400 when it is not JSON."""
    length = request.headers.get("content-length")
    if length is not None and (not length.isdigit() or int(length) > limit):
        raise P.APIError(413, f"the request body is larger than {limit} bytes", None, "request_too_large")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise P.APIError(413, f"the request body is larger than {limit} bytes", None, "request_too_large")
    try:
        return json.loads(body)
    except (ValueError, UnicodeDecodeError) as e:
        raise P.APIError(400, f"the request body is not valid JSON ({e})", None, "invalid_json") from None


class Server:
    """The routes over one engine; `app` is the ASGI application."""

    def __init__(self, engine: Engine, api_key: str | None = None, max_queue: int = 16, max_body: int = MAX_BODY):
        self.engine, self.max_body = engine, max_body
        self.api_key = api_key.encode() if api_key else None
        self.gate = Gate(max_queue)
        routes = [Route("/v1/chat/completions", self.endpoint(self.chat), methods=["POST"]),
                  Route("/v1/completions", self.endpoint(self.completions), methods=["POST"]),
                  Route("/v1/models", self.endpoint(self.models), methods=["GET"]),
                  Route("/health", self.endpoint(self.health), methods=["GET"])]
        self.app = Starlette(routes=routes, exception_handlers={HTTPException: self.http_error})

    # ------------------------------------------------------------------ every route

    def authorize(self, request) -> None:
        if self.api_key is None:
            return
        scheme, _, key = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(key.strip().encode(), self.api_key):
            raise P.APIError(401, "missing or incorrect API key: send the header 'Authorization: Bearer KEY'", None,
                             "invalid_api_key", headers={"WWW-Authenticate": "Bearer"})

    def endpoint(self, handler):
        async def run(request):
            try:
                self.authorize(request)
                return await handler(request)
            except P.APIError as e:
                return error_response(e)
            except MomjaxError as e:
                return error_response(P.APIError(400, " ".join(str(e).split()), None, "invalid_request"))
            except Exception:  # noqa: BLE001 - the server goes on; the traceback goes to its stderr only
                traceback.print_exc(file=sys.stderr)
                return error_response(P.APIError(500, "the server failed on this request; see its log", None,
                                                 "internal_error", type="server_error"))
        return run

    async def http_error(self, request, exc: HTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        return error_response(P.APIError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}",
                                         None, code))

    # ------------------------------------------------------------------ routes

    async def health(self, request):
        return JSONResponse({"status": "ok", "running": self.gate.running, "waiting": self.gate.waiting,
                             "kept_sessions": len(self.engine.store)})

    async def models(self, request):
        return JSONResponse(P.models_body(self.engine.name, self.engine.created))

    async def chat(self, request):
        return await self.generate(request, P.parse_chat)

    async def completions(self, request):
        return await self.generate(request, P.parse_completion)

    async def generate(self, request, parse):
        req = parse(await read_json(request, self.max_body), self.engine.max_context)
        if req.model is not None and req.model != self.engine.name:
            raise P.APIError(404, f"the model '{req.model}' does not exist; this server serves "
                                  f"'{self.engine.name}' (GET /v1/models)", "model", "model_not_found")
        job = await anyio.to_thread.run_sync(self.engine.job, req)  # a long document's template and tokens
        ticket = self.gate.ticket()
        if req.stream:
            return EventStream(self.events(job, ticket), ticket)
        try:
            async with ticket:
                text = await anyio.to_thread.run_sync(lambda: "".join(job.pieces()))
        finally:
            ticket.leave_queue()
        return JSONResponse(P.completion_body(req.kind, P.new_id(req.kind), self.engine.name, text,
                                              job.finish_reason, job.usage()))

    async def events(self, job: Job, ticket: Ticket):
        """The streamed answer: a first chunk (the assistant's role), the text pieces, the last chunk with its
        finish_reason, the usage chunk when asked, then [DONE]."""
        req, name = job.req, self.engine.name
        rid, created = P.new_id(req.kind), int(time.time())
        async with ticket:
            if req.kind == "chat":
                yield sse(P.chunk_body("chat", rid, name, created, "", None, req.include_usage, first=True))
            pieces = job.pieces()
            try:
                while (piece := await anyio.to_thread.run_sync(next, pieces, None)) is not None:
                    yield sse(P.chunk_body(req.kind, rid, name, created, piece, None, req.include_usage))
            except P.APIError as e:  # the headers are sent: the error goes in the stream
                yield sse(e.body())
                return
            except MomjaxError as e:
                yield sse(P.APIError(400, " ".join(str(e).split()), None, "invalid_request").body())
                return
            except Exception:  # noqa: BLE001 - as endpoint(): the traceback to the server's stderr only
                traceback.print_exc(file=sys.stderr)
                yield sse(P.APIError(500, "the server failed on this request; see its log", None, "internal_error",
                                     type="server_error").body())
                return
            finally:
                with anyio.CancelScope(shield=True):
                    await anyio.to_thread.run_sync(pieces.close)
            yield sse(P.chunk_body(req.kind, rid, name, created, None, job.finish_reason, req.include_usage))
            if req.include_usage:
                yield sse(P.usage_chunk(req.kind, rid, name, created, job.usage()))
            yield "data: [DONE]\n\n"


def create_app(engine: Engine, api_key: str | None = None, max_queue: int = 16, max_body: int = MAX_BODY):
    """The ASGI app serving engine (see Server)."""
    return Server(engine, api_key, max_queue, max_body).app
