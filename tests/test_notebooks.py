"""The notebooks run top to bottom on CPU, offline, and are committed without outputs.

Each notebook is executed with nbclient in a fresh python3 kernel (the ipykernel of this environment),
with MOMJAX_OFFLINE=1 so that notebook 01 uses the demo model instead of downloading one, and a fresh
MOMJAX_CACHE so that the demo checkpoint is built from scratch. All three together take well under 3 minutes.
"""

from __future__ import annotations

import os
import re

import nbformat
import pytest

NOTEBOOKS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "notebooks")
NAMES = ["01_quickstart.ipynb", "02_long_context_memory.ipynb", "03_serve.ipynb"]
TIMEOUT_S = 240  # per cell: the longest cell compiles a handful of 8B programs on a shared CPU


def read(name: str):
    return nbformat.read(os.path.join(NOTEBOOKS, name), as_version=4)


def outputs_text(nb) -> str:
    parts = []
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            parts.append(out.get("text", "") if out.get("output_type") == "stream" else
                         str(out.get("data", {}).get("text/plain", "")))
    return "\n".join(parts)


@pytest.mark.parametrize("name", NAMES)
def test_committed_notebook_has_no_outputs(name):
    nb = read(name)
    nbformat.validate(nb)
    assert nb.metadata["kernelspec"]["name"] == "python3"
    for i, cell in enumerate(nb.cells):
        if cell.cell_type == "code":
            assert cell.outputs == [], f"{name} cell {i} has outputs: strip them before committing"
            assert cell.execution_count is None, f"{name} cell {i} has an execution count: strip it"


@pytest.mark.parametrize("name", NAMES)
def test_notebook_runs_on_cpu_offline(name, tmp_path, monkeypatch):
    from nbclient import NotebookClient

    monkeypatch.setenv("MOMJAX_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("MOMJAX_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    nb = read(name)
    # The kernel starts in notebooks/, as it would in Jupyter, so relative paths into the checkout work.
    NotebookClient(nb, timeout=TIMEOUT_S, kernel_name="python3", resources={"metadata": {"path": NOTEBOOKS}}).execute()

    text = outputs_text(nb)
    assert "Traceback" not in text
    # Nothing a reader would take for an error: no warnings or notices written to a cell's stderr.
    stderr = [out.get("text", "") for cell in nb.cells for out in cell.get("outputs", []) if out.get("name") == "stderr"]
    assert stderr == [], stderr
    if name.startswith("01"):
        assert "offline fallback" in text
        assert "identical tokens across policies: True" in text
        for policy in ("baseline", "mom", "mom-stream"):
            assert re.search(rf"^{policy} .*tokens/s", text, re.MULTILINE), policy
        assert "max context" in text
    elif name.startswith("03"):
        cached = [int(n) for n in re.findall(r"prompt tokens, (\d+) of them from a kept cache", text)]
        assert len(cached) == 3 and cached[0] < 100 and min(cached[1:]) > 2000, cached
        assert "the server's last answer equals a fresh run's: True" in text and "stopped" in text
    else:
        assert "No GPU here" in text
        assert text.count("max context") == 3
        assert "XLA" in text and "estimate" in text
        # No GPU attached: the target defaults to an A100 80GB, compiled for when the gpu-plan extra is installed.
        assert "planning for NVIDIA A100 80GB" in text
        from momjax import no_gpu

        if no_gpu.cuda_plugin_installed():
            assert "XLA's GPU compiler for NVIDIA A100 80GB" in text
        else:
            assert "XLA's GPU compiler is not installed here" in text
