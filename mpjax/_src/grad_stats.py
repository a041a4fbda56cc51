"""Underflow and headroom statistics of gradients at a given loss scale.

`grad_stats` answers "how much of each layer's gradient does float16 lose at
this scale, and how far is it from overflowing?": per leaf, per layer and in
total, the share of nonzero gradient entries that become zero or subnormal
when the *scaled* gradient is cast to the low dtype, the share that overflow,
the largest |g|, and the headroom in powers of two to the dtype's maximum.
Everything is `jnp` (jittable, no host sync); `periodic_grad_stats` computes it
every N steps under `lax.cond`; `grad_stats_summary` turns a result into
plain Python numbers for logging.
"""

import math
import numbers
from typing import Any, Dict, NamedTuple

import chex
import flax.struct
import jax
import jax.numpy as jnp

from mpjax._src import attribution


class TensorStats(NamedTuple):
  """Statistics of one gradient tensor (or a sum over several).

  Attributes:
    size: int32 [], entries.
    nonzero: int32 [], finite nonzero entries of the (unscaled) gradient.
    underflow: int32 [], of those, entries whose scaled value cast to the
      dtype is zero or subnormal (below the dtype's smallest normal).
    overflow: int32 [], of those, entries whose scaled value cast to the dtype
      is not finite.
    nonfinite: int32 [], entries of the gradient already inf or NaN.
    max_abs: float32 [], the largest |g| over finite entries of the unscaled
      gradient (0 when there is none).
    headroom_log2: float32 [], ``log2(dtype max / (max_abs * scale))``: how
      many doublings the scale (or the gradient) can take before the largest
      entry overflows; negative when it already does, +inf for an all-zero
      gradient.
  """
  size: chex.Array
  nonzero: chex.Array
  underflow: chex.Array
  overflow: chex.Array
  nonfinite: chex.Array
  max_abs: chex.Array
  headroom_log2: chex.Array

  @property
  def underflow_fraction(self) -> chex.Array:
    """float32 []: underflow / nonzero (0 when no entry is nonzero)."""
    return _fraction(self.underflow, self.nonzero)

  @property
  def overflow_fraction(self) -> chex.Array:
    """float32 []: overflow / nonzero (0 when no entry is nonzero)."""
    return _fraction(self.overflow, self.nonzero)


def _fraction(part: chex.Array, whole: chex.Array) -> chex.Array:
  return (part.astype(jnp.float32)
          / jnp.maximum(whole, 1).astype(jnp.float32))


class GradStats(flax.struct.PyTreeNode):
  """The result of `grad_stats`: a pytree of arrays (jit outputs it as is).

  Attributes:
    leaves: a tree shaped like the gradients with a `TensorStats` per leaf.
    layers: ``{layer name: TensorStats}``, summed over each layer's leaves; a
      layer is the first `layer_depth` components of a leaf's path
      (``"Dense_1"`` for ``Dense_1/kernel`` with the default depth 1).
    total: `TensorStats` over every leaf.
    loss_scale: float32 [], the scale the statistics assume.
    computed: bool [], False where `periodic_grad_stats` skipped this step
      (every count is then 0).
    dtype: the low dtype's name, e.g. ``"float16"`` (static).
  """
  leaves: Any
  layers: Dict[str, TensorStats]
  total: TensorStats
  loss_scale: chex.Array
  computed: chex.Array
  dtype: str = flax.struct.field(pytree_node=False, default="float16")


def _check_dtype(dtype) -> jnp.dtype:
  try:
    dtype = jnp.dtype(dtype)
  except TypeError as e:
    raise TypeError(f"grad_stats: dtype must be a floating dtype such as "
                    f"jnp.float16 or jnp.bfloat16, got {dtype!r}.") from e
  if not jnp.issubdtype(dtype, jnp.floating):
    raise TypeError(f"grad_stats: dtype must be a floating dtype such as "
                    f"jnp.float16 or jnp.bfloat16, got {dtype}.")
  return dtype


def _check_depth(layer_depth) -> int:
  if isinstance(layer_depth, bool) or not isinstance(layer_depth,
                                                     numbers.Integral):
    raise TypeError(f"grad_stats: layer_depth must be an int, got "
                    f"{layer_depth!r}.")
  if layer_depth < 1:
    raise ValueError(f"grad_stats: layer_depth must be >= 1, got {layer_depth}.")
  return int(layer_depth)


def _tensor_stats(g: chex.Array, scale: chex.Array,
                  dtype: jnp.dtype) -> TensorStats:
  info = jnp.finfo(dtype)
  g = jnp.asarray(g)
  g = g.astype(jnp.promote_types(g.dtype, jnp.float32))
  finite = jnp.isfinite(g)
  nonzero = jnp.logical_and(finite, g != 0)
  cast = (g * scale.astype(g.dtype)).astype(dtype)
  # Compare in float32: the dtype's smallest normal is a float32 normal too.
  cast_abs = jnp.abs(cast.astype(jnp.float32))
  underflow = jnp.logical_and(nonzero,
                              cast_abs < jnp.float32(info.smallest_normal))
  overflow = jnp.logical_and(nonzero, jnp.logical_not(jnp.isfinite(cast_abs)))
  count = lambda mask: jnp.sum(mask, dtype=jnp.int32)
  max_abs = jnp.max(jnp.where(finite, jnp.abs(g), 0), initial=0).astype(
      jnp.float32)
  return TensorStats(
      size=jnp.asarray(g.size, jnp.int32), nonzero=count(nonzero),
      underflow=count(underflow), overflow=count(overflow),
      nonfinite=count(jnp.logical_not(finite)), max_abs=max_abs,
      headroom_log2=_headroom(max_abs, scale, dtype))


def _headroom(max_abs: chex.Array, scale: chex.Array,
              dtype: jnp.dtype) -> chex.Array:
  # A sum of logs: max_abs * scale may itself overflow float32.
  log2_max = jnp.float32(math.log2(float(jnp.finfo(dtype).max)))
  return (log2_max - jnp.log2(max_abs) - jnp.log2(scale)).astype(jnp.float32)


def _combine(stats, scale: chex.Array, dtype: jnp.dtype) -> TensorStats:
  if not stats:
    zero = jnp.zeros([], jnp.int32)
    max_abs = jnp.zeros([], jnp.float32)
    return TensorStats(zero, zero, zero, zero, zero, max_abs,
                       _headroom(max_abs, scale, dtype))
  total = lambda field: sum(getattr(s, field) for s in stats)
  max_abs = jnp.max(jnp.stack([s.max_abs for s in stats]))
  return TensorStats(
      size=total("size"), nonzero=total("nonzero"),
      underflow=total("underflow"), overflow=total("overflow"),
      nonfinite=total("nonfinite"), max_abs=max_abs,
      headroom_log2=_headroom(max_abs, scale, dtype))


def grad_stats(grads: chex.ArrayTree, loss_scale: chex.Numeric,
               dtype=jnp.float16, *, layer_depth: int = 1) -> GradStats:
  """Per-leaf and per-layer underflow, overflow and headroom of `grads`.

  For every floating leaf ``g`` of the *unscaled* gradients it computes
  ``cast = (g * loss_scale).astype(dtype)`` (the product in float32) and
  counts, among the finite nonzero entries of ``g``, those where ``cast`` is
  zero or subnormal (lost to underflow, or about to be) and those where it is
  inf (overflow). Zero entries of ``g`` are not counted: they lose nothing.
  Non-floating leaves get all-zero counts.

  These are the share of each parameter's gradient that the low dtype at this
  scale cannot carry, which is what to watch when choosing a scale or
  deciding that a layer needs float32. Entries already flushed to zero inside
  a float16 backward pass arrive as exact zeros and cannot be told apart from
  true zeros, so they are not counted: on gradients from a float16 step the
  underflow fraction is a lower bound.

  Cost: a few fused elementwise passes and reductions per leaf, about an
  optimizer update's worth; jit it or use `periodic_grad_stats`.

  Args:
    grads: a tree of gradients (any floating dtypes; float16/bfloat16 leaves
      are upcast to float32 first).
    loss_scale: float32 scalar, e.g. ``metrics["loss_scale"]`` or
      ``mpjax.current_loss_scale(opt_state)``.
    dtype: the low dtype to test against (static): ``jnp.float16``,
      ``jnp.bfloat16`` or any floating dtype with a `jnp.finfo`.
    layer_depth: how many leading path components name a layer (static;
      1 gives ``Dense_1`` for ``Dense_1/kernel``).

  Returns:
    A `GradStats`; ``stats.layers["Dense_1"].underflow_fraction`` and so on.
    `grad_stats_summary` turns it into plain numbers.

  Examples:
    >>> import jax.numpy as jnp
    >>> grads = {"Dense_0": {"kernel": jnp.array([1e-9, 1e-3, 0.0, 1.0])}}
    >>> stats = grad_stats(grads, 1024.0)
    >>> layer = stats.layers["Dense_0"]
    >>> int(layer.nonzero), int(layer.underflow), float(layer.underflow_fraction)
    (3, 1, 0.3333333432674408)
    >>> round(float(layer.headroom_log2), 2)  # log2(65504 / 1024)
    6.0
  """
  dtype = _check_dtype(dtype)
  layer_depth = _check_depth(layer_depth)
  scale = jnp.asarray(loss_scale, jnp.float32)
  if scale.shape != ():
    raise ValueError(
        f"grad_stats: loss_scale must be a scalar, got shape {scale.shape}.")

  def leaf_stats(g):
    g = jnp.asarray(g)
    if not jnp.issubdtype(g.dtype, jnp.floating):
      return _combine([], scale, dtype)
    return _tensor_stats(g, scale, dtype)

  leaves = jax.tree.map(leaf_stats, grads)
  is_stats = lambda x: isinstance(x, TensorStats)
  by_layer: Dict[str, list] = {}
  for path, stats in jax.tree_util.tree_leaves_with_path(leaves,
                                                         is_leaf=is_stats):
    name = attribution.path_str(path[:layer_depth])
    by_layer.setdefault(name, []).append(stats)
  layers = {name: _combine(s, scale, dtype) for name, s in by_layer.items()}
  total = _combine(list(layers.values()), scale, dtype)
  return GradStats(leaves=leaves, layers=layers, total=total,
                   loss_scale=scale, computed=jnp.array(True),
                   dtype=dtype.name)


def periodic_grad_stats(grads: chex.ArrayTree, loss_scale: chex.Numeric,
                        step: chex.Numeric, every: int, dtype=jnp.float16, *,
                        layer_depth: int = 1) -> GradStats:
  """`grad_stats` on steps where ``step % every == 0``; zeros elsewhere.

  Meant for inside a jitted train step: the statistics cost their passes
  over the gradients only on the chosen steps (a `lax.cond`; on GPU its
  predicate is a small device-to-host read). Off steps return a `GradStats`
  with ``computed=False`` and every count 0, so that the step's outputs keep
  one structure.

  Args:
    grads, loss_scale, dtype, layer_depth: as for `grad_stats`.
    step: int scalar, e.g. ``state.step``.
    every: compute every `every` steps (static int >= 1).

  Returns:
    A `GradStats`.
  """
  if isinstance(every, bool) or not isinstance(every, numbers.Integral):
    raise TypeError(f"periodic_grad_stats: every must be an int, got {every!r}.")
  if every < 1:
    raise ValueError(f"periodic_grad_stats: every must be >= 1, got {every}.")
  compute = lambda g, s: grad_stats(g, s, dtype, layer_depth=layer_depth)

  def skip(g, s):
    shape = jax.eval_shape(compute, g, s)
    zeros = jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), shape)
    return zeros.replace(loss_scale=jnp.asarray(s, jnp.float32))

  scale = jnp.asarray(loss_scale, jnp.float32)
  return jax.lax.cond(jnp.asarray(step) % every == 0, compute, skip, grads,
                      scale)


def _tensor_summary(stats: TensorStats) -> Dict[str, Any]:
  """Host-side numbers of one (fetched) `TensorStats`."""
  denominator = max(int(stats.nonzero), 1)
  return {
      "underflow_fraction": int(stats.underflow) / denominator,
      "overflow_fraction": int(stats.overflow) / denominator,
      "max_abs": float(stats.max_abs),
      "headroom_log2": float(stats.headroom_log2),
      "nonzero": int(stats.nonzero),
      "underflow": int(stats.underflow),
      "overflow": int(stats.overflow),
      "nonfinite": int(stats.nonfinite),
      "size": int(stats.size),
  }


def grad_stats_summary(stats: GradStats, *,
                       leaves: bool = True) -> Dict[str, Any]:
  """Plain Python numbers from a `GradStats` (one host transfer), for logging.

  Args:
    stats: from `grad_stats` or `periodic_grad_stats`.
    leaves: include the per-leaf entries (keyed by ``"Dense_1/kernel"``).

  Returns:
    ``{"dtype", "loss_scale", "computed", "total": {...}, "layers": {name:
    {...}}, "leaves": {path: {...}}}``, each ``{...}`` holding
    ``underflow_fraction``, ``overflow_fraction``, ``max_abs``,
    ``headroom_log2`` and the counts ``nonzero``, ``underflow``,
    ``overflow``, ``nonfinite``, ``size``.
  """
  if not isinstance(stats, GradStats):
    raise TypeError(f"grad_stats_summary: expected a GradStats, got "
                    f"{type(stats).__name__}.")
  stats = jax.device_get(stats)
  out = {
      "dtype": stats.dtype,
      "loss_scale": float(stats.loss_scale),
      "computed": bool(stats.computed),
      "total": _tensor_summary(stats.total),
      "layers": {name: _tensor_summary(s) for name, s in stats.layers.items()},
  }
  if leaves:
    is_stats = lambda x: isinstance(x, TensorStats)
    out["leaves"] = {
        attribution.path_str(path): _tensor_summary(s)
        for path, s in jax.tree_util.tree_leaves_with_path(
            stats.leaves, is_leaf=is_stats)}
  return out
