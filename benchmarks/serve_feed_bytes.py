"""Bytes across the host link per session feed, counted from the compiled feed programs: what a question costs
`momjax serve` when the kept cache lives in host memory (policies mom and mom-stream).

For each cached length N, a Session's per-layer feed program (generation.feed_layer_fn, as Session.feed compiles
it) is compiled for a QUESTION_TOKENS-token feed into a buffer holding N tokens; its parameters that XLA placed
in host memory (memory space S(5): they come to the device) and its outputs placed in host memory (they go
back) are summed, times the layers. Compile only: nothing runs, and the same programs are what a GPU runs with
the same shardings. Model: the demo checkpoint's shapes (4 layers, 2 KV heads, head_dim 64, float32).

Issue 24 asks for these bytes to grow with the question, not the document; this measures where they stand.

    python benchmarks/serve_feed_bytes.py [--out benchmarks/results/serve_feed_bytes.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys

import jax
import jax.numpy as jnp

import momjax
from momjax import generation as G
from momjax import targets as T
from momjax.cache import sharding
from momjax.demo_model import hf_config
from momjax.hf.config import from_hf
from momjax.params import init_random

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from provenance import git_state  # noqa: E402

QUESTION_TOKENS = 32
LENGTHS = (1024, 4096, 16384)


def feed_bytes(model, policy, cached: int) -> dict:
    """Host-to-device and device-to-host bytes of one feed of QUESTION_TOKENS tokens after `cached` tokens."""
    cfg = model.config
    capacity = G.bucket_length(cached + QUESTION_TOKENS, policy)
    kind = policy.kv_prefill
    buf = jax.ShapeDtypeStruct((1, cfg.num_kv_heads, capacity, cfg.head_dim), model.dtype, sharding=sharding(kind))
    tokens = jnp.zeros((1, G.bucket_length(QUESTION_TOKENS, policy)), jnp.int32)
    programs = G.compile_feed(model.params, tokens, buf, buf, cfg, policy)
    per_layer = {}
    for name in ("layer", "last"):
        if name in programs:
            compiled = programs[name]
            outs = jax.tree.leaves(T.output_avals(compiled))
            d2h = sum(o.size * o.dtype.itemsize for o in outs if getattr(o.sharding, "memory_kind", None) == "pinned_host")
            per_layer[name] = dict(host_to_device=T.host_parameter_bytes(compiled), device_to_host=int(d2h))
    runs = {"layer": cfg.num_layers - policy.last_position_only, "last": policy.last_position_only}
    h2d = sum(per_layer[n]["host_to_device"] * runs[n] for n in per_layer)
    d2h = sum(per_layer[n]["device_to_host"] * runs[n] for n in per_layer)
    new_kv = 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * QUESTION_TOKENS * jnp.dtype(model.dtype).itemsize
    cache = 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * capacity * jnp.dtype(model.dtype).itemsize
    return dict(cached_tokens=cached, capacity=capacity, host_to_device_bytes=int(h2d), device_to_host_bytes=int(d2h),
                cache_buffer_bytes=int(cache), question_kv_bytes=int(new_kv), per_layer=per_layer)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=os.path.join(HERE, "results", "serve_feed_bytes.json"))
    args = parser.parse_args(argv)
    cfg = from_hf({**hf_config(), "max_position_embeddings": 32768})
    model = momjax.Model(config=cfg, params=init_random(cfg, seed=0, dtype="float32"))
    results = {}
    for name in ("mom", "mom-stream"):
        policy = momjax.get_policy(name)
        results[name] = [feed_bytes(model, policy, n) for n in LENGTHS]
        for r in results[name]:
            print(f"{name}: {r['cached_tokens']:>6} cached tokens: {r['host_to_device_bytes'] / 2**20:7.2f} MiB to the "
                  f"device, {r['device_to_host_bytes'] / 2**20:7.2f} MiB back (the question's own K/V: "
                  f"{r['question_kv_bytes'] / 2**20:.2f} MiB)", flush=True)
    out = dict(benchmark="serve_feed_bytes", question_tokens=QUESTION_TOKENS, model="demo shapes, float32",
               machine=dict(platform=platform.platform(), backend=jax.default_backend(), jax=jax.__version__),
               provenance=git_state(), results=results)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(out, f, indent=2)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
