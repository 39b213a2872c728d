"""Tiny GGUF files written with the `gguf` package's writer, as llama.cpp's convert_hf_to_gguf.py writes them.

`write_gguf` takes a transformers model (tests/tiny.py) and writes its config as llama.cpp metadata, a small
byte-level tokenizer and chat template, and its tensors under llama.cpp's names: for the `llama`
architecture the q/k projection rows permuted as llama.cpp's LlamaModel.permute does (Qwen2 is written
unpermuted), 2-D weights quantized to the requested type (kept F16 where a row is not a whole number of
blocks, as llama.cpp falls back), 1-D tensors F32. Hooks let tests break a file on purpose.
"""

from __future__ import annotations

import math

import gguf
import numpy as np

from momjax.demo_model import byte_to_unicode

Q = gguf.GGMLQuantizationType
CHAT_TEMPLATE = ("{% for m in messages %}<|s256|>{{ m['role'] }}\n{{ m['content'] }}<|s257|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|s256|>assistant\n{% endif %}")

# Hugging Face name (after "model.layers.{i}." for per-layer ones) -> GGUF name
_LAYER_NAMES = {
    "input_layernorm.weight": "attn_norm.weight", "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight", "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.q_proj.bias": "attn_q.bias", "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.bias": "attn_v.bias", "self_attn.o_proj.weight": "attn_output.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight", "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight", "mlp.down_proj.weight": "ffn_down.weight",
}
_TOP_NAMES = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
              "lm_head.weight": "output.weight"}


def gguf_name(hf_name: str) -> str:
    if hf_name in _TOP_NAMES:
        return _TOP_NAMES[hf_name]
    _, _, i, rest = hf_name.split(".", 3)
    return f"blk.{i}.{_LAYER_NAMES[rest]}"


def permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's LlamaModel.permute: each head's rows from Hugging Face's halves to interleaved pairs."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


MERGES = ("h i", "Ġ t", "t h")  # GPT-2 spelling: Ġ is a space


def tokens_for(vocab: int) -> tuple[list[str], list[int], list[str]]:
    """Byte-level tokens (GPT-2's alphabet), control tokens <|s256|> and <|s257|>, the tokens of MERGES, then
    more control tokens <|sN|>, up to vocab; their token types; the merges that fit."""
    table = byte_to_unicode()
    tokens = [table[b] for b in range(min(256, vocab))]
    types = [int(gguf.TokenType.NORMAL)] * len(tokens)
    merges = []
    for i in range(256, vocab):
        k = i - 258
        if 0 <= k < len(MERGES):
            tokens.append(MERGES[k].replace(" ", ""))
            types.append(int(gguf.TokenType.NORMAL))
            merges.append(MERGES[k])
        else:
            tokens.append(f"<|s{i}|>")
            types.append(int(gguf.TokenType.CONTROL))
    return tokens, types, merges


def llama3_rope_factors(theta: float, head_dim: int, factor: float, low: float, high: float, old: int) -> np.ndarray:
    """What llama.cpp's converter writes as rope_freqs.weight for Llama 3's rope scaling."""
    freqs = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim))
    out = []
    for freq in freqs:
        wavelen = 2 * math.pi / float(freq)
        if wavelen < old / high:
            out.append(1.0)
        elif wavelen > old / low:
            out.append(factor)
        else:
            smooth = (old / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.asarray(out, np.float32)


def encode(array: np.ndarray, qtype) -> tuple[np.ndarray, object]:
    """(data, raw_dtype) for GGUFWriter.add_tensor: 1-D tensors F32; 2-D in qtype, F16 where rows are not
    whole blocks of qtype."""
    array = np.ascontiguousarray(array, np.float32)
    if array.ndim == 1 or qtype == Q.F32:
        return array, None
    if qtype == Q.F16 or array.shape[-1] % gguf.GGML_QUANT_SIZES[qtype][0]:
        return array.astype(np.float16), None
    return gguf.quants.quantize(array, qtype), qtype


def write_gguf(model, path: str, qtype=Q.F32, arch: str | None = None, name: str = "tiny", metadata=None,
               drop=(), tensors=None, rope_freqs=None, tokenizer: bool = True) -> str:
    """Write transformers `model` as a GGUF file the way llama.cpp's converter does; returns path.

    metadata: {key: value} added or replacing what is written ({arch}.* keys without the prefix: "arch.X");
    drop: keys not written; tensors: {gguf name: (data, raw_dtype) or None (left out)} replacing tensors;
    rope_freqs: written as rope_freqs.weight (F32).
    """
    c = model.config
    arch = arch or ("qwen2" if c.model_type == "qwen2" else "llama")
    L, D, H, K = c.num_hidden_layers, c.hidden_size, c.num_attention_heads, c.num_key_value_heads
    head_dim = getattr(c, "head_dim", None) or D // H
    values = {
        "general.name": name,
        "arch.block_count": L, "arch.context_length": c.max_position_embeddings, "arch.embedding_length": D,
        "arch.feed_forward_length": c.intermediate_size, "arch.attention.head_count": H,
        "arch.attention.head_count_kv": K, "arch.rope.freq_base": float(c.rope_parameters["rope_theta"]),
        "arch.attention.layer_norm_rms_epsilon": float(c.rms_norm_eps), "general.file_type": 0,
    }
    if arch == "llama":
        values["arch.vocab_size"] = c.vocab_size
        values["arch.rope.dimension_count"] = head_dim
    if head_dim != D // H:  # llama.cpp writes these when config.json has an explicit head_dim
        values["arch.attention.key_length"] = values["arch.attention.value_length"] = head_dim
    rope = c.rope_parameters
    if rope.get("rope_type") == "linear":
        values["arch.rope.scaling.type"] = "linear"
        values["arch.rope.scaling.factor"] = float(rope["factor"])
    if rope.get("rope_type") == "yarn":  # as convert_hf_to_gguf.py writes it (the betas only when config.json has them)
        values["arch.rope.scaling.type"] = "yarn"
        values["arch.rope.scaling.factor"] = float(rope["factor"])
        values["arch.rope.scaling.original_context_length"] = rope["original_max_position_embeddings"]
        for beta in ("beta_fast", "beta_slow"):
            if rope.get(beta) is not None:
                values[f"arch.rope.scaling.yarn_{beta}"] = float(rope[beta])
    if tokenizer:
        tokens, types, merges = tokens_for(c.vocab_size)
        eos = c.eos_token_id[0] if isinstance(c.eos_token_id, list) else c.eos_token_id
        values.update({"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "default",
                       "tokenizer.ggml.tokens": tokens, "tokenizer.ggml.token_type": types,
                       "tokenizer.ggml.bos_token_id": c.bos_token_id,
                       "tokenizer.ggml.eos_token_id": eos, "tokenizer.ggml.add_bos_token": False,
                       "tokenizer.chat_template": CHAT_TEMPLATE})
        if merges:  # llama.cpp writes the merges of a BPE vocabulary (transformers needs them or scores)
            values["tokenizer.ggml.merges"] = merges
        else:
            values["tokenizer.ggml.scores"] = [0.0] * len(tokens)
    values.update(metadata or {})
    w = gguf.GGUFWriter(path, arch)
    for key, value in values.items():
        if key in drop:
            continue
        key = key.replace("arch.", arch + ".", 1) if key.startswith("arch.") else key
        _add(w, key, value)

    out = {}
    for hf, t in model.state_dict().items():
        if hf == "lm_head.weight" and c.tie_word_embeddings:
            continue
        data = t.detach().float().numpy()
        if arch == "llama" and hf.endswith(("q_proj.weight", "k_proj.weight")):
            data = permute(data, H if "q_proj" in hf else K)
        out[gguf_name(hf)] = encode(data, qtype)
    if rope_freqs is not None:
        out["rope_freqs.weight"] = (np.asarray(rope_freqs, np.float32), None)
    for key, value in (tensors or {}).items():
        if value is None:
            out.pop(key, None)
        else:
            out[key] = value
    for key, (data, raw_dtype) in out.items():
        w.add_tensor(key, data, raw_dtype=raw_dtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _add(w, key: str, value) -> None:
    if isinstance(value, bool):
        w.add_bool(key, value)
    elif isinstance(value, int):
        w.add_uint32(key, value)
    elif isinstance(value, float):
        w.add_float32(key, value)
    elif isinstance(value, str):
        w.add_string(key, value)
    else:
        w.add_array(key, list(value))


def random_blocks(qtype, rows: int, cols: int, seed: int = 0, scale: float = 0.02) -> np.ndarray:
    """Random raw blocks [rows, bytes per row] of a quantized type, with its float16 scale fields set to small
    finite values (random bytes there could be inf or NaN)."""
    block, nbytes = gguf.GGML_QUANT_SIZES[qtype]
    rng = np.random.default_rng(seed)
    raw = rng.integers(0, 256, size=(rows, cols // block, nbytes), dtype=np.uint8)
    scales = rng.uniform(0.5, 1.0, size=(rows, cols // block, 2)).astype(np.float32) * scale
    offsets = {Q.Q2_K: (80, 82), Q.Q3_K: (108,), Q.Q4_K: (0, 2), Q.Q5_K: (0, 2), Q.Q6_K: (208,),
               Q.Q4_0: (0,), Q.Q4_1: (0, 2), Q.Q5_0: (0,), Q.Q5_1: (0, 2), Q.Q8_0: (0,)}[qtype]
    for k, off in enumerate(offsets):
        raw[..., off:off + 2] = scales[..., k:k + 1].astype(np.float16).view(np.uint8).reshape(rows, cols // block, 2)
    return raw.reshape(rows, -1)
