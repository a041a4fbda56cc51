"""FP8 recipes and their state: saturating casts, delayed and current scaling.

An fp8 matmul quantizes each operand ``x`` to an 8-bit float as
``saturate(x * (1 / scale))`` (in float32) and multiplies the result of the
matmul by the product of the two operands' scales. ``scale`` is a
*dequantization* scale (TE's ``scale_inv``, flax's ``scale``): the value one
fp8 unit stands for, ``amax / fp8_max`` for a tensor whose largest magnitude
is ``amax``.

Formats (`FORMATS`): ``"e4m3"`` is ``float8_e4m3fn`` (max 448, no inf: a
plain cast of 1000 gives NaN), ``"e5m2"`` is ``float8_e5m2`` (max 57344; a
plain cast of 1e6 gives inf). `saturating_cast` clips to the format's max
first, as Transformer Engine does, so an overflow gives the max, never
NaN/inf (a NaN input stays NaN).

Recipes (frozen, validated, hashable configs; `mpjax.PolicyMap` entries):

- `DelayedScaling` (Transformer Engine's default recipe): each operand has an
  amax history of ``history_length`` float32 values (newest first) and a
  float32 scale. At every use the scale is recomputed from the history
  *before* this step's amax joins it, ``scale = a * (2**margin /
  fp8_max)`` (the constant rounded to float32 once) with
  ``a = max(history)`` (``"max"``) or ``history[0]`` (``"most_recent"``);
  a zero or non-finite ``a`` keeps the previous scale. Then this step's ``amax(|x|)`` is pushed in front and the oldest value
  dropped. A non-finite amax (an overflowed gradient of a step that will be
  skipped) is not recorded: the history and the scale stay as they were.
- `CurrentScaling` (just-in-time): the scale is ``amax / fp8_max`` of the
  tensor itself (``amax == 0`` or non-finite: 1), per tensor or per row
  (one scale per index of the dimensions the matmul does not contract). No
  state.

Both use ``format="hybrid"`` by default (TE's ``Format.HYBRID``): e4m3 for
the forward operands (inputs and kernels), e5m2 for the output gradients in
the backward pass; ``format="e4m3"`` uses e4m3 for all three.
"""

import dataclasses
from typing import Any, Dict, Tuple, Union

import jax
import jax.numpy as jnp
import numpy as np

from mpjax._src import model_state as model_state_lib

#: The collection (linen) / model-state entry fp8 state lives in: flax's own
#: name, so flax ``fp8_ops`` layers train through `mpjax.make_train_step` too.
OVERWRITE_WITH_GRADIENT = model_state_lib.OVERWRITE_WITH_GRADIENT

FORMATS: Dict[str, Any] = {"e4m3": jnp.float8_e4m3fn,
                           "e5m2": jnp.float8_e5m2}
# recipe format -> (forward operands' dtype, output gradients' dtype)
_RECIPE_FORMATS = {"hybrid": ("e4m3", "e5m2"), "e4m3": ("e4m3", "e4m3")}
_REDUCTIONS = ("max", "most_recent")
_GRANULARITIES = ("tensor", "row")

#: The three operands of an fp8 matmul, in flax's variable names.
OPERANDS = ("input", "kernel", "output_grad")


def fp8_dtype(fmt: Union[str, Any]) -> Any:
  """The dtype of an fp8 format name (``"e4m3"``, ``"e5m2"``) or dtype.

  Raises:
    ValueError: anything else, naming it and the known formats.
  """
  if isinstance(fmt, str) and fmt in FORMATS:
    return FORMATS[fmt]
  try:
    dtype = jnp.dtype(fmt)
  except TypeError:
    dtype = None
  if dtype is not None and dtype in {jnp.dtype(d) for d in FORMATS.values()}:
    return dtype.type
  raise ValueError(f"unknown fp8 format {fmt!r}; known: {sorted(FORMATS)} "
                   "(float8_e4m3fn, float8_e5m2).")


def fp8_max(dtype: Any) -> float:
  """The largest finite value of an fp8 dtype (448.0 for e4m3fn)."""
  return float(jnp.finfo(fp8_dtype(dtype)).max)


def saturating_cast(x: jax.Array, dtype: Any,
                    scale: Any = None) -> jax.Array:
  """``x * (1 / scale)`` in float32, clipped to the format's range, to fp8.

  Args:
    x: a floating array (any dtype; computed in float32).
    dtype: ``"e4m3"``, ``"e5m2"`` or the fp8 dtype.
    scale: the dequantization scale, broadcastable to `x` (None: 1).

  Returns:
    `x` quantized (one rounding, float32 to fp8, round to nearest even);
    values beyond the format's max become its max, NaN stays NaN.

  Examples:
    >>> import jax.numpy as jnp
    >>> saturating_cast(jnp.array([1000.0, -1e6]), "e4m3")
    Array([448, -448], dtype=float8_e4m3fn)
  """
  dtype = fp8_dtype(dtype)
  x = jnp.asarray(x).astype(jnp.float32)
  if scale is not None:
    # XLA rewrites x / broadcast(s) as x * broadcast(1 / s): say so.
    x = x * (1.0 / jnp.asarray(scale, jnp.float32))
  limit = fp8_max(dtype)
  return jnp.clip(x, -limit, limit).astype(dtype)


def format_dtypes(name: str, fmt: Any) -> Tuple[Any, Any]:
  """(forward dtype, output-gradient dtype) of recipe format `fmt`
  (``"hybrid"`` or ``"e4m3"``); a ValueError naming `name` otherwise."""
  if fmt not in _RECIPE_FORMATS:
    raise ValueError(f"{name}: unknown format {fmt!r}; known: "
                     f"{sorted(_RECIPE_FORMATS)} ('hybrid': e4m3 forward, "
                     "e5m2 gradients).")
  fwd, bwd = _RECIPE_FORMATS[fmt]
  return FORMATS[fwd], FORMATS[bwd]


def _check_format(name: str, fmt: Any) -> None:
  format_dtypes(name, fmt)


class _Formats:
  """What the recipes share: their formats, and no state unless they say."""

  format: str

  @property
  def dtypes(self) -> Tuple[Any, Any]:
    """(dtype of the forward operands, dtype of the output gradients)."""
    return format_dtypes(type(self).__name__, self.format)

  def init_state(self) -> Dict[str, jax.Array]:
    """The recipe's state: ``{}`` (current scaling and MXFP8 keep none)."""
    return {}


@dataclasses.dataclass(frozen=True)
class DelayedScaling(_Formats):
  """Delayed scaling from an amax history (Transformer Engine's recipe).

  Attributes:
    history_length: amax values kept per operand (>= 1; TE's default 1024).
    margin: the scale is ``2**margin`` times larger than needed (int >= 0).
    amax_reduction: ``"max"`` over the history or ``"most_recent"``.
    format: ``"hybrid"`` (e4m3 forward, e5m2 gradients) or ``"e4m3"``.

  Examples:
    >>> DelayedScaling(history_length=16).dtypes[0]
    <class 'jax.numpy.float8_e4m3fn'>
  """
  history_length: int = 1024
  margin: int = 0
  amax_reduction: str = "max"
  format: str = "hybrid"

  def __post_init__(self):
    h = self.history_length
    if isinstance(h, bool) or not isinstance(h, int) or h < 1:
      raise ValueError("DelayedScaling: history_length must be an int >= 1, "
                       f"got {h!r}.")
    m = self.margin
    if isinstance(m, bool) or not isinstance(m, int) or m < 0:
      raise ValueError("DelayedScaling: margin must be an int >= 0, got "
                       f"{m!r}.")
    if self.amax_reduction not in _REDUCTIONS:
      raise ValueError(
          f"DelayedScaling: unknown amax_reduction {self.amax_reduction!r}; "
          f"known: {list(_REDUCTIONS)}.")
    _check_format("DelayedScaling", self.format)

  def init_state(self) -> Dict[str, jax.Array]:
    """A fresh state of one fp8 matmul: scales 1, histories 0 (float32).

    Keys are flax's variable names: ``input_scale`` [1],
    ``input_amax_history`` [history_length], and the same for ``kernel``
    and ``output_grad``.
    """
    state = {}
    for op in OPERANDS:
      state[f"{op}_amax_history"] = jnp.zeros((self.history_length,),
                                              jnp.float32)
      state[f"{op}_scale"] = jnp.ones((1,), jnp.float32)
    return state

  def scale_from_history(self, history: jax.Array, scale: jax.Array,
                         dtype: Any) -> jax.Array:
    """The scale this step uses, from the history before this step's amax."""
    if self.amax_reduction == "max":
      amax = jnp.max(history, axis=0)
    else:
      amax = history[0]
    # A product with a float32 constant: XLA turns a division by a constant
    # into one anyway, so this is what eager, jit and NumPy all compute.
    new = amax * np.float32(2.0 ** self.margin / fp8_max(dtype))
    return jnp.where((amax > 0.0) & jnp.isfinite(amax), new,
                     scale).astype(jnp.float32)

  def push(self, history: jax.Array, amax: jax.Array) -> jax.Array:
    """`history` with `amax` in front and the oldest value dropped.

    A non-finite `amax` is not recorded (`history` is returned as is).
    """
    amax = jnp.asarray(amax, jnp.float32).reshape(())
    pushed = jnp.concatenate([amax[None], history[:-1]])
    return jnp.where(jnp.isfinite(amax), pushed, history)

  def update(self, x: jax.Array, history: jax.Array, scale: jax.Array,
             dtype: Any) -> Tuple[jax.Array, jax.Array, jax.Array]:
    """One use of an operand: ``(q, new_scale, new_history)``.

    `q` is `x` quantized with ``new_scale`` (computed from `history`, before
    ``amax(|x|)`` joins it); ``new_history`` has ``amax(|x|)`` pushed in.
    """
    new_scale = self.scale_from_history(history, scale, dtype)
    q = saturating_cast(x, dtype, new_scale[0] if new_scale.ndim else
                        new_scale)
    new_history = self.push(history, amax_of(x))
    return q, new_scale, new_history


@dataclasses.dataclass(frozen=True)
class CurrentScaling(_Formats):
  """Current (just-in-time) scaling: each tensor's own amax sets its scale.

  Attributes:
    granularity: ``"tensor"`` (one scale per operand) or ``"row"`` (one scale
      per index of the dimensions the matmul keeps, i.e. the amax is taken
      over the contracted dimensions only; the backward pass re-quantizes
      the saved 16-bit operands along its own contracted dimensions).
    format: ``"hybrid"`` (e4m3 forward, e5m2 gradients) or ``"e4m3"``.

  Examples:
    >>> CurrentScaling(granularity="row")
    CurrentScaling(granularity='row', format='hybrid')
  """
  granularity: str = "tensor"
  format: str = "hybrid"

  def __post_init__(self):
    if self.granularity not in _GRANULARITIES:
      raise ValueError(
          f"CurrentScaling: unknown granularity {self.granularity!r}; "
          f"known: {list(_GRANULARITIES)}.")
    _check_format("CurrentScaling", self.format)

  def quantize(self, x: jax.Array, dtype: Any,
               contracting: Tuple[int, ...]) -> Tuple[jax.Array, jax.Array]:
    """``(q, scale)``: `x` quantized with its own amax.

    `scale` is float32 [] per tensor, or `x`'s shape with the `contracting`
    dimensions of size 1 per row.
    """
    axes = (tuple(range(x.ndim)) if self.granularity == "tensor"
            else tuple(contracting))
    amax = max_abs(x, axis=axes, keepdims=self.granularity == "row")
    scale = jnp.where((amax > 0.0) & jnp.isfinite(amax),
                      amax / fp8_max(dtype), 1.0).astype(jnp.float32)
    return saturating_cast(x, dtype, scale), scale


@dataclasses.dataclass(frozen=True)
class MXScaling(_Formats):
  """MXFP8 (OCP microscaling): one e8m0 power-of-two scale per 32 elements.

  A layer under it runs `mpjax.mxfp8_dot_general` (see `mpjax._src.
  mxfp8_dot`): blocks of 32 along the contracted dimensions, each block's
  own scale (no state), e4m3 data, e5m2 output gradients (``"hybrid"``).

  Attributes:
    format: ``"hybrid"`` (e4m3 forward, e5m2 gradients) or ``"e4m3"``.

  Examples:
    >>> MXScaling()
    MXScaling(format='hybrid')
  """
  format: str = "hybrid"

  def __post_init__(self):
    _check_format("MXScaling", self.format)


Recipe = Union[DelayedScaling, CurrentScaling, MXScaling]
RECIPES = (DelayedScaling, CurrentScaling, MXScaling)


def is_recipe(value: Any) -> bool:
  """Whether `value` is an fp8 recipe (`DelayedScaling`, `CurrentScaling`,
  `MXScaling`)."""
  return isinstance(value, RECIPES)


def check_recipe(value: Any, where: str = "fp8") -> Recipe:
  """`value` if it is a recipe, else a TypeError naming it."""
  if not is_recipe(value):
    raise TypeError(
        f"{where}: {value!r} (of type {type(value).__name__}) is not an fp8 "
        "recipe; expected mpjax.DelayedScaling(...), "
        "mpjax.CurrentScaling(...) or mpjax.MXScaling(...).")
  return value


def max_abs(x: jax.Array, axis: Any = None,
            keepdims: bool = False) -> jax.Array:
  """``max(|x|)`` in float32 along `axis`; inf where `x` holds a NaN.

  The NaN is made an inf before the reduction because XLA:CPU's vectorized
  max reduction drops NaN (jax 0.10.2: a NaN among 4096 or more elements
  can come out as the max of the rest), and a NaN operand must not pass
  for a finite amax.
  """
  a = jnp.abs(jnp.asarray(x).astype(jnp.float32))
  return jnp.max(jnp.where(jnp.isnan(a), jnp.inf, a), axis=axis,
                 keepdims=keepdims)


def amax_of(x: jax.Array) -> jax.Array:
  """``max(|x|)`` in float32, a scalar (a global max under SPMD); inf when
  `x` holds a NaN (`max_abs`)."""
  return max_abs(x)

