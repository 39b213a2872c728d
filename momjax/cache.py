"""The KV cache pytree and its placement in device or pinned host memory.

The prompt's keys and values, k and v: [L, B, K, T, E], are written once by prefill. Tokens generated
afterwards go to a small tail, tail_k and tail_v: [L, B, K, N, E], that always lives on the device, so
decoding never has to write into a host buffer (XLA cannot update host buffers in place on GPU).
Offloading changes only the memory kind of k and v; every policy runs the same code on them.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct


@struct.dataclass
class KVCache:
    k: jax.Array  # [L, B, K, T, E] prompt keys (device or pinned_host)
    v: jax.Array  # [L, B, K, T, E]
    start: jax.Array  # [B] int32: left padding of each row (its first real token's index)
    tail_k: jax.Array  # [L, B, K, N, E] keys of generated tokens, on the device
    tail_v: jax.Array  # [L, B, K, N, E]
    length: jax.Array  # int32 scalar: tokens written in the tail

    @classmethod
    def from_prompt(cls, k, v, start, tail: int = 0) -> KVCache:
        """The cache of a prefilled prompt, with room for `tail` generated tokens."""
        empty = jnp.zeros((), jnp.int32)
        return cls(k=k, v=v, start=start, tail_k=empty, tail_v=empty, length=empty).with_tail(tail)

    def with_tail(self, tail: int) -> KVCache:
        """Room for `tail` generated tokens (the tail is reset)."""
        L, B, K, _, E = self.k.shape
        shape = (L, B, K, tail, E)
        # Two separate buffers: the jitted decode step donates the cache, and a buffer cannot be donated twice.
        return self.replace(tail_k=jnp.zeros(shape, self.k.dtype), tail_v=jnp.zeros(shape, self.k.dtype),
                            length=jnp.zeros((), jnp.int32))

    @property
    def prompt_length(self) -> int:
        return self.k.shape[3]

    @property
    def memory_kind(self) -> str:
        return self.k.sharding.memory_kind


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
        raise ValueError(f"memory_kind must be 'device' or 'pinned_host', got {memory_kind!r}")
    return jax.device_put(x, _SPACES[memory_kind])


def place_prompt(cache: KVCache, memory_kind: str) -> KVCache:
    """Move the prompt K/V (not the tail) to memory_kind, e.g. back to the device before decoding."""
    if cache.k.sharding.memory_kind == memory_kind:
        return cache
    return cache.replace(k=to_memory_kind(cache.k, memory_kind), v=to_memory_kind(cache.v, memory_kind))
