"""GPU targets: compile momjax's programs for a GPU that is not attached (deviceless ahead-of-time compilation).

XLA's GPU compiler runs without a GPU when it is given a description of the device (a
GpuTargetConfigProto in text form: SM count, shared memory, compute capability, memory size...). The
descriptions ship in momjax/gpu_specs/ (see the README there for where each fact comes from). With
them, `memory_report(..., target="h100")` and `plan(..., target="a100-80gb")` read the buffer
assignment of the very program XLA would run on that GPU, in any dtype, on a laptop.

What such a figure is, and is not: the compiled program's buffer assignment (arguments, outputs,
temporaries), not an allocator peak measured on a live GPU. No autotuning runs, so GEMM algorithm
choices and their workspaces may differ on the real device, and cuDNN workspaces show as 0.
Arguments that live in pinned host memory cannot be declared to the deviceless compiler (the memory
kind of an abstract argument is dropped), so `compile` hands it those arguments as device arrays and
moves their bytes from the device figure to the host figure itself: see `analyse`.

Needs the CUDA plugin and ptxas: `pip install 'momjax[gpu-plan]'` (about 1.2 GB).
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.resources
import importlib.util
import re

import jax
import numpy as np

from momjax import no_gpu
from momjax.errors import TargetError
from momjax.mesh import in_mesh, shard_bytes

INSTALL_HINT = "pip install 'momjax[gpu-plan]'"
# What the GPU compiler logs when a program needs more than the target's memory: expected while `plan`
# bisects past the limit, and already visible in the report's device_bytes.
_OVER_MEMORY_LOG = re.compile(r"(hlo_rematerialization\.cc.*Can't reduce memory use below)|"
                              r"(gpu_hlo_schedule\.cc.*exceeds the base limit)")
GIB = 2**30


@dataclasses.dataclass(frozen=True)
class Target:
    """A GPU momjax can compile for without having it.

    memory_bytes: nominal device memory (the CUDA context and the allocator keep some of it, and JAX
    preallocates 75% unless XLA_PYTHON_CLIENT_MEM_FRACTION says otherwise; pass `hbm` to plan for less).
    memory_bandwidth, host_link_bandwidth: bytes/s, device memory and host <-> device per direction
    (what a decode step that reads the weights, or streams KV from the host, is bound by).
    """

    name: str
    description: str
    spec_file: str
    memory_bytes: int
    memory_bandwidth: float
    host_link: str
    host_link_bandwidth: float
    source: str
    # Between GPUs of one host, per direction per GPU: NVLink where the part has it, else the PCIe host link.
    interconnect: str = ""
    interconnect_bandwidth: float = 0.0

    @property
    def peak_flops(self) -> float:
        """Dense 16-bit tensor-core FLOP/s (`PEAK_FLOPS`), what prefill times are predicted from."""
        return PEAK_FLOPS[self.name]

    def __post_init__(self):
        if not self.interconnect_bandwidth:
            object.__setattr__(self, "interconnect", self.host_link)
            object.__setattr__(self, "interconnect_bandwidth", self.host_link_bandwidth)

    @property
    def spec_text(self) -> str:
        return importlib.resources.files("momjax").joinpath("gpu_specs", self.spec_file).read_text()


PCIE4_X16 = 16e9 * 16 * 128 / 130 / 8  # 31.5 GB/s per direction: 16 GT/s per lane, 128b/130b encoding
PCIE5_X16 = 2 * PCIE4_X16
PCIE3_X16 = 8e9 * 16 * 128 / 130 / 8

# Dense (no sparsity) 16-bit tensor-core FLOP/s with float32 accumulation, from NVIDIA's datasheets: A100 312 TFLOPS
# bf16; H100 SXM 989 (the H200 is the same GH100 die and clocks); L4 121 bf16; RTX 4090 165.2 (Ada architecture
# whitepaper, bf16 with float32 accumulate); T4 65 fp16 mixed precision (Turing has no bf16 tensor cores, so bf16
# programs there run slower than this).
PEAK_FLOPS = {"a100-80gb": 312e12, "a100-40gb": 312e12, "h100": 989e12, "h200": 989e12, "l4": 121e12,
              "rtx4090": 165.2e12, "t4": 65e12}

TARGETS: dict[str, Target] = {t.name: t for t in (
    Target("a100-80gb", "NVIDIA A100 80GB (sm_80)", "a100_80gb.txtpb", 80 * GIB, 2039e9, "PCIe 4.0 x16",
           PCIE4_X16, "openxla/xla GPU target specs (A100 80GB); NVIDIA A100 datasheet (80 GB HBM2e, 2,039 GB/s; SXM NVLink "
           "600 GB/s)", "NVLink 3 (SXM)", 300e9),
    Target("a100-40gb", "NVIDIA A100 40GB (sm_80)", "a100_40gb.txtpb", 40 * GIB, 1555e9, "PCIe 4.0 x16",
           PCIE4_X16, "the A100 80GB description with NVIDIA A100 datasheet memory (40 GB HBM2, 1,555 GB/s; SXM NVLink 600 GB/s)",
           "NVLink 3 (SXM)", 300e9),
    Target("h100", "NVIDIA H100 SXM 80GB HBM3 (sm_90a)", "h100_sxm.txtpb", 80 * GIB, 3.35e12, "PCIe 5.0 x16",
           PCIE5_X16, "openxla/xla GPU target specs (H100 SXM); NVIDIA H100 datasheet (80 GB HBM3, 3.35 TB/s; NVLink 900 GB/s)",
           "NVLink 4", 450e9),
    Target("h200", "NVIDIA H200 SXM 141GB HBM3e (sm_90a)", "h200.txtpb", 143771 * 2**20, 4.8e12, "PCIe 5.0 x16",
           PCIE5_X16, "the H100 SXM description with the H200's memory: NVIDIA H200 datasheet (141 GB HBM3e, 4.8 TB/s, "
           "PCIe Gen5 x16, NVLink 900 GB/s); 143,771 MiB as nvidia-smi reports it on the H200 machines this project ran "
           "on", "NVLink 4", 450e9),
    Target("l4", "NVIDIA L4 24GB (sm_89)", "l4.txtpb", 24 * GIB, 300e9, "PCIe 4.0 x16", PCIE4_X16,
           "NVIDIA L4 datasheet (24 GB GDDR6, 300 GB/s, 58 SMs); CUDA C++ Programming Guide (sm_89 limits)"),
    Target("rtx4090", "NVIDIA GeForce RTX 4090 24GB (sm_89)", "rtx4090.txtpb", 24 * GIB, 1008e9, "PCIe 4.0 x16",
           PCIE4_X16, "NVIDIA RTX 4090 specifications (24 GB GDDR6X, 1,008 GB/s, 128 SMs); CUDA C++ Programming Guide"),
    Target("t4", "NVIDIA T4 16GB (sm_75)", "t4.txtpb", 16 * GIB, 320e9, "PCIe 3.0 x16", PCIE3_X16,
           "NVIDIA T4 datasheet (16 GB GDDR6, 320 GB/s, 40 SMs); CUDA C++ Programming Guide (sm_75 limits)"),
)}


def names() -> list[str]:
    return list(TARGETS)


def get(target) -> Target | None:
    """A Target from its name (or the Target itself); None for None or "cpu" (this machine's compiler)."""
    if target is None or isinstance(target, Target):
        return target
    if not isinstance(target, str):
        raise TargetError(f"target must be a name such as 'h100', got {type(target).__name__}")
    key = target.strip().lower()
    if key == "cpu":
        return None
    if key not in TARGETS:
        raise TargetError(f"unknown target {target!r}; choose one of: cpu, {', '.join(TARGETS)}")
    return TARGETS[key]


# jax.devices()[0].device_kind of each GPU a target describes, as CUDA names them (the driver's product name).
# A kind matches when it contains every word of a row, case-insensitively; the first matching row wins, so
# narrower rows come first. A100 PCIe cards map to the A100 of their memory size (the same sm_80 chip and memory,
# bandwidth ~5% lower); H100 PCIe and NVL (fewer SMs, other memory) are not the SXM part h100 describes: None.
_DEVICE_KINDS = (
    (("a100", "80gb"), "a100-80gb"),
    (("a100", "40gb"), "a100-40gb"),
    (("h100", "80gb", "hbm3"), "h100"),
    (("h200", "nvl"), None),  # the H200 NVL is a PCIe card with other clocks and power: not the SXM part
    (("h200",), "h200"),
    (("rtx", "4090"), "rtx4090"),
    (("l4",), "l4"),
    (("t4",), "t4"),
)


def from_device_kind(kind: str) -> str | None:
    """The target name of a GPU from its `jax.devices()[0].device_kind` ("NVIDIA L4" -> "l4"), or None.

    None when no target describes that GPU (compile for the attached device with target=None instead).
    """
    if not isinstance(kind, str):
        return None
    words = set(re.split(r"[^a-z0-9]+", kind.lower()))
    for needed, name in _DEVICE_KINDS:
        if all(w in words for w in needed):
            return name
    return None


def source_name(target) -> str:
    """The `source` label of figures compiled for target: "xla" (this machine) or "xla-gpu:<name>"."""
    t = get(target)
    return "xla" if t is None else f"xla-gpu:{t.name}"


def check_compiler() -> None:
    """Raise TargetError naming the extra to install when the GPU compiler or ptxas is missing."""
    plugin = no_gpu.cuda_plugin()
    if plugin is None:
        raise TargetError(f"compiling for a GPU target needs JAX's CUDA plugin, which is not installed; run "
                          f"`{INSTALL_HINT}` (or leave the target out to use this machine's compiler)")
    if not any(_has_ptxas(package) for package in ("nvidia.cuda_nvcc", "nvidia.cu13")):
        raise TargetError(f"compiling for a GPU target needs ptxas (the nvidia-cuda-nvcc-cu12 package, or CUDA 13's "
                          f"nvidia-cuda-nvcc), which is not installed; run `{INSTALL_HINT}`")
    dist = "jax-cuda13-plugin" if plugin.endswith("cuda13") else "jax-cuda12-plugin"
    version, jaxlib = _version(dist), _version("jaxlib")
    if version and jaxlib and version != jaxlib:
        raise TargetError(f"{dist} {version} does not match jaxlib {jaxlib}; run `{INSTALL_HINT}` "
                          "to install the matching version")


def _has_ptxas(package: str) -> bool:
    """Whether the pip package `package` (nvidia.cuda_nvcc for CUDA 12, nvidia.cu13 for CUDA 13) is installed
    with a ptxas binary in it, as jaxlib looks for one."""
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        return False
    if spec is None:
        return False
    import os

    return any(os.path.isfile(os.path.join(folder, "bin", "ptxas")) for folder in spec.submodule_search_locations or ())


def _version(dist: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return None


@functools.cache
def topology(target, devices: int = 1):
    """The deviceless topology of `devices` GPUs of this target in one host (cached per target and count)."""
    t = get(target)
    check_compiler()
    from jax.experimental import topologies

    try:
        with no_gpu.filtered_stderr():
            return topologies.get_topology_desc(platform="cuda", topology=f"1x1x{devices}",
                                                target_config=t.spec_text)
    except NotImplementedError as e:  # the plugin did not register (JAX_PLATFORMS excludes it, or it failed)
        raise TargetError(f"the CUDA plugin is installed but did not register with jax ({e}); check that "
                          f"JAX_PLATFORMS does not exclude it, or reinstall with `{INSTALL_HINT}`") from None


def abstract_sharding(target, memory_kind: str = "device") -> jax.sharding.Sharding:
    """The sharding of an abstract argument placed in memory_kind for target.

    For a GPU target the memory kind cannot be expressed (the deviceless device has no memory spaces):
    the sharding is the device's, and a host-resident argument must be declared to `compile` by giving it
    a sharding of this machine with memory_kind="pinned_host" instead (compile moves it and counts it).
    """
    t = get(target)
    if t is None:
        return jax.sharding.SingleDeviceSharding(jax.devices()[0], memory_kind=memory_kind)
    return jax.sharding.SingleDeviceSharding(topology(t).devices[0])


def _abstract_mesh(args):
    """The AbstractMesh the abstract args are described on (momjax.memory.measure with devices > 1), or None."""
    for x in jax.tree.leaves(args):
        s = getattr(x, "sharding", None)
        if isinstance(s, jax.sharding.NamedSharding) and isinstance(s.mesh, jax.sharding.AbstractMesh):
            return s.mesh
    return None


def concrete_mesh(abstract, target=None) -> jax.sharding.Mesh:
    """The devices an abstract mesh's programs compile for: this machine's first devices, or the target's GPUs."""
    n = int(np.prod(abstract.axis_sizes))
    t = get(target)
    if t is None:
        devices = jax.devices()
        if len(devices) < n:
            raise TargetError(f"compiling for {n} devices needs {n} of this machine's; it has {len(devices)}. On a "
                              f"CPU, start Python with XLA_FLAGS=--xla_force_host_platform_device_count={n}, or give "
                              "a GPU target (compiled for that many GPUs without them)")
    else:
        devices = topology(t, n).devices
    return jax.sharding.Mesh(np.array(devices[:n]).reshape(abstract.axis_sizes), abstract.axis_names)


def _kind(leaf) -> str | None:
    sharding = getattr(leaf, "sharding", None)
    return None if sharding is None else sharding.memory_kind


def retarget(args, target, mesh=None):
    """args with every abstract leaf moved to target's device (or, described on an abstract mesh, to `mesh`, that
    mesh's concrete devices), and the per-device bytes of those that were pinned host."""
    t = get(target)
    if t is None and mesh is None:
        host = sum(shard_bytes(x) for x in jax.tree.leaves(args) if _kind(x) == "pinned_host")
        return args, host
    device = abstract_sharding(t) if mesh is None else None
    host = 0

    def move(x):
        nonlocal host
        if not isinstance(x, jax.ShapeDtypeStruct):
            return x
        if _kind(x) == "pinned_host" and t is not None:
            host += shard_bytes(x)
        where = device
        if mesh is not None:  # the same split on the concrete devices; a GPU target's keep no memory kind
            kind = x.sharding.memory_kind if t is None else None
            where = jax.sharding.NamedSharding(mesh, x.sharding.spec, memory_kind=kind)
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=where)

    moved = jax.tree.map(move, args)
    if t is None:
        host = sum(shard_bytes(x) for x in jax.tree.leaves(moved) if _kind(x) == "pinned_host")
    return moved, host


def compile(fn, *args, target=None, **static):
    """Compile a jitted function for abstract args on target (None = this machine): (compiled, analysis).

    args: pytrees of jax.ShapeDtypeStruct; leaves with memory_kind="pinned_host" are host-resident
    (on a GPU target they are given to the compiler as device arrays and counted by `analyse`).
    static: the function's static keyword arguments. analysis: see `analyse`.
    """
    t = get(target)
    abstract = _abstract_mesh(args)
    mesh = None if abstract is None else concrete_mesh(abstract, t)
    moved, host_args = retarget(args, t, mesh)
    with in_mesh(mesh):
        if t is None:
            compiled = fn.trace(*moved, **static).lower().compile()
        else:
            with no_gpu.filtered_stderr(also=_OVER_MEMORY_LOG):
                compiled = fn.trace(*moved, **static).lower().compile()
    return compiled, analyse(compiled, host_args, t)


_ALL_REDUCE = re.compile(r"= ([a-z]+[0-9]*)\[([0-9,]*)\]\{[^}]*\} all-reduce(?:-start)?\(")


def allreduce_bytes(compiled, devices: int) -> int:
    """Bytes each device sends in the compiled program's all-reduces (outside loops: one decode step), as a ring
    all-reduce sends them: 2 (n - 1) / n of each result. 0 on one device."""
    if devices == 1:
        return 0
    total = 0
    for dtype, dims in _ALL_REDUCE.findall(compiled.as_text()):
        size = int(np.prod([int(d) for d in dims.split(",") if d])) if dims else 1
        total += size * _hlo_itemsize(dtype)
    return total * 2 * (devices - 1) // devices


_SHAPE = re.compile(r"([a-z]+[0-9]*)\[([0-9,]*)\]\{([^}]*)\}")


def host_parameter_bytes(compiled) -> int:
    """Bytes of the compiled program's parameters that XLA placed in host memory (memory space S(5) in its
    entry computation layout). A decode step reads each of its arguments once, so this is what it brings
    across the host link per step. Read from this machine's compiled program: a deviceless GPU compile
    cannot be given host-resident arguments (see `analyse`)."""
    head = compiled.as_text().split("\n", 1)[0]
    m = re.search(r"entry_computation_layout=\{\((.*)\)->", head)
    if m is None:
        raise RuntimeError("cannot find the entry computation layout in the compiled program's text")
    total = 0
    for dtype, dims, layout in _SHAPE.findall(m.group(1)):
        if "S(5)" in layout:
            size = int(np.prod([int(d) for d in dims.split(",") if d])) if dims else 1
            total += size * _hlo_itemsize(dtype)
    return total


def _hlo_itemsize(name: str) -> int:
    """Bytes per element of an HLO element type: f32 -> 4, bf16 -> 2, s8 -> 1, f8e4m3fn -> 1, pred -> 1."""
    bits = re.match(r"[a-z]+?(\d+)", name)
    return 1 if bits is None else max(int(bits.group(1)) // 8, 1)


def output_avals(compiled):
    """The compiled program's outputs as ShapeDtypeStructs with their shardings (memory kinds included)."""
    return jax.tree.map(lambda o, s: jax.ShapeDtypeStruct(o.shape, o.dtype, sharding=s),
                        compiled.out_info, compiled.output_shardings)


def analyse(compiled, host_argument_bytes: int, target=None) -> dict:
    """XLA's memory analysis of compiled, split into device and host bytes the same way for every backend.

    device_bytes = arguments + outputs + temporaries - aliased bytes (donated inputs reused as outputs),
    without what lives in host memory. host_bytes = host-resident arguments and outputs; host_output_bytes =
    the outputs alone.
    On this machine's CPU compiler host-placed arguments and outputs sit inside the argument and output
    sizes and are taken out using their shardings. On a GPU target the compiler reports the outputs it
    moves to the host itself (host_output_size_in_bytes), while host-resident arguments, which it cannot
    be told about, are the `host_argument_bytes` momjax counted (host_argument_counted_bytes).
    """
    t = get(target)
    ma = compiled.memory_analysis()
    total = ma.argument_size_in_bytes + ma.output_size_in_bytes + ma.temp_size_in_bytes - ma.alias_size_in_bytes
    compiler_host = ma.host_argument_size_in_bytes + ma.host_output_size_in_bytes
    if t is None:
        host_outs = sum(shard_bytes(x) for x in jax.tree.leaves(output_avals(compiled)) if _kind(x) == "pinned_host")
        # Host outputs that are arguments passed through (a decode step returns its prompt K/V untouched; split
        # over a mesh their shardings say pinned_host) are not in the output size: they are counted once, as
        # arguments. Such outputs show as more host outputs than the program writes.
        if host_outs > ma.output_size_in_bytes - ma.alias_size_in_bytes:
            host_outs = 0
        host = host_argument_bytes + host_outs + compiler_host
        # The CPU backend reports host-placed buffers inside argument/output sizes; take them out.
        device = total - (host_argument_bytes + host_outs if ma.host_argument_size_in_bytes == 0 else 0)
        host_outs += ma.host_output_size_in_bytes
    else:
        host = host_argument_bytes + compiler_host
        device = total - host_argument_bytes
        host_outs = ma.host_output_size_in_bytes
    return dict(device_bytes=int(device), host_bytes=int(host), temp_bytes=int(ma.temp_size_in_bytes),
                argument_bytes=int(ma.argument_size_in_bytes), output_bytes=int(ma.output_size_in_bytes),
                alias_bytes=int(ma.alias_size_in_bytes), host_output_bytes=int(host_outs),
                host_argument_counted_bytes=int(host_argument_bytes if t is not None else 0),
                source=source_name(t))
