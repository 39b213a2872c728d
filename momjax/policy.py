"""Memory policies: where a long prompt's work and KV cache live. Every policy computes the same function; only
memory and speed differ.

`MemoryPolicy` holds the runtime memory knobs (mini-sequence length, attention blocks, where the KV cache
and the residual stream live, int8 K/V, layers kept on the device). The named policies are `POLICIES["baseline" |
"mom" | "mom-stream" | "mom-host"]`; `get_policy` is the one place a name or a MemoryPolicy becomes a MemoryPolicy.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from momjax.errors import InputError


@dataclass(frozen=True)
class MemoryPolicy:
    """Runtime memory knobs. Every policy computes the same function; only memory and speed differ.

    minisequence: tokens per mini-sequence (None = the whole sequence at once).
    minisequence_scope: "layer" runs the whole layer chunk by chunk (q/k/v, attention, o-proj, MLP);
        "mlp" chunks only the MLP, as the paper does.
    last_position_only: the final layer's attention output, MLP, final norm and LM head run on the last
        position only in prefill.
    kv_prefill / kv_decode: memory kind of the prompt's KV cache after prefill and while decoding
        ("device" or "pinned_host"). kv_decode="pinned_host" streams one layer at a time to the device.
    kv_dtype: None keeps K/V in the model's dtype (exact); "int8" stores them as int8 with one float32 scale
        per token per KV head (approximate: logits change slightly; every policy gives the same tokens).
    kv_device_layers: with kv_decode="pinned_host" only: the first N layers' prompt K/V are brought to the
        device once after prefill and stay there; the others stream every step. None or 0 streams them all;
        N = the model's layer count behaves like `mom`. Exact.
    residual: where prefill keeps the residual stream ([S, D]) between layers. "pinned_host" is `mom-host`:
        nothing on the device grows with the context (momjax.offload); its K/V live in host memory in blocks
        of host_block tokens (None = the mini-sequence length, which it must divide) and host_heads KV heads
        (None = all of them; it must divide the model's KV heads), streamed to the device one block at a time,
        the next block's copy in flight while the current one is attended to, in prefill and in decode.
    """

    name: str = "custom"
    minisequence: int | None = None
    minisequence_scope: str = "layer"
    last_position_only: bool = False
    q_block: int = 512
    kv_block: int = 512
    kv_prefill: str = "device"
    kv_decode: str = "device"
    kv_dtype: str | None = None
    kv_device_layers: int | None = None
    residual: str = "device"
    host_block: int | None = None
    host_heads: int | None = None

    def __post_init__(self):
        if self.minisequence is not None and self.minisequence <= 0:
            raise InputError(f"minisequence must be a positive number of tokens, got {self.minisequence}")
        if self.minisequence_scope not in ("layer", "mlp"):
            raise InputError(f"minisequence_scope must be 'layer' or 'mlp', got {self.minisequence_scope!r}")
        for kind in (self.kv_prefill, self.kv_decode):
            if kind not in ("device", "pinned_host"):
                raise InputError(f"KV placement must be 'device' or 'pinned_host', got {kind!r}")
        if self.kv_prefill == "device" and self.kv_decode == "pinned_host":
            raise InputError("kv_decode='pinned_host' needs kv_prefill='pinned_host'")
        if self.q_block <= 0 or self.kv_block <= 0:
            raise InputError("attention blocks must be positive")
        if self.kv_dtype not in KV_DTYPES:
            raise InputError(f"kv_dtype must be None (the model's dtype) or 'int8', got {self.kv_dtype!r}")
        n = self.kv_device_layers
        if n is not None:
            if isinstance(n, bool) or not isinstance(n, int) or n < 0:
                raise InputError(f"kv_device_layers must be a whole number of layers >= 0, got {n!r}")
            if self.kv_decode != "pinned_host":
                raise InputError(f"kv_device_layers={n} needs a policy that streams the KV cache from the host "
                                 "while decoding (kv_decode='pinned_host', e.g. 'mom-stream')")

        if self.residual not in ("device", "pinned_host"):
            raise InputError(f"residual must be 'device' or 'pinned_host', got {self.residual!r}")
        for knob in ("host_block", "host_heads"):
            n = getattr(self, knob)
            if n is None:
                continue
            if isinstance(n, bool) or not isinstance(n, int) or n <= 0:
                raise InputError(f"{knob} must be a positive whole number, got {n!r}")
            if self.residual != "pinned_host":
                raise InputError(f"{knob}={n} is a knob of the 'mom-host' policy (residual='pinned_host')")
        if self.residual == "pinned_host":
            if self.minisequence is None or self.kv_decode != "pinned_host" or self.minisequence_scope != "layer":
                raise InputError("residual='pinned_host' (mom-host) runs whole layers in mini-sequences and keeps the "
                                 "K/V in host memory: it needs minisequence, minisequence_scope='layer' and "
                                 "kv_prefill = kv_decode = 'pinned_host'")
            if self.host_block is not None and self.minisequence % self.host_block:
                raise InputError(f"host_block ({self.host_block} tokens) must divide the mini-sequence length "
                                 f"({self.minisequence}): each chunk's K/V are cut into whole blocks")

    @property
    def on_host(self) -> bool:
        """Whether this is `mom-host`: the residual stream and the K/V in host memory (momjax.offload)."""
        return self.residual == "pinned_host"

    def check_layers(self, num_layers: int) -> None:
        """InputError when kv_device_layers is more than the model's num_layers."""
        if self.kv_device_layers is not None and self.kv_device_layers > num_layers:
            raise InputError(f"kv_device_layers must be between 0 and the model's {num_layers} layers, "
                             f"got {self.kv_device_layers}")

    @property
    def quantized_kv(self) -> bool:
        return self.kv_dtype == "int8"

    def device_layers(self, num_layers: int) -> int:
        """How many layers' prompt K/V are on the device while decoding."""
        if self.kv_decode == "device":
            return num_layers
        return min(self.kv_device_layers or 0, num_layers)

    def replace(self, **changes) -> MemoryPolicy:
        return dataclasses.replace(self, **changes)


KV_DTYPES = (None, "int8")

# Default mini-sequence length, from the rule and measurement in benchmarks/minisequence_size.py: CPU prefill time
# is flat from 512 to 8192 tokens, and 2048 is the largest chunk within 5% of the least memory at 128k tokens.
DEFAULT_MINISEQUENCE = 2048

POLICIES: dict[str, MemoryPolicy] = {
    "baseline": MemoryPolicy(name="baseline"),
    "mom": MemoryPolicy(
        name="mom", minisequence=DEFAULT_MINISEQUENCE, last_position_only=True, kv_prefill="pinned_host",
        kv_decode="device",
    ),
    "mom-stream": MemoryPolicy(
        name="mom-stream", minisequence=DEFAULT_MINISEQUENCE, last_position_only=True, kv_prefill="pinned_host",
        kv_decode="pinned_host",
    ),
    "mom-host": MemoryPolicy(
        name="mom-host", minisequence=DEFAULT_MINISEQUENCE, last_position_only=True, kv_prefill="pinned_host",
        kv_decode="pinned_host", residual="pinned_host",
    ),
}


def get_policy(policy) -> MemoryPolicy:
    """A policy name ("baseline", "mom", "mom-stream", "mom-host") or a MemoryPolicy -> the MemoryPolicy."""
    if isinstance(policy, MemoryPolicy):
        return policy
    if not isinstance(policy, str):
        raise InputError(f"policy must be one of {', '.join(POLICIES)} or a MemoryPolicy, got {policy!r}")
    if policy not in POLICIES:
        raise InputError(f"unknown policy {policy!r}; choose one of {', '.join(POLICIES)} or pass a MemoryPolicy")
    return POLICIES[policy]


def describe_policy(policy: MemoryPolicy, num_layers: int) -> str:
    """e.g. "mom-stream (30 of 32 layers' K/V on the device), int8 K/V"."""
    text = policy.name
    if policy.kv_decode == "pinned_host" and policy.kv_device_layers:
        text += f" ({policy.device_layers(num_layers)} of {num_layers} layers' K/V on the device)"
    if policy.kv_dtype:
        text += f", {policy.kv_dtype} K/V"
    return text
