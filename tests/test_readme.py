"""README's promises: its Python example runs as written, and CI runs its install commands verbatim."""

from __future__ import annotations

import os
import re

import readme_example

import momjax

CI_SCRIPT = os.path.join(readme_example.ROOT, ".ci", "run")


def test_python_example_runs_from_text_to_text(tmp_path, capsys):
    folder = readme_example.demo_checkpoint(str(tmp_path))
    ns = readme_example.run(folder)
    out = capsys.readouterr().out
    tokenizer, generation = ns["tokenizer"], ns["out"]
    assert isinstance(tokenizer, momjax.Tokenizer) and isinstance(generation, momjax.Generation)
    new_tokens = generation.as_lists()[0]
    assert 1 <= len(new_tokens) <= 64
    assert ns["prompt_ids"] == tokenizer.encode_chat("Explain in two sentences what a KV cache is.")
    # It printed the decoded text of the generated tokens, then the timings.
    assert out.startswith(tokenizer.decode(new_tokens) + "\n")
    assert ns["logits"].shape == (1, len(ns["prompt_ids"]), ns["model"].config.vocab_size)
    assert ns["last_logits"].shape == (1, ns["model"].config.vocab_size)


def test_ci_runs_readme_commands_verbatim():
    with open(readme_example.README, encoding="utf-8") as f:
        readme = f.read()
    with open(CI_SCRIPT, encoding="utf-8") as f:
        ci = f.read()
    commands = re.findall(r"^```bash\n(.*?)\n```", readme_example.section(readme, "Getting started"),
                          re.MULTILINE | re.DOTALL)
    install = next(c for c in commands if c.endswith("momjax demo"))
    tests = next(c for c in commands if c.endswith("pytest -q tests"))
    assert install.startswith("python3 -m venv .venv") and "pip install -e . " in install
    assert "torch==2.13.0" in tests and "pytest" in tests
    for command in (install, tests):
        assert command in ci.splitlines(), f"README's command is not run verbatim by .ci/run: {command}"
    notebooks = readme_example.section(readme, "Notebooks")
    assert 'pip install -e ".[notebooks]"' in notebooks and 'pip install -e ".[notebooks]"' in ci.splitlines()
