"""`momjax serve`: an OpenAI-compatible HTTP server on one checkpoint, keeping conversations' KV caches so a long
document is prefilled once however many questions follow (momjax.serve).

This module parses the flags, loads the model, prints one line with the URL when the server listens, and runs
uvicorn until Ctrl-C or SIGTERM (uvicorn's own handling: in-flight requests get GRACEFUL_S seconds to finish).
Starlette and uvicorn are the optional `serve` extra; without them the command says how to install it.
"""

from __future__ import annotations

import ipaddress
import os
import signal
import socket

from momjax.cli.common import (
    DTYPES,
    MODEL_HELP,
    UsageError,
    add_device_args,
    add_policy_args,
    add_weights_arg,
    check_model_path,
    loaded_weight_bytes,
    log,
    note_dtype,
    resolve_policy,
    start_devices,
)
from momjax.loading import folder_config

GRACEFUL_S = 30
INSTALL = 'momjax serve needs the serve extra: pip install "momjax[serve]" (Starlette and uvicorn)'


def add_parser(sub, common) -> None:
    p = sub.add_parser("serve", parents=[common], help="an OpenAI-compatible HTTP server that keeps long documents' "
                                                       "KV caches between requests")
    p.add_argument("--model", required=True, metavar="PATH", help=MODEL_HELP)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1, this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port (default: 8000; 0 picks a free one)")
    p.add_argument("--name", default=None, help="the model's name in the API (default: the folder's name)")
    add_policy_args(p)
    add_device_args(p, processes=False)  # one process: every request runs where the model is
    add_weights_arg(p)
    p.add_argument("--dtype", choices=DTYPES, default=None, help="weights dtype (default: the checkpoint's)")
    p.add_argument("--api-key", default=os.environ.get("MOMJAX_API_KEY"), metavar="KEY",
                   help="require 'Authorization: Bearer KEY' on every request (default: $MOMJAX_API_KEY)")
    p.add_argument("--cache-memory", default="4GiB", metavar="SIZE",
                   help="host memory for kept conversations' KV caches, e.g. 8GiB (default: 4GiB); the least "
                        "recently used go first")
    p.add_argument("--cache-dir", default=None, metavar="DIR",
                   help="also keep the caches in DIR as session files, and load them again at start")
    p.add_argument("--max-queue", type=int, default=16, metavar="N",
                   help="requests that may wait while one runs (default: 16); more get 429")
    p.add_argument("--max-tokens", type=int, default=1024, metavar="N",
                   help="answer length for requests that do not give max_tokens (default: 1024)")
    p.add_argument("--allow-long-context", action="store_true",
                   help="accept prompts past the model's trained context (outputs may degrade)")
    p.set_defaults(run=run)


def check_args(args) -> int:
    """The flags checked before anything is loaded; returns --cache-memory in bytes."""
    from momjax.units import parse_bytes

    check_model_path(args.model)
    if not 0 <= args.port < 65536:
        raise UsageError(f"--port must be in 0..65535, got {args.port}")
    if args.max_queue < 0:
        raise UsageError(f"--max-queue must be >= 0, got {args.max_queue}")
    if args.max_tokens < 1:
        raise UsageError(f"--max-tokens must be at least 1, got {args.max_tokens}")
    if args.api_key is not None and not args.api_key.strip():
        raise UsageError("--api-key is empty; give a key, or leave the option out")
    try:
        budget = parse_bytes(args.cache_memory)
    except ValueError as e:
        raise UsageError(f"--cache-memory: {e}") from None
    if args.cache_dir and os.path.exists(args.cache_dir) and not os.path.isdir(args.cache_dir):
        raise UsageError(f"--cache-dir {args.cache_dir} is a file; pass a folder")
    return budget


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def warn_exposed(host: str, api_key) -> None:
    if not is_loopback(host) and not api_key:
        bar = "!" * 100
        log(f"{bar}\nmomjax serve: WARNING: listening on {host} WITHOUT an API key: anyone who can reach this "
            f"port can use the model\nand read the documents it keeps. Pass --api-key KEY (or bind 127.0.0.1).\n{bar}")


def run(args) -> int:
    try:
        import starlette  # noqa: F401
        import uvicorn
    except ImportError:
        raise UsageError(INSTALL) from None
    import momjax
    from momjax.serve.app import create_app
    from momjax.serve.cache import SessionStore
    from momjax.serve.engine import Engine
    from momjax.tokenizer import load_tokenizer

    budget = check_args(args)
    sock = listening_socket(args.host, args.port)  # before the model loads: a taken port is said at once
    warn_exposed(args.host, args.api_key)
    tok = load_tokenizer(args.model)
    cfg = folder_config(args.model)
    note_dtype(args.dtype or cfg.dtype)
    mesh = start_devices(args, cfg)
    model = momjax.load(args.model, dtype=args.dtype, mesh=mesh, weights=args.weights, progress=False,
                        max_context=2**31 - 1 if args.allow_long_context else None)
    args.max_new_tokens = args.max_tokens  # what --policy auto plans for
    policy = resolve_policy(args, model.config, model.max_context, model.dtype, log,
                            loaded_weight_bytes=loaded_weight_bytes(model))
    store = SessionStore(model, policy, budget, args.cache_dir, log=log)
    if args.cache_dir:
        log(f"momjax serve: {len(store)} kept sessions loaded from {args.cache_dir}")
    name = args.name or os.path.basename(os.path.normpath(args.model))
    engine = Engine(model, tok, policy, store, name, default_max_tokens=args.max_tokens)
    app = create_app(engine, api_key=args.api_key, max_queue=args.max_queue)
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level="warning", access_log=False,
                            timeout_graceful_shutdown=GRACEFUL_S, lifespan="off")
    stopped = []
    # uvicorn finishes in-flight requests on SIGTERM, then raises the signal again under the handler it found:
    # this one, so that a stop asked for is a clean exit (status 0) rather than death by the signal.
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: stopped.append(signum))
    try:
        announcing_server(uvicorn, config, name).run(sockets=[sock])
    finally:
        # Stopping now: a second SIGTERM while the process shuts down (JAX's teardown takes a moment, and Python
        # drops its own handlers as it finalizes) is the same stop, not a kill. A caller's own handler comes back.
        signal.signal(signal.SIGTERM, signal.SIG_IGN if previous is signal.SIG_DFL else previous)
    log("momjax serve: stopped" + (" (SIGTERM)" if stopped else ""))
    return 0


def listening_socket(host: str, port: int) -> socket.socket:
    """A socket bound to host:port, or a UsageError saying why not (a port in use, an unknown address)."""
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
    except OSError as e:
        raise UsageError(f"cannot listen on {host} port {port}: {e.strerror or e}; pass another --port or --host") \
            from None
    sock.set_inheritable(True)
    return sock


def bound_port(server) -> int:
    """The port a started uvicorn.Server listens on (--port 0 picks one)."""
    for s in server.servers:
        for sock in s.sockets:
            if sock.family in (socket.AF_INET, socket.AF_INET6):
                return sock.getsockname()[1]
    return server.config.port


def announcing_server(uvicorn, config, name: str):
    """A uvicorn.Server that prints one line with the URL once it listens."""

    class Announcing(uvicorn.Server):
        async def startup(self, sockets=None):
            await super().startup(sockets)
            if self.started:
                host = config.host if ":" not in config.host else f"[{config.host}]"
                print(f"momjax serve: {name} on http://{host}:{bound_port(self)}/v1 (Ctrl-C to stop)", flush=True)

    return Announcing(config)
