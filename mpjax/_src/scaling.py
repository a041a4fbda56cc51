"""Loss-scale configurations: `NoScaling`, `StaticScaling`, `DynamicScaling`.

A configuration is static, frozen and hashable (it can be closed over by `jit`
or used as a static argument). The evolving part, the current scale (float32
scalar) and the growth counter (int32 scalar), is plain array state that the
`loss_scaled` optax wrapper keeps in its optimizer state; `adjust` maps the old
arrays to the new ones with `jnp.where` only, so it traces once and never syncs
with the host.

jmp's own loss-scale classes are not used for the state: `DynamicLossScale`
drops `min_loss_scale` in `tree_flatten` (jmp PR #44), so the floor is lost under
`jit`, and a float16 scale breaks `lax.select` (jmp #47).
"""

import dataclasses
import math
import numbers
from typing import Tuple, Union

import jax
import jax.numpy as jnp
import numpy as np

_F32_MAX = float(np.finfo(np.float32).max)
_INT32_MAX = int(np.iinfo(np.int32).max)


def _check_real(owner: str, name: str, value) -> float:
  """Returns `value` as a float; TypeError for non-numbers, ValueError for NaN/inf."""
  if isinstance(value, bool) or not isinstance(value, numbers.Real):
    raise TypeError(
        f"{owner}: {name} must be a real number, got {value!r} of type "
        f"{type(value).__name__}.")
  value = float(value)
  if not math.isfinite(value):
    raise ValueError(f"{owner}: {name} must be finite, got {value!r}.")
  return value


def _check_scale(owner: str, name: str, value) -> float:
  value = _check_real(owner, name, value)
  if not 0.0 < value <= _F32_MAX:
    raise ValueError(
        f"{owner}: {name} must be > 0 and representable in float32 "
        f"(<= {_F32_MAX:.4g}), got {value!r}.")
  if np.float32(value) == 0.0:
    raise ValueError(
        f"{owner}: {name}={value!r} rounds to 0 in float32; use a value "
        f">= {float(np.finfo(np.float32).tiny):.4g}.")
  return value


def _as_f32(x) -> jax.Array:
  return jnp.asarray(x, dtype=jnp.float32)


@dataclasses.dataclass(frozen=True)
class NoScaling:
  """No loss scaling: the scale is always 1.

  `loss_scaled(inner, NoScaling())` still skips non-finite steps (without
  touching the inner optimizer state), which is what bfloat16 and float32
  training want from it.
  """

  def init(self) -> Tuple[jax.Array, jax.Array]:
    """Returns the initial ``(scale, growth_count)``: float32 1 and int32 0."""
    return _as_f32(1.0), jnp.zeros([], jnp.int32)

  def adjust(self, scale: jax.Array, growth_count: jax.Array,
             grads_finite: jax.Array, stepped: jax.Array = True
             ) -> Tuple[jax.Array, jax.Array]:
    """Returns the state unchanged."""
    del grads_finite, stepped
    return scale, growth_count


@dataclasses.dataclass(frozen=True)
class StaticScaling:
  """A constant loss scale.

  Attributes:
    scale: the factor the loss is multiplied by (> 0, finite in float32). Steps
      whose gradients are non-finite are skipped; the scale never changes.
  """

  scale: float

  def __post_init__(self):
    object.__setattr__(self, "scale", _check_scale("StaticScaling", "scale",
                                                   self.scale))

  def init(self) -> Tuple[jax.Array, jax.Array]:
    """Returns the initial ``(scale, growth_count)``: float32 scale, int32 0."""
    return _as_f32(self.scale), jnp.zeros([], jnp.int32)

  def adjust(self, scale: jax.Array, growth_count: jax.Array,
             grads_finite: jax.Array, stepped: jax.Array = True
             ) -> Tuple[jax.Array, jax.Array]:
    """Returns the state unchanged."""
    del grads_finite, stepped
    return scale, growth_count


@dataclasses.dataclass(frozen=True)
class DynamicScaling:
  """A loss scale that grows while gradients stay finite and backs off when not.

  The rule, per update, with ``n`` the growth counter:

  - finite gradients that complete an optimizer step: ``n += 1``; when ``n``
    reaches `growth_interval` (the growth_interval-th *consecutive* finite
    optimizer step, as in PyTorch's `GradScaler` and Keras's
    `LossScaleOptimizer`) the scale is multiplied by `growth_factor` and ``n``
    is reset to 0. A growth that would overflow float32 keeps the old scale
    (the scale is never inf).
  - finite gradients of a micro-batch that does not complete an optimizer
    step (inside an ``optax.MultiSteps`` window): nothing changes, so one
    window is computed with one scale.
  - non-finite gradients: the scale is multiplied by `backoff_factor` and
    ``n`` is reset to 0, at once (also in the middle of a window).
  - the result is clipped to ``[min_scale, max_scale]``.

  Factors are applied in float32: for factors that are not exactly
  representable in float32 (e.g. 1.1) the trajectory may differ from
  PyTorch's (which multiplies in float64) by one ulp per step.

  Attributes:
    initial_scale: the scale of the first step (float32, > 0).
    growth_interval: consecutive finite steps before a growth (int, >= 1).
    growth_factor: growth multiplier (> 1).
    backoff_factor: multiplier on a non-finite step (in (0, 1)).
    min_scale: floor of the scale. Defaults to 1, as Keras 2 and jmp: a scale
      below 1 means float16 cannot hold the gradients at all (pytorch #99640).
    max_scale: ceiling of the scale. Defaults to the float32 maximum, i.e. only
      the never-inf rule bounds it.
  """

  initial_scale: float
  growth_interval: int
  growth_factor: float = 2.0
  backoff_factor: float = 0.5
  min_scale: float = 1.0
  max_scale: float = _F32_MAX

  def __post_init__(self):
    owner = "DynamicScaling"
    check = lambda name, fn: object.__setattr__(
        self, name, fn(owner, name, getattr(self, name)))
    check("initial_scale", _check_scale)
    check("min_scale", _check_scale)
    check("max_scale", _check_scale)
    check("growth_factor", _check_real)
    check("backoff_factor", _check_real)
    interval = self.growth_interval
    if isinstance(interval, bool) or not isinstance(interval, numbers.Integral):
      raise TypeError(
          f"{owner}: growth_interval must be an int, got {interval!r} of type "
          f"{type(interval).__name__}.")
    if not 1 <= interval <= _INT32_MAX:
      raise ValueError(
          f"{owner}: growth_interval must be in [1, {_INT32_MAX}], got "
          f"{interval!r}.")
    object.__setattr__(self, "growth_interval", int(interval))
    if not self.growth_factor > 1.0:
      raise ValueError(
          f"{owner}: growth_factor must be > 1, got {self.growth_factor!r}.")
    if not 0.0 < self.backoff_factor < 1.0:
      raise ValueError(
          f"{owner}: backoff_factor must be in (0, 1), got "
          f"{self.backoff_factor!r}.")
    if not self.min_scale <= self.initial_scale <= self.max_scale:
      raise ValueError(
          f"{owner}: need min_scale <= initial_scale <= max_scale, got "
          f"min_scale={self.min_scale!r}, initial_scale={self.initial_scale!r}, "
          f"max_scale={self.max_scale!r}.")

  @classmethod
  def like_torch(cls, **overrides) -> "DynamicScaling":
    """PyTorch `GradScaler` defaults: 2**16, interval 2000, x2, x0.5.

    The scale trajectory and skip decisions equal `torch.amp.GradScaler`'s
    while the scale stays >= `min_scale` (default 1; torch has no floor). Pass
    ``min_scale=2.0**-126`` to follow torch below 1 as well.
    """
    kwargs = dict(initial_scale=2.0**16, growth_interval=2000,
                  growth_factor=2.0, backoff_factor=0.5)
    kwargs.update(overrides)
    return cls(**kwargs)

  @classmethod
  def like_keras(cls, **overrides) -> "DynamicScaling":
    """Keras 3 `LossScaleOptimizer` defaults: 2**15, interval 2000, x2, x0.5.

    Differs from Keras 3 on purpose in two places: the scale never grows to
    inf (Keras 3 does, and then stays inf) and it has a floor (default 1).
    """
    kwargs = dict(initial_scale=2.0**15, growth_interval=2000,
                  growth_factor=2.0, backoff_factor=0.5)
    kwargs.update(overrides)
    return cls(**kwargs)

  def init(self) -> Tuple[jax.Array, jax.Array]:
    """Returns the initial ``(scale, growth_count)``: float32 scale, int32 0."""
    return _as_f32(self.initial_scale), jnp.zeros([], jnp.int32)

  def adjust(self, scale: jax.Array, growth_count: jax.Array,
             grads_finite: jax.Array, stepped: jax.Array = True
             ) -> Tuple[jax.Array, jax.Array]:
    """Returns the next ``(scale, growth_count)``.

    Args:
      scale: float32 scalar, the scale used for this step.
      growth_count: int32 scalar, consecutive finite optimizer steps before
        this one since the scale last changed.
      grads_finite: bool scalar, whether this step's gradients were finite.
      stepped: bool scalar, whether this update completed an optimizer step
        (False for a micro-batch inside a gradient-accumulation window); only
        completed steps count towards growth.

    Returns:
      The float32 scale and int32 counter for the next step.
    """
    # The counter stays below growth_interval, so only a completed step can
    # reach it: `grow` needs no `stepped` of its own.
    count = growth_count + jnp.asarray(stepped).astype(jnp.int32)
    grow = jnp.logical_and(grads_finite, count >= self.growth_interval)
    grown = scale * jnp.float32(self.growth_factor)
    grown = jnp.where(jnp.isfinite(grown), grown, scale)
    backed_off = scale * jnp.float32(self.backoff_factor)
    new_scale = jnp.where(grads_finite, jnp.where(grow, grown, scale),
                          backed_off)
    new_scale = jnp.clip(new_scale, jnp.float32(self.min_scale),
                         jnp.float32(self.max_scale))
    keep_counting = jnp.logical_and(grads_finite, jnp.logical_not(grow))
    new_count = jnp.where(keep_counting, count, 0).astype(jnp.int32)
    return new_scale.astype(jnp.float32), new_count


LossScaling = Union[NoScaling, StaticScaling, DynamicScaling]
