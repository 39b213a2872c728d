"""`momjax serve`: an OpenAI-compatible HTTP server that keeps conversations' KV caches and serves each request
from the one sharing its longest token prefix.

protocol.py (request checks, response shapes) -> cache.py (the kept sessions) -> engine.py (prompts, answers)
-> app.py (the Starlette routes, the queue). Starlette and uvicorn are the optional `serve` extra: nothing here
is imported by `import momjax`.
"""
