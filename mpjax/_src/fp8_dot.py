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
happens inside the jitted step, and a skipped step keeps the old one.

A layer called more than once in one loss (a shared layer, weights used
twice) reads the same state at every call: autodiff would *add* the calls'
updated states (an amax history of ``10 + 1`` where the max is 10, a doubled
scale). `fp8_dot_general_chained` orders the uses instead: each call returns
a *token* (zeros shaped like the state) whose gradient is the updated state
of the later uses, and the next call takes it (``previous=``), so the state's
gradient is the elementwise max of every use's updated state: the history
takes the max of the calls' amaxes, and the scale, computed by every call
from the same history, stays that scale. The layer hooks
(`mpjax._src.fp8_layers`) chain the calls of one layer within one trace.
"""

import functools
from typing import Any, Callable, Dict, Mapping, Optional, Tuple

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
  """``(out, token)``: the product and a zero token (see `chain_state`)."""
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
  token = {k: jnp.zeros_like(v) for k, v in state.items()}
  return (out, token), res


def _delayed_bwd(dims, recipe, out_dtype, lhs_dtype, rhs_dtype, res, g):
  del out_dtype
  g, later = g  # later: the token's cotangent, the later uses' new state
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
  # Zeros when no later use: histories are >= 0 and scales > 0.
  new_state = {k: jnp.maximum(v, later[k]) for k, v in new_state.items()}
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


# ---------------------------------------------------------------- chaining


@jax.custom_vjp
def chain_state(state, token):
  """`state`, with its gradient handed to `token` (an earlier use's token).

  Forward: `state`. Backward: zero for `state`, and the gradient (this and
  the later uses' updated state) for `token`, which the earlier use combines
  with its own by max.
  """
  del token
  return state


def _chain_fwd(state, token):
  del token
  return state, None


def _chain_bwd(_, g):
  return jax.tree.map(jnp.zeros_like, g), g


chain_state.defvjp(_chain_fwd, _chain_bwd)


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


def fp8_dot_general_chained(
    lhs: jax.Array, rhs: jax.Array, dimension_numbers: Any,
    precision: Any = None, preferred_element_type: Optional[Any] = None, *,
    recipe: fp8_lib.Recipe, state: Optional[Mapping[str, jax.Array]] = None,
    previous: Optional[Mapping[str, jax.Array]] = None,
    out_sharding: Any = None) -> Tuple[jax.Array, Optional[Dict[str, Any]]]:
  """`fp8_dot_general`, and the token the next use of `state` takes.

  Args:
    lhs, rhs, dimension_numbers, precision, preferred_element_type, recipe,
      state, out_sharding: as `fp8_dot_general`'s.
    previous: the token of the previous call with the same `state` in this
      differentiated function (None: this is the first). The state's gradient
      is then the elementwise max of both calls' updated states (see the
      module docstring), not their sum.

  Returns:
    ``(out, token)``: the product, and a dict of zeros shaped like `state`
    to pass as ``previous=`` to the next use (None with `CurrentScaling`).
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
    if previous is not None:
      state = chain_state(state, check_state(previous, recipe,
                                             "fp8_dot_general(previous=)"))
    return _delayed(lhs, rhs, state, dims, recipe, out_dtype,
                    jnp.dtype(lhs.dtype), jnp.dtype(rhs.dtype))
  if state:
    raise ValueError(f"fp8_dot_general: {type(recipe).__name__} keeps no "
                     f"state; got state with keys {sorted(state)}.")
  if isinstance(recipe, fp8_lib.MXScaling):
    # Imported here: mxfp8_dot imports this module.
    from mpjax._src import mxfp8_dot  # pylint: disable=g-import-not-at-top
    return mxfp8_dot.mxfp8_dot_general(
        lhs, rhs, dims, None, out_dtype, format=recipe.format), None
  return _current(lhs, rhs, dims, recipe, out_dtype), None


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
    recipe: `DelayedScaling`, `CurrentScaling` or `MXScaling` (MXFP8:
      `mpjax.mxfp8_dot_general`).
    state: with `DelayedScaling`, the layer's fp8 state
      (``recipe.init_state()`` or its updated value); its gradient is the
      updated state. None with `CurrentScaling`. A state used by several
      calls in one differentiated function needs `fp8_dot_general_chained`.
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
  return fp8_dot_general_chained(
      lhs, rhs, dimension_numbers, precision, preferred_element_type,
      recipe=recipe, state=state, out_sharding=out_sharding)[0]


def with_recipe(recipe: fp8_lib.Recipe,
                state: Optional[Mapping[str, jax.Array]] = None):
  """`fp8_dot_general` with `recipe` and `state` bound: a ``dot_general``.

  Hand it to a flax layer (``nn.Dense(..., dot_general=...)``) or to
  ``jnp.einsum(..., _dot_general=...)``.
  """
  return functools.partial(fp8_dot_general, recipe=recipe, state=state)


_LETTERS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"


def einsum_dims(subscripts: str, lhs_ndim: int, rhs_ndim: int
                ) -> Tuple[Dims, Tuple[int, ...], Tuple[int, ...],
                           Tuple[int, ...]]:
  """A two-operand einsum as one ``dot_general``.

  Args:
    subscripts: ``"btd,dh->bth"`` (``...`` allowed; implicit output: the
      labels used once, sorted, as NumPy's).
    lhs_ndim, rhs_ndim: the operands' ranks.

  Returns:
    ``(dims, perm, lhs_sum, rhs_sum)``: ``einsum(s, lhs, rhs) ==
    transpose(dot_general(sum(lhs, lhs_sum), sum(rhs, rhs_sum), dims),
    perm)``, where ``lhs_sum``/``rhs_sum`` are the axes of labels only that
    operand has and the output lacks (summed before the matmul).

  Raises:
    ValueError: not two operands, a label repeated within an operand, a
      rank that does not match, or an ellipsis of different ranks.
  """
  s = subscripts.replace(" ", "")
  inputs, arrow, out = s.partition("->")
  operands = inputs.split(",")
  if len(operands) != 2:
    raise ValueError(f"fp8_einsum: {subscripts!r} must have exactly two "
                     "operands (input, kernel).")
  used = set(s) - set(".,->")
  pool = [c for c in _LETTERS if c not in used]
  ell = {}
  labels = []
  for term, ndim in zip(operands, (lhs_ndim, rhs_ndim)):
    if "..." in term:
      n = ndim - len(term.replace("...", ""))
      if n < 0 or ell.setdefault("n", n) != n:
        raise ValueError(f"fp8_einsum: {subscripts!r}: the ellipsis spans "
                         "different ranks in the two operands (broadcasting "
                         "is not supported) or the rank is too small.")
      term = term.replace("...", "".join(pool[:n]))
    if len(term) != ndim:
      raise ValueError(f"fp8_einsum: {subscripts!r}: operand {term!r} has "
                       f"{len(term)} labels for a rank-{ndim} array.")
    if len(set(term)) != len(term):
      raise ValueError(f"fp8_einsum: {subscripts!r}: a label repeated within "
                       f"operand {term!r} (a diagonal) is not supported.")
    labels.append(term)
  ellipsis = "".join(pool[:ell.get("n", 0)])
  if arrow:
    out = out.replace("...", ellipsis)
  else:
    both = labels[0] + labels[1]
    out = ellipsis + "".join(sorted(c for c in set(both) - set(ellipsis)
                                    if both.count(c) == 1))
  lhs, rhs = labels
  lhs_sum = tuple(i for i, c in enumerate(lhs) if c not in rhs + out)
  rhs_sum = tuple(i for i, c in enumerate(rhs) if c not in lhs + out)
  lhs = "".join(c for c in lhs if c in rhs + out)
  rhs = "".join(c for c in rhs if c in lhs + out)
  batch = [c for c in lhs if c in rhs and c in out]
  contract = [c for c in lhs if c in rhs and c not in out]
  lhs_free = [c for c in lhs if c not in rhs]
  rhs_free = [c for c in rhs if c not in lhs]
  dims = ((tuple(lhs.index(c) for c in contract),
           tuple(rhs.index(c) for c in contract)),
          (tuple(lhs.index(c) for c in batch),
           tuple(rhs.index(c) for c in batch)))
  dot_out = batch + lhs_free + rhs_free
  if sorted(dot_out) != sorted(out):
    raise ValueError(f"fp8_einsum: {subscripts!r}: output labels {out!r} "
                     "must each come from an operand, once.")
  return dims, tuple(dot_out.index(c) for c in out), lhs_sum, rhs_sum


def einsum_with(dot_general: Callable[..., jax.Array], subscripts: str,
                lhs: jax.Array, rhs: jax.Array, precision: Any = None,
                preferred_element_type: Optional[Any] = None,
                **kwargs) -> jax.Array:
  """``einsum(subscripts, lhs, rhs)`` as one call of `dot_general`.

  `einsum_dims`' dot_general, the axes only one operand has (and the output
  lacks) summed first, and the transpose to the output's order. The
  ``einsum_op`` of an NNX ``Einsum`` with `dot_general` as its matmul.
  """
  kwargs.pop("out_sharding", None)
  if kwargs:
    raise TypeError(f"fp8_einsum: unsupported arguments {sorted(kwargs)}.")
  dims, perm, lhs_sum, rhs_sum = einsum_dims(subscripts, lhs.ndim, rhs.ndim)
  if lhs_sum:
    lhs = jnp.sum(lhs, axis=lhs_sum)
  if rhs_sum:
    rhs = jnp.sum(rhs, axis=rhs_sum)
  out = dot_general(lhs, rhs, dims, precision, preferred_element_type)
  return jnp.transpose(out, perm)


def fp8_einsum(subscripts: str, lhs: jax.Array, rhs: jax.Array, *,
               recipe: fp8_lib.Recipe,
               state: Optional[Mapping[str, jax.Array]] = None,
               preferred_element_type: Optional[Any] = None,
               **kwargs) -> jax.Array:
  """``jnp.einsum(subscripts, lhs, rhs)`` as one fp8 `fp8_dot_general`.

  The einsum is one ``dot_general`` (`einsum_dims`) and a transpose, so
  the operands are quantized once each, whatever their layout.

  Examples:
    >>> import jax.numpy as jnp
    >>> from mpjax._src import fp8
    >>> x, k = jnp.ones((2, 3, 4)), jnp.full((4, 5), 0.5)
    >>> y = fp8_einsum("btd,dh->bth", x, k, recipe=fp8.CurrentScaling())
    >>> y.shape, bool(jnp.allclose(y, 2.0))
    ((2, 3, 5), True)
  """
  return einsum_with(with_recipe(recipe, state), subscripts, lhs, rhs,
                     preferred_element_type=preferred_element_type, **kwargs)
