"""Sharding as data: a device mesh, logical-axis rules and `NamedSharding`s.

Model code only names *logical* axes: every parameter carries them in its
`axes` metadata (("embed", "heads", "head_dim"), ("vocab", "embed"), ...), and
the trainer names the batch axis "batch". A config maps logical names onto the
three mesh axes:

* `data`: pure data parallelism; only the batch is split over it.
* `fsdp`: the batch *and* the parameters are split over it (ZeRO-3 style: XLA
  all-gathers a layer's weights where they are used).
* `tensor`: model parallelism inside a layer (heads, MLP, vocabulary).

Mixture-of-experts weights are stacked [E, ...] under the logical axis `expert`.
By default it is not split (each expert is sharded like a dense MLP, over `embed`
and `mlp`); `EXPERT_PARALLEL_RULES` puts it on `tensor` instead, so each device
holds whole experts (E / tensor of them) and the MLP width stays whole. Any
mesh axis may be named for it (e.g. `fsdp`, then `embed` is left unsplit there).

Rules are `(logical_name, mesh_axes)` pairs, `mesh_axes` being None, one axis
or a tuple of axes. A mesh axis is used at most once per array, and a
dimension its mesh axes do not divide evenly stays replicated (tiny test
models have, e.g., 2 kv heads on a 4-way tensor axis). Parameters without
`axes` metadata (the mapper, LoRA's layer-stacked adapters, optimizer state)
are replicated: they are small.

Multi-host (a TPU pod slice, several GPU hosts, or several CPU processes in a
test) is one call before anything else touches JAX:

  maybe_initialize_distributed(coordinator_address, num_processes, process_id)

On TPU pods and SLURM/Kubernetes GPU clusters `jax.distributed.initialize()`
finds its peers by itself (`auto=True`); elsewhere pass the coordinator's
`host:port`, the process count and this process's index. On CPU the
collectives go through gloo. Afterwards `jax.devices()` lists every host's
devices, each host feeds its own slice of the batch
(`jax.make_array_from_process_local_data`) and the same jitted step runs on
all of them.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")

MeshAxes = str | tuple[str, ...] | None
Rules = tuple[tuple[str, MeshAxes], ...]

DEFAULT_RULES: Rules = (
  ("batch", ("data", "fsdp")),
  ("embed", "fsdp"),
  ("vocab", "tensor"),
  ("mlp", "tensor"),
  ("heads", "tensor"),
  ("kv_heads", "tensor"),
  ("head_dim", None),
  ("layers", None),
  ("expert", None),
)
# Experts over the tensor axis: the first dimension of the stacked expert weights takes
# `tensor`, so their `mlp` dimension (which would want it too) stays whole.
EXPERT_PARALLEL_RULES: Rules = tuple(
  (name, "tensor" if name == "expert" else axes) for name, axes in DEFAULT_RULES
)


@dataclasses.dataclass(frozen=True)
class MeshConfig:
  """Mesh shape over (data, fsdp, tensor); one entry may be -1 (all remaining devices)."""

  shape: tuple[int, int, int] = (1, -1, 1)
  rules: Rules = DEFAULT_RULES

  def __post_init__(self):
    if len(self.shape) != len(MESH_AXES):
      raise ValueError(f"mesh shape must have {len(MESH_AXES)} entries {MESH_AXES}: {self.shape}")
    for name, axes in self.rules:
      for axis in as_tuple(axes):
        if axis not in MESH_AXES:
          raise ValueError(f"rule {name!r} -> {axes!r} names unknown mesh axis {axis!r}")


def as_tuple(axes: MeshAxes) -> tuple[str, ...]:
  if axes is None:
    return ()
  return (axes,) if isinstance(axes, str) else tuple(axes)


def resolve_shape(shape: Sequence[int], num_devices: int) -> tuple[int, ...]:
  """Replaces a -1 entry by the devices left over; checks the product."""
  shape = tuple(int(s) for s in shape)
  if shape.count(-1) > 1 or any(s == 0 or s < -1 for s in shape):
    raise ValueError(f"mesh shape {shape}: entries must be positive, at most one -1")
  known = math.prod(s for s in shape if s != -1)
  if -1 in shape:
    if num_devices % known:
      raise ValueError(f"mesh shape {shape} does not divide {num_devices} devices")
    shape = tuple(num_devices // known if s == -1 else s for s in shape)
  if math.prod(shape) != num_devices:
    raise ValueError(f"mesh shape {shape} needs {math.prod(shape)} devices, have {num_devices}")
  return shape


def make_mesh(config: MeshConfig, devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A (data, fsdp, tensor) mesh over `devices` (default: every device of every host).

  In a single process, a shape without -1 that needs fewer devices than there
  are takes the first ones (e.g. a (1, 1, 1) mesh for a one-device baseline).
  """
  devices = list(jax.devices() if devices is None else devices)
  needed = math.prod(config.shape)
  if -1 not in config.shape and 0 < needed < len(devices) and jax.process_count() == 1:
    devices = devices[:needed]
  shape = resolve_shape(config.shape, len(devices))
  # Auto axes: classic GSPMD propagation from the in/out shardings of each jit.
  return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * 3, devices=devices)


def logical_to_spec(
  axes: Sequence[str | None],
  rules: Rules,
  shape: Sequence[int] | None = None,
  mesh=None,
  warn: bool = True,
) -> PartitionSpec:
  """Maps logical axis names to a `PartitionSpec`.

  Args:
    axes: one logical name (or None) per array dimension.
    rules: (logical name, mesh axes) pairs; unnamed logical axes are replicated.
    shape: the array shape; with `mesh`, dimensions that the mesh axes do not
      divide are replicated instead.
    mesh: the mesh (for the divisibility check).
    warn: log (once) each axis left replicated because it does not divide; off for
      activations, whose batch often does not divide (3 workers on 2 ways).
  """
  table = dict(rules)
  used: set[str] = set()
  spec = []
  for dim, name in enumerate(axes):
    mesh_axes = tuple(a for a in as_tuple(table.get(name)) if a not in used)
    if mesh is not None:
      mesh_axes = tuple(a for a in mesh_axes if mesh.shape[a] > 1)
    if shape is not None and mesh is not None and mesh_axes:
      ways = math.prod(mesh.shape[a] for a in mesh_axes)
      if shape[dim] % ways:
        if warn:
          _warn_replicated(name, shape[dim], mesh_axes, ways)
        mesh_axes = ()
    used.update(mesh_axes)
    spec.append(None if not mesh_axes else mesh_axes[0] if len(mesh_axes) == 1 else mesh_axes)
  return PartitionSpec(*spec)


@functools.cache
def _warn_replicated(name: str | None, size: int, mesh_axes: tuple[str, ...], ways: int) -> None:
  # Once per case: a replicated weight costs `ways` times its sharded memory.
  logging.warning(
    "logical axis %s of size %d does not divide over mesh axes %s (%d ways): replicated",
    name,
    size,
    mesh_axes,
    ways,
  )


# Logical axes of what inference and training compute, for `constrain`.
CACHE_AXES = ("batch", "kv_heads", None, "head_dim")  # k, v [B, G, S, H]: over kv heads
ACTIVATION_AXES = ("batch", None, None)  # [B, T, D]: the residual stream, D not split


def constrain(x: jax.Array, axes: Sequence[str | None], mesh: Mesh | None, rules: Rules):
  """`x` laid out by its logical `axes` on `mesh` (inside jit); `x` itself without a mesh.

  The model states its own layouts (caches over kv heads, activations over the batch)
  where GSPMD would otherwise have to infer them from the weights: a cache written by
  one jitted program and read by the next keeps the same layout, and no layer gathers
  a cache to one device. Dimensions the mesh does not divide stay replicated.
  """
  if mesh is None or mesh.size == 1:
    return x
  spec = logical_to_spec(axes, rules, np.shape(x), mesh, warn=False)
  return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


def batch_sharding(mesh: Mesh, rules: Rules, ndim: int) -> NamedSharding:
  """Leading axis over the batch mesh axes, the rest replicated."""
  return NamedSharding(mesh, logical_to_spec(("batch",) + (None,) * (ndim - 1), rules))


def tree_shardings(tree: Any, mesh: Mesh, rules: Rules) -> Any:
  """`NamedSharding`s for a pytree of arrays or `nnx.Variable`s (e.g. `Params`).

  A Variable with `axes` metadata is sharded by the rules; every other leaf is
  replicated. The result has the tree's structure (Variables keep their
  metadata and hold the sharding), so it can be a jit's in/out shardings.
  """

  def one(x):
    if isinstance(x, nnx.Variable):
      value = x.get_value()
      axes = x.get_metadata().get("axes")
      if axes is None or len(axes) != np.ndim(value):
        return x.replace(replicated(mesh))
      return x.replace(NamedSharding(mesh, logical_to_spec(axes, rules, np.shape(value), mesh)))
    return replicated(mesh)

  return jax.tree.map(one, tree, is_leaf=lambda x: isinstance(x, nnx.Variable))


def sharded_initializer(init_fn, mesh: Mesh, rules: Rules, compiler_options=None, args=()):
  """`init_fn(*args)` jitted so that its outputs are created directly in their shards.

  `jax.eval_shape` gives the shapes (no memory), `tree_shardings` the
  placement, and one jit with `out_shardings` materialises every array where
  it belongs, so no host ever holds the whole model. Call the result (no
  arguments) to initialise. `args` are static (configs, seeds): a module-level
  `init_fn` with equal args and shardings reuses jax's compiled program, where a
  fresh closure would compile again.
  """
  abstract = jax.eval_shape(functools.partial(init_fn, *args))
  shardings = tree_shardings(abstract, mesh, rules)
  static = tuple(range(len(args)))
  jitted = jax.jit(
    init_fn, static_argnums=static, out_shardings=shardings, compiler_options=compiler_options
  )
  return functools.partial(jitted, *args)


def shard_init(init_fn, mesh: Mesh, rules: Rules, compiler_options=None):
  """Runs `init_fn()` with its outputs created directly in their shards (see above)."""
  return sharded_initializer(init_fn, mesh, rules, compiler_options)()


def place_array(value, dtype, axes, mesh: Mesh, rules: Rules) -> jax.Array:
  """A host array (numpy or memory-mapped) -> a global array in its `NamedSharding`.

  Each addressable device receives only its own slice, cast to `dtype` there and
  then, so placing a tensor never makes a second full copy of it on the host,
  and each host of a multi-host mesh reads only the slices its devices hold.

  Args:
    value: an array-like of the full (global) shape, sliceable with numpy indices.
    dtype: the device dtype.
    axes: logical axis names, one per dimension (None: replicated).
    mesh, rules: the mesh and logical-axis rules.
  """
  shape = tuple(np.shape(value))
  spec = PartitionSpec() if axes is None else logical_to_spec(axes, rules, shape, mesh)
  dtype = np.dtype(dtype)

  def shard(index):
    return np.asarray(value[index], dtype=dtype)

  return jax.make_array_from_callback(shape, NamedSharding(mesh, spec), shard)


def shard_tree(tree: Any, mesh: Mesh, rules: Rules) -> Any:
  """Places an existing pytree (e.g. weights loaded on every host) by the rules."""
  return jax.device_put(tree, tree_shardings(tree, mesh, rules))


def host_local_to_global(tree: Any, mesh: Mesh, rules: Rules) -> Any:
  """This host's slice of a batch (numpy, leading axis) -> global batch-sharded arrays."""

  def one(x):
    return jax.make_array_from_process_local_data(batch_sharding(mesh, rules, np.ndim(x)), x)

  return jax.tree.map(one, tree)


def maybe_initialize_distributed(
  coordinator_address: str | None = None,
  num_processes: int | None = None,
  process_id: int | None = None,
  auto: bool = False,
) -> bool:
  """Joins a multi-process JAX run; a no-op for a single process.

  Must run before the first JAX computation of the process.

  Args:
    coordinator_address: "host:port" of process 0 (explicit setup).
    num_processes: number of processes; 0/None/1 with `auto=False` is single-process.
    process_id: this process's index in [0, num_processes).
    auto: let `jax.distributed.initialize()` detect the cluster (TPU pods,
      SLURM, Kubernetes/MPI launchers).

  Returns:
    True if this process joined a distributed run.
  """
  explicit = bool(num_processes) and num_processes > 1
  if not (auto or explicit):
    return False
  if jax.distributed.is_initialized():
    return True
  # CPU devices of different processes talk through gloo (bundled with jaxlib); the
  # setting only concerns the CPU backend, so it is harmless on TPU/GPU hosts.
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  if explicit:
    jax.distributed.initialize(coordinator_address, num_processes, process_id)
  else:
    jax.distributed.initialize()
  logging.info(
    "process %d of %d, %d local / %d global devices",
    jax.process_index(),
    jax.process_count(),
    jax.local_device_count(),
    jax.device_count(),
  )
  return True
