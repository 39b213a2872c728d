"""Tensor parallelism on a JAX device mesh: which axis of each weight and of the KV cache is split over the
mesh's "tp" axis, and the checks that say which degrees a model supports.

momjax builds no scheduler and no transport of its own. Weights and caches are placed with `NamedSharding`s
(this module says which), and the same jitted programs that run on one device are partitioned by XLA's SPMD
partitioner from those input shardings. The split is Megatron's: q/k/v and gate/up on their output heads or
features, o and down on their input, so each layer needs two all-reduces of the residual stream (after the
o projection and after the MLP) and nothing else; the KV cache is split on its KV-head axis, wherever it
lives (the device, or each device's own pinned host memory), so each device reads and streams only its
heads' keys and values.

The embedding and LM head are split on the vocabulary when it divides evenly (else the LM head on its hidden
axis and the embedding kept whole on every device); the MLP on the intermediate axis when it divides, else whole. Heads must divide:
a degree that divides neither the query heads nor the KV heads is refused with the degrees that work.
A "dp" axis (data-parallel batches) may be named but must have size 1 for now: batches are not split.
"""

from __future__ import annotations

import contextlib

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from momjax.config import Config
from momjax.errors import InputError

TP = "tp"

# Which axis of each stored leaf (per layer: without the leading L) is split over "tp". None: replicated.
# "vocab" leaves fall back to the hidden axis, and "ffn" leaves to replication, when the size does not divide.
_SPLIT = {
    # [V, D] on the vocabulary, else whole: split on the hidden axis, the gathered rows would leave the residual
    # stream split too, and every norm would then need collectives of its own.
    "embed": ("vocab", 0, None),
    "lm_head": ("vocab", 1, 0),  # [D, V]
    "wq": ("heads", 1),  # [D, H, E]
    "wk": ("heads", 1),  # [D, K, E]
    "wv": ("heads", 1),
    "wo": ("heads", 0),  # [H, E, D]
    "bq": ("heads", 0),  # [H, E]
    "bk": ("heads", 0),  # [K, E]
    "bv": ("heads", 0),
    "w_gate": ("ffn", 1),  # [D, F]
    "w_up": ("ffn", 1),
    "w_down": ("ffn", 0),  # [F, D]
}


def distributed_init(coordinator: str | None = None, num_processes: int | None = None, process_id: int | None = None,
                     local_device_ids=None) -> None:
    """Join this process to a multi-process JAX run (jax.distributed.initialize) before anything touches a
    device; afterwards jax.devices() (and so make_mesh) spans every process's devices, and each process loads
    and places only its own devices' pieces of each weight.

    coordinator "HOST:PORT" (process 0 listens there), num_processes, process_id: as jax.distributed.initialize
    takes them; None lets jax read them from the environment (e.g. JAX_COORDINATOR_ADDRESS, or a cluster
    manager such as SLURM). On CPUs the collectives between processes go over gloo.
    """
    if coordinator is not None and (not isinstance(coordinator, str) or coordinator.count(":") != 1
                                    or not coordinator.rsplit(":", 1)[1].isdigit()):
        raise InputError(f"coordinator must be 'HOST:PORT' (e.g. '10.0.0.1:1234'), got {coordinator!r}")
    for name, n, low in (("num_processes", num_processes, 1), ("process_id", process_id, 0)):
        if n is not None and (isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < low):
            raise InputError(f"{name} must be an integer >= {low}, got {n!r}")
    if num_processes is not None and process_id is not None and process_id >= num_processes:
        raise InputError(f"process_id {process_id} is out of range for {num_processes} processes (0 to "
                         f"{num_processes - 1})")
    if jax.config.jax_cpu_collectives_implementation in (None, "", "none"):
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    try:
        jax.distributed.initialize(coordinator, num_processes, process_id, local_device_ids=local_device_ids)
    except RuntimeError as e:
        raise InputError(f"cannot join the distributed run: {e}. Call momjax.distributed_init before anything else "
                         "uses JAX (loading a model, listing devices), once per process") from None


def make_mesh(tp: int = 1, dp: int = 1, devices=None) -> Mesh:
    """A mesh of dp x tp devices with axes ("dp", "tp"), from the visible devices (all processes' devices
    after momjax.distributed_init) or the given ones, in their order: tensor-parallel groups are neighbours.
    load() accepts dp = 1 only for now (batches are not split over devices)."""
    for name, n in (("tp", tp), ("dp", dp)):
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
            raise InputError(f"{name} must be a positive number of devices, got {n!r}")
    devices = list(jax.devices() if devices is None else devices)
    if tp * dp > len(devices):
        raise InputError(f"a mesh of tp={tp} x dp={dp} needs {tp * dp} devices; {len(devices)} are visible "
                         f"({devices[0].platform}). On a CPU, XLA_FLAGS=--xla_force_host_platform_device_count=N "
                         "before jax starts gives N virtual devices")
    return Mesh(np.array(devices[: tp * dp]).reshape(dp, tp), ("dp", TP))


def tp_degree(mesh: Mesh | None) -> int:
    return 1 if mesh is None else int(mesh.shape[TP])


def working_degrees(cfg: Config) -> list[int]:
    """Tensor-parallel degrees this model supports: those dividing both its query and its KV heads."""
    return [n for n in range(1, cfg.num_heads + 1) if cfg.num_heads % n == 0 and cfg.num_kv_heads % n == 0]


def check_degree(cfg: Config, tp: int) -> None:
    """Refuse a tensor-parallel degree this model cannot be split over, saying which degrees work."""
    if tp not in working_degrees(cfg):
        raise InputError(
            f"a tensor-parallel degree of {tp} does not divide this model's {cfg.num_heads} query heads and "
            f"{cfg.num_kv_heads} KV heads (each device holds whole heads; KV heads are not replicated); degrees "
            f"that work: {', '.join(map(str, working_degrees(cfg)))}")


def check_mesh(mesh, cfg: Config) -> None:
    """Refuse a mesh this model cannot be split over, saying which degrees work."""
    if not isinstance(mesh, Mesh):
        raise InputError(f"mesh must be a jax.sharding.Mesh (momjax.make_mesh(tp=N)), got {type(mesh).__name__}")
    if TP not in mesh.axis_names:
        raise InputError(f"the mesh has axes {tuple(mesh.axis_names)} but no {TP!r} axis; build it with "
                         "momjax.make_mesh(tp=N) or name its tensor-parallel axis 'tp'")
    extra = [a for a in mesh.axis_names if a not in (TP, "dp")]
    if extra:
        raise InputError(f"mesh axes {extra} are not used by momjax; name them 'tp' (tensor parallel) and 'dp'")
    if "dp" in mesh.axis_names and mesh.shape["dp"] > 1:
        raise InputError(f"a 'dp' axis of {mesh.shape['dp']} devices (data-parallel batches) is not supported yet: "
                         "momjax splits a model tensor-parallel only; build the mesh with make_mesh(tp=N) (dp=1), "
                         "or run one process per replica")
    check_degree(cfg, tp_degree(mesh))


def leaf_spec(name: str, shape: tuple[int, ...], tp: int) -> P:
    """The PartitionSpec of one weight (flat name as params.param_shapes gives it, "layers." prefix and leading
    layer axis removed; shape likewise), for a tensor-parallel degree tp."""
    rule = _SPLIT.get(name)
    spec = [None] * len(shape)
    if rule is None or tp == 1:
        return P(*spec)
    kind, axis, *fallback = rule
    if shape[axis] % tp == 0:
        spec[axis] = TP
    elif kind == "vocab" and fallback[0] is not None and shape[fallback[0]] % tp == 0:
        spec[fallback[0]] = TP
    elif kind == "heads":
        raise InputError(f"{name} {shape}: {shape[axis]} heads do not split over {tp} devices")
    return P(*spec)


def leaf_sharding(mesh: Mesh, name: str, shape: tuple[int, ...], memory_kind: str = "device") -> NamedSharding:
    return NamedSharding(mesh, leaf_spec(name, shape, tp_degree(mesh)), memory_kind=memory_kind)


def kv_sharding(mesh: Mesh, ndim: int = 4, memory_kind: str = "device", axis: int = 1) -> NamedSharding:
    """A cache array [B, K, T, E] (or an int8 cache's scales [B, K, T]) split on its KV-head axis; `axis` names
    another axis for arrays whose heads are elsewhere (mom-host's query tiles [Nq, B, K, rows, E])."""
    spec = [None] * ndim
    spec[axis] = TP
    return NamedSharding(mesh, P(*spec), memory_kind=memory_kind)


def replicated(mesh: Mesh, memory_kind: str = "device") -> NamedSharding:
    return NamedSharding(mesh, P(), memory_kind=memory_kind)


def inputs_on(mesh: Mesh | None, x):
    """A host input (token ids, offsets) as programs of a model on `mesh` take it: whole on every device of the
    mesh (on the default device without one)."""
    return jax.numpy.asarray(x) if mesh is None else jax.device_put(x, replicated(mesh))


def shard_bytes(leaf) -> int:
    """Bytes of one device's piece of an array or ShapeDtypeStruct (all of it unless split over a mesh)."""
    s = getattr(leaf, "sharding", None)
    shape = s.shard_shape(leaf.shape) if isinstance(s, NamedSharding) else leaf.shape
    return int(np.prod(shape)) * jax.numpy.dtype(leaf.dtype).itemsize


def place_leaf(x: np.ndarray, sharding: NamedSharding) -> jax.Array:
    """A host array placed as sharding says, each device given only its own piece (never a whole copy on one
    device first); in several processes each process places its own devices' pieces."""
    return jax.make_array_from_callback(x.shape, sharding, lambda index: np.ascontiguousarray(x[index]))


# ---------------------------------------------------------------------- running programs on a mesh


def in_mesh(mesh: Mesh | None):
    """The context that programs of a model on `mesh` are traced and run in (nothing for one device): inside it
    `replicate` pins the residual stream whole on every device, so each layer costs exactly its two all-reduces."""
    return jax.set_mesh(mesh) if mesh is not None else contextlib.nullcontext()


def iterate_in(mesh: Mesh | None, items):
    """Iterate a generator with each of its steps run in `in_mesh(mesh)` (a `with` around a generator's yields
    would leak the mesh into the caller between steps)."""
    items = iter(items)
    try:
        while True:
            with in_mesh(mesh):
                try:
                    item = next(items)
                except StopIteration:
                    return
            yield item
    finally:  # closed early: close the generator inside too (its own cleanup runs now, in the mesh)
        if hasattr(items, "close"):
            with in_mesh(mesh):
                items.close()


def tensor_parallel() -> bool:
    """Whether the program being traced runs tensor-parallel (inside `in_mesh` of a mesh with tp > 1)."""
    mesh = jax.sharding.get_abstract_mesh()
    return not mesh.empty and TP in mesh.axis_names and mesh.shape[TP] > 1


def traced_degree() -> int:
    """The tensor-parallel degree of the mesh programs are being traced and run in (`in_mesh`): 1 outside one."""
    return int(jax.sharding.get_abstract_mesh().shape[TP]) if tensor_parallel() else 1


def replicate(x):
    """x held whole on every device of the mesh being traced for (unchanged on one device)."""
    return jax.lax.with_sharding_constraint(x, P()) if tensor_parallel() else x


def split_hidden(x):
    """x [..., D] split on its hidden axis over the mesh being traced for (unchanged on one device; whole on every
    device when D does not divide): how mom-host keeps the residual stream in host memory, one copy across the
    devices' host memory rather than one each. Slicing the whole residual costs no communication; bringing it back
    whole (`replicate`) costs one all-gather."""
    if not tensor_parallel():
        return x
    if x.shape[-1] % traced_degree():
        return replicate(x)
    return jax.lax.with_sharding_constraint(x, P(*([None] * (x.ndim - 1)), TP))


def embed_lookup(embed, tokens):
    """embed[tokens] (embed [V, D], tokens of any shape). Split over a mesh on its vocabulary, each device looks
    up the tokens among its own rows (zeros for the others') and one all-reduce sums them: the SPMD partitioner
    left alone may gather the whole table onto every device instead (XLA's GPU compiler does, every step)."""
    mesh = jax.sharding.get_abstract_mesh()
    V = embed.shape[0]
    if not tensor_parallel() or V % mesh.shape[TP]:
        return replicate(embed[tokens])

    def local(rows, ids):
        first = jax.lax.axis_index(TP) * rows.shape[0]
        here = (ids >= first) & (ids < first + rows.shape[0])
        found = rows[jax.numpy.where(here, ids - first, 0)]
        return jax.lax.psum(jax.numpy.where(here[..., None], found, jax.numpy.zeros_like(found)), TP)

    return jax.shard_map(local, mesh=mesh, in_specs=(P(TP, None), P()), out_specs=P(), axis_names={TP})(embed, tokens)
