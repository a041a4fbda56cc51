"""MXFP8 dot_general: 32-element blocks, e8m0 scales, against NumPy + einsum.

The reference quantizes in NumPy (ml_dtypes), independently of the library:
per block of 32 along the contracted axis, scale = the smallest power of two
with amax / scale <= the format's max; then dequantizes and multiplies with
``jnp.einsum`` in float32. Tiny shapes; CPU.
"""

import chex
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

import mpjax
from mpjax._src import mxfp8_dot

DENSE = (((1,), (0,)), ((), ()))
E4M3, E5M2 = ml_dtypes.float8_e4m3fn, ml_dtypes.float8_e5m2


def np_block_quantize(x, dtype):
  """``(dequantized, q, exponents)``: blocks of 32 along the last axis
  (zero-padded), float64 log2 for the exponent (exact on these values)."""
  x = np.asarray(x, np.float32)
  pad = -x.shape[-1] % 32
  x = np.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, pad)])
  blocks = x.reshape(x.shape[:-1] + (-1, 32))
  amax = np.abs(blocks).max(-1)
  fmax = float(ml_dtypes.finfo(dtype).max)
  with np.errstate(divide="ignore"):
    exp = np.ceil(np.log2(amax.astype(np.float64) / fmax))
  exp = np.clip(np.where(amax == 0, -126, exp), -126, 127).astype(np.int32)
  scale = np.ldexp(np.float32(1.0), exp).astype(np.float32)[..., None]
  q = np.clip(blocks * (np.float32(1.0) / scale), -fmax, fmax).astype(dtype)
  deq = (q.astype(np.float32) * scale).reshape(x.shape)
  return deq, q.reshape(x.shape), exp


def ref_dense(x, k, g):
  """Forward and both gradients of x @ k in MXFP8 (hybrid)."""
  ein = lambda s, a, b: np.asarray(jnp.einsum(s, a, b, precision="highest"))
  xq, kq = np_block_quantize(x, E4M3)[0], np_block_quantize(k.T, E4M3)[0]
  y = ein("mk,nk->mn", xq, kq)
  gq, kq2 = np_block_quantize(g, E5M2)[0], np_block_quantize(k, E4M3)[0]
  dx = ein("mn,kn->mk", gq, kq2)
  gq3, xq3 = np_block_quantize(g.T, E5M2)[0], np_block_quantize(x.T, E4M3)[0]
  dk = ein("nm,km->kn", gq3, xq3)
  return y, dx, dk


def operands(m=8, k=64, n=32, seed=0):
  keys = jax.random.split(jax.random.key(seed), 3)
  # Rows of very different magnitudes: one scale per tensor could not
  # serve them all, 32-element blocks can.
  x = jax.random.normal(keys[0], (m, k)) * jnp.logspace(-3, 3, m)[:, None]
  w = jax.random.normal(keys[1], (k, n)) * 0.05
  g = jax.random.normal(keys[2], (m, n)) * 1e-4
  return np.asarray(x), np.asarray(w), np.asarray(g)


def test_quantize_blocks_have_power_of_two_e8m0_scales_rounded_up():
  x = np.array(jax.random.normal(jax.random.key(3), (4, 96)) * 50)
  x[1, :32] = 0.0
  x[2, 32:64] = 1000.0  # 1000 / 4 = 250 <= 448 < 1000 / 2
  q, s = jax.jit(mpjax.mxfp8_quantize)(x)
  deq, np_q, exp = np_block_quantize(x, E4M3)
  chex.assert_shape(s, (4, 3))
  assert s.dtype == jnp.float8_e8m0fnu and q.dtype == jnp.float8_e4m3fn
  np.testing.assert_array_equal(np.asarray(s, np.float32),
                                np.ldexp(np.float32(1.0), exp))
  np.testing.assert_array_equal(np.asarray(q, np.float32),
                                np_q.astype(np.float32))
  assert float(s[2, 1]) == 4.0 and float(q[2, 40]) == 256.0  # e4m3(250)
  assert float(s[1, 0]) == 2.0**-126 and not np.any(np.asarray(q[1, :32],
                                                               np.float32))
  # Rounded up: no element of a block reaches past the format's max.
  assert np.all(np.abs(np.asarray(q, np.float32)) <= 448.0)
  np.testing.assert_array_equal(
      np.asarray(q, np.float32) * np.repeat(np.asarray(s, np.float32), 32,
                                            -1), deq)


def test_non_finite_block_gets_a_nan_scale_and_others_are_untouched():
  x = np.ones((1, 64), np.float32)
  x[0, 3] = np.inf
  q, s = jax.jit(mpjax.mxfp8_quantize)(x)
  assert np.isnan(float(s[0, 0])) and float(s[0, 1]) == 2.0**-8
  assert np.all(np.asarray(q[0, 32:], np.float32) == 256.0)


def test_forward_and_gradients_equal_dequantize_then_einsum_exactly():
  x, w, g = operands()

  @jax.jit
  def forward_backward(a, b, ct):
    y, vjp = jax.vjp(lambda a, b: mpjax.mxfp8_dot_general(a, b, DENSE), a, b)
    return (y,) + vjp(ct)

  y, dx, dw = forward_backward(x, w, g)
  ry, rdx, rdw = ref_dense(x, w, g)
  np.testing.assert_array_equal(np.asarray(y), ry)
  np.testing.assert_array_equal(np.asarray(dx), rdx)
  # dw contracts the 8 rows: one block, zero-padded to 32.
  np.testing.assert_array_equal(np.asarray(dw), rdw)
  # Per block, the small rows keep their precision (per tensor, e4m3 would
  # flush the 1e-3 rows under a scale set by the 1e3 ones).
  rel = np.abs(np.asarray(y) - x @ w) / np.abs(x @ w).max(1, keepdims=True)
  assert rel.max() < 0.1


def test_jitted_bfloat16_step_keeps_dtypes_and_rounds_the_reference_once():
  x, w, g = (np.asarray(jnp.asarray(a, jnp.bfloat16), np.float32)
             for a in operands())

  @jax.jit
  def forward_backward(a, b, ct):
    y, vjp = jax.vjp(lambda a, b: mpjax.mxfp8_dot_general(a, b, DENSE), a, b)
    return (y,) + vjp(ct)

  out = forward_backward(*(jnp.asarray(a, jnp.bfloat16) for a in (x, w, g)))
  assert [o.dtype for o in out] == [jnp.bfloat16] * 3
  # float32 accumulation, one rounding to bfloat16 at the end.
  for got, want in zip(out, ref_dense(x, w, g)):
    np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(
        jnp.asarray(want, jnp.bfloat16), np.float32))


def test_batch_and_two_contracting_dims_block_along_the_flattened_ones():
  # [batch 2, m 3, c1 4, c2 16] x [batch 2, c1 4, c2 16, n 5]: K = 64.
  keys = jax.random.split(jax.random.key(1), 2)
  a = np.asarray(jax.random.normal(keys[0], (2, 3, 4, 16)))
  b = np.asarray(jax.random.normal(keys[1], (2, 4, 16, 5)))
  dims = (((2, 3), (1, 2)), ((0,), (0,)))
  out = jax.jit(lambda a, b: mpjax.mxfp8_dot_general(a, b, dims))(a, b)
  aq = np_block_quantize(a.reshape(2, 3, 64), E4M3)[0]
  bq = np_block_quantize(b.reshape(2, 64, 5).transpose(0, 2, 1), E4M3)[0]
  ref = np.asarray(jnp.einsum("bmk,bnk->bmn", aq, bq, precision="highest"))
  chex.assert_shape(out, (2, 3, 5))
  np.testing.assert_array_equal(np.asarray(out), ref)


def test_e4m3_format_quantizes_the_gradient_to_e4m3():
  x, w, g = operands()
  f = jax.jit(lambda fmt: jax.vjp(
      lambda a: mpjax.mxfp8_dot_general(a, w, DENSE, format=fmt), x)[1](g)[0],
               static_argnums=0)
  rdx = np.asarray(jnp.einsum("mn,kn->mk", np_block_quantize(g, E4M3)[0],
                              np_block_quantize(w, E4M3)[0],
                              precision="highest"))
  np.testing.assert_array_equal(np.asarray(f("e4m3")), rdx)
  assert not np.array_equal(np.asarray(f("hybrid")), rdx)


def test_lowered_program_has_block_scaled_dots_with_e8m0_scales():
  x, w, _ = operands()
  text = jax.jit(jax.value_and_grad(lambda a, b: jnp.sum(
      mpjax.mxfp8_dot_general(a, b, DENSE)), argnums=(0, 1))).lower(
          x, w).as_text()
  # forward, dx, dw: XLA's scaled-dot (the dequantized dot, on a CPU)
  assert text.count('stablehlo.composite "xla.scaled_dot"') == 3
  for dtype in ("f8E4M3FN", "f8E5M2", "f8E8M0FNU"):
    assert dtype in text, dtype


@pytest.mark.parametrize("kwargs, match", [
    ({"format": "e5m2"}, "unknown format 'e5m2'"),
    ({"dimension_numbers": (((), ()), ((), ()))}, "contracting"),
])
def test_bad_input_names_the_value(kwargs, match):
  args = {"dimension_numbers": DENSE, **kwargs}
  with pytest.raises(ValueError, match=match):
    mpjax.mxfp8_dot_general(jnp.ones((2, 32)), jnp.ones((32, 2)), **args)


def test_quantize_needs_whole_blocks():
  with pytest.raises(ValueError, match=r"last axis \(40\).*multiple of 32"):
    mxfp8_dot.mxfp8_quantize(jnp.ones((2, 40)))


def test_mxscaling_policy_map_entry_runs_dense_and_linear_in_mxfp8():
  import optax  # pylint: disable=g-import-not-at-top
  from flax import linen as nn  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top
  x = jax.random.normal(jax.random.key(4), (8, 64))
  batch = {"x": x, "y": jnp.ones((8, 32))}

  def loss_fn(params, b, apply_fn, rng):
    del rng
    out = apply_fn({"params": params}, b["x"]).astype(jnp.float32)
    return jnp.mean((out - b["y"]) ** 2)

  tx = mpjax.loss_scaled(optax.sgd(0.1), mpjax.NoScaling())
  step = mpjax.make_train_step(loss_fn)
  model = nn.Dense(32, use_bias=False)
  pm = mpjax.PolicyMap("mixed_bfloat16", {nn.Dense: mpjax.MXScaling()})
  params = model.init(jax.random.key(0), x)["params"]
  # The layer under the entry is mxfp8_dot_general on the policy's bfloat16.
  y = mpjax.with_policy(model.apply, pm)({"params": params}, x)
  want = mpjax.mxfp8_dot_general(x.astype(jnp.bfloat16),
                                 params["kernel"].astype(jnp.bfloat16), DENSE)
  chex.assert_trees_all_equal(y, want)
  linen_state = mpjax.TrainState.create(apply_fn=model.apply, params=params,
                                        tx=tx, policy=pm)
  nnx_state = mpjax.TrainState.from_nnx(
      nnx.Linear(64, 32, use_bias=False, rngs=nnx.Rngs(0)), tx=tx,
      policy=mpjax.PolicyMap("mixed_bfloat16",
                             {nnx.Linear: mpjax.MXScaling()}))
  for state in (linen_state, nnx_state):
    text = step.lower(state, batch).as_text()
    # forward and kernel gradient (the input's gradient is not needed)
    assert text.count('stablehlo.composite "xla.scaled_dot"') == 2
    state, metrics = step(state, batch)
    state, metrics2 = step(state, batch)
    assert bool(metrics["grads_finite"])
    assert float(metrics2["loss"]) < float(metrics["loss"])


def test_mxscaling_rejects_an_unknown_format():
  with pytest.raises(ValueError, match="unknown format 'e5m2'"):
    mpjax.MXScaling(format="e5m2")


def test_mxscaling_entry_on_einsum_layers_is_mxfp8_dot_general():
  from flax import linen as nn  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top
  x = jax.random.normal(jax.random.key(5), (8, 64))
  layer = nn.Einsum((64, 32), "bk,kn->bn", use_bias=False)
  variables = layer.init(jax.random.key(1), x)
  pm = mpjax.PolicyMap("mixed_bfloat16", {nn.Einsum: mpjax.MXScaling()})
  got = jax.jit(mpjax.with_policy(layer.apply, pm))(variables, x)
  kernel = variables["params"]["kernel"]
  nnx_layer = nnx.Einsum("bk,kn->bn", (64, 32), rngs=nnx.Rngs(0))
  mpjax.with_nnx_policy(nnx_layer, mpjax.PolicyMap(
      "mixed_bfloat16", {nnx.Einsum: mpjax.MXScaling()}))
  for out, k in ((got, kernel), (nnx_layer(x), nnx_layer.kernel[...])):
    want = mpjax.mxfp8_dot_general(x.astype(jnp.bfloat16),
                                   k.astype(jnp.bfloat16), DENSE)
    np.testing.assert_array_equal(np.asarray(out, np.float32),
                                  np.asarray(want, np.float32))
