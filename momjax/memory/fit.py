"""Refuse, before anything is allocated, a request that cannot fit in this machine's memory."""

from __future__ import annotations

import jax.numpy as jnp

from momjax import machine
from momjax.config import Config
from momjax.errors import InputError
from momjax.generation import bucket_length
from momjax.memory.estimate import estimate
from momjax.policy import MemoryPolicy
from momjax.units import format_bytes


def check_fits(cfg: Config, prompt_len: int, new_tokens: int, policy: MemoryPolicy, dtype, batch: int = 1,
               devices: int = 1, weights: str = "device") -> None:
    """InputError when a request's prefill or decode cannot fit in this machine's memory by the closed-form
    estimate (instant). Only a sure failure is refused: the estimate is compared with the total memory, not
    what is free now. devices: the model is split over that many devices (each device's share is compared with
    one device's memory)."""
    policy.check_layers(cfg.num_layers)
    device_limit, ram = machine.memory_limits()
    phases = [("prefill", prompt_len)] + ([("decode", bucket_length(prompt_len, policy))] if new_tokens else [])
    for phase, n in phases:
        r = estimate(cfg, n, policy, dtype=str(jnp.dtype(dtype)), phase=phase, batch=batch, new_tokens=max(new_tokens, 1),
                     devices=devices, weights=weights)
        if device_limit is None:  # CPU: device and host memory are the same RAM, shared by every CPU device
            need, limit, where = devices * r["device_bytes"] + r["host_bytes"], ram, "RAM on this machine"
        elif r["device_bytes"] > device_limit:
            need, limit, where = r["device_bytes"], device_limit, "device memory"
        else:
            need, limit, where = r["host_bytes"], ram, "host RAM"
        if limit is not None and need > limit:
            raise InputError(
                f"this request cannot fit: {phase} of {batch} x {prompt_len} prompt tokens"
                + (f" + {new_tokens} new tokens" if new_tokens else "")
                + f" with policy {policy.name!r} in {jnp.dtype(dtype)} needs about {format_bytes(need)} "
                f"(momjax.memory.estimate), more than the {format_bytes(limit)} of {where}; ask for fewer new "
                "tokens, a shorter prompt or a smaller batch"
                + (", or use policy 'mom-stream'" if device_limit is not None and policy.kv_decode == "device"
                   and phase == "decode" else ""))
