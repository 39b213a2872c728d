"""GGUF checkpoints (llama.cpp, Ollama, LM Studio): config, weights and tokenizer from one .gguf file.

- `gguf/file.py`: the header (metadata, tensor table) parsed with bounds checks, the ggml types read.
- `gguf/config.py`: metadata -> `Config` (architectures llama and qwen2), refusing what it does not handle.
- `gguf/tensors.py`: the tensors dequantized and streamed as momjax's flat leaves, q/k rows un-permuted.
- `gguf/fetch.py`: `fetch_smollm2`, a real trained model downloaded once (not imported here: it sits above
  the converter).

`momjax.load`, `momjax.load_tokenizer` (momjax.tokenizer builds it from the metadata), `momjax convert` and
the command line's `--model` take a .gguf file through these.
"""

from momjax.gguf.config import config_from_gguf, read_config
from momjax.gguf.file import GGUFFile, TensorInfo, is_gguf, read_gguf
from momjax.gguf.tensors import stream_gguf_leaves

__all__ = ["GGUFFile", "TensorInfo", "config_from_gguf", "is_gguf", "read_config", "read_gguf", "stream_gguf_leaves"]
