"""MXFP8 matmuls: 32-element blocks, e8m0 scales, e4m3 data, a custom VJP.

`mxfp8_dot_general(lhs, rhs, dimension_numbers)` has `jax.lax.dot_general`'s
signature, like `mpjax.fp8_dot_general`, with the OCP microscaling format
instead of one scale per tensor:

- each operand is cut into blocks of `BLOCK` (32) consecutive elements along
  the matmul's contracting dimensions (all of them, flattened in
  ``dimension_numbers``' order; zero-padded to a multiple of 32, which
  changes no product) and each block gets one power-of-two scale, stored as
  ``float8_e8m0fnu``: the smallest ``2**e`` with ``amax(|block|) / 2**e <=
  fp8_max`` (rounded *up*, as Transformer Engine's MXFP8 recipe and
  ``jax.nn``'s own quantizer do, so no element of a block saturates), ``e``
  clipped to [-126, 127] (float32's normal range: XLA flushes subnormals, so
  e8m0's ``2**-127`` would compute as 0); an all-zero block gets
  ``2**-126``, a block with an inf or NaN the NaN scale;
- the elements are ``saturating_cast(x / 2**e)`` to e4m3 (a NaN stays NaN);
- the product is the block-scaled matmul of the fp8 data and scales,
  float32-accumulated, cast to the output dtype;
- backward (`format="hybrid"`, the default): the output gradient is
  quantized to e5m2 in blocks along each backward matmul's own contracting
  dimensions, and the saved 16-bit operands are re-quantized to e4m3 along
  those (a block runs along the contracted axis, so the transposed operand
  needs its own blocks); ``format="e4m3"`` uses e4m3 for the gradient too.

The block-scaled matmul is `jax.nn.scaled_matmul` when the program is
compiled for CUDA (the ``__op$block_scaled_dot`` custom call, which XLA:GPU
turns into cuDNN's block-scaled GEMM, ``__cudnn$blockScaledDot``, when the
target's cuDNN supports it; otherwise into a dequantize + float32 GEMM) and
`jax.lax.scaled_dot` elsewhere (XLA's ``scaled-dot``: on a CPU, the
dequantized operands' dot). Its result equals dequantize-then-einsum
(``q.astype(float32) * scale`` on both operands, float32 matmul). No state:
the scales are each block's own (current scaling).
"""

import functools
import math
from typing import Any, Optional, Tuple

import jax
import jax.numpy as jnp
from jax import lax

from mpjax._src import fp8 as fp8_lib
from mpjax._src import fp8_dot

#: Elements per scale block along the contracting dimension (OCP MX).
BLOCK = 32
#: The scales' dtype: an 8-bit power of two, 2**-127 .. 2**127.
SCALE_DTYPE = jnp.float8_e8m0fnu
_MIN_EXP, _MAX_EXP = -126, 127


def _check_format(fmt: Any) -> Tuple[Any, Any]:
  return fp8_lib.format_dtypes("mxfp8_dot_general", fmt)


def block_exponent(amax: jax.Array, dtype: Any) -> jax.Array:
  """int32 ``e``: the smallest with ``amax / 2**e <= fp8_max(dtype)``.

  Exact (``frexp``, no logarithm); ``amax == 0`` gives -126; clipped to
  [-126, 127] (see the module doc).
  """
  ratio = jnp.asarray(amax, jnp.float32) / jnp.float32(fp8_lib.fp8_max(dtype))
  mantissa, exp = jnp.frexp(ratio)  # ratio = mantissa * 2**exp, [0.5, 1)
  exp = jnp.where(mantissa == 0.5, exp - 1, exp)  # a power of two: itself
  exp = jnp.where(ratio == 0, _MIN_EXP, exp)
  return jnp.clip(exp, _MIN_EXP, _MAX_EXP).astype(jnp.int32)


def mxfp8_quantize(x: jax.Array, dtype: Any = "e4m3"
                   ) -> Tuple[jax.Array, jax.Array]:
  """Blocks of `BLOCK` along the last axis: ``(q, scales)``.

  Args:
    x: floating, ``[..., K]`` with ``K`` a multiple of 32.
    dtype: ``"e4m3"``, ``"e5m2"`` or the fp8 dtype of the data.

  Returns:
    ``q``: `x`'s shape in `dtype`; ``scales``: ``[..., K // 32]``
    ``float8_e8m0fnu``; ``x ~= q * repeat(scales, 32, axis=-1)``.

  Examples:
    >>> import jax.numpy as jnp
    >>> q, s = mxfp8_quantize(jnp.full((1, 32), 1000.0))
    >>> float(s[0, 0]), float(q[0, 0])   # 1000 / 4 = 250 <= 448
    (4.0, 256.0)
  """
  dtype = fp8_lib.fp8_dtype(dtype)
  k = x.shape[-1]
  if k % BLOCK:
    raise ValueError(f"mxfp8_quantize: the last axis ({k}) must be a "
                     f"multiple of {BLOCK}.")
  blocks = jnp.asarray(x, jnp.float32).reshape(x.shape[:-1] +
                                               (k // BLOCK, BLOCK))
  amax = fp8_lib.max_abs(blocks, axis=-1)  # inf for a block with a NaN
  exp = block_exponent(amax, dtype)
  scale = jnp.where(jnp.isfinite(amax), jnp.ldexp(jnp.float32(1.0), exp),
                    jnp.nan)  # exact powers of two
  q = fp8_lib.saturating_cast(blocks, dtype, scale[..., None])
  return q.reshape(x.shape), scale.astype(SCALE_DTYPE)


def _free(ndim: int, contracting, batch) -> Tuple[int, ...]:
  return tuple(d for d in range(ndim) if d not in contracting and
               d not in batch)


def _canonical(x: jax.Array, batch, contracting) -> jax.Array:
  """`x` as ``[batch, free, K]`` (K padded to a multiple of `BLOCK`)."""
  free = _free(x.ndim, contracting, batch)
  x = jnp.transpose(x, tuple(batch) + free + tuple(contracting))
  size = lambda dims: math.prod(x.shape[d] for d in dims)
  nb, nf = len(batch), len(free)
  k = size(range(nb + nf, x.ndim))
  x = x.reshape(size(range(nb)), size(range(nb, nb + nf)), k)
  pad = -k % BLOCK
  return jnp.pad(x, ((0, 0), (0, 0), (0, pad))) if pad else x


def _block_scaled(qa, sa, qb, sb) -> jax.Array:
  """float32 ``[B, M, N]`` of ``[B, M, K]`` x ``[B, N, K]`` block-scaled."""

  def cuda(qa, sa, qb, sb):
    return jax.nn.scaled_matmul(qa, qb, sa, sb,
                                preferred_element_type=jnp.float32)

  def other(qa, sa, qb, sb):
    return lax.scaled_dot(qa, qb, lhs_scale=sa, rhs_scale=sb,
                          dimension_numbers=(((2,), (2,)), ((0,), (0,))),
                          preferred_element_type=jnp.float32)

  return lax.platform_dependent(qa, sa, qb, sb, cuda=cuda, default=other)


def mx_product(a: jax.Array, b: jax.Array, dims, a_dtype: Any,
               b_dtype: Any) -> jax.Array:
  """``dot_general(a, b, dims)`` with both operands MXFP8-quantized along
  the contracted dimensions (`a` to `a_dtype`, `b` to `b_dtype`); float32
  in ``dot_general``'s output layout."""
  (ac, bc), (ab, bb) = dims
  qa, sa = mxfp8_quantize(_canonical(a, ab, ac), a_dtype)
  qb, sb = mxfp8_quantize(_canonical(b, bb, bc), b_dtype)
  out = _block_scaled(qa, sa, qb, sb)
  shape = (tuple(a.shape[d] for d in ab) +
           tuple(a.shape[d] for d in _free(a.ndim, ac, ab)) +
           tuple(b.shape[d] for d in _free(b.ndim, bc, bb)))
  return out.reshape(shape)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _mx(lhs, rhs, dims, fmt, out_dtype):
  fwd, _ = _check_format(fmt)
  return mx_product(lhs, rhs, dims, fwd, fwd).astype(out_dtype)


def _mx_fwd(lhs, rhs, dims, fmt, out_dtype):
  return _mx(lhs, rhs, dims, fmt, out_dtype), (lhs, rhs)


def _mx_bwd(dims, fmt, out_dtype, res, g):
  del out_dtype
  lhs, rhs = res
  fwd, bwd = _check_format(fmt)
  lhs_dims, lhs_perm = fp8_dot.grad_lhs_dims(dims, lhs.ndim, rhs.ndim)
  rhs_dims, rhs_perm = fp8_dot.grad_rhs_dims(dims, lhs.ndim, rhs.ndim)
  dx = jnp.transpose(mx_product(g, rhs, lhs_dims, bwd, fwd), lhs_perm)
  dk = jnp.transpose(mx_product(g, lhs, rhs_dims, bwd, fwd), rhs_perm)
  return dx.astype(lhs.dtype), dk.astype(rhs.dtype)


_mx.defvjp(_mx_fwd, _mx_bwd)


def mxfp8_dot_general(lhs: jax.Array, rhs: jax.Array, dimension_numbers: Any,
                      precision: Any = None,
                      preferred_element_type: Optional[Any] = None, *,
                      format: str = "hybrid",  # pylint: disable=redefined-builtin
                      out_sharding: Any = None) -> jax.Array:
  """`jax.lax.dot_general` in MXFP8; differentiable (see module doc).

  Args:
    lhs: the input (any floating dtype).
    rhs: the kernel.
    dimension_numbers: as `jax.lax.dot_general`'s (at least one contracting
      dimension).
    precision: ignored (accepted for the signature).
    preferred_element_type: the output dtype (default: the operands' result
      type). Accumulation is float32 regardless.
    format: ``"hybrid"`` (e4m3 forward, e5m2 output gradients) or
      ``"e4m3"``.
    out_sharding: must be None.

  Returns:
    The product, in the output dtype.

  Examples:
    >>> import jax.numpy as jnp
    >>> x, k = jnp.ones((2, 64)), jnp.full((64, 3), 0.5)
    >>> y = mxfp8_dot_general(x, k, (((1,), (0,)), ((), ())))
    >>> y.dtype, bool(jnp.all(y == 32.0))
    (dtype('float32'), True)
  """
  del precision
  _check_format(format)
  if out_sharding is not None:
    raise NotImplementedError("mxfp8_dot_general: out_sharding is not "
                              "supported; shard the operands instead.")
  (lc, rc), (lb, rb) = dimension_numbers
  dims = tuple(tuple(tuple(int(d) for d in ds) for ds in pair)
               for pair in ((lc, rc), (lb, rb)))
  if not dims[0][0]:
    raise ValueError("mxfp8_dot_general: blocks run along a contracting "
                     "dimension; got none in dimension_numbers "
                     f"{dimension_numbers!r}.")
  empty = [d for d in dims[0][0] if jnp.shape(lhs)[d] == 0]
  if empty:
    raise ValueError("mxfp8_dot_general: a contracting dimension has size 0 "
                     f"(lhs shape {jnp.shape(lhs)}, contracting dims "
                     f"{dims[0][0]}); the product is all zeros: compute it "
                     "without fp8.")
  out_dtype = jnp.dtype(preferred_element_type if preferred_element_type
                        is not None else jnp.result_type(lhs, rhs))
  return _mx(lhs, rhs, dims, format, out_dtype)
