"""The public API: forward, prefill, generate. Inputs are checked at this boundary (momjax.checks), with errors
that say what is wrong and what to do, before anything reaches JAX; the layers below take them as checked."""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

from momjax import checks
from momjax import generation as G
from momjax.cache import KVCache
from momjax.decoding import collect, decode_stream
from momjax.decoding import prefill as run_prefill
from momjax.errors import InputError
from momjax.loading import Model, check_model, check_runs, check_weights
from momjax.mesh import in_mesh, tp_degree
from momjax.memory.fit import check_fits
from momjax.policy import MemoryPolicy, get_policy


def _padded(prompts: list[list[int]], policy: MemoryPolicy):
    S = max(len(p) for p in prompts)
    tokens, start = G.left_pad(prompts, G.bucket_length(S, policy))
    return jnp.asarray(tokens), jnp.asarray(start)


def forward(model: Model, tokens, policy="baseline") -> jax.Array:
    """float32 logits [B, S, V] at every position of tokens [B, S] (all rows the same length)."""
    check_model(model)
    policy = get_policy(policy)
    check_weights(model)
    prompts = checks.prompts(tokens, model.config.vocab_size)
    S = len(prompts[0])
    if any(len(p) != S for p in prompts):
        raise InputError("forward takes rows of one length; pad them yourself or call prefill/generate with a list")
    checks.context(model.max_context, S)
    padded, start = _padded(prompts, policy)
    with in_mesh(model.mesh):
        logits = G.forward_fn(model.params, padded, start, model.config, policy)
    return logits[:, padded.shape[1] - S:]


def prefill(model: Model, tokens, policy="mom", on_layer=None) -> tuple[jax.Array, KVCache]:
    """Logits [B, V] at each row's last token, and the prompt's KV cache (placed as the policy says)."""
    check_model(model)
    policy = get_policy(policy)
    prompts = checks.prompts(tokens, model.config.vocab_size)
    checks.callback(on_layer)
    check_runs(model, policy)
    longest = max(len(p) for p in prompts)
    checks.context(model.max_context, longest)
    check_fits(model.config, longest, 0, policy, model.dtype, len(prompts), tp_degree(model.mesh),
               model.weights)
    padded, start = _padded(prompts, policy)
    with in_mesh(model.mesh):
        return run_prefill(model.params, padded, start, model.config, policy, on_layer=on_layer)


@dataclass
class Generation:
    """Result of `generate`: tokens [B, max_new_tokens] (rows that stopped are padded with pad_id)."""

    tokens: np.ndarray
    lengths: np.ndarray  # valid new tokens per row (including the stop token)
    pad_id: int
    prompt_tokens: int
    time_to_first_token_s: float
    decode_s: float
    policy: str

    def __array__(self, dtype=None, copy=None):
        return self.tokens if dtype is None else self.tokens.astype(dtype)

    def as_lists(self) -> list[list[int]]:
        return [row[:n].tolist() for row, n in zip(self.tokens, self.lengths)]

    @property
    def decode_tokens_per_s(self) -> float:
        steps = int(self.lengths.max()) - 1
        return steps / self.decode_s if self.decode_s > 0 and steps > 0 else float("nan")

    def summary(self) -> dict:
        d = dataclasses.asdict(self)
        d.pop("tokens")
        d["lengths"] = self.lengths.tolist()
        d["decode_tokens_per_s"] = self.decode_tokens_per_s
        return d


def generate(model: Model, tokens, max_new_tokens: int, policy="mom", temperature: float = 0.0,
             top_k: int | None = None, top_p: float | None = None, seed: int = 0, stop_tokens=None,
             on_layer=None) -> Generation:
    """Generate up to max_new_tokens per prompt. tokens: [B, S] array or a list of token lists.

    temperature 0 is greedy. stop_tokens: None = the checkpoint's EOS ids; [] = never stop early.
    on_layer(i) is called after prefill layer i (0-based) has finished.
    """
    check_model(model)
    policy = get_policy(policy)
    cfg = model.config
    prompts = checks.prompts(tokens, cfg.vocab_size)
    max_new_tokens = checks.new_tokens(max_new_tokens)
    checks.callback(on_layer)
    check_runs(model, policy)
    longest = max(len(p) for p in prompts)
    checks.context(model.max_context, longest, max_new_tokens)
    sampling = checks.sampling(cfg.vocab_size, cfg.eos_token_ids, temperature, top_k, top_p, seed, stop_tokens)
    check_fits(cfg, longest, max_new_tokens, policy, model.dtype, len(prompts), tp_degree(model.mesh),
               model.weights)

    padded, start = _padded(prompts, policy)
    with in_mesh(model.mesh):
        t0 = time.perf_counter()
        logits, cache = run_prefill(model.params, padded, start, cfg, policy, on_layer=on_layer)
        logits.block_until_ready()
        ttft = time.perf_counter() - t0
        t1 = time.perf_counter()
        chunks = decode_stream(model.params, cache, logits, sampling, cfg, policy, max_new_tokens, streamed=False)
        out, lengths = collect(chunks, max_new_tokens, sampling.pad_id, sampling.stop_ids)
        decode_s = time.perf_counter() - t1
    return Generation(tokens=out, lengths=lengths, pad_id=sampling.pad_id, prompt_tokens=sum(map(len, prompts)),
                      time_to_first_token_s=ttft, decode_s=decode_s, policy=policy.name)
