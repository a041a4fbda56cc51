"""Sharding plans: data-parallel and FSDP layouts of a train state on a mesh.

A `ShardingPlan` says, for a `jax.sharding.Mesh`, which mesh axes split the
batch's leading dimension and which one (if any) splits the params and the
optimizer state. `make_train_step(..., sharding=plan)` jits the step with
those `NamedSharding`s as its input and output shardings, so XLA's SPMD
partitioner inserts the collectives. Every reduction in the step is a global
one: the loss-scale decision (`jnp.all` over every gradient leaf) is made on
the whole batch, identically on every device and host, and the loss-scale
state (scalars) is replicated.
"""

import dataclasses
import math
from typing import Any, Optional, Tuple

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P


def _auto_mesh(mesh: Mesh) -> Mesh:
  """The same devices and axis names with Auto axes (GSPMD propagation).

  `jax.make_mesh` defaults to Explicit axes, under which a matmul of a
  batch-sharded activation with an FSDP-sharded kernel must be resharded by
  hand; the plans here rely on the partitioner doing that.
  """
  if all(t == AxisType.Auto for t in mesh.axis_types):
    return mesh
  return Mesh(mesh.devices, mesh.axis_names,
              axis_types=(AxisType.Auto,) * len(mesh.axis_names))


@dataclasses.dataclass(frozen=True)
class ShardingPlan:
  """How a train state and a batch are laid out on a mesh.

  Attributes:
    mesh: the device mesh (its axes are used as Auto axes).
    batch_axes: mesh axes that split the leading (batch) dimension of every
      batch leaf; the batch size must be divisible by their product.
    param_axis: the mesh axis that splits params and optimizer state (FSDP),
      or None to replicate them (data parallelism).
    min_shard_elements: leaves with fewer elements stay replicated (biases,
      norms, scalars: sharding them costs more in collectives than it saves).
  """

  mesh: Mesh
  batch_axes: Tuple[str, ...]
  param_axis: Optional[str] = None
  min_shard_elements: int = 1024

  def __post_init__(self):
    if not isinstance(self.mesh, Mesh):
      raise TypeError(f"ShardingPlan: mesh must be a jax.sharding.Mesh, got "
                      f"{self.mesh!r}.")
    object.__setattr__(self, "mesh", _auto_mesh(self.mesh))
    axes = (self.batch_axes,) if isinstance(self.batch_axes, str) else tuple(
        self.batch_axes)
    object.__setattr__(self, "batch_axes", axes)
    names = self.mesh.axis_names
    for axis in axes + ((self.param_axis,) if self.param_axis else ()):
      if axis not in names:
        raise ValueError(f"ShardingPlan: axis {axis!r} is not an axis of the "
                         f"mesh; its axes are {names}.")
    if not isinstance(self.min_shard_elements, int) or self.min_shard_elements < 1:
      raise ValueError("ShardingPlan: min_shard_elements must be an int >= 1, "
                       f"got {self.min_shard_elements!r}.")

  @property
  def replicated(self) -> NamedSharding:
    return NamedSharding(self.mesh, P())

  @property
  def batch_shards(self) -> int:
    return math.prod(self.mesh.shape[a] for a in self.batch_axes)

  def leaf_spec(self, shape: Tuple[int, ...]) -> P:
    """The partition spec of one state leaf of `shape`.

    With a `param_axis`, the largest dimension divisible by that axis's size
    is split over it (the last such dimension on ties); anything smaller than
    `min_shard_elements`, or with no divisible dimension, is replicated.
    """
    if self.param_axis is None or math.prod(shape) < self.min_shard_elements:
      return P()
    size = self.mesh.shape[self.param_axis]
    candidates = [(d, i) for i, d in enumerate(shape) if d % size == 0]
    if not candidates:
      return P()
    _, dim = max(candidates)
    spec = [None] * len(shape)
    spec[dim] = self.param_axis
    return P(*spec)

  def state_shardings(self, state: Any) -> Any:
    """A tree of `NamedSharding`s shaped like `state` (arrays or shapes)."""
    def sharding(x):
      shape = np.shape(x) if not hasattr(x, "shape") else x.shape
      return NamedSharding(self.mesh, self.leaf_spec(tuple(shape)))
    return jax.tree.map(sharding, state)

  def batch_shardings(self, batch: Any) -> Any:
    """A tree of `NamedSharding`s splitting every leaf's leading dimension."""
    def sharding(x):
      shape = np.shape(x) if not hasattr(x, "shape") else x.shape
      if not shape:
        raise ValueError("ShardingPlan: batch leaves need a leading batch "
                         f"dimension, got a scalar {x!r}.")
      if shape[0] % self.batch_shards:
        raise ValueError(
            f"ShardingPlan: batch dimension {shape[0]} is not divisible by the "
            f"{self.batch_shards} shards of mesh axes {self.batch_axes}.")
      return NamedSharding(self.mesh, P(self.batch_axes))
    return jax.tree.map(sharding, batch)

  def shard_state(self, state: Any) -> Any:
    """Places `state` on the mesh with `state_shardings`."""
    return jax.device_put(state, self.state_shardings(state))

  def shard_batch(self, batch: Any) -> Any:
    """Places a global batch (the same on every host) on the mesh."""
    return jax.device_put(batch, self.batch_shardings(batch))

  def batch_from_process_local(self, local_batch: Any) -> Any:
    """Builds the global batch from each host's own slice (multi-host input).

    Each process passes its ``global_batch / process_count`` examples; the
    result is one global array per leaf, split over `batch_axes`.
    """
    def global_array(x):
      sharding = NamedSharding(self.mesh, P(self.batch_axes))
      return jax.make_array_from_process_local_data(sharding, np.asarray(x))
    return jax.tree.map(global_array, local_batch)


def data_parallel(mesh: Mesh, batch_axis: str = "data") -> ShardingPlan:
  """Replicated params and optimizer state; the batch split over `batch_axis`."""
  return ShardingPlan(mesh=mesh, batch_axes=(batch_axis,), param_axis=None)


def fsdp(mesh: Mesh, param_axis: str = "fsdp",
         batch_axes: Optional[Tuple[str, ...]] = None,
         min_shard_elements: int = 1024) -> ShardingPlan:
  """Params and optimizer state split over `param_axis` (ZeRO-3 / FSDP style).

  The batch is split over `batch_axes`, by default every axis of the mesh
  (e.g. ``("data", "fsdp")`` on a 2x4 mesh: 8-way data parallelism with
  4-way sharded state).
  """
  axes = tuple(mesh.axis_names) if batch_axes is None else batch_axes
  return ShardingPlan(mesh=mesh, batch_axes=axes, param_axis=param_axis,
                      min_shard_elements=min_shard_elements)
