"""What this machine has: the device's memory limit and the host's RAM."""

from __future__ import annotations

import os

import jax


def memory_limits() -> tuple[int | None, int | None]:
    """(device bytes, host bytes) of this machine: the first device's memory limit (None on CPU, where device
    and host are the same RAM) and the total RAM (None where the OS does not say)."""
    try:
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        ram = None
    device = jax.devices()[0]
    if device.platform == "cpu":
        return None, ram
    stats = device.memory_stats() or {}
    return stats.get("bytes_limit"), ram


def device_memory_in_use() -> int:
    """Bytes the first device's allocator holds now (0 where it does not say, e.g. on a CPU)."""
    stats = jax.devices()[0].memory_stats() or {}
    return stats.get("bytes_in_use", 0)


def peak_device_memory() -> int | None:
    """The first device's peak allocation so far, or None where the backend keeps no statistics (a CPU)."""
    stats = jax.devices()[0].memory_stats() or {}
    return stats.get("peak_bytes_in_use")
