"""momjax: Hugging Face Llama, Qwen2 and Mistral checkpoints as pure JAX functions, with MOM memory policies
that make very long prompts fit on one accelerator."""

from momjax.api import Generation, InputError, Model, forward, generate, load, prefill
from momjax.cache import KVCache
from momjax.config import POLICIES, PRESETS, Config, ConfigError, MemoryPolicy, get_policy, preset

__all__ = [
    "Config", "ConfigError", "Generation", "InputError", "KVCache", "MemoryPolicy", "Model", "POLICIES", "PRESETS",
    "forward", "generate", "get_policy", "load", "prefill", "preset",
]
__version__ = "0.1.0"
