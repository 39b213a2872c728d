"""The KV cache pytree and its placement in device or pinned host memory.

One array per layer, as for the weights (params.py): the prompt's keys and values, k[l] and v[l]:
[B, K, T, E], written once by prefill, and a small tail for the tokens generated afterwards, tail_k[l] and
tail_v[l]: [B, K, N, E], that always lives on the device, so decoding never writes into a host buffer (XLA
cannot update host buffers in place on GPU). Separate per-layer arrays are what lets a decode step read a
layer's K/V where it lies: a slice of a stacked [L, ...] cache would be copied first, every token.
Offloading changes only the memory kind of k and v; every policy runs the same code on them.

With MemoryPolicy(kv_dtype="int8") k, v, tail_k and tail_v hold int8 and each has a float32 scale per token per
KV head beside it (k_scale ... tail_v_scale, [B, K, T] or [B, K, N]): symmetric absmax over the head dim
(`quantize_kv`). The scales live and move with their K/V; without quantisation the scale fields are empty.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from momjax.errors import InputError


@struct.dataclass
class KVCache:
    k: tuple[jax.Array, ...]  # L x [B, K, T, E] prompt keys (device or pinned_host)
    v: tuple[jax.Array, ...]  # L x [B, K, T, E]
    start: jax.Array  # [B] int32: left padding of each row (its first real token's index)
    tail_k: tuple[jax.Array, ...]  # L x [B, K, N, E] keys of generated tokens, on the device
    tail_v: tuple[jax.Array, ...]  # L x [B, K, N, E]
    length: jax.Array  # int32 scalar: tokens written in the tail
    # int32 scalar or None: valid prompt keys. None means all T are (a prefill cache); a session's buffer holds
    # `end` valid keys followed by spare room, and the generated tokens sit at positions end + [0, N).
    end: jax.Array | None = None
    # int8 caches only (empty tuples otherwise): float32 scales, one per token per KV head.
    k_scale: tuple[jax.Array, ...] = ()  # L x [B, K, T], in the same memory kind as k
    v_scale: tuple[jax.Array, ...] = ()
    tail_k_scale: tuple[jax.Array, ...] = ()  # L x [B, K, N], on the device
    tail_v_scale: tuple[jax.Array, ...] = ()

    @classmethod
    def from_prompt(cls, k, v, start, tail: int = 0, k_scale=(), v_scale=()) -> KVCache:
        """The cache of a prefilled prompt (per-layer sequences k, v, and their scales when k and v are int8),
        with room for `tail` generated tokens."""
        empty = jnp.zeros((), jnp.int32)
        return cls(k=tuple(k), v=tuple(v), start=start, tail_k=(), tail_v=(), length=empty, k_scale=tuple(k_scale),
                   v_scale=tuple(v_scale)).with_tail(tail)

    def with_tail(self, tail: int) -> KVCache:
        """Room for `tail` generated tokens (the tail is reset; an int8 tail gets zero scales)."""
        B, K, _, E = self.k[0].shape
        where = _device_twin(self.k[0])
        zeros = lambda: jnp.zeros((B, K, tail, E), self.k[0].dtype, device=where)
        # Separate buffers: the jitted decode step donates the cache, and a buffer cannot be donated twice.
        new = self.replace(tail_k=tuple(zeros() for _ in self.k), tail_v=tuple(zeros() for _ in self.k),
                           length=jnp.zeros((), jnp.int32))
        if self.quantized:
            where = where and where.update(spec=where.spec[:3])
            scales = lambda: tuple(jnp.zeros((B, K, tail), jnp.float32, device=where) for _ in self.k)
            new = new.replace(tail_k_scale=scales(), tail_v_scale=scales())
        return new

    @property
    def quantized(self) -> bool:
        """Whether K/V are int8 with scales (MemoryPolicy(kv_dtype="int8"))."""
        return len(self.k_scale) > 0

    def layer(self, l: int) -> tuple:
        """Layer l's prompt K/V where they lie: (k, v, k_scale, v_scale), the scales None unless quantised."""
        if self.quantized:
            return self.k[l], self.v[l], self.k_scale[l], self.v_scale[l]
        return self.k[l], self.v[l], None, None

    @property
    def tails(self) -> tuple:
        """The generated-token tail as a decode loop carries it: (tail_k, tail_v), or for an int8 cache
        ((tail_k, tail_k_scale), (tail_v, tail_v_scale)). `with_tails` puts it back."""
        if self.quantized:
            return (self.tail_k, self.tail_k_scale), (self.tail_v, self.tail_v_scale)
        return self.tail_k, self.tail_v

    def with_tails(self, tail_k, tail_v) -> KVCache:
        """This cache with the tail from `tails` (the same two forms)."""
        pairs = len(tail_k) == 2 and all(isinstance(t, tuple) for t in (*tail_k, *tail_v))
        if self.quantized != pairs:
            raise TypeError("the tail must be given as cache.tails gives it: (values, scales) pairs for an int8 "
                            "cache, the per-layer arrays otherwise")
        if self.quantized:
            return self.replace(tail_k=tail_k[0], tail_k_scale=tail_k[1], tail_v=tail_v[0], tail_v_scale=tail_v[1])
        return self.replace(tail_k=tail_k, tail_v=tail_v)

    @property
    def num_layers(self) -> int:
        return len(self.k)

    @property
    def prompt_length(self) -> int:
        return self.k[0].shape[2]

    @property
    def prompt_end(self):
        """Index of the first generated token: the valid prompt length (traced for a session's cache)."""
        return self.prompt_length if self.end is None else self.end

    @property
    def memory_kind(self) -> str:
        return self.k[0].sharding.memory_kind


def _device_twin(x):
    """Where a new device array shaped like x goes: x's mesh and split on the device, for an x split over a
    mesh (momjax.mesh); None (the default device) otherwise, and inside a trace."""
    s = getattr(x, "sharding", None) if isinstance(x, jax.Array) and not isinstance(x, jax.core.Tracer) else None
    return s.with_memory_kind("device") if isinstance(s, jax.sharding.NamedSharding) else None


def sharding(memory_kind: str, device=None) -> jax.sharding.Sharding:
    """A sharding on one device of this machine (the first by default) in memory_kind, for abstract arguments."""
    return jax.sharding.SingleDeviceSharding(device or jax.devices()[0], memory_kind=memory_kind)


_SPACES = {"device": jax.memory.Space.Device, "pinned_host": jax.memory.Space.Host}


def to_memory_kind(x, memory_kind: str):
    """Place x in `memory_kind` ("device" or "pinned_host"); inside jit this is where offloading happens.

    A memory space, not a sharding: it names no device, so the same program compiles for this machine and,
    deviceless, for a GPU target (momjax.targets), where a sharding of this machine's device would not fit.
    """
    if memory_kind not in _SPACES:
        raise InputError(f"memory_kind must be 'device' or 'pinned_host', got {memory_kind!r}")
    return jax.device_put(x, _SPACES[memory_kind])


# The per-layer prompt arrays that move between host and device together (the int8 scales when present).
_PROMPT_FIELDS = ("k", "v", "k_scale", "v_scale")


def _place_layers(cache: KVCache, kind_of_layer) -> KVCache:
    """The cache with layer l's prompt arrays in memory kind kind_of_layer(l); arrays already there stay."""
    def move(xs):
        return tuple(x if x.sharding.memory_kind == kind_of_layer(l) else to_memory_kind(x, kind_of_layer(l))
                     for l, x in enumerate(xs))

    return cache.replace(**{f: move(getattr(cache, f)) for f in _PROMPT_FIELDS})


def place_prompt(cache: KVCache, memory_kind: str) -> KVCache:
    """Move the prompt K/V (not the tail) to memory_kind, e.g. back to the device before decoding."""
    return _place_layers(cache, lambda l: memory_kind)


def place_for_decode(cache: KVCache, policy) -> KVCache:
    """Where the policy decodes from: `mom` brings the whole prompt K/V back to the device (the one copy),
    `mom-stream` leaves it in pinned host memory except its first `kv_device_layers` layers, which come to
    the device once here and stay. The host copies of those layers are dropped with the old cache."""
    resident = policy.device_layers(cache.num_layers)
    return _place_layers(cache, lambda l: "device" if l < resident else policy.kv_decode)


# ---------------------------------------------------------------------- int8 K/V

QMAX = 127  # symmetric: int8 values in [-127, 127], so -x quantises to -q


def quantize_kv(x):
    """x [..., E] -> (int8 [..., E], float32 scale [...]): symmetric absmax over the head dim E, one scale per
    token per head. x ~= q * scale with |x - q * scale| <= scale / 2; an all-zero row gets scale 1 (q = 0)."""
    x32 = x.astype(jnp.float32)
    amax = jnp.max(jnp.abs(x32), axis=-1)
    scale = jnp.where(amax > 0, amax / QMAX, 1.0)
    q = jnp.clip(jnp.round(x32 / scale[..., None]), -QMAX, QMAX).astype(jnp.int8)
    return q, scale


def dequantize_kv(q, scale, dtype=jnp.float32):
    """The values int8 q [..., E] with scale [...] stand for, in dtype (for tests and small blocks)."""
    return (q.astype(jnp.float32) * scale[..., None]).astype(dtype)
