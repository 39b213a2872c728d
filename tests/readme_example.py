"""README's Python example, run as written on a local checkpoint (only its path is replaced).

`python tests/readme_example.py [FOLDER]` runs every ```python block of README's "Python" section, in order
and in one namespace, with README's example path replaced by FOLDER (default: the demo's Hugging Face
checkpoint, written into a temporary folder; it has a tokenizer with a chat template and needs no torch).
CI runs it in the newcomer's environment; tests/test_readme.py runs it under pytest.
"""

from __future__ import annotations

import os
import re
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(ROOT, "README.md")
EXAMPLE_PATH = "path/to/Qwen2.5-0.5B-Instruct"  # the path README's example loads


def section(text: str, title: str) -> str:
    """The text of README's `## title` section, up to the next `## ` heading."""
    match = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## )", text, re.MULTILINE | re.DOTALL)
    if match is None:
        raise ValueError(f"README.md has no '## {title}' section")
    return match.group(1)


def python_blocks(text: str) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", text, re.MULTILINE | re.DOTALL)


def example_source(folder: str) -> str:
    with open(README, encoding="utf-8") as f:
        blocks = python_blocks(section(f.read(), "Python"))
    if not blocks:
        raise ValueError("README.md's Python section has no ```python block")
    source = "\n".join(blocks)
    if f'"{EXAMPLE_PATH}"' not in source:
        raise ValueError(f"README.md's Python example no longer loads {EXAMPLE_PATH!r}: update {__file__}")
    return source.replace(f'"{EXAMPLE_PATH}"', repr(folder))


def run(folder: str) -> dict:
    """Execute the example against folder; returns its namespace."""
    namespace: dict = {"__name__": "readme_example"}
    exec(compile(example_source(folder), "README.md (Python)", "exec"), namespace)  # noqa: S102 - our own README
    return namespace


def demo_checkpoint(parent: str) -> str:
    from momjax import demo_model as demo

    return demo.write_checkpoint(os.path.join(parent, "demo-hf"))


if __name__ == "__main__":
    if len(sys.argv) > 1:
        run(sys.argv[1])
    else:
        with tempfile.TemporaryDirectory() as tmp:
            run(demo_checkpoint(tmp))
    print("README's Python example ran", file=sys.stderr)
