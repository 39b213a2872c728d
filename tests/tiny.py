"""Tiny random Hugging Face checkpoints, built offline with transformers, for golden tests.

Each builder writes a real checkpoint folder with `save_pretrained` (safetensors only) and returns the
folder. Shapes are small enough that a transformers forward pass takes milliseconds on CPU.
"""

from __future__ import annotations

import os

import torch
import transformers

# name -> (config class, config kwargs). MHA, GQA and MQA; Llama, Qwen2 and Mistral.
FAMILIES = {
    "llama-gqa": (
        transformers.LlamaConfig,
        dict(vocab_size=257, hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-5, rope_theta=10000.0,
             bos_token_id=1, eos_token_id=2, tie_word_embeddings=False),
    ),
    "llama31-mha": (  # Llama 3.1 style: llama3 rope scaling, several EOS ids
        transformers.LlamaConfig,
        dict(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
             num_key_value_heads=4, max_position_embeddings=1024, rms_norm_eps=1e-5, rope_theta=500000.0,
             rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                               original_max_position_embeddings=64),
             bos_token_id=1, eos_token_id=[2, 3], tie_word_embeddings=False),
    ),
    "llama-linear-mqa": (  # linear rope scaling, MQA, tied embeddings (Llama 3.2 style)
        transformers.LlamaConfig,
        dict(vocab_size=200, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=1, max_position_embeddings=512, rope_theta=10000.0,
             rope_scaling=dict(rope_type="linear", factor=2.0), bos_token_id=1, eos_token_id=2,
             tie_word_embeddings=True),
    ),
    "qwen2": (
        transformers.Qwen2Config,
        dict(vocab_size=320, hidden_size=96, intermediate_size=192, num_hidden_layers=2, num_attention_heads=6,
             num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-6, rope_theta=1000000.0,
             bos_token_id=1, eos_token_id=2, tie_word_embeddings=True),
    ),
    "mistral-window": (  # Mistral v0.1 style sliding window, shorter than the test prompts
        transformers.MistralConfig,
        dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=512, sliding_window=7, rope_theta=10000.0,
             bos_token_id=1, eos_token_id=2, tie_word_embeddings=False),
    ),
    "mistral-nemo": (  # Mistral NeMo style: explicit head_dim != hidden / heads, no window
        transformers.MistralConfig,
        dict(vocab_size=256, hidden_size=80, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, head_dim=32, max_position_embeddings=1024, sliding_window=None,
             rope_theta=1000000.0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False),
    ),
}


def build_hf_model(family: str, seed: int = 0, families: dict = FAMILIES):
    """A random transformers model of the family (a name in `families`) in float32, eval mode, eager attention."""
    cls, kwargs = families[family]
    config = cls(**kwargs)
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():  # random init leaves norms at 1 and biases at 0: perturb them so they are tested
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.add_(0.1 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.normal_(0.0, 0.1)
    return model.eval()


def save_checkpoint(model, folder: str, dtype: torch.dtype = torch.float32, max_shard_size=None) -> str:
    """save_pretrained as safetensors (optionally sharded, optionally cast) and return the folder."""
    os.makedirs(folder, exist_ok=True)
    to_save = model if dtype == torch.float32 else _cast_copy(model, dtype)
    kwargs = {"safe_serialization": True}
    if max_shard_size is not None:
        kwargs["max_shard_size"] = max_shard_size
    to_save.save_pretrained(folder, **kwargs)
    return folder


def _cast_copy(model, dtype):
    import copy

    clone = copy.deepcopy(model)
    return clone.to(dtype)


def hf_logits(model, tokens) -> torch.Tensor:
    """Float32 logits [B, S, V] of transformers' PyTorch model."""
    with torch.no_grad():
        return model(torch.as_tensor(tokens, dtype=torch.long)).logits.float()


def hf_greedy(model, prompt: list[int], max_new_tokens: int) -> list[int]:
    """transformers' greedy continuation of one prompt, never stopping early (argmax of full forwards)."""
    tokens = list(prompt)
    with torch.no_grad():
        for _ in range(max_new_tokens):
            logits = model(torch.as_tensor([tokens], dtype=torch.long)).logits[0, -1]
            tokens.append(int(logits.argmax()))
    return tokens[len(prompt):]
