"""An fp8 ``dot_general`` with a custom VJP, for a recipe of `mpjax._src.fp8`.

`fp8_dot_general(lhs, rhs, dimension_numbers, recipe=..., state=...)` has
`jax.lax.dot_general`'s signature (so a flax layer takes it as its
``dot_general``, and ``jnp.einsum`` as its ``_dot_general``):

- forward: ``lhs`` (the input) and ``rhs`` (the kernel) are quantized to the
  recipe's forward format (e4m3) with saturation, multiplied in fp8 with
  float32 accumulation (``preferred_element_type=float32``), and the float32
  result is multiplied by the product of their scales and cast to the output
  dtype (``preferred_element_type`` if given, else the operands' result
  type);
- backward: the output gradient is quantized to the backward format (e5m2),
  and both operand gradients are fp8 matmuls of it with the saved fp8
  operands (per tensor) or with the operands re-quantized along the
  backward matmul's own contracted dimensions (current scaling per row),
  again float32-accumulated and dequantized.

With `DelayedScaling`, ``state`` is the layer's fp8 state (`DelayedScaling.
init_state`: scales and amax histories of the input, kernel and output
gradient) and the *gradient* with respect to ``state`` is its updated value
(the forward's input/kernel scales and histories, the backward's
output-gradient ones). `mpjax.make_train_step` makes that gradient the new
value of the ``"_overwrite_with_gradient"`` model state, so the update
happens inside the jitted step, and a skipped step keeps the old one. Each
state must be used by one call per differentiated function: two uses would
add their updated values.
"""

import functools
from typing import Any, Dict, Mapping, Optional, Tuple

import jax
import jax.numpy as jnp
from jax import lax

from mpjax._src import fp8 as fp8_lib

Dims = Tuple[Tuple[Tuple[int, ...], Tuple[int, ...]],
             Tuple[Tuple[int, ...], Tuple[int, ...]]]


def _normalize(dimension_numbers: Any) -> Dims:
  (lc, rc), (lb, rb) = dimension_numbers
  return ((tuple(int(d) for d in lc), tuple(int(d) for d in rc)),
          (tuple(int(d) for d in lb), tuple(int(d) for d in rb)))


def _free(ndim: int, contracting, batch) -> Tuple[int, ...]:
  return tuple(i for i in range(ndim) if i not in contracting and
               i not in batch)


def grad_lhs_dims(dims: Dims, lhs_ndim: int, rhs_ndim: int
                  ) -> Tuple[Dims, Tuple[int, ...]]:
  """``(dims, perm)`` with d lhs = ``transpose(dot_general(g, rhs, dims),
  perm)`` for an output gradient ``g``."""
  (lc, rc), (lb, rb) = dims
  lf, rf = _free(lhs_ndim, lc, lb), _free(rhs_ndim, rc, rb)
  nb = len(lb)
  g_rf = tuple(nb + len(lf) + j for j in range(len(rf)))
  new = ((g_rf, rf), (tuple(range(nb)), rb))
  order = sorted(rc)
  perm = []
  for a in range(lhs_ndim):
    if a in lb:
      perm.append(lb.index(a))
    elif a in lf:
      perm.append(nb + lf.index(a))
    else:
      perm.append(nb + len(lf) + order.index(rc[lc.index(a)]))
  return new, tuple(perm)


def grad_rhs_dims(dims: Dims, lhs_ndim: int, rhs_ndim: int
                  ) -> Tuple[Dims, Tuple[int, ...]]:
  """``(dims, perm)`` with d rhs = ``transpose(dot_general(g, lhs, dims),
  perm)`` for an output gradient ``g``."""
  (lc, rc), (lb, rb) = dims
  lf, rf = _free(lhs_ndim, lc, lb), _free(rhs_ndim, rc, rb)
  nb = len(lb)
  g_lf = tuple(nb + j for j in range(len(lf)))
  new = ((g_lf, lf), (tuple(range(nb)), lb))
  order = sorted(lc)
  perm = []
  for a in range(rhs_ndim):
    if a in rb:
      perm.append(rb.index(a))
    elif a in rf:
      perm.append(nb + rf.index(a))
    else:
      perm.append(nb + len(rf) + order.index(lc[rc.index(a)]))
  return new, tuple(perm)


def _output_scale(sa: jax.Array, sb: jax.Array, dims: Dims, a_ndim: int,
                  b_ndim: int) -> jax.Array:
  """The product of two operands' scales in the dot's output layout."""
  if sa.ndim == 0 and sb.ndim == 0:
    return sa * sb
  (ac, bc), (ab, bb) = dims
  af, bf = _free(a_ndim, ac, ab), _free(b_ndim, bc, bb)
  # Per-row scales have size 1 on the contracted dimensions: drop them.
  sa = jnp.transpose(sa, ab + af + ac).reshape(
      tuple(sa.shape[d] for d in ab + af) + (1,) * len(bf))
  sb = jnp.transpose(sb, bb + bf + bc).reshape(
      tuple(sb.shape[d] for d in bb) + (1,) * len(af) +
      tuple(sb.shape[d] for d in bf))
  return sa * sb


def scaled_dot(qa: jax.Array, sa: jax.Array, qb: jax.Array, sb: jax.Array,
               dims: Dims) -> jax.Array:
  """``dot_general(qa, qb)`` of fp8 operands, float32-accumulated, dequantized.

  Returns float32: the fp8 product times the operands' scales.
  """
  out = lax.dot_general(qa, qb, dims, preferred_element_type=jnp.float32)
  return out * _output_scale(sa, sb, dims, qa.ndim, qb.ndim)


# ---------------------------------------------------------------- delayed


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6, 7))
def _delayed(lhs, rhs, state, dims, recipe, out_dtype, lhs_dtype, rhs_dtype):
  return _delayed_fwd(lhs, rhs, state, dims, recipe, out_dtype, lhs_dtype,
                      rhs_dtype)[0]


def _delayed_fwd(lhs, rhs, state, dims, recipe, out_dtype, lhs_dtype,
                 rhs_dtype):
  del lhs_dtype, rhs_dtype
  fwd, _ = recipe.dtypes
  qx, xs, xh = recipe.update(lhs, state["input_amax_history"],
                             state["input_scale"], fwd)
  qk, ks, kh = recipe.update(rhs, state["kernel_amax_history"],
                             state["kernel_scale"], fwd)
  out = scaled_dot(qx, xs[0], qk, ks[0], dims).astype(out_dtype)
  res = (qx, qk, xs, xh, ks, kh, state["output_grad_scale"],
         state["output_grad_amax_history"])
  return out, res


def _delayed_bwd(dims, recipe, out_dtype, lhs_dtype, rhs_dtype, res, g):
  del out_dtype
  qx, qk, xs, xh, ks, kh, gs_old, gh_old = res
  _, bwd = recipe.dtypes
  qg, gs, gh = recipe.update(g, gh_old, gs_old, bwd)
  lhs_dims, lhs_perm = grad_lhs_dims(dims, qx.ndim, qk.ndim)
  rhs_dims, rhs_perm = grad_rhs_dims(dims, qx.ndim, qk.ndim)
  dx = jnp.transpose(scaled_dot(qg, gs[0], qk, ks[0], lhs_dims), lhs_perm)
  dk = jnp.transpose(scaled_dot(qg, gs[0], qx, xs[0], rhs_dims), rhs_perm)
  new_state = {"input_scale": xs, "input_amax_history": xh,
               "kernel_scale": ks, "kernel_amax_history": kh,
               "output_grad_scale": gs, "output_grad_amax_history": gh}
  return dx.astype(lhs_dtype), dk.astype(rhs_dtype), new_state


_delayed.defvjp(_delayed_fwd, _delayed_bwd)


# ---------------------------------------------------------------- current


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _current(lhs, rhs, dims, recipe, out_dtype):
  return _current_fwd(lhs, rhs, dims, recipe, out_dtype)[0]


def _current_fwd(lhs, rhs, dims, recipe, out_dtype):
  fwd, _ = recipe.dtypes
  (lc, rc), _ = dims
  qx, sx = recipe.quantize(lhs, fwd, lc)
  qk, sk = recipe.quantize(rhs, fwd, rc)
  out = scaled_dot(qx, sx, qk, sk, dims).astype(out_dtype)
  if recipe.granularity == "tensor":
    return out, (qx, sx, qk, sk, jnp.zeros((0,), lhs.dtype),
                 jnp.zeros((0,), rhs.dtype))
  # Per row, the backward matmuls contract other dimensions: keep the
  # operands to re-quantize them along those.
  return out, (lhs, rhs)


def _current_bwd(dims, recipe, out_dtype, res, g):
  del out_dtype
  fwd, bwd = recipe.dtypes
  if recipe.granularity == "tensor":
    qx, sx, qk, sk, lhs_like, rhs_like = res
    x_ndim, k_ndim = qx.ndim, qk.ndim
    lhs_dtype, rhs_dtype = lhs_like.dtype, rhs_like.dtype
    qg, sg = recipe.quantize(g, bwd, ())
  else:
    lhs, rhs = res
    x_ndim, k_ndim = lhs.ndim, rhs.ndim
    lhs_dtype, rhs_dtype = lhs.dtype, rhs.dtype
  lhs_dims, lhs_perm = grad_lhs_dims(dims, x_ndim, k_ndim)
  rhs_dims, rhs_perm = grad_rhs_dims(dims, x_ndim, k_ndim)
  if recipe.granularity == "row":
    qg, sg = recipe.quantize(g, bwd, lhs_dims[0][0])
    qk, sk = recipe.quantize(rhs, fwd, lhs_dims[0][1])
  dx = jnp.transpose(scaled_dot(qg, sg, qk, sk, lhs_dims), lhs_perm)
  if recipe.granularity == "row":
    qg, sg = recipe.quantize(g, bwd, rhs_dims[0][0])
    qx, sx = recipe.quantize(lhs, fwd, rhs_dims[0][1])
  dk = jnp.transpose(scaled_dot(qg, sg, qx, sx, rhs_dims), rhs_perm)
  return dx.astype(lhs_dtype), dk.astype(rhs_dtype)


_current.defvjp(_current_fwd, _current_bwd)


# ---------------------------------------------------------------- public


def check_state(state: Any, recipe: fp8_lib.DelayedScaling,
                where: str = "fp8_dot_general") -> Dict[str, jax.Array]:
  """`state` as a dict with `recipe.init_state`'s keys and shapes, or raises."""
  want = recipe.init_state()
  if not isinstance(state, Mapping) or set(state) != set(want):
    raise ValueError(
        f"{where}: delayed scaling needs a state with keys {sorted(want)} "
        f"(DelayedScaling.init_state()), got "
        f"{sorted(state) if isinstance(state, Mapping) else state!r}.")
  for key, leaf in want.items():
    if jnp.shape(state[key]) != leaf.shape:
      raise ValueError(
          f"{where}: state[{key!r}] has shape {jnp.shape(state[key])}, the "
          f"recipe {recipe} needs {leaf.shape}.")
  return {k: jnp.asarray(state[k], jnp.float32) for k in want}


def fp8_dot_general(lhs: jax.Array, rhs: jax.Array, dimension_numbers: Any,
                    precision: Any = None,
                    preferred_element_type: Optional[Any] = None, *,
                    recipe: fp8_lib.Recipe,
                    state: Optional[Mapping[str, jax.Array]] = None,
                    out_sharding: Any = None) -> jax.Array:
  """`jax.lax.dot_general` with fp8 operands; differentiable (see module doc).

  Args:
    lhs: the input (any floating dtype).
    rhs: the kernel.
    dimension_numbers: as `jax.lax.dot_general`'s.
    precision: ignored (fp8 matmuls have one precision); accepted for the
      signature.
    preferred_element_type: the output dtype (default: the operands' result
      type, e.g. bfloat16 for bfloat16 operands). Accumulation is float32
      regardless.
    recipe: `DelayedScaling` or `CurrentScaling`.
    state: with `DelayedScaling`, the layer's fp8 state
      (``recipe.init_state()`` or its updated value); its gradient is the
      updated state. None with `CurrentScaling`.
    out_sharding: must be None.

  Returns:
    The product, in the output dtype.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> from mpjax._src import fp8
    >>> x, k = jnp.ones((2, 3)), jnp.full((3, 4), 0.5)
    >>> y = fp8_dot_general(x, k, (((1,), (0,)), ((), ())),
    ...                     recipe=fp8.CurrentScaling())
    >>> y.dtype, bool(jnp.allclose(y, x @ k))
    (dtype('float32'), True)
  """
  del precision
  fp8_lib.check_recipe(recipe, "fp8_dot_general")
  if out_sharding is not None:
    raise NotImplementedError("fp8_dot_general: out_sharding is not supported;"
                              " shard the operands instead.")
  dims = _normalize(dimension_numbers)
  out_dtype = jnp.dtype(preferred_element_type if preferred_element_type
                        is not None else jnp.result_type(lhs, rhs))
  if isinstance(recipe, fp8_lib.DelayedScaling):
    if state is None:
      raise ValueError("fp8_dot_general: DelayedScaling needs state= "
                       "(recipe.init_state(), then its gradient).")
    state = check_state(state, recipe)
    return _delayed(lhs, rhs, state, dims, recipe, out_dtype,
                    jnp.dtype(lhs.dtype), jnp.dtype(rhs.dtype))
  if state:
    raise ValueError("fp8_dot_general: CurrentScaling keeps no state; got "
                     f"state with keys {sorted(state)}.")
  return _current(lhs, rhs, dims, recipe, out_dtype)


def with_recipe(recipe: fp8_lib.Recipe,
                state: Optional[Mapping[str, jax.Array]] = None):
  """`fp8_dot_general` with `recipe` and `state` bound: a ``dot_general``.

  Hand it to a flax layer (``nn.Dense(..., dot_general=...)``) or to
  ``jnp.einsum(..., _dot_general=...)``.
  """
  return functools.partial(fp8_dot_general, recipe=recipe, state=state)


def fp8_einsum(subscripts: str, lhs: jax.Array, rhs: jax.Array, *,
               recipe: fp8_lib.Recipe,
               state: Optional[Mapping[str, jax.Array]] = None,
               preferred_element_type: Optional[Any] = None,
               **kwargs) -> jax.Array:
  """``jnp.einsum(subscripts, lhs, rhs)`` as one fp8 `fp8_dot_general`."""
  kwargs.pop("precision", None)
  kwargs.pop("out_sharding", None)
  return jnp.einsum(subscripts, lhs, rhs,
                    preferred_element_type=preferred_element_type,
                    _dot_general=with_recipe(recipe, state), **kwargs)

