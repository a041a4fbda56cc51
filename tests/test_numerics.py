"""Tests for mpjax/_src/numerics.py: float32 islands for functional ops."""

import re

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import mpjax
from mpjax import numerics

F32, F16, BF16 = jnp.float32, jnp.float16, jnp.bfloat16


def sample(shape, dtype, seed=0, scale=3.0):
  x = np.random.default_rng(seed).normal(size=shape) * scale
  return jnp.asarray(x, dtype)


ELEMENTWISE = {
    "softmax": (numerics.softmax, jax.nn.softmax),
    "log_softmax": (numerics.log_softmax, jax.nn.log_softmax),
    "logsumexp": (numerics.logsumexp,
                  lambda x: jax.nn.logsumexp(x, axis=-1)),
}


@pytest.mark.parametrize("name", sorted(ELEMENTWISE))
@pytest.mark.parametrize("dtype", [F16, BF16, F32], ids=["f16", "bf16", "f32"])
def test_returns_float32_computed_from_the_upcast_input(name, dtype):
  ours, reference = ELEMENTWISE[name]
  x = sample((4, 7), dtype)
  y = ours(x)
  chex.assert_type(y, F32)
  chex.assert_trees_all_close(y, reference(x.astype(F32)), atol=1e-6,
                              rtol=1e-6)
  chex.assert_type(ours(x, dtype=dtype), dtype)


def test_bfloat16_softmax_over_many_classes_sums_to_one_in_float32():
  x = sample((2, 4096), BF16, scale=0.1)
  assert abs(float(numerics.softmax(x).sum(-1)[0]) - 1) < 1e-5
  # What the island avoids: bfloat16 probabilities of 1/4096 carry ~0.4%
  # rounding error each.
  naive = jax.nn.softmax(x).astype(F32).sum(-1)[0]
  assert abs(float(naive) - 1) > 1e-4


def test_logsumexp_keepdims_and_axis_none():
  x = sample((3, 5), F16)
  chex.assert_shape(numerics.logsumexp(x, keepdims=True), (3, 1))
  chex.assert_shape(numerics.logsumexp(x, axis=None), ())


def test_softmax_where_masks_like_jax():
  x = sample((2, 5), BF16)
  where = jnp.array([[True, True, False, True, False]] * 2)
  y = numerics.softmax(x, where=where)
  chex.assert_trees_all_close(y, jax.nn.softmax(x.astype(F32), where=where))
  assert float(y[0, 2]) == 0.0


def test_gradients_flow_back_in_the_input_dtype():
  x = sample((3, 6), F16)
  g = jax.grad(lambda x: numerics.log_softmax(x)[:, 0].sum())(x)
  chex.assert_type(g, F16)
  chex.assert_tree_all_finite(g)


@pytest.mark.parametrize("dtype", [F16, BF16], ids=["f16", "bf16"])
def test_cross_entropy_with_integer_labels_is_optax_on_float32_logits(dtype):
  logits, labels = sample((5, 11), dtype), jnp.arange(5) % 11
  loss = numerics.softmax_cross_entropy_with_integer_labels(logits, labels)
  chex.assert_type(loss, F32)
  chex.assert_shape(loss, (5,))
  chex.assert_trees_all_close(
      loss, optax.softmax_cross_entropy_with_integer_labels(
          logits.astype(F32), labels), rtol=1e-6)
  with pytest.raises(TypeError, match="labels must be integers"):
    numerics.softmax_cross_entropy_with_integer_labels(logits, labels * 1.0)


def test_cross_entropy_with_probabilities():
  logits = sample((4, 3), BF16)
  labels = jax.nn.one_hot(jnp.arange(4) % 3, 3, dtype=BF16)
  loss = numerics.softmax_cross_entropy(logits, labels, dtype=BF16)
  chex.assert_type(loss, BF16)
  chex.assert_trees_all_close(
      numerics.softmax_cross_entropy(logits, labels),
      optax.softmax_cross_entropy(logits.astype(F32), labels.astype(F32)))


def test_layer_norm_matches_a_float64_reference_like_torch():
  x = sample((4, 16), F16, scale=100.0)
  scale, bias = sample((16,), BF16, seed=1), sample((16,), F32, seed=2)
  y = numerics.layer_norm(x, scale, bias)
  chex.assert_type(y, F32)
  x64 = np.asarray(x, np.float64)
  mean = x64.mean(-1, keepdims=True)
  var = ((x64 - mean) ** 2).mean(-1, keepdims=True)  # biased, like torch
  expected = ((x64 - mean) / np.sqrt(var + 1e-5) * np.asarray(scale, np.float64)
              + np.asarray(bias, np.float64))
  np.testing.assert_allclose(np.asarray(y), expected, rtol=1e-4, atol=1e-4)
  chex.assert_type(numerics.layer_norm(x, dtype=F16), F16)


def test_rms_norm_matches_a_float64_reference():
  x = sample((4, 16), BF16)
  y = numerics.rms_norm(x, jnp.full((16,), 2.0, BF16))
  x64 = np.asarray(x, np.float64)
  expected = x64 / np.sqrt((x64 ** 2).mean(-1, keepdims=True) + 1e-6) * 2
  chex.assert_type(y, F32)
  np.testing.assert_allclose(np.asarray(y), expected, rtol=1e-5)


def float32_norm_graph(x, scale, bias, axis, center, fast_variance=False,
                       epsilon=1e-5):
  """A norm written as plain float32 jnp: what autodiff differentiated."""
  x = x.astype(F32)
  if center:
    mean = jnp.mean(x, axis, keepdims=True)
    var = (jnp.mean(jnp.square(x), axis, keepdims=True) - jnp.square(mean)
           if fast_variance else
           jnp.mean(jnp.square(x - mean), axis, keepdims=True))
    x = x - mean
  else:
    var = jnp.mean(jnp.square(x), axis, keepdims=True)
  y = x * jax.lax.rsqrt(var + epsilon)
  y = y if scale is None else y * scale.astype(F32)
  return y if bias is None else y + bias.astype(F32)


def ulp_close(dtype):
  """Tolerances of one rounding step of `dtype` (float32 for float32)."""
  eps = float(jnp.finfo(dtype).eps)
  return {"rtol": max(eps, 1e-5), "atol": 1e-6}


NORM_CASES = {
    "last_axis": (-1, (16,), True, False),
    "fast_variance": (-1, (16,), True, True),
    "two_axes_scale_broadcast": ((1, 2), (3, 1), False, False),
    "no_scale_no_bias": (-1, None, True, False),
    "rms_last_axis": (-1, (16,), None, False),
    "rms_two_axes": ((1, 2), (3, 16), None, False),
}


@pytest.mark.parametrize("case", sorted(NORM_CASES))
@pytest.mark.parametrize("dtype", [F16, BF16, F32], ids=["f16", "bf16", "f32"])
def test_norm_values_and_gradients_equal_those_of_the_float32_graph(case,
                                                                    dtype):
  axis, param_shape, with_bias, fast = NORM_CASES[case]
  center = with_bias is not None
  # Rows of small, unit and large spread: epsilon matters in the first.
  spread = jnp.array([[0.01], [1.0], [10.0]])
  x = ((sample((2, 3, 16), F32, scale=2.0) + 1) * spread).astype(dtype)
  scale = None if param_shape is None else sample(param_shape, F32, seed=1)
  bias = sample(param_shape, F32, seed=2) if with_bias else None
  if center:
    ours = lambda x, s, b: numerics.layer_norm(
        x, s, b, axis=axis, use_fast_variance=fast)
  else:
    ours = lambda x, s, b: numerics.rms_norm(x, s, axis=axis, epsilon=1e-5)
  reference = lambda x, s, b: float32_norm_graph(x, s, b, axis, center, fast)
  y, ours_vjp = jax.vjp(ours, x, scale, bias)
  y_ref, ref_vjp = jax.vjp(reference, x, scale, bias)
  chex.assert_type(y, F32)
  chex.assert_trees_all_close(y, y_ref, rtol=1e-5, atol=1e-6)
  g = sample(y.shape, F32, seed=3)
  (dx, dscale, dbias), (dx_ref, dscale_ref, dbias_ref) = ours_vjp(g), ref_vjp(g)
  chex.assert_type(dx, dtype)
  # dx is rounded to x's dtype once, from float32 values that differ only
  # by float32 rounding: equal up to one rounding step of that dtype.
  chex.assert_trees_all_close(dx.astype(F32), dx_ref.astype(F32),
                              **ulp_close(dtype))
  chex.assert_trees_all_equal_dtypes((dscale, dbias), (scale, bias))
  chex.assert_trees_all_close((dscale, dbias), (dscale_ref, dbias_ref),
                              rtol=1e-5, atol=1e-5)


def test_norm_backward_keeps_the_input_in_its_dtype_and_row_statistics():
  x = sample((4, 6, 16), BF16)
  scale, bias = sample((16,), F32, seed=1), sample((16,), F32, seed=2)
  for fn, stats in ((lambda x: numerics.layer_norm(x, scale, bias), 2),
                    (lambda x: numerics.rms_norm(x, scale), 1)):
    kept = jax.tree.leaves(jax.eval_shape(lambda x: jax.vjp(fn, x)[1], x))
    by_shape = sorted((leaf.shape, jnp.dtype(leaf.dtype).name)
                      for leaf in kept if leaf.shape != (16,))
    assert by_shape == [((4, 6, 1), "float32")] * stats + [
        ((4, 6, 16), "bfloat16")], by_shape
    # The float32 graph would keep float32 copies of x's shape instead.
    ref = lambda x: float32_norm_graph(x, scale, bias, -1, center=stats == 2)
    kept = jax.tree.leaves(jax.eval_shape(lambda x: jax.vjp(ref, x)[1], x))
    assert ((4, 6, 16), jnp.dtype(F32)) in [(l.shape, l.dtype) for l in kept]


def test_norm_gradients_work_under_jit_and_vmap():
  x = sample((3, 4, 16), F16)
  def loss(x):
    return jnp.sum(numerics.layer_norm(x) ** 3) + jnp.sum(
        numerics.rms_norm(x, jnp.full((16,), 2.0)) ** 3)
  def reference(x):
    return jnp.sum(float32_norm_graph(x, None, None, -1, True) ** 3) + jnp.sum(
        float32_norm_graph(x, jnp.full((16,), 2.0), None, -1, False,
                           epsilon=1e-6) ** 3)
  got = jax.jit(jax.vmap(jax.grad(loss)))(x)
  chex.assert_type(got, F16)
  chex.assert_trees_all_close(got.astype(F32),
                              jax.vmap(jax.grad(reference))(x).astype(F32),
                              **ulp_close(F16))


def test_integer_inputs_are_rejected():
  with pytest.raises(TypeError, match="floating array"):
    numerics.softmax(jnp.arange(3))


def qkv(dtype, scale=1.0, heads=2, kv_heads=2, seed=0):
  shape = (2, 5, heads, 4)
  kv_shape = (2, 5, kv_heads, 4)
  return (sample(shape, dtype, seed, scale), sample(kv_shape, dtype, seed + 1,
                                                    scale),
          sample(kv_shape, dtype, seed + 2))


def test_attention_in_float32_equals_flax():
  q, k, v = qkv(F32)
  mask = nn.make_causal_mask(jnp.ones((2, 5)))
  bias = sample((2, 2, 5, 5), F32, seed=7, scale=0.5)
  ours = numerics.dot_product_attention(q, k, v, bias=bias, mask=mask)
  theirs = nn.dot_product_attention(q, k, v, bias=bias, mask=mask)
  chex.assert_trees_all_close(ours, theirs, atol=1e-5, rtol=1e-5)
  causal = numerics.dot_product_attention(q, k, v, is_causal=True)
  chex.assert_trees_all_close(causal, nn.dot_product_attention(q, k, v,
                                                               mask=mask),
                              atol=1e-5, rtol=1e-5)


def test_grouped_query_attention_repeats_the_key_value_heads():
  q, k, v = qkv(F32, heads=4, kv_heads=2)
  ours = numerics.dot_product_attention(q, k, v)
  repeated = nn.dot_product_attention(q, jnp.repeat(k, 2, axis=-2),
                                      jnp.repeat(v, 2, axis=-2))
  chex.assert_trees_all_close(ours, repeated, atol=1e-5, rtol=1e-5)
  with pytest.raises(ValueError, match="not a multiple"):
    numerics.dot_product_attention(*qkv(F32, heads=3, kv_heads=2))


def test_float16_attention_whose_logits_overflow_stays_finite():
  q, k, v = qkv(F16, scale=300.0)  # q.k/2 reaches ~1e5 > 65504
  logits = jnp.einsum("bqhd,bkhd->bhqk", q.astype(F32), k.astype(F32)) / 2
  assert float(jnp.abs(logits).max()) > 65504
  flax_out = nn.dot_product_attention(q, k, v)
  assert not bool(jnp.all(jnp.isfinite(flax_out)))
  out = numerics.dot_product_attention(q, k, v)
  chex.assert_type(out, F16)
  chex.assert_tree_all_finite(out)
  expected = nn.dot_product_attention(*(a.astype(F32) for a in (q, k, v)))
  chex.assert_trees_all_close(out.astype(F32), expected, atol=2e-2, rtol=2e-2)

  def loss(q, k, v):
    return numerics.dot_product_attention(q, k, v).astype(F32).sum()

  grads = jax.grad(loss, argnums=(0, 1, 2))(q, k, v)
  chex.assert_type(grads, [F16, F16, F16])
  chex.assert_tree_all_finite(grads)


def test_attention_matmuls_take_compute_dtype_operands_both_ways():
  q, k, v = qkv(BF16)
  text = jax.jit(jax.grad(lambda q, k, v: numerics.dot_product_attention(
      q, k, v).astype(F32).sum(), argnums=(0, 1, 2))).lower(q, k, v).as_text()
  dots = re.findall(r"stablehlo\.dot_general.*?: \(([^)]*)\)\s*->\s*"
                    r"tensor<[^>]*x(\w+)>", text)
  assert len(dots) >= 5  # logits, (p @ v, dead here), dp, dv, dq, dk
  for operands, _ in dots:
    assert re.findall(r"x(bf16|f32)>", operands) == ["bf16", "bf16"]
  # The logits matmul returns float32.
  assert sum(result == "f32" for _, result in dots) == 1


def test_attention_dropout():
  q, k, v = qkv(F32)
  kept = numerics.dot_product_attention(q, k, v, dropout_rate=0.5,
                                        deterministic=True)
  chex.assert_trees_all_close(kept, numerics.dot_product_attention(q, k, v))
  dropped = numerics.dot_product_attention(
      q, k, v, dropout_rate=0.5, dropout_rng=jax.random.key(1))
  assert not np.allclose(dropped, kept)
  chex.assert_tree_all_finite(dropped)
  with pytest.raises(ValueError, match="dropout_rng"):
    numerics.dot_product_attention(q, k, v, dropout_rate=0.5)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16])
def test_cross_entropy_gradient_is_the_float32_graphs_and_keeps_low_residuals(
    dtype):
  rng = np.random.default_rng(0)
  logits = jnp.asarray(rng.normal(size=(3, 5, 11)) * 4, dtype)
  labels = jnp.asarray(rng.integers(0, 11, (3, 5)))
  ours = lambda x: numerics.softmax_cross_entropy_with_integer_labels(
      x, labels).mean()
  reference = lambda x: optax.softmax_cross_entropy_with_integer_labels(
      x.astype(jnp.float32), labels).mean()
  chex.assert_trees_all_close(ours(logits), reference(logits), rtol=1e-6)
  grad, expected = jax.grad(ours)(logits), jax.grad(reference)(logits)
  chex.assert_type(grad, dtype)
  chex.assert_trees_all_close(grad.astype(jnp.float32),
                              expected.astype(jnp.float32), atol=1e-7)
  # The backward pass keeps the logits in their own dtype, not float32 copies.
  # The backward pass keeps the logits in their own dtype and the float32
  # logsumexp [3, 5], not float32 [3, 5, 11] copies.
  kept = mpjax.residuals(ours, logits).bytes_by_dtype
  lse_bytes = 3 * 5 * 4
  if dtype == jnp.float32:
    assert kept["float32"] == logits.nbytes + lse_bytes
  else:
    assert kept[jnp.dtype(dtype).name] == logits.nbytes
    assert kept["float32"] == lse_bytes


def test_cross_entropy_rejects_mismatched_labels():
  with pytest.raises(ValueError, match="labels of shape"):
    numerics.softmax_cross_entropy_with_integer_labels(
        jnp.zeros((2, 4)), jnp.zeros((3,), jnp.int32))
  with pytest.raises(ValueError, match="axis 2"):
    numerics.softmax_cross_entropy_with_integer_labels(
        jnp.zeros((2, 4)), jnp.zeros((2,), jnp.int32), axis=2)


def test_attention_backward_keeps_only_compute_dtype_arrays():
  rng = np.random.default_rng(1)
  q, k, v = (jnp.asarray(rng.normal(size=(2, 16, 4, 8)), jnp.bfloat16)
             for _ in range(3))
  mask = jnp.tril(jnp.ones((16, 16), bool))
  ours = lambda q, k, v: numerics.dot_product_attention(
      q, k, v, mask=mask).astype(jnp.float32).sum()
  reference = lambda q, k, v: nn.dot_product_attention(
      *(a.astype(jnp.float32) for a in (q, k, v)), mask=mask).sum()
  kept = mpjax.residuals(ours, q, k, v)
  assert set(kept.bytes_by_dtype) == {"bfloat16"}
  for got, want in zip(jax.grad(ours, argnums=(0, 1, 2))(q, k, v),
                       jax.grad(reference, argnums=(0, 1, 2))(q, k, v)):
    chex.assert_type(got, jnp.bfloat16)
    chex.assert_trees_all_close(got.astype(jnp.float32), want, atol=0.05)


def test_a_fully_masked_row_stays_finite():
  q = k = v = jnp.ones((1, 4, 1, 2), jnp.float16)
  mask = jnp.zeros((4, 4), bool).at[1:, :].set(True)  # row 0 sees nothing
  out, grads = jax.value_and_grad(
      lambda q: numerics.dot_product_attention(q, k, v, mask=mask).astype(
          jnp.float32).sum())(q)
  chex.assert_tree_all_finite((out, grads))


def test_a_fully_masked_row_with_a_minus_inf_bias_equals_flax():
  q, k, v = qkv(F32)
  mask = jnp.ones((2, 2, 5, 5), bool).at[:, :, 1, :].set(False)  # row 1: none
  bias = jnp.zeros((2, 2, 5, 5)).at[:, :, 1, :].set(-jnp.inf)
  bias = bias.at[:, :, 3, 0].set(-jnp.inf)  # an unmasked -inf: probability 0
  ours = numerics.dot_product_attention(q, k, v, bias=bias, mask=mask)
  chex.assert_tree_all_finite(ours)
  chex.assert_trees_all_close(
      ours, nn.dot_product_attention(q, k, v, bias=bias, mask=mask),
      atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("broadcast", [True, False])
def test_attention_dropout_equals_flax_for_the_same_key_and_rate(broadcast):
  q, k, v = qkv(F32)
  kwargs = dict(dropout_rate=0.3, dropout_rng=jax.random.key(3),
                broadcast_dropout=broadcast)
  chex.assert_trees_all_close(
      numerics.dot_product_attention(q, k, v, **kwargs),
      nn.dot_product_attention(q, k, v, **kwargs), atol=1e-6, rtol=1e-6)
