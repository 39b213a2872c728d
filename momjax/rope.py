"""Rotary position embeddings: the inverse frequencies of every rope scaling momjax reads (default, linear,
llama3, yarn, dynamic NTK), as transformers computes them, and their application to queries and keys.

Frequencies are computed in float32 on the host for the static types; dynamic NTK scaling depends on the
sequence length, so `rope_frequencies` computes them inside the programs from a traced length.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from momjax.config import Config


def rope_inv_freq(cfg: Config) -> np.ndarray:
    """Inverse rotary frequencies [E/2] in float32, with linear, llama3 or yarn scaling applied, computed in the
    order and precision transformers uses. For dynamic NTK scaling these are the unscaled frequencies, which it
    uses up to max_position_embeddings; `rope_frequencies` scales them for longer sequences."""
    E = cfg.head_dim
    inv = (1.0 / cfg.rope_theta ** (np.arange(0, E, 2, dtype=np.float32) / np.float32(E))).astype(np.float32)
    if cfg.rope_type == "linear":
        inv = inv / np.float32(cfg.rope_factor)
    elif cfg.rope_type == "llama3":
        old = cfg.rope_original_max_position
        low_wavelen = old / cfg.rope_low_freq_factor
        high_wavelen = old / cfg.rope_high_freq_factor
        wavelen = 2 * np.pi / inv
        scaled = np.where(wavelen > low_wavelen, inv / cfg.rope_factor, inv)
        smooth = (old / wavelen - cfg.rope_low_freq_factor) / (cfg.rope_high_freq_factor - cfg.rope_low_freq_factor)
        smoothed = (1 - smooth) * scaled / cfg.rope_factor + smooth * scaled
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        inv = np.where(medium, smoothed, scaled).astype(np.float32)
    elif cfg.rope_type == "yarn":
        inv = _yarn_inv_freq(cfg)
    return inv


def _yarn_inv_freq(cfg: Config) -> np.ndarray:
    """YaRN (arXiv 2309.00071): dimensions that turn more than beta_fast times over the original context keep
    their frequency, those that turn fewer than beta_slow times are divided by the factor, and a linear ramp
    over dimension indices blends the two in between. The ramp's ends (in float64, as transformers finds them)
    are rounded outwards to whole dimensions unless rope_truncate is off."""
    E, base, factor = cfg.head_dim, cfg.rope_theta, cfg.rope_factor

    def dim_of(rotations):  # the dimension index whose wavelength fits `rotations` times in the original context
        return E * math.log(cfg.rope_original_max_position / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = dim_of(cfg.rope_beta_fast), dim_of(cfg.rope_beta_slow)
    if cfg.rope_truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, E - 1)
    if low == high:
        high += 0.001  # as transformers: no zero-width ramp
    powers = np.float32(base) ** (np.arange(0, E, 2, dtype=np.float32) / np.float32(E))  # float32 throughout
    extrapolated = np.float32(1.0) / powers
    interpolated = np.float32(1.0) / (np.float32(factor) * powers)
    ramp = np.clip((np.arange(E // 2, dtype=np.float32) - np.float32(low)) / np.float32(high - low), 0, 1)
    keep = np.float32(1.0) - ramp  # weight of the unscaled frequency
    return (interpolated * (np.float32(1.0) - keep) + extrapolated * keep).astype(np.float32)


def rope_frequencies(cfg: Config, length) -> jax.Array:
    """Inverse rotary frequencies [E/2] (float32) for a forward pass whose longest row reaches `length` tokens
    (its highest position + 1; an int32 scalar, traced or not).

    Only dynamic NTK scaling reads `length`. As transformers does (its `dynamic_rope_update`), a length up to
    max_position_embeddings uses the unscaled frequencies, and a longer one raises the base to
        theta * (factor * length / max_position_embeddings - (factor - 1)) ** (E / (E - 2)),
    in float32. Each program computes this from its own length: one prefill (every mini-sequence of it) uses
    the whole prompt's, each decode step its own, each session feed the length at the end of the feed; K/V
    cached earlier keep the frequencies they were computed with, as transformers' cache does. Unlike
    transformers' rotary module, nothing is remembered between calls: transformers keeps the largest length
    it has seen until a call shorter than max_position_embeddings, so after a longer call its shorter calls
    differ; on a fresh model, and whenever lengths only grow, the two agree.
    """
    inv = jnp.asarray(rope_inv_freq(cfg))
    if cfg.rope_type != "dynamic":
        return inv
    E, original, factor = cfg.head_dim, cfg.max_position_embeddings, cfg.rope_factor
    f32 = jnp.float32
    n = jnp.maximum(jnp.asarray(length, jnp.int32), original).astype(f32)
    growth = f32(factor) * n / f32(original) - f32(factor - 1)
    base = f32(cfg.rope_theta) * growth ** f32(E / (E - 2))
    scaled = 1.0 / base ** (jnp.arange(0, E, 2, dtype=f32) / f32(E))
    return jnp.where(length > original, scaled, inv)


def rope(x, positions, inv_freq, scale: float = 1.0):
    """Rotate halves of the head dim by position x angle (transformers' layout). x: [B, S, *, E].
    scale (yarn's attention factor, cfg.rope_attention_factor) multiplies cos and sin, as transformers does."""
    angles = positions.astype(jnp.float32)[:, :, None] * inv_freq  # [B, S, E/2], f32 for long positions
    cos, sin = jnp.cos(angles)[:, :, None, :], jnp.sin(angles)[:, :, None, :]
    if scale != 1.0:
        cos, sin = cos * scale, sin * scale
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)
