"""Reading Hugging Face checkpoints: config.json (config.py) and safetensors weights (tensors.py)."""
