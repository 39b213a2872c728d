"""Sessions: one conversation's KV cache kept between calls, so a long document is prefilled once and then
questioned many times, rewound, saved to disk and loaded again.

A `Session` holds, per layer, a K and a V buffer [1, K, capacity, E] of which the first `length` positions
are valid, and the token ids they came from. `feed` extends them: the new tokens are right-padded to a
length bucket and run layer by layer by one compiled per-layer program (generation.feed_layer_fn) that
writes their K/V at index `length` (in place: the buffer is donated) and lets their queries attend to the
cached tokens and to themselves, in the policy's mini-sequences. The buffers live where the policy puts a
prompt's KV cache: on the device for `baseline`, in pinned host memory for `mom` and `mom-stream`, where
each layer's buffer comes to the device for that layer's program only. When a feed does not fit, the
buffers grow to the next bucket, one layer at a time.

`generate` and `stream` feed the question, decode through the one decode loop (momjax.decoding, over the
session's buffers with the keys past `length` masked; `mom` copies the cache to the device for decoding,
`mom-stream` streams it from the host), then feed the answer so the next call continues the conversation.
Every step is the computation a one-shot prefill of the concatenated tokens does, so the greedy tokens are
the same as `momjax.generate`'s (except with dynamic NTK rope scaling past max_position_embeddings: see
`Session`).

`save` and `load` use the session file format (momjax.session_file). With an int8 policy
(MemoryPolicy(kv_dtype="int8")) each layer's K and V buffer is a pair (int8 [1, K, capacity, E], float32
scales [1, K, capacity]), fed, grown, placed, decoded and saved together; such a session loads only with an
int8 policy.
"""

from __future__ import annotations

import contextlib
import time

import jax
import jax.numpy as jnp
import numpy as np

from momjax import checks, offload, session_file
from momjax import generation as G
from momjax import model as M
from momjax.api import Generation
from momjax.cache import KVCache, place_for_decode, sharding, to_memory_kind
from momjax.decoding import DecodeStats, collect, decode_stream
from momjax.errors import InputError, SessionError
from momjax.loading import Model, check_model, check_runs
from momjax.memory.fit import check_fits
from momjax.mesh import in_mesh, inputs_on, iterate_in, kv_sharding, tp_degree
from momjax.policy import MemoryPolicy, get_policy


@contextlib.contextmanager
def _as_session_errors():
    """The InputErrors of momjax.checks, raised as SessionErrors (what every Session method raises)."""
    try:
        yield
    except SessionError:
        raise
    except InputError as e:
        raise SessionError(str(e)) from None


def _grow_impl(buf, capacity: int, memory_kind: str):
    """A copy of one layer's buffer [B, K, cap, E] (or an int8 buffer's scales [B, K, cap]) with room for
    `capacity` positions, placed in memory_kind."""
    out = jnp.zeros((*buf.shape[:2], capacity, *buf.shape[3:]), buf.dtype)
    out = jax.lax.dynamic_update_slice_in_dim(out, to_memory_kind(buf, "device"), 0, axis=2)
    return to_memory_kind(out, memory_kind)


# Not donated: the grown buffer has another shape, so it cannot reuse the old one's memory; the old one is freed
# when the caller drops it, so the copy costs one layer's buffer at a time.
_grow = jax.jit(_grow_impl, static_argnames=("capacity", "memory_kind"))


def _buffer_sharding(model: Model, ndim: int, memory_kind: str):
    """Where a session buffer of ndim dimensions lives: the first device, or split on its KV heads over the
    model's mesh, in memory_kind."""
    return sharding(memory_kind) if model.mesh is None else kv_sharding(model.mesh, ndim, memory_kind)


def _placed_buffer(values: np.ndarray, capacity: int, where):
    """A buffer [B, K, capacity, ...] holding values [B, K, n, ...] in its first n positions, placed at `where`
    (a sharding)."""
    n = values.shape[2]
    buf = np.zeros((*values.shape[:2], capacity, *values.shape[3:]), values.dtype)
    buf[:, :, :n] = values
    return jax.device_put(buf, where)


# ---------------------------------------------------------------------- the session


class Session:
    """One conversation's KV cache (batch 1), kept between calls.

        s = momjax.Session(model, policy="mom")
        s.feed(document_ids)                          # prefill once
        mark = s.length
        out = s.generate(question_ids, 64)            # == momjax.generate(model, [document + question], 64)
        s.rewind(mark)                                # back to just after the document
        s.save("doc.session"); s2 = momjax.Session.load(model, "doc.session")

    Results equal `momjax.generate` on the concatenated tokens (the same greedy tokens), for every policy.
    Not with dynamic NTK rope scaling once the session is longer than max_position_embeddings: its frequencies
    depend on the length, and each feed (the answer's too) computes its tokens' K/V at the length where the
    feed ends and keeps them, as transformers does over its KV cache; one prefill of all the tokens computes
    every K/V at the final length. `generate` on an empty session still equals `momjax.generate`.
    Errors (SessionError, an InputError) leave the session as it was.
    """

    def __init__(self, model: Model, policy="mom", capacity: int = 0):
        """capacity: room to allocate now, in tokens (rounded up to a length bucket); the buffers grow anyway
        when a feed needs more, but each new capacity compiles the feed and decode programs again, so pass
        the expected total (e.g. the document's length plus some questions) to compile them once."""
        check_model(model)
        self.model = model
        self.policy: MemoryPolicy = get_policy(policy)
        check_runs(model, self.policy)
        self._tokens: list[int] = []
        # mom-host: the K/V as streamed blocks in host memory (momjax.offload.HostCache), made by the first feed.
        self._host: offload.HostCache | None = None
        # Per-layer buffers [1, K, capacity, E] (int8 policy: (int8 buffer, scales [1, K, capacity]) pairs);
        # allocated by the first feed.
        self._k: tuple = ()
        self._v: tuple = ()
        self.info: dict = {}  # the caller's notes (JSON-serializable), saved with the session (e.g. chat messages)
        self.last_feed_compile_s = 0.0  # seconds the last feed spent compiling its programs (0 once compiled)
        self._feed_programs: dict = {}  # (width, capacity) -> the feed's compiled programs (generation.compile_feed)
        if isinstance(capacity, bool) or not isinstance(capacity, (int, np.integer)) or capacity < 0:
            raise SessionError(f"capacity must be a number of tokens >= 0, got {capacity!r}")
        if capacity:
            self._reserve(int(capacity))

    # ------------------------------------------------------------------ state

    @property
    def length(self) -> int:
        """Tokens in the cache."""
        return len(self._tokens)

    @property
    def tokens(self) -> list[int]:
        """The token ids in the cache (a copy)."""
        return list(self._tokens)

    @property
    def capacity(self) -> int:
        """Positions the buffers have room for (grows as needed; mom-host's blocks grow with each feed)."""
        if self.policy.on_host:
            return self._host.capacity if self._host else 0
        return jax.tree.leaves(self._k[0])[0].shape[2] if self._k else 0

    @property
    def memory_kind(self) -> str:
        """Where the cache lives between calls: "device" or "pinned_host" (the policy's kv_prefill)."""
        return self.policy.kv_prefill

    @property
    def buffer_memory_kind(self) -> str | None:
        """Where the cache's buffers really are, read from the arrays themselves (None before the first feed)."""
        if self.policy.on_host:
            return self._host.memory_kind if self._host and self._host.spans else None
        return jax.tree.leaves(self._k[0])[0].sharding.memory_kind if self._k else None

    @property
    def nbytes(self) -> int:
        """Bytes the cache's buffers hold (the whole capacity, int8 scales included), wherever they live."""
        return sum(leaf.nbytes for leaf in jax.tree.leaves((self._k, self._v))) + (self._host.nbytes if self._host
                                                                                    else 0)

    def __repr__(self) -> str:
        return f"Session(length={self.length}, capacity={self.capacity}, policy={self.policy.name!r})"

    def rewind(self, n: int) -> None:
        """Keep only the first n tokens (0 <= n <= length): e.g. go back to just after the document."""
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)):
            raise SessionError(f"rewind takes a number of tokens, got {n!r}")
        if not 0 <= n <= self.length:
            raise SessionError(f"cannot rewind to {n} tokens: the session holds {self.length}; pass 0 to "
                               f"{self.length}")
        # The K/V past n stay in the buffers: later feeds overwrite them and nothing reads them before. mom-host
        # drops the blocks past n and masks the rest of the one across it.
        del self._tokens[int(n):]
        if self._host is not None:
            self._host.rewind(int(n))

    def reset(self) -> None:
        """Forget every token (the buffers are kept for the next feed)."""
        self.rewind(0)

    # ------------------------------------------------------------------ feeding

    def _check_tokens(self, tokens, new_tokens: int = 0) -> list[int]:
        if isinstance(tokens, (np.ndarray, jax.Array)) and tokens.size == 0 or \
                isinstance(tokens, (list, tuple)) and len(tokens) == 0:
            raise SessionError("nothing to feed: pass at least one token id")
        with _as_session_errors():
            rows = checks.prompts(tokens, self.model.config.vocab_size)
        if len(rows) != 1:
            raise SessionError(f"a Session holds one conversation: pass one list of token ids, not {len(rows)}")
        ids = rows[0]
        with _as_session_errors():
            checks.context(self.model.max_context, self.length + len(ids), new_tokens,
                           what=f"the session ({self.length} tokens) + {len(ids)} new tokens")
        # A feed never needs more memory than a one-shot prefill of all the tokens (tests/test_session.py):
        # refuse what that prefill could not do.
        check_fits(self.model.config, self.length + len(ids), new_tokens, self.policy, self.model.dtype,
                   devices=tp_degree(self.model.mesh), weights=self.model.weights)
        return ids

    def feed(self, tokens, on_layer=None) -> jax.Array:
        """Extend the cache with tokens (a list of ids or a [n] / [1, n] array); returns the float32 logits [V]
        that follow the last of them. on_layer(i) is called after layer i (0-based) has finished."""
        checks.callback(on_layer)
        ids = self._check_tokens(tokens)
        return self._feed(ids, on_layer)[0]

    def _feed(self, ids: list[int], on_layer=None) -> jax.Array:
        cfg, n, offset = self.model.config, len(ids), self.length
        if self.policy.on_host:  # chunk by chunk over blocks in host memory; programs compile as they are first run
            compiled = offload.compile_seconds()
            logits, self._host = offload.feed(self.model.params, ids, self._host, cfg, self.policy, on_layer)
            self.last_feed_compile_s = offload.compile_seconds() - compiled
            self._tokens.extend(ids)
            return logits
        width = G.bucket_length(n, self.policy)
        # Room for the real tokens only (their padding may be dropped at the end): the capacity is then the
        # length bucket a one-shot prefill of all the tokens would use, never more.
        self._reserve(offset + n)
        tokens = np.zeros((1, width), np.int32)  # right padding: causally invisible to the real tokens
        tokens[0, :n] = ids
        tokens = inputs_on(self.model.mesh, tokens)
        with in_mesh(self.model.mesh):
            # Compiled ahead, so the time spent compiling is known; kept per shape (a feed's width and the buffers'
            # capacity), so a later feed of the same shapes neither compiles nor lowers them again.
            t0 = time.perf_counter()
            key = (width, self.capacity)
            if key not in self._feed_programs:
                self._feed_programs[key] = G.compile_feed(self.model.params, tokens, self._k[0], self._v[0], cfg,
                                                          self.policy)
            programs = self._feed_programs[key]
            self.last_feed_compile_s = time.perf_counter() - t0
            logits, self._k, self._v = G.feed_fn(self.model.params, tokens, self._k, self._v, offset, n, cfg,
                                                 self.policy, on_layer=on_layer, compiled=programs)
        self._tokens.extend(ids)
        return logits

    def _reserve(self, needed: int) -> None:
        """Make room for `needed` positions: allocate, or grow to the next bucket one layer at a time (mom-host's
        blocks are added by each feed: nothing to reserve)."""
        if needed <= self.capacity or self.policy.on_host:
            return
        cfg, kind = self.model.config, self.memory_kind
        capacity = G.bucket_length(needed, self.policy)
        if not self._k:
            shape = (1, cfg.num_kv_heads, capacity, cfg.head_dim)
            where = lambda shape, kind: _buffer_sharding(self.model, len(shape), kind)
            zeros = lambda shape, dtype: jax.device_put(jnp.zeros(shape, dtype, device=where(shape, "device")),
                                                        where(shape, kind))
            if self.policy.quantized_kv:
                buffer = lambda: (zeros(shape, jnp.int8), zeros(shape[:3], jnp.float32))
            else:
                buffer = lambda: zeros(shape, self.model.dtype)
            self._k = tuple(buffer() for _ in range(cfg.num_layers))
            self._v = tuple(buffer() for _ in range(cfg.num_layers))
            return
        ks, vs = list(self._k), list(self._v)
        grow = lambda buf: jax.tree.map(lambda b: _grow(b, capacity=capacity, memory_kind=kind), buf)
        with in_mesh(self.model.mesh):
            for i in range(cfg.num_layers):  # one layer at a time: never two copies of the whole cache
                ks[i] = grow(ks[i])
                vs[i] = grow(vs[i])
        self._k, self._v = tuple(ks), tuple(vs)

    def decode_cache(self) -> KVCache:
        """The cache as decoding reads it: the buffers, with the keys past `length` masked, placed as the policy
        says for decoding (mom: a device copy; the session's own buffers stay where they are). mom-host: its
        HostCache, whose blocks decoding streams."""
        if self.policy.on_host:
            return self._host
        scales = {}
        if self.policy.quantized_kv:
            (k, k_scale), (v, v_scale) = zip(*self._k), zip(*self._v)
            scales = dict(k_scale=tuple(k_scale), v_scale=tuple(v_scale))
        else:
            k, v = self._k, self._v
        cache = KVCache(k=tuple(k), v=tuple(v), start=jnp.zeros((1,), jnp.int32), tail_k=(), tail_v=(),
                        length=jnp.zeros((), jnp.int32), end=jnp.int32(self.length), **scales)
        return place_for_decode(cache, self.policy)

    # ------------------------------------------------------------------ generating

    def generate(self, tokens, max_new_tokens: int, temperature: float = 0.0, top_k: int | None = None,
                 top_p: float | None = None, seed: int = 0, stop_tokens=None, on_layer=None) -> Generation:
        """Feed tokens, generate up to max_new_tokens, and keep the answer in the cache (up to and including a
        stop token) so the next call continues the conversation. Returns what `momjax.generate` returns, with
        tokens [1, max_new_tokens]; time_to_first_token_s is the feed and the first token, prompt_tokens the
        tokens fed.
        Sampling is exactly momjax.generate's: the same seed gives the same tokens."""
        stats = {}
        chunks = list(self._answer(tokens, max_new_tokens, temperature, top_k, top_p, seed, stop_tokens, on_layer,
                                   stats, streamed=False))
        sampling = stats["sampling"]
        out, lengths = collect(chunks, int(max_new_tokens), sampling.pad_id, sampling.stop_ids)
        return Generation(tokens=out, lengths=lengths, pad_id=sampling.pad_id, prompt_tokens=stats["fed"],
                          time_to_first_token_s=stats["time_to_first_token_s"], decode_s=stats["decode_s"],
                          policy=self.policy.name)

    def stream(self, tokens, max_new_tokens: int, temperature: float = 0.0, top_k: int | None = None,
               top_p: float | None = None, seed: int = 0, stop_tokens=None, stats: dict | None = None):
        """As `generate`, but yields lists of new token ids as they are decoded (the same tokens, in chunks that
        grow until one takes about a quarter of a second). The answer is fed into the cache when the generator
        finishes; one closed early keeps what was yielded. stats, if given, receives fed (tokens fed),
        time_to_first_token_s (feed and first token, compilation included), feed_compile_s, decode_s (compilation
        excluded), decode_compile_s and new_tokens."""
        answer = self._answer(tokens, max_new_tokens, temperature, top_k, top_p, seed, stop_tokens, None,
                              stats if stats is not None else {}, streamed=True)
        try:
            for chunk in answer:
                yield chunk[0].tolist()
        finally:  # closed early: the answer is fed now, while the caller waits, not whenever Python collects it
            answer.close()

    def _answer(self, tokens, max_new_tokens, temperature, top_k, top_p, seed, stop_tokens, on_layer, stats: dict,
                streamed: bool):
        """The one path of generate and stream: check, feed, decode (chunks [1, n]), then feed the answer."""
        cfg = self.model.config
        with _as_session_errors():
            max_new_tokens = checks.new_tokens(max_new_tokens)
            checks.callback(on_layer)
            ids = self._check_tokens(tokens, max_new_tokens)
            sampling = checks.sampling(cfg.vocab_size, cfg.eos_token_ids, temperature, top_k, top_p, seed,
                                       stop_tokens)
        stats.update(sampling=sampling, fed=len(ids))
        t0 = time.perf_counter()
        logits = self._feed(ids, on_layer)
        logits.block_until_ready()
        stats["feed_compile_s"] = self.last_feed_compile_s
        decoding = DecodeStats()
        answer = []
        chunks = iterate_in(self.model.mesh, decode_stream(self.model.params, self.decode_cache(), logits, sampling,
                                                           cfg, self.policy, max_new_tokens, stats=decoding,
                                                           streamed=streamed))
        try:
            for chunk in chunks:
                if not answer:
                    stats["time_to_first_token_s"] = time.perf_counter() - t0
                stats.update(decode_s=decoding.decode_s, decode_compile_s=decoding.decode_compile_s,
                             new_tokens=decoding.new_tokens)
                row = chunk[0].tolist()
                if sampling.stop_ids:  # keep the answer up to and including its stop token
                    stop = next((i for i, t in enumerate(row) if t in sampling.stop_ids), None)
                    row = row if stop is None else row[: stop + 1]
                answer.extend(row)
                yield chunk
        finally:
            chunks.close()  # decoding ends here, before the answer is fed
            if answer:
                self._feed(answer)  # the answer's K/V, as a prefill of it would compute them

    # ------------------------------------------------------------------ files

    def save(self, path: str) -> None:
        """Write the session to a safetensors file at path, atomically (momjax.session_file): an interrupted save
        never leaves a half-written session file."""
        n, cfg = self.length, self.model.config
        tensors = {"tokens": np.asarray(self._tokens, np.int32)}
        parts = session_file.layer_tensors(cfg.num_kv_heads, cfg.head_dim, self.model.dtype, self.policy.quantized_kv,
                                           n)
        for i in range(cfg.num_layers):
            for name, pieces in self._layer_pieces(i, n).items():
                for j, (suffix, shape, dtype) in enumerate(parts):
                    valid = np.asarray(jax.device_get(pieces[j]))[:, :, :n] if pieces else np.zeros(shape, dtype)
                    tensors[f"{name}{suffix}.{i}"] = np.ascontiguousarray(valid)
        session_file.write(path, tensors, self.policy, session_file.fingerprint(self.model), self.info)

    def _layer_pieces(self, i: int, n: int) -> dict:
        """Layer i's K and V as the file stores them: {"k": (values[, scales]), "v": (...)}, each [1, K, >= n, ...]
        with the first n positions valid (() before the first feed)."""
        if self.policy.on_host:
            arrays = self._host.layer_arrays(i, n) if n else ()  # (k, v[, k_scale, v_scale])
            return {"k": arrays[0::2], "v": arrays[1::2]}
        pieces = lambda bufs: (bufs[i] if self.policy.quantized_kv else (bufs[i],)) if bufs else ()
        return {"k": pieces(self._k), "v": pieces(self._v)}

    @classmethod
    def load(cls, model: Model, path: str, policy=None, capacity: int = 0) -> Session:
        """A session read from a file written by `save`, for the same model (config, dtype and weights).
        policy: None for the saved one; any other gives the same results (it only moves the cache).
        capacity: room to allocate, as in `Session` (at least the saved tokens)."""
        header = session_file.read_header(path)
        where = f"session file {path}"
        session = cls(model, header.policy if policy is None else policy)
        if session.policy.kv_dtype != header.policy.kv_dtype:
            raise SessionError(f"{where} holds a K/V cache with kv_dtype={header.policy.kv_dtype!r}; load it with a "
                               f"policy of the same kv_dtype (policy=None keeps the saved one), not "
                               f"{session.policy.kv_dtype!r}")
        if isinstance(capacity, bool) or not isinstance(capacity, (int, np.integer)) or capacity < 0:
            raise SessionError(f"capacity must be a number of tokens >= 0, got {capacity!r}")
        current = session_file.fingerprint(model)
        if header.model != current:
            raise SessionError(f"{where} was saved from {session_file.describe_difference(header.model, current)}; a "
                               "session can only be loaded into the model that wrote it")
        cfg, n = model.config, header.length
        parts = session_file.layer_tensors(cfg.num_kv_heads, cfg.head_dim, model.dtype, session.policy.quantized_kv, n)
        expected = {"tokens": ((n,), np.dtype(np.int32))}
        for i in range(cfg.num_layers):
            for suffix, shape, dtype in parts:
                expected[f"k{suffix}.{i}"] = expected[f"v{suffix}.{i}"] = (shape, dtype)
        if header.tensors != expected:
            wrong = sorted(k for k in set(header.tensors) | set(expected) if header.tensors.get(k) != expected.get(k))
            raise SessionError(f"{where} does not hold this model's cache layout (tensors {', '.join(wrong[:4])} "
                               "missing or misshapen); save the session again")
        if n > model.max_context:
            raise SessionError(f"{where} holds {n} tokens, more than model.max_context = {model.max_context}")
        # One tensor at a time (the checksum is built as they are read), so loading holds the session's
        # buffers and one layer's K or V, not a second copy of the whole cache.
        room, kind = G.bucket_length(max(n, int(capacity), 1), session.policy), session.memory_kind
        on_host = session.policy.on_host
        if on_host:  # mom-host: blocks as a feed of the n tokens would cut them
            block, heads = offload.layout(cfg, session.policy, M.chunk_length(room, session.policy),
                                          tp_degree(model.mesh))
        buffers = {}
        for name, t in session_file.read_tensors(header, expected):
            if name == "tokens":
                ids = t.tolist()
            elif n and on_host:
                buffers[name] = offload.cut_positions(t, n, block, heads, _buffer_sharding(model, t.ndim, kind))
            elif n:
                buffers[name] = _placed_buffer(t, room, _buffer_sharding(model, t.ndim, kind))
        if any(not 0 <= t < cfg.vocab_size for t in ids):
            raise SessionError(f"{where} holds token ids outside the vocabulary")
        if n and on_host:
            session._host = offload.session_cache(buffers, n, block, heads, cfg.num_layers,
                                                  session.policy.quantized_kv)
        elif n:
            pair = session.policy.quantized_kv
            layer = lambda name, i: (buffers[f"{name}.{i}"], buffers[f"{name}_scale.{i}"]) if pair else \
                buffers[f"{name}.{i}"]
            session._k = tuple(layer("k", i) for i in range(cfg.num_layers))
            session._v = tuple(layer("v", i) for i in range(cfg.num_layers))
        elif capacity:
            session._reserve(int(capacity))
        session._tokens = ids
        session.info = dict(header.info)
        return session
