"""fp8 recipes and the fp8 dot_general: casts, numerics vs NumPy and flax."""

import chex
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax.linen import fp8_ops

from mpjax._src import fp8
from mpjax._src import fp8_dot

DENSE = (((1,), (0,)), ((), ()))
E4M3, E5M2 = ml_dtypes.float8_e4m3fn, ml_dtypes.float8_e5m2


# ------------------------------------------------------------ NumPy model

def np_quantize(x, dtype, scale):
  """The recipe's quantization: x * (1 / scale) in float32, clip, round."""
  x = np.asarray(x, np.float32) * (np.float32(1.0) / np.float32(scale))
  limit = np.float32(ml_dtypes.finfo(dtype).max)
  return np.clip(x, -limit, limit).astype(dtype)


def np_delayed_scale(history, scale, dtype, margin=0, reduction="max"):
  a = np.max(history) if reduction == "max" else history[0]
  if a > 0 and np.isfinite(a):
    return np.float32(a) * np.float32(
        2.0 ** margin / float(ml_dtypes.finfo(dtype).max))
  return np.float32(scale)


def np_delayed_trajectory(amaxes, recipe, dtype):
  """Scales used at each step and the final history, for a list of amaxes."""
  history = np.zeros(recipe.history_length, np.float32)
  scale, scales = np.float32(1.0), []
  for amax in np.asarray(amaxes, np.float32):
    scale = np_delayed_scale(history, scale, dtype, recipe.margin,
                             recipe.amax_reduction)
    scales.append(scale)
    if np.isfinite(amax):
      history = np.concatenate([[amax], history[:-1]]).astype(np.float32)
  return np.asarray(scales, np.float32), history


def np_fp8_dense(x, k, g, xs, ks, gs, out_dtype=np.float32):
  """Forward and both gradients of x @ k in fp8 (hybrid), in NumPy."""
  qx = np_quantize(x, E4M3, xs).astype(np.float32)
  qk = np_quantize(k, E4M3, ks).astype(np.float32)
  qg = np_quantize(g, E5M2, gs).astype(np.float32)
  y = (qx @ qk) * (np.float32(xs) * np.float32(ks))
  dx = (qg @ qk.T) * (np.float32(gs) * np.float32(ks))
  dk = (qx.T @ qg) * (np.float32(gs) * np.float32(xs))
  return (y.astype(out_dtype), dx.astype(np.float32), dk.astype(np.float32))


def values(key, shape, scale, low=1.0, high=16.0):
  """``v * scale`` with |v| in [low, high): after quantization with `scale`
  the fp8 values span few binades, so float32 sums of their products are
  exact in any order (NumPy and XLA agree bit for bit)."""
  k1, k2 = jax.random.split(key)
  v = jax.random.uniform(k1, shape, minval=low, maxval=high)
  sign = jnp.where(jax.random.bernoulli(k2, 0.5, shape), 1.0, -1.0)
  return np.asarray(v * sign, np.float32) * np.float32(scale)


def seeded_state(recipe, input_amax, kernel_amax, grad_amax):
  state = recipe.init_state()
  for op, amax in (("input", input_amax), ("kernel", kernel_amax),
                   ("output_grad", grad_amax)):
    key = f"{op}_amax_history"
    state[key] = state[key].at[0].set(amax)
  return state


# ------------------------------------------------------------ casts

def test_saturating_cast_e4m3_gives_448_not_nan():
  out = fp8.saturating_cast(jnp.array([1000.0, -1e6, 448.0, 3.0]), "e4m3")
  chex.assert_trees_all_equal(out.astype(jnp.float32),
                              jnp.array([448.0, -448.0, 448.0, 3.0]))
  # The plain cast is what users hit: NaN.
  assert bool(jnp.isnan(jnp.array(1000.0).astype(jnp.float8_e4m3fn)
                        .astype(jnp.float32)))


def test_saturating_cast_e5m2_gives_57344_not_inf():
  out = fp8.saturating_cast(jnp.array([1e6, -jnp.inf, 2.0]), "e5m2")
  chex.assert_trees_all_equal(out.astype(jnp.float32),
                              jnp.array([57344.0, -57344.0, 2.0]))


def test_saturating_cast_keeps_nan_and_divides_by_scale():
  out = fp8.saturating_cast(jnp.array([jnp.nan, 10.0]), jnp.float8_e4m3fn,
                            scale=2.0).astype(jnp.float32)
  assert bool(jnp.isnan(out[0])) and float(out[1]) == 5.0


def test_formats_and_max():
  assert fp8.fp8_max("e4m3") == 448.0 and fp8.fp8_max("e5m2") == 57344.0
  assert fp8.DelayedScaling().dtypes == (jnp.float8_e4m3fn, jnp.float8_e5m2)
  assert fp8.CurrentScaling(format="e4m3").dtypes == (jnp.float8_e4m3fn,
                                                      jnp.float8_e4m3fn)


# ------------------------------------------------------------ bad input

@pytest.mark.parametrize("make, match", [
    (lambda: fp8.DelayedScaling(history_length=0), "history_length.*0"),
    (lambda: fp8.DelayedScaling(history_length=2.5), "history_length.*2.5"),
    (lambda: fp8.DelayedScaling(margin=-1), "margin.*-1"),
    (lambda: fp8.DelayedScaling(amax_reduction="mean"), "'mean'"),
    (lambda: fp8.DelayedScaling(format="e3m4"), "'e3m4'"),
    (lambda: fp8.CurrentScaling(granularity="block"), "'block'"),
    (lambda: fp8.CurrentScaling(format="int8"), "'int8'"),
    (lambda: fp8.fp8_dtype("e4m3fnuz"), "'e4m3fnuz'"),
])
def test_bad_recipe_or_format_names_the_value(make, match):
  with pytest.raises(ValueError, match=match):
    make()


def test_unknown_recipe_names_it():
  with pytest.raises(TypeError, match="'tensorwise'"):
    fp8_dot.fp8_dot_general(jnp.ones((2, 2)), jnp.ones((2, 2)), DENSE,
                            recipe="tensorwise")


def test_delayed_needs_state_of_its_history_length():
  recipe = fp8.DelayedScaling(history_length=4)
  with pytest.raises(ValueError, match="state="):
    fp8_dot.fp8_dot_general(jnp.ones((2, 2)), jnp.ones((2, 2)), DENSE,
                            recipe=recipe)
  with pytest.raises(ValueError, match=r"\(4,\)"):
    fp8_dot.fp8_dot_general(jnp.ones((2, 2)), jnp.ones((2, 2)), DENSE,
                            recipe=recipe,
                            state=fp8.DelayedScaling(8).init_state())


def test_recipes_are_hashable_static_configs():
  assert hash(fp8.DelayedScaling()) == hash(fp8.DelayedScaling())
  assert fp8.DelayedScaling() == fp8.DelayedScaling(1024, 0, "max", "hybrid")


# ------------------------------------------------------------ numerics

def _vjp(recipe, x, k, state, g):
  def f(x, k, state):
    return fp8_dot.fp8_dot_general(x, k, DENSE, recipe=recipe, state=state)
  y, pullback = jax.vjp(f, x, k, state)
  return (y,) + pullback(g)


def test_delayed_forward_and_backward_equal_numpy_exactly():
  recipe = fp8.DelayedScaling(history_length=8)
  # Scales 3/448, 0.5/448... (not powers of two), with some saturation.
  state = seeded_state(recipe, 3.0, 0.5, 0.02)
  xs = np_delayed_scale(np.asarray(state["input_amax_history"]), 1.0, E4M3)
  ks = np_delayed_scale(np.asarray(state["kernel_amax_history"]), 1.0, E4M3)
  gs = np_delayed_scale(np.asarray(state["output_grad_amax_history"]), 1.0,
                        E5M2)
  x = values(jax.random.key(0), (8, 32), xs)
  x[0, :3] = [1e4, -1e4, 450 * xs]  # beyond e4m3: saturates to +-448
  k = values(jax.random.key(1), (32, 4), ks)
  g = values(jax.random.key(2), (8, 4), gs, high=8.0)
  args = (jnp.asarray(x), jnp.asarray(k), state, jnp.asarray(g))
  y, dx, dk, new_state = _vjp(recipe, *args)  # op by op: exact
  ry, rdx, rdk = np_fp8_dense(x, k, g, xs, ks, gs)
  np.testing.assert_array_equal(np.asarray(y), ry)
  np.testing.assert_array_equal(np.asarray(dx), rdx)
  np.testing.assert_array_equal(np.asarray(dk), rdk)
  # Jitted, XLA:CPU fuses the dequantizing multiply into its dot kernel:
  # within one float32 rounding; the fp8 operands and the state are exact.
  jitted = jax.jit(_vjp, static_argnums=0)(recipe, *args)
  for got, want in zip(jitted[:3], (ry, rdx, rdk)):
    np.testing.assert_allclose(np.asarray(got), want, rtol=2.5e-7, atol=0)
  chex.assert_trees_all_equal(jitted[3], new_state)
  # The gradient of the state is its updated value.
  for op, t, s in (("input", x, xs), ("kernel", k, ks),
                   ("output_grad", g, gs)):
    np.testing.assert_array_equal(np.asarray(new_state[f"{op}_scale"]), [s])
    hist = np.asarray(state[f"{op}_amax_history"])
    np.testing.assert_array_equal(
        np.asarray(new_state[f"{op}_amax_history"]),
        np.concatenate([[np.abs(t).max()], hist[:-1]]).astype(np.float32))


def test_delayed_bfloat16_operands_give_bfloat16_results():
  recipe = fp8.DelayedScaling(history_length=4)
  x = jnp.ones((4, 8), jnp.bfloat16)
  k = jnp.ones((8, 2), jnp.bfloat16)
  y, dx, dk, _ = _vjp(recipe, x, k, recipe.init_state(),
                      jnp.ones((4, 2), jnp.bfloat16))
  assert (y.dtype, dx.dtype, dk.dtype) == (jnp.bfloat16,) * 3
  chex.assert_trees_all_equal(y, jnp.full((4, 2), 8.0, jnp.bfloat16))


def test_delayed_agrees_with_flax_fp8_ops():
  recipe = fp8.DelayedScaling(history_length=16)
  state = seeded_state(recipe, 2.5, 0.3, 0.01)
  x = jax.random.normal(jax.random.key(0), (8, 16)) * 2
  k = jax.random.normal(jax.random.key(1), (16, 4)) * 0.3

  def ours(x, k, st):
    y = fp8_dot.fp8_dot_general(x, k, DENSE, recipe=recipe, state=st)
    return jnp.sum(jnp.sin(y)), y

  def theirs(x, k, st):
    y = fp8_ops.fp8_scaled_dot_general(
        x, k, DENSE, preferred_element_type=jnp.float32,
        lhs_scale=st["input_scale"], rhs_scale=st["kernel_scale"],
        grad_scale=st["output_grad_scale"],
        lhs_amax_history=st["input_amax_history"],
        rhs_amax_history=st["kernel_amax_history"],
        grad_amax_history=st["output_grad_amax_history"])
    return jnp.sum(jnp.sin(y)), y

  (ga, ya) = jax.grad(ours, (0, 1, 2), has_aux=True)(x, k, state)
  (gb, yb) = jax.grad(theirs, (0, 1, 2), has_aux=True)(x, k, state)
  # flax computes the scale as 1 / ((max / amax) / 2**margin), we as
  # amax * (2**margin / max): equal to one float32 rounding, and so are the
  # results (the fp8 operands agree).
  np.testing.assert_allclose(ya, yb, rtol=2.5e-7)
  for a, b in zip(ga[:2], gb[:2]):
    np.testing.assert_allclose(a, b, rtol=2.5e-7, atol=1e-12)
  for name in ga[2]:
    if name.endswith("scale"):
      np.testing.assert_allclose(ga[2][name], gb[2][name], rtol=1.2e-7)
    else:  # flax rotates its history; the window of values is the same
      np.testing.assert_array_equal(np.sort(np.asarray(ga[2][name])),
                                    np.sort(np.asarray(gb[2][name])))


@pytest.mark.parametrize("reduction, margin", [("max", 0),
                                               ("most_recent", 1)])
def test_delayed_trajectory_equals_numpy_model(reduction, margin):
  recipe = fp8.DelayedScaling(history_length=5, margin=margin,
                              amax_reduction=reduction)
  steps = 23
  gains = 2.0 ** np.sin(np.arange(steps) * 0.7) * np.where(
      np.arange(steps) == 11, 100.0, 1.0)  # one 100x jump
  gains[15] = np.inf  # an overflowed gradient: not recorded
  k = jax.random.normal(jax.random.key(1), (6, 3))

  @jax.jit
  def step(state, gain):
    x = jax.random.normal(jax.random.key(0), (4, 6)) * gain
    _, pullback = jax.vjp(
        lambda s: fp8_dot.fp8_dot_general(x, k, DENSE, recipe=recipe,
                                          state=s), state)
    g = jnp.ones((4, 3)) * gain
    return pullback(g)[0], jnp.max(jnp.abs(x))

  state = recipe.init_state()
  used, x_amax = [], []
  for gain in gains:
    state, amax = step(state, jnp.float32(gain))
    used.append(float(state["output_grad_scale"][0]))
    x_amax.append(float(amax))
  scales, history = np_delayed_trajectory(gains, recipe, E5M2)
  np.testing.assert_array_equal(np.asarray(used, np.float32), scales)
  np.testing.assert_array_equal(np.asarray(state["output_grad_amax_history"]),
                                history)
  _, x_history = np_delayed_trajectory(np.asarray(x_amax, np.float32),
                                       recipe, E4M3)
  np.testing.assert_array_equal(np.asarray(state["input_amax_history"]),
                                x_history)


@pytest.mark.parametrize("granularity", ["tensor", "row"])
def test_current_scaling_equals_numpy(granularity):
  recipe = fp8.CurrentScaling(granularity=granularity)
  x = np.asarray(jax.random.normal(jax.random.key(0), (8, 16)), np.float32)
  k = np.asarray(jax.random.normal(jax.random.key(1), (16, 4)), np.float32)
  g = np.asarray(jax.random.normal(jax.random.key(2), (8, 4)), np.float32)
  y, pullback = jax.vjp(lambda a, b: fp8_dot.fp8_dot_general(
      a, b, DENSE, recipe=recipe), jnp.asarray(x), jnp.asarray(k))
  dx, dk = pullback(jnp.asarray(g))

  def q(t, dtype, axis):
    amax = (np.abs(t).max() if granularity == "tensor"
            else np.abs(t).max(axis=axis, keepdims=True))
    s = (amax / np.float32(ml_dtypes.finfo(dtype).max)).astype(np.float32)
    return np_quantize(t, dtype, s).astype(np.float32), s

  def mm(a, sa, b, sb):
    out = a @ b  # float32 sums of fp8 products
    return out * (sa * sb if granularity == "tensor" else sa * sb)

  qx, sx = q(x, E4M3, 1)
  qk, sk = q(k, E4M3, 0)
  ry = mm(qx, sx, qk, sk)
  qg, sg = q(g, E5M2, 1)
  qkt, skt = q(k.T, E4M3, 0)
  rdx = mm(qg, sg, qkt, skt)
  qgt, sgt = q(g.T, E5M2, 1)
  qxt, sxt = q(x, E4M3, 0)
  rdk = mm(qgt, sgt, qxt, sxt).T
  # The sums are not exact here (Gaussian data): float32 order differences.
  np.testing.assert_allclose(np.asarray(y), ry, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(np.asarray(dx), rdx, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(np.asarray(dk), rdk, rtol=1e-6, atol=1e-6)
  # And fp8 is close to float32.
  np.testing.assert_allclose(np.asarray(y), x @ k, atol=0.2 * np.abs(
      x @ k).max())


@pytest.mark.parametrize("recipe", [fp8.CurrentScaling(),
                                    fp8.CurrentScaling("row")])
def test_einsum_with_batch_dims_is_exact_on_small_integers(recipe):
  # Integers |v| <= 4 with a 7 in every row (of every layout the three
  # matmuls quantize): scales 7/448 = 2**-6 and 7/57344 = 2**-13, so every
  # value is exact in e4m3/e5m2 and fp8 equals float32.
  ints = lambda key, shape: jax.random.randint(key, shape, -4, 5).astype(
      jnp.float32)
  a = ints(jax.random.key(0), (2, 3, 4, 5)).at[..., 0].set(7.0).at[
      :, 0, 0, :].set(7.0)
  b = ints(jax.random.key(1), (2, 5, 6)).at[:, 0, :].set(7.0).at[
      :, :, 0].set(7.0)
  g = ints(jax.random.key(2), (2, 4, 3, 6)).at[..., 0].set(7.0).at[
      :, 0, 0, :].set(7.0)
  eq = "bsqd,bdn->bqsn"
  y1, p1 = jax.vjp(lambda a, b: fp8_dot.fp8_einsum(eq, a, b, recipe=recipe),
                   a, b)
  y2, p2 = jax.vjp(lambda a, b: jnp.einsum(eq, a, b), a, b)
  chex.assert_trees_all_equal(y1, y2)
  chex.assert_trees_all_equal(p1(g), p2(g))


def test_grad_dims_transpose_any_layout():
  # The operand-gradient dimension numbers against autodiff of float32.
  lhs = jax.random.normal(jax.random.key(0), (3, 2, 5, 4))
  rhs = jax.random.normal(jax.random.key(1), (4, 7, 3, 5))
  dims = (((2, 3), (3, 0)), ((0,), (2,)))
  y, pullback = jax.vjp(lambda a, b: jax.lax.dot_general(a, b, dims),
                        lhs, rhs)
  g = jax.random.normal(jax.random.key(2), y.shape)
  want_a, want_b = pullback(g)
  (ld, lp), (rd, rp) = (fp8_dot.grad_lhs_dims(dims, 4, 4),
                        fp8_dot.grad_rhs_dims(dims, 4, 4))
  got_a = jnp.transpose(jax.lax.dot_general(g, rhs, ld), lp)
  got_b = jnp.transpose(jax.lax.dot_general(g, lhs, rd), rp)
  np.testing.assert_allclose(got_a, want_a, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(got_b, want_b, rtol=1e-5, atol=1e-5)


def test_lowered_matmuls_are_all_fp8_with_float32_results():
  recipe = fp8.DelayedScaling(history_length=4)

  def loss(x, k, st):
    return jnp.sum(fp8_dot.fp8_dot_general(x, k, DENSE, recipe=recipe,
                                           state=st).astype(jnp.float32))

  text = jax.jit(jax.value_and_grad(loss, (0, 1, 2))).lower(
      jnp.ones((4, 8), jnp.bfloat16), jnp.ones((8, 2), jnp.bfloat16),
      recipe.init_state()).as_text()
  from mpjax._src import program_audit
  report = program_audit.audit_lowered(text)
  pairs = sorted((m.lhs_dtype, m.rhs_dtype, m.out_dtype)
                 for m in report.matmuls)
  assert pairs == [("float8_e4m3fn", "float8_e4m3fn", "float32"),
                   ("float8_e5m2", "float8_e4m3fn", "float32"),
                   ("float8_e5m2", "float8_e4m3fn", "float32")]
  per_matmul = 2 * 4 * 8 * 2
  assert report.fp8_flops() == {"float8_e4m3fn": 3 * per_matmul,
                                "float8_e5m2": 2 * per_matmul,
                                "fp8": 3 * per_matmul}


def test_amax_of_a_large_operand_with_one_nan_is_not_finite():
  # XLA:CPU's vectorized max reduction (>= 4096 elements) drops NaN.
  from mpjax._src import fp8 as fp8_lib  # pylint: disable=g-import-not-at-top
  from mpjax._src import mxfp8_dot  # pylint: disable=g-import-not-at-top
  x = jnp.ones((64, 128)).at[3, 5].set(jnp.nan)
  assert not bool(jnp.isfinite(jax.jit(fp8_lib.amax_of)(x)))
  _, scale = jax.jit(mxfp8_dot.mxfp8_quantize)(jnp.ones((512, 256)).at[
      100, 40].set(jnp.nan))
  scale = np.asarray(scale.astype(jnp.float32))
  assert np.isnan(scale[100, 1]) and np.isfinite(np.delete(
      scale.reshape(-1), 100 * 8 + 1)).all()
