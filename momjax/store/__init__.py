"""Writing and reading momjax's own folders: Orbax checkpoints (orbax.py) and safe staging (staging.py)."""
