"""GPU targets without the GPU compiler: names, package data, clear errors, host placement, quiet stderr.

The compiles themselves need `momjax[gpu-plan]` and run in the GPU tier (tests_gpu/, .ci/gpu_tier).
"""

import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest

import momjax
from momjax import memory, no_gpu, targets
from momjax.cache import to_memory_kind


def test_target_names_and_cpu():
    assert targets.get(None) is None and targets.get("cpu") is None and targets.get("CPU") is None
    assert targets.get("H100").name == "h100"
    assert {"h100", "a100-80gb"} <= set(momjax.TARGETS)
    with pytest.raises(targets.TargetError, match="a100-80gb"):
        targets.get("b200")
    assert targets.source_name(None) == "xla" and targets.source_name("a100-80gb") == "xla-gpu:a100-80gb"


@pytest.mark.parametrize("kind, name", [
    ("Tesla T4", "t4"), ("NVIDIA L4", "l4"), ("NVIDIA A100-SXM4-80GB", "a100-80gb"),
    ("NVIDIA A100 80GB PCIe", "a100-80gb"), ("NVIDIA A100-SXM4-40GB", "a100-40gb"),
    ("NVIDIA A100-PCIE-40GB", "a100-40gb"), ("NVIDIA H100 80GB HBM3", "h100"), ("NVIDIA H200", "h200"),
    ("NVIDIA GeForce RTX 4090", "rtx4090"),
    ("NVIDIA H100 PCIe", None), ("NVIDIA H200 NVL", None), ("NVIDIA L40S", None), ("NVIDIA GeForce RTX 3090", None), ("cpu", None), ("", None),
])
def test_target_from_device_kind(kind, name):
    assert targets.from_device_kind(kind) == name
    assert name is None or targets.get(name).name == name  # every answer is a real target


@pytest.mark.parametrize("name", list(targets.TARGETS))
def test_target_descriptions_ship_and_agree_with_the_table(name):
    t = targets.TARGETS[name]
    text = t.spec_text  # read from the installed package, as a user gets it
    field = lambda key: float(re.search(rf"^\s*{key}:\s*([0-9.]+)", text, re.MULTILINE).group(1))
    assert abs(field("memory_bandwidth") / t.memory_bandwidth - 1) < 0.01, name
    assert t.host_link_bandwidth > 10e9 and t.memory_bytes >= 16 * 2**30
    assert t.source


def test_missing_gpu_compiler_names_the_extra(monkeypatch):
    monkeypatch.setattr(no_gpu, "cuda_plugin", lambda: None)
    with pytest.raises(targets.TargetError, match=re.escape("momjax[gpu-plan]")):
        momjax.memory_report("llama-3.2-1b", 1024, "mom", dtype="bfloat16", target="h100")
    with pytest.raises(targets.TargetError, match=re.escape("momjax[gpu-plan]")):
        momjax.plan("llama-3.2-1b", target="l4")


def test_missing_ptxas_names_the_extra(monkeypatch):
    monkeypatch.setattr(no_gpu, "cuda_plugin", lambda: "jax_plugins.xla_cuda12")
    real = targets.importlib.util.find_spec
    monkeypatch.setattr(targets.importlib.util, "find_spec",
                        lambda name, *a: None if name in ("nvidia.cuda_nvcc", "nvidia.cu13") else real(name, *a))
    with pytest.raises(targets.TargetError, match="ptxas.*momjax\\[gpu-plan\\]"):
        targets.check_compiler()


def test_plan_needs_a_budget_or_a_target():
    with pytest.raises(ValueError, match="hbm"):
        memory.plan("llama-3.2-1b")
    with pytest.raises(targets.TargetError, match="unknown target"):
        memory.plan("llama-3.2-1b", "24GiB", target="b200")


def test_plan_command_line_errors_are_one_line():
    for extra, message in ((["--target", "b200"], "unknown target 'b200'"), ([], "give --hbm")):
        out = subprocess.run([sys.executable, "-m", "momjax.cli", "plan", "--model", "llama-3.2-1b", *extra],
                             capture_output=True, text=True, check=False)
        assert out.returncode == 2 and message in out.stderr, out.stderr
        assert len(out.stderr.strip().splitlines()) == 1 and "Traceback" not in out.stderr


def test_host_placement_by_memory_space_offloads_inside_jit():
    # The placement the model uses: a memory space, not a device, so it compiles for GPU targets too.
    f = jax.jit(lambda x: (x.sum(), to_memory_kind(x * 2, "pinned_host")))
    x = jnp.ones((64, 64), jnp.float32)
    _, y = f(x)
    assert y.sharding.memory_kind == "pinned_host"
    assert to_memory_kind(y, "device").sharding.memory_kind == "device"
    _, analysis = targets.compile(f, jax.ShapeDtypeStruct((64, 64), jnp.float32), target=None)
    assert analysis["host_bytes"] == 64 * 64 * 4 and analysis["source"] == "xla"
    with pytest.raises(ValueError, match="pinned_host"):
        to_memory_kind(x, "host")


def test_filtered_stderr_drops_only_the_noise(capfd):
    pattern = re.compile(r"compiler chatter")
    with no_gpu.filtered_stderr(also=pattern):
        os.write(2, b"W0000 compiler chatter: ignore me\nsomething the user must see\n")
    err = capfd.readouterr().err
    assert "something the user must see" in err and "chatter" not in err
