"""Decode reads each weight and each cached K/V byte where it lies: read from the compiled program.

A layer's slice of a stacked [L, ...] array, a transposed weight or a copied K/V array shows up in the
compiled HLO as a copy, slice, dynamic-slice or transpose whose result has the weight's (or the K/V's)
shape, possibly permuted. The model below has sizes that coincide with nothing else (hidden 96, 3 heads of
40, 1 KV head, ffn 232, 1000 prompt tokens), so a match can only be one of those arrays. This is the test
that fails if the per-layer layout (params.py, cache.py) or the o-projection (model.project_o) regresses.
"""

from __future__ import annotations

import itertools
import re

import jax
import jax.numpy as jnp
import pytest
from conftest import lower_decode_loop

import momjax
from momjax.memory import abstract_cache as _abstract_cache
from momjax.params import abstract_params

CFG = momjax.Config(vocab_size=503, hidden_size=96, intermediate_size=232, num_layers=3, num_heads=3,
                    num_kv_heads=1, head_dim=40, tie_embeddings=False, max_position_embeddings=4096)
PROMPT, NEW = 1000, 24
MOVES = ("copy", "slice", "dynamic-slice", "transpose", "copy-start")
OP = re.compile(r"= \w+\[([\d,]*)\]\S* (" + "|".join(MOVES) + r")\(")


def moved_shapes(hlo: str) -> list[tuple[tuple[int, ...], str]]:
    """(result shape, op) of every copy, slice, dynamic-slice, transpose and copy-start in the HLO text."""
    return [(tuple(int(d) for d in dims.split(",") if d), op) for dims, op in OP.findall(hlo)]


def forbidden_shapes(cfg, policy) -> set[tuple[int, ...]]:
    """Every permutation of a per-layer weight's shape and of one layer's prompt K/V shape, with and without
    a leading layer axis of 1 (how a static slice of a stacked array looks)."""
    lp = abstract_params(cfg, "float32").layers[0]
    shapes = [leaf.shape for leaf in jax.tree.leaves(lp) if len(leaf.shape) > 1]
    shapes.append((1, cfg.num_kv_heads, PROMPT, cfg.head_dim))
    out = set()
    for s in shapes:
        for p in itertools.permutations(s):
            out |= {p, (1, *p)}
    return out


@pytest.mark.parametrize("policy", ["baseline", "mom", "mom-stream", "mom-stream-1"])
def test_decode_loop_copies_no_weight_and_no_prompt_kv(policy):
    # mom-stream-1: one layer's K/V resident on the device, the others streamed
    policy = momjax.get_policy("mom-stream").replace(kv_device_layers=1) if policy == "mom-stream-1" else \
        momjax.get_policy(policy)
    cache = _abstract_cache(CFG, PROMPT, NEW, jnp.float32, policy, 1)
    hlo = lower_decode_loop(abstract_params(CFG, "float32"), cache, CFG, policy, NEW - 1).compile().as_text()
    moved = moved_shapes(hlo)
    assert any(op == "copy" for _, op in moved)  # the pattern does read this HLO (the tail is copied, small)
    bad = [(shape, op) for shape, op in moved if shape in forbidden_shapes(CFG, policy)]
    assert not bad, f"the decode loop copies weight- or K/V-sized arrays: {bad}"


def test_the_check_catches_a_stacked_slice():
    """The same check on a scan over stacked weights (the layout this test guards against) finds the copies."""
    layers = abstract_params(CFG, "float32").layers
    stacked = jax.tree.map(lambda *xs: sds_stack(xs), *layers)
    x = jax.ShapeDtypeStruct((1, CFG.hidden_size), jnp.float32)

    def scan(stacked, x):
        def body(x, lp):
            return jnp.tanh(x @ lp.w_gate) @ lp.w_down, None

        return jax.lax.scan(body, x, stacked)[0]

    hlo = jax.jit(scan).lower(stacked, x).compile().as_text()
    assert any(shape in forbidden_shapes(CFG, momjax.get_policy("mom")) for shape, _ in moved_shapes(hlo))


def sds_stack(xs):
    return jax.ShapeDtypeStruct((len(xs), *xs[0].shape), xs[0].dtype)


# ---------------------------------------------------------------------- int8 K/V

FLOATS = ("f16", "bf16", "f32", "f64")


def float_buffers(hlo: str) -> list[tuple[str, tuple[int, ...]]]:
    """(dtype, shape) of every float array the program materialises: the results of instructions outside
    fusion bodies (what a fusion computes inside, e.g. an int8 -> float conversion feeding a reduction, lives
    in registers)."""
    fused = set(re.findall(r"calls=(%[\w.\-]+)", hlo))
    found, computation = [], None
    for line in hlo.splitlines():
        if line and not line[0].isspace() and line.rstrip().endswith("{"):
            head = re.match(r"(?:ENTRY )?(%[\w.\-]+)", line)
            computation = head.group(1) if head else None
            continue
        m = re.match(r"\s*(?:ROOT )?%[\w.\-]+ = (\w+)\[([\d,]*)\]", line)
        if m and m.group(1) in FLOATS and computation not in fused:
            found.append((m.group(1), tuple(int(d) for d in m.group(2).split(",") if d)))
    return found


def prompt_kv_shapes(cfg) -> set[tuple[int, ...]]:
    """One layer's prompt K/V shape in any order, with up to two extra axes of 1 (a broadcast group axis)."""
    out = set()
    for p in itertools.permutations((1, cfg.num_kv_heads, PROMPT, cfg.head_dim)):
        out |= {p, (1, *p), (1, 1, *p)} | {p[:i] + (1,) + p[i:] for i in range(5)}
    return out


@pytest.mark.parametrize("policy", ["baseline", "mom", "mom-stream"])
def test_int8_decode_loop_builds_no_float_copy_of_the_prompt_kv(policy):
    """The int8 decode loop reads the int8 cache in place: no float buffer of a layer's prompt K/V shape (a
    dequantised copy, e.g. a conversion hoisted out of the loop), and still no weight or K/V copies."""
    policy = momjax.get_policy(policy).replace(kv_dtype="int8")
    cache = _abstract_cache(CFG, PROMPT, NEW, jnp.float32, policy, 1)
    assert cache.quantized and cache.k[0].dtype == jnp.int8
    hlo = lower_decode_loop(abstract_params(CFG, "float32"), cache, CFG, policy, NEW - 1).compile().as_text()
    assert float_buffers(hlo)  # the parser does read this HLO
    bad = [b for b in float_buffers(hlo) if b[1] in prompt_kv_shapes(CFG)]
    assert not bad, f"the int8 decode loop materialises float K/V-sized arrays: {bad}"
    moved = [(shape, op) for shape, op in moved_shapes(hlo) if shape in forbidden_shapes(CFG, policy)]
    assert not moved, f"the int8 decode loop copies weight- or K/V-sized arrays: {moved}"


def test_the_float_copy_check_catches_a_dequantised_cache():
    """A loop attending over an int8 cache with a plain convert-then-dot: XLA hoists the conversion out of the
    loop, a float copy of the whole cache, and the check above finds it."""
    k = jax.ShapeDtypeStruct((1, CFG.num_kv_heads, PROMPT, CFG.head_dim), jnp.int8)
    q = jax.ShapeDtypeStruct((1, CFG.num_kv_heads, CFG.head_dim), jnp.float32)

    def loop(k, q):
        body = lambda i, q: q + jnp.einsum("bkt,bkte->bke", jnp.einsum("bke,bkte->bkt", q, k.astype(jnp.float32)),
                                           k.astype(jnp.float32))
        return jax.lax.fori_loop(0, 4, body, q)

    hlo = jax.jit(loop).lower(k, q).compile().as_text()
    assert [b for b in float_buffers(hlo) if b[1] in prompt_kv_shapes(CFG)]
