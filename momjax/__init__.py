"""momjax: Hugging Face Llama, Qwen2 and Mistral checkpoints as pure JAX functions, with MOM memory policies
that make very long prompts fit on one accelerator."""

from momjax import no_gpu as _no_gpu

_no_gpu.prepare()  # before jax is first imported: quiet on machines with the CUDA plugin and no GPU

from momjax.api import Generation, InputError, Model, forward, generate, load, prefill
from momjax.cache import KVCache
from momjax.config import POLICIES, PRESETS, Config, ConfigError, MemoryPolicy, get_policy, preset
from momjax.memory import estimate, memory_report, plan
from momjax.session import Session, SessionError
from momjax.targets import TARGETS, TargetError
from momjax.tokenizer import Tokenizer, TokenizerError, load_tokenizer

__all__ = [
    "POLICIES",
    "PRESETS",
    "TARGETS",
    "Config",
    "ConfigError",
    "Generation",
    "InputError",
    "KVCache",
    "MemoryPolicy",
    "Model",
    "Session",
    "SessionError",
    "TargetError",
    "Tokenizer",
    "TokenizerError",
    "estimate",
    "forward",
    "generate",
    "get_policy",
    "load",
    "load_tokenizer",
    "memory_report",
    "plan",
    "prefill",
    "preset",
]
__version__ = "0.1.0"
