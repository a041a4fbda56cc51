"""Tests for mpjax/_src/program_audit.py: the lowered program's dtypes."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import mpjax
import models
import seed_mlp


def tiny_state(policy, model=None):
  model = model or models.MLP(hidden=(16,), num_classes=4)
  params = model.init(jax.random.key(0), jnp.ones((1, 8)))["params"]
  tx = mpjax.loss_scaled(optax.adam(1e-3), mpjax.DynamicScaling.like_torch())
  return mpjax.TrainState.create(apply_fn=model.apply, params=params, tx=tx,
                                 policy=policy)


BATCH = {"x": jnp.ones((16, 8)), "y": jnp.zeros((16,), jnp.int32)}


def test_dot_flops_are_two_m_n_k():
  report = mpjax.audit_program(lambda a, b: a @ b, jnp.ones((3, 5)),
                               jnp.ones((5, 7)))
  (op,) = report.matmuls
  assert (op.kind, op.flops, op.lhs_dtype) == ("dot_general", 2 * 3 * 5 * 7,
                                               "float32")
  batched = mpjax.audit_program(
      lambda a, b: jnp.einsum("bij,bjk->bik", a, b), jnp.ones((4, 3, 5)),
      jnp.ones((4, 5, 7)))
  assert batched.matmul_flops == 4 * 2 * 3 * 5 * 7


def test_an_already_lowered_program_is_audited_as_it_is():
  lowered = jax.jit(lambda a, b: a @ b).lower(jnp.ones((3, 5)),
                                               jnp.ones((5, 7)))
  (op,) = mpjax.audit_program(lowered).matmuls
  assert op.flops == 2 * 3 * 5 * 7
  with pytest.raises(TypeError, match="takes no arguments"):
    mpjax.audit_program(lowered, jnp.ones(3))


def test_convolution_flops():
  conv = nn.Conv(6, (3, 3))
  x = jnp.ones((2, 8, 8, 3), jnp.bfloat16)
  variables = conv.init(jax.random.key(0), x)
  report = mpjax.audit_program(
      lambda v, x: conv.apply(mpjax.get_policy("bfloat16").cast_to_compute(v),
                              x), variables, x)
  (op,) = report.matmuls
  assert op.kind == "convolution" and op.lhs_dtype == "bfloat16"
  assert op.flops == 2 * (2 * 8 * 8 * 6) * (3 * 3 * 3)


@pytest.mark.parametrize("policy, dtype", [("mixed_float16", "float16"),
                                           ("mixed_bfloat16", "bfloat16"),
                                           ("float32", "float32")])
def test_every_matmul_of_a_mixed_step_is_in_the_compute_dtype(policy, dtype):
  state = tiny_state(policy)
  report = mpjax.audit_program(mpjax.make_train_step(seed_mlp.loss_fn),
                               state, BATCH)
  assert len(report.matmuls) == 5
  assert report.matmul_share(dtype) == 1.0
  assert report.host_ops == ()
  assert report.float32_islands().get("exponential") == 1  # softmax-xent
  if dtype != "float32":
    assert report.converts > 0


class HalfAndFull(nn.Module):
  """A model with one Dense forced to float32: a deliberately wrong policy."""

  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Dense(16)(x))
    x = x.astype(jnp.float32)
    return nn.Dense(4, dtype=jnp.float32, param_dtype=jnp.float32)(x)


def test_a_float32_matmul_inside_a_mixed_step_is_caught():
  state = tiny_state("mixed_bfloat16", HalfAndFull())
  report = mpjax.audit_program(mpjax.make_train_step(seed_mlp.loss_fn),
                               state, BATCH)
  assert 0 < report.matmul_share("bfloat16") < 1
  assert "float32" in report.matmul_flops_by_dtype()


def test_host_callbacks_are_reported():
  def noisy(x):
    jax.debug.print("x = {}", x.sum())
    return x * 2

  report = mpjax.audit_program(noisy, jnp.ones(3))
  assert report.host_ops and report.host_ops[0].startswith("host callback")


def test_residuals_of_a_mixed_mlp_are_about_half():
  model = models.MLP(hidden=(256, 256), num_classes=10)
  x = jnp.ones((64, 32))
  params = model.init(jax.random.key(0), x)["params"]

  def loss(policy):
    apply = mpjax.with_policy(model.apply, policy)
    return lambda p: apply({"params": p}, x).sum()

  full = mpjax.residuals(loss("float32"), params)
  half = mpjax.residuals(loss("mixed_bfloat16"), params)
  # relu keeps a bool mask in both; everything else halves.
  assert set(full.bytes_by_dtype) == {"float32", "bool"}
  assert set(half.bytes_by_dtype) == {"bfloat16", "bool"}
  np.testing.assert_allclose(
      half.bytes_by_dtype["bfloat16"] / full.bytes_by_dtype["float32"], 0.5,
      rtol=1e-6)
  assert half.bytes_by_dtype["bool"] == full.bytes_by_dtype["bool"]


def test_matmul_precisions_counts_each_dot_by_its_precision():
  from mpjax._src.program_audit import matmul_precisions
  def f(a, b):
    return jnp.dot(a, b, precision="highest") + jnp.dot(a, b)
  x = jnp.ones((4, 4))
  counts = matmul_precisions(jax.jit(f).lower(x, x).as_text())
  assert counts == {"HIGHEST": 1, "DEFAULT": 1}


def test_attention_residuals_are_the_seq_by_seq_arrays():
  from mpjax._src.program_audit import attention_residuals
  q = jnp.ones((2, 16, 2, 8), jnp.bfloat16)

  def loss(q):
    return mpjax.numerics.dot_product_attention(q, q, q).astype(
        jnp.float32).sum()

  found = attention_residuals(loss, q, seq_len=16)
  # The island keeps the bfloat16 probabilities [2, 2, 16, 16] only.
  assert found == {"bfloat16": 2 * 2 * 16 * 16 * 2}
