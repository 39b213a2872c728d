"""momjax: Hugging Face Llama, Qwen2 and Mistral checkpoints as pure JAX functions, with MOM memory policies
that make very long prompts fit on one accelerator, or on several split tensor-parallel on a JAX mesh."""

from momjax import no_gpu as _no_gpu

_no_gpu.prepare()  # before jax is first imported: quiet on machines with the CUDA plugin and no GPU

from momjax.api import Generation, forward, generate, prefill
from momjax.cache import KVCache
from momjax.config import PRESETS, Config, preset
from momjax.errors import (
    CheckpointError,
    ConfigError,
    InputError,
    MomjaxError,
    SessionError,
    TargetError,
    TokenizerError,
)
from momjax.loading import Model, load
from momjax.memory import estimate, memory_report, plan
from momjax.mesh import distributed_init, make_mesh
from momjax.policy import POLICIES, MemoryPolicy, get_policy
from momjax.session import Session
from momjax.targets import TARGETS
from momjax.tokenizer import Tokenizer, load_tokenizer

__all__ = [
    "POLICIES",
    "PRESETS",
    "TARGETS",
    "CheckpointError",
    "Config",
    "ConfigError",
    "Generation",
    "InputError",
    "KVCache",
    "MemoryPolicy",
    "Model",
    "MomjaxError",
    "Session",
    "SessionError",
    "TargetError",
    "Tokenizer",
    "TokenizerError",
    "distributed_init",
    "estimate",
    "forward",
    "generate",
    "get_policy",
    "load",
    "load_tokenizer",
    "make_mesh",
    "memory_report",
    "plan",
    "prefill",
    "preset",
]
__version__ = "0.1.0"
