"""float32 islands for functional ops: upcast, compute, return float32.

The functions here follow the contract of PyTorch autocast's float32 list
(``softmax``, ``log_softmax``, ``logsumexp``, ``cross_entropy``,
``layer_norm``...): whatever the floating dtype of the inputs (float16,
bfloat16, float32), they are converted to float32, the op runs in float32, and
the result is float32. ``dtype=`` casts the float32 result on the way out (for
example back to the compute dtype, to keep activations small). float64 inputs
are computed and returned in float64, never narrowed.

Gradients flow through the casts: differentiating with respect to a float16
input gives a float16 gradient of the float32 computation. `layer_norm` and
`rms_norm` keep only their input (in its own dtype) and float32 per-row
statistics for the backward pass, which recomputes the rest in float32.

`dot_product_attention` is the island for attention: the attention logits
``q k^T / sqrt(d)`` are accumulated and returned in float32 (the matmul keeps
its operands in the compute dtype), masked and normalised in float32; only the
probabilities that multiply the values are cast back. It accepts the keyword
arguments flax's linen and NNX attention layers pass, so it can be given as
their ``attention_fn``.
"""

import functools
import operator
from typing import Any, Optional, Sequence, Tuple, Union

import jax
import jax.numpy as jnp
import optax
from flax import nnx

Axis = Union[int, Sequence[int]]
DTypeLike = Any


def _upcast(x: jax.Array) -> jax.Array:
  """x as a float32 (or wider) floating array."""
  x = jnp.asarray(x)
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise TypeError(
        f"mpjax.numerics expects a floating array, got dtype {x.dtype}.")
  return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def _finish(y: jax.Array, dtype: Optional[DTypeLike]) -> jax.Array:
  return y if dtype is None else y.astype(dtype)


def softmax(x: jax.Array, axis: Axis = -1, *,
            where: Optional[jax.Array] = None,
            dtype: Optional[DTypeLike] = None) -> jax.Array:
  """Softmax over `axis`, computed in float32.

  Args:
    x: floating array of any shape and dtype (float16, bfloat16, float32).
    axis: axis or axes to normalise over.
    where: optional boolean mask of `x`'s shape; masked-out elements get
      probability 0 (``jax.nn.softmax``'s semantics).
    dtype: dtype of the result; default float32 (float64 stays float64).

  Returns:
    Array of `x`'s shape: float32 probabilities that sum to 1 over `axis`, or
    cast to `dtype`.

  Examples:
    >>> import jax.numpy as jnp
    >>> from mpjax import numerics
    >>> numerics.softmax(jnp.array([0.0, 0.0], jnp.float16)).dtype
    dtype('float32')
  """
  return _finish(jax.nn.softmax(_upcast(x), axis=axis, where=where), dtype)


def log_softmax(x: jax.Array, axis: Axis = -1, *,
                where: Optional[jax.Array] = None,
                dtype: Optional[DTypeLike] = None) -> jax.Array:
  """Log-softmax over `axis`, computed in float32.

  Args:
    x: floating array of any shape and dtype.
    axis: axis or axes to normalise over.
    where: optional boolean mask (``jax.nn.log_softmax``'s semantics).
    dtype: dtype of the result; default float32.

  Returns:
    Array of `x`'s shape, float32 (or `dtype`).
  """
  return _finish(jax.nn.log_softmax(_upcast(x), axis=axis, where=where), dtype)


def logsumexp(x: jax.Array, axis: Optional[Axis] = -1, *,
              keepdims: bool = False,
              dtype: Optional[DTypeLike] = None) -> jax.Array:
  """``log(sum(exp(x)))`` over `axis`, computed in float32.

  In float16, ``sum(exp(x))`` overflows for any ``x`` above 11.1 unless the
  maximum is subtracted first; here both the shift and the sum are float32.

  Args:
    x: floating array of any shape and dtype.
    axis: axis or axes to reduce (None: all).
    keepdims: keep the reduced axes with size 1.
    dtype: dtype of the result; default float32.

  Returns:
    `x`'s shape without `axis` (or with size-1 axes), float32 (or `dtype`).
  """
  return _finish(jax.nn.logsumexp(_upcast(x), axis=axis, keepdims=keepdims),
                 dtype)


def softmax_cross_entropy_with_integer_labels(
    logits: jax.Array, labels: jax.Array, *, axis: int = -1,
    dtype: Optional[DTypeLike] = None) -> jax.Array:
  """Cross-entropy between `logits` and integer class `labels`, in float32.

  Same values as ``optax.softmax_cross_entropy_with_integer_labels`` computed
  on float32 logits (the logits are upcast first, as autocast does for
  ``cross_entropy``); no reduction over the batch.

  Args:
    logits: floating array ``[..., num_classes]`` (class axis `axis`), any
      floating dtype.
    labels: integer array of `logits`' shape without the class axis.
    axis: the class axis of `logits`.
    dtype: dtype of the result; default float32.

  Returns:
    Per-example losses, `labels`' shape, float32 (or `dtype`).

  Examples:
    >>> import jax.numpy as jnp
    >>> from mpjax import numerics
    >>> loss = numerics.softmax_cross_entropy_with_integer_labels(
    ...     jnp.zeros((2, 4), jnp.bfloat16), jnp.array([0, 3]))
    >>> loss.dtype, loss.shape
    (dtype('float32'), (2,))
  """
  labels = jnp.asarray(labels)
  if not jnp.issubdtype(labels.dtype, jnp.integer):
    raise TypeError(
        "softmax_cross_entropy_with_integer_labels: labels must be integers, "
        f"got dtype {labels.dtype}; use softmax_cross_entropy for "
        "probabilities.")
  shape = jnp.shape(logits)
  if not -len(shape) <= axis < len(shape):
    raise ValueError(
        f"softmax_cross_entropy_with_integer_labels: axis {axis} is out of "
        f"range for logits of shape {shape}.")
  axis %= len(shape)
  if labels.shape != shape[:axis] + shape[axis + 1:]:
    raise ValueError(
        "softmax_cross_entropy_with_integer_labels: labels of shape "
        f"{labels.shape} do not match logits of shape {shape} without axis "
        f"{axis}.")
  return _finish(_sparse_xent(jnp.asarray(logits), labels, axis), dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _sparse_xent(logits: jax.Array, labels: jax.Array, axis: int) -> jax.Array:
  """``logsumexp(x) - x[label]`` with x = float32(logits).

  A custom VJP so that the backward pass keeps the logits in their own
  (compute) dtype and the float32 logsumexp only, and recomputes the float32
  softmax from them: the same numbers as differentiating the float32 graph,
  without its float32 ``[..., num_classes]`` residuals (for a language model,
  the largest activation there is).
  """
  return _sparse_xent_fwd(logits, labels, axis)[0]


def _sparse_xent_fwd(logits, labels, axis):
  x = _upcast(logits)
  lse = jax.nn.logsumexp(x, axis=axis, keepdims=True)
  picked = jnp.take_along_axis(x, jnp.expand_dims(labels, axis), axis=axis)
  loss = jnp.squeeze(lse - picked, axis)
  return loss, (logits, labels, lse)


def _sparse_xent_bwd(axis, residuals, grad):
  logits, labels, lse = residuals
  x = _upcast(logits)
  probs = jnp.exp(x - lse)
  classes = jnp.arange(x.shape[axis]).reshape(
      [-1 if d == axis else 1 for d in range(x.ndim)])
  onehot = (jnp.expand_dims(labels, axis) == classes).astype(x.dtype)
  dlogits = (probs - onehot) * jnp.expand_dims(grad.astype(x.dtype), axis)
  return dlogits.astype(logits.dtype), None


_sparse_xent.defvjp(_sparse_xent_fwd, _sparse_xent_bwd)


def softmax_cross_entropy(logits: jax.Array, labels: jax.Array, *,
                          axis: int = -1,
                          dtype: Optional[DTypeLike] = None) -> jax.Array:
  """Cross-entropy between `logits` and target probabilities, in float32.

  Args:
    logits: floating array ``[..., num_classes]``, any floating dtype.
    labels: floating array of `logits`' shape (probabilities), any dtype.
    axis: the class axis.
    dtype: dtype of the result; default float32.

  Returns:
    Per-example losses, `logits`' shape without `axis`, float32 (or `dtype`).
  """
  return _finish(optax.softmax_cross_entropy(
      _upcast(logits), _upcast(labels), axis=axis), dtype)


def layer_norm(x: jax.Array, scale: Optional[jax.Array] = None,
               bias: Optional[jax.Array] = None, *, axis: Axis = -1,
               epsilon: float = 1e-5, use_fast_variance: bool = False,
               dtype: Optional[DTypeLike] = None) -> jax.Array:
  """Layer normalisation over `axis`, statistics and arithmetic in float32.

  ``(x - mean) * (rsqrt(var + epsilon) * scale) + bias`` with the biased
  variance, like ``torch.nn.functional.layer_norm`` (whose default `epsilon`,
  1e-5, this takes; flax's layers default to 1e-6).

  The backward pass keeps only `x` in its own dtype and the float32 per-row
  ``mean`` and ``rsqrt(var + epsilon)``, and recomputes the normalised input
  in float32 from them: the gradients of the float32 computation (up to
  float32 rounding) without the float32 copies of the input that autodiff of
  the float32 graph keeps (three arrays of `x`'s shape per layer).

  Args:
    x: floating array of any shape and dtype.
    scale: optional array broadcastable to the normalised axes (any floating
      dtype; upcast).
    bias: optional array like `scale`.
    axis: axis or axes holding the features to normalise.
    epsilon: added to the variance.
    use_fast_variance: compute the variance as ``mean(x**2) - mean(x)**2``
      (clipped at 0) in one pass, as flax's layers do by default, instead of
      ``mean((x - mean)**2)``.
    dtype: dtype of the result; default float32.

  Returns:
    Array of `x`'s shape, float32 (or `dtype`).
  """
  return _finish(_normalize(x, scale, bias, axis, epsilon, True,
                            use_fast_variance), dtype)


def rms_norm(x: jax.Array, scale: Optional[jax.Array] = None, *,
             axis: Axis = -1, epsilon: float = 1e-6,
             dtype: Optional[DTypeLike] = None) -> jax.Array:
  """RMS normalisation ``x * (rsqrt(mean(x**2) + epsilon) * scale)`` in float32.

  Like `layer_norm`, the backward pass keeps `x` in its own dtype and the
  float32 per-row ``rsqrt(mean(x**2) + epsilon)`` only.

  Args:
    x: floating array of any shape and dtype.
    scale: optional array broadcastable to the normalised axes.
    axis: axis or axes to normalise over.
    epsilon: added to the mean square (flax's default, 1e-6).
    dtype: dtype of the result; default float32.

  Returns:
    Array of `x`'s shape, float32 (or `dtype`).
  """
  return _finish(_normalize(x, scale, None, axis, epsilon, False, False),
                 dtype)


def _normalize(x, scale, bias, axis, epsilon, center, fast_variance):
  """Validates and canonicalises the arguments of `_norm`."""
  x = jnp.asarray(x)
  scale, bias = (None if p is None else jnp.asarray(p) for p in (scale, bias))
  axes = tuple(map(operator.index, axis if isinstance(axis, (tuple, list))
                  else (axis,)))
  if not all(-x.ndim <= a < x.ndim for a in axes):
    raise ValueError(
        f"mpjax.numerics: axis {axis} is out of range for an array of shape "
        f"{x.shape}.")
  axes = tuple(sorted({a % x.ndim for a in axes}))
  return _norm(x, scale, bias, axes, float(epsilon), center, fast_variance)


def _sum_to(t: jax.Array, shape: Tuple[int, ...]) -> jax.Array:
  """Sums `t` over the axes along which an array of `shape` was broadcast."""
  lead = t.ndim - len(shape)
  t = jnp.sum(t, axis=tuple(range(lead)))
  return jnp.sum(t, axis=tuple(i for i, n in enumerate(shape)
                               if n == 1 and t.shape[i] != 1), keepdims=True)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6))
def _norm(x, scale, bias, axes, epsilon, center, fast_variance):
  """float32 layer (``center``) or RMS normalisation over `axes`.

  A custom VJP so that the backward pass keeps `x` in its own (compute) dtype
  plus the float32 per-row statistics, not the float32 upcast of `x` and the
  float32 intermediates (``x - mean``, ...) that autodiff of the float32
  graph keeps (three float32 arrays of `x`'s shape): for a transformer in
  bfloat16, most of what its norms would keep.
  """
  return _norm_fwd(x, scale, bias, axes, epsilon, center, fast_variance)[0]


def _norm_fwd(x, scale, bias, axes, epsilon, center, fast_variance):
  # The operations and their order are flax's (`_compute_stats` and
  # `_normalize` of linen and NNX), so that the float32 island of a flax
  # LayerNorm/RMSNorm computed here gives flax's float32 forward values.
  xf = _upcast(x)
  if center:
    mean = jnp.mean(xf, axes, keepdims=True)
    if fast_variance:
      var = jnp.maximum(0.0, jnp.mean(jax.lax.square(xf), axes, keepdims=True)
                        - jax.lax.square(mean))
    else:
      var = jnp.mean(jax.lax.square(xf - mean), axes, keepdims=True)
    y = xf - mean
  else:
    mean = None
    var = jnp.mean(jax.lax.square(xf), axes, keepdims=True)
    y = xf
  rstd = jax.lax.rsqrt(var + epsilon)
  mul = rstd if scale is None else rstd * _upcast(scale)
  y = y * mul
  if bias is not None:
    y = y + _upcast(bias)
  return y, (x, scale, bias, mean, rstd)


def _norm_bwd(axes, epsilon, center, fast_variance, residuals, grad):
  # With xhat = (x - mean) * rstd and y = xhat * scale + bias, the usual
  # closed form (that of fused LayerNorm kernels):
  # dx = rstd * (dxhat - mean(dxhat) - xhat * mean(dxhat * xhat)), without
  # the mean(dxhat) term for RMS normalisation. It is the derivative of the
  # clipped fast variance too, except where the clip is active (constant
  # rows), where xhat is 0 and the terms that differ vanish.
  del epsilon, fast_variance
  x, scale, bias, mean, rstd = residuals
  xf = _upcast(x)
  xhat = (xf - mean if center else xf) * rstd
  g = grad.astype(jnp.result_type(xhat, grad))
  dscale = dbias = None
  if bias is not None:
    dbias = _sum_to(g, bias.shape).astype(bias.dtype)
  if scale is not None:
    dscale = _sum_to(g * xhat, scale.shape).astype(scale.dtype)
  dxhat = _sum_to(g if scale is None else g * _upcast(scale), xhat.shape)
  dx = dxhat - xhat * jnp.mean(dxhat * xhat, axes, keepdims=True)
  if center:
    dx = dx - jnp.mean(dxhat, axes, keepdims=True)
  return (rstd * dx).astype(x.dtype), dscale, dbias


_norm.defvjp(_norm_fwd, _norm_bwd)


def dot_product_attention(query: jax.Array, key: jax.Array, value: jax.Array,
                          bias: Optional[jax.Array] = None,
                          mask: Optional[jax.Array] = None,
                          broadcast_dropout: bool = True,
                          dropout_rng: Optional[jax.Array] = None,
                          dropout_rate: float = 0.0,
                          deterministic: bool = False,
                          dtype: Optional[DTypeLike] = None,
                          precision: Any = None,
                          module: Any = None,
                          is_causal: bool = False) -> jax.Array:
  """Multi-head dot-product attention with float32 logits and softmax.

  A drop-in ``attention_fn`` for ``flax.linen.MultiHeadDotProductAttention``
  and ``flax.nnx.MultiHeadAttention``. Unlike flax's own
  ``force_fp32_for_softmax=True``, which upcasts logits that were already
  computed (and may have overflowed to inf) in float16, the ``q k^T`` matmul
  here runs on compute-dtype operands with a float32 result
  (``preferred_element_type``), so logits beyond float16's 65504 stay finite.

  Dtypes: `query`, `key`, `value` share the compute dtype ``c`` (or are
  promoted to `dtype` when given); logits, mask, bias, softmax and dropout are
  float32; the probabilities are cast to ``c`` for the ``probs @ value``
  matmul, and only those ``c`` probabilities are kept for the backward pass
  (whose softmax gradient is float32); the result is ``c``. With ``module``
  (flax's ``sow_weights``) the float32 probabilities are sown as
  ``attention_weights``.

  Args:
    query: ``[batch..., q_length, num_heads, head_dim]``.
    key: ``[batch..., kv_length, num_kv_heads, head_dim]``; ``num_heads``
      must be a multiple of ``num_kv_heads`` (grouped-query attention).
    value: like `key`.
    bias: optional, broadcastable to ``[batch..., num_heads, q_length,
      kv_length]``; added to the logits.
    mask: optional boolean (or 0/1) array of the same broadcast shape; False
      positions get probability 0.
    broadcast_dropout: share the dropout mask across batch and heads.
    dropout_rng: key for attention dropout.
    dropout_rate: attention dropout probability.
    deterministic: disables dropout.
    dtype: compute dtype of the matmuls; default: that of the inputs.
    precision: passed to both einsums.
    module: a flax module to sow the probabilities into, or None.
    is_causal: apply a lower-triangular mask (NNX's option).

  Returns:
    ``[batch..., q_length, num_heads, head_dim]`` in the compute dtype.
  """
  if dtype is None:
    dtype = jnp.result_type(query, key, value)
  query, key, value = (jnp.asarray(a).astype(dtype)
                       for a in (query, key, value))
  heads, kv_heads = query.shape[-2], key.shape[-2]
  if heads != kv_heads:
    if kv_heads == 0 or heads % kv_heads:
      raise ValueError(
          f"dot_product_attention: {heads} query heads are not a multiple of "
          f"{kv_heads} key/value heads.")
    key = jnp.repeat(key, heads // kv_heads, axis=-2)
    value = jnp.repeat(value, heads // kv_heads, axis=-2)
  depth = query.shape[-1]
  # Scale before the matmul, as flax does, so q stays small in float16.
  query = query / jnp.sqrt(depth).astype(dtype)
  logits = _attention_logits(query, key, precision)
  if is_causal:
    q_len, kv_len = logits.shape[-2:]
    causal = jnp.tril(jnp.ones((q_len, kv_len), jnp.bool_))
    mask = causal if mask is None else jnp.logical_and(mask, causal)
  if mask is not None:
    # The mask replaces the bias where it is False (so a -inf bias in a fully
    # masked row gives flax's uniform row, not NaN) and is applied as a bias,
    # not jnp.where(mask, logits, min): that where keeps a float32
    # [..., q, kv] array for its backward pass, the sum keeps nothing.
    # Half of float32's min: adding a finite logit can never overflow to -inf.
    masked = jnp.finfo(jnp.float32).min / 2
    bias = jnp.where(mask, 0.0 if bias is None else _upcast(bias), masked)
  if bias is not None:
    logits = logits + _upcast(bias)
  probs = _softmax_to(logits, jnp.dtype(dtype))
  if module is not None:  # flax's sow_weights, a debugging aid: float32
    _sow_weights(module, jax.nn.softmax(logits, axis=-1))
  if not deterministic and dropout_rate > 0.0:
    if dropout_rng is None:
      raise ValueError("dot_product_attention: dropout needs a dropout_rng.")
    keep_prob = 1.0 - dropout_rate
    shape = (probs.shape[-2:] if broadcast_dropout else probs.shape)
    keep = jax.random.bernoulli(dropout_rng, keep_prob, shape)
    probs = jnp.where(keep, probs / keep_prob, 0).astype(probs.dtype)
  return jnp.einsum("...hqk,...khd->...qhd", probs, value,
                    precision=precision)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _softmax_to(logits: jax.Array, dtype: jnp.dtype) -> jax.Array:
  """float32 softmax over the last axis, returned in `dtype`.

  Its backward pass keeps only the `dtype` probabilities (the ones the
  ``probs @ value`` matmul uses anyway) and computes the softmax gradient
  ``p * (g - sum(g * p))`` from them in float32, as fused softmax kernels
  (Megatron's) do. Differentiating the float32 softmax would keep the float32
  probabilities as well: with a ``[..., heads, q, kv]`` array per layer, the
  largest activation of a transformer.
  """
  return jax.nn.softmax(logits, axis=-1).astype(dtype)


def _softmax_to_fwd(logits, dtype):
  probs = _softmax_to(logits, dtype)
  return probs, probs


def _softmax_to_bwd(dtype, probs, grad):
  del dtype
  p, g = _upcast(probs), _upcast(grad)
  return (p * (g - jnp.sum(g * p, axis=-1, keepdims=True)),)


_softmax_to.defvjp(_softmax_to_fwd, _softmax_to_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _attention_logits(query: jax.Array, key: jax.Array,
                      precision: Any) -> jax.Array:
  """``q k^T`` on compute-dtype operands with a float32 result."""
  return jnp.einsum("...qhd,...khd->...hqk", query, key, precision=precision,
                    preferred_element_type=jnp.float32)


def _attention_logits_fwd(query, key, precision):
  return _attention_logits(query, key, precision), (query, key)


def _attention_logits_bwd(precision, residuals, grad):
  # jax's own transpose would upcast q and k to the float32 cotangent's dtype
  # and run both backward matmuls in float32; cast the cotangent down instead
  # so that, as in the forward pass, the matmuls take compute-dtype operands.
  query, key = residuals
  grad = grad.astype(query.dtype)
  return (jnp.einsum("...hqk,...khd->...qhd", grad, key, precision=precision),
          jnp.einsum("...hqk,...qhd->...khd", grad, query, precision=precision))


_attention_logits.defvjp(_attention_logits_fwd, _attention_logits_bwd)


def _sow_weights(module: Any, probs: jax.Array) -> None:
  """Sows the probabilities where flax's own attention does, per API."""
  if isinstance(module, nnx.Module):
    module.sow(nnx.Intermediate, "attention_weights", probs)
  else:
    module.sow("intermediates", "attention_weights", probs)
