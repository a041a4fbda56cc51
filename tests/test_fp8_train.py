"""fp8 layers in the train step: state updates, skips, accumulation, resume."""

import json
import os
import subprocess
import sys

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import mpjax
from mpjax._src import fp8

OWG = mpjax.OVERWRITE_WITH_GRADIENT
RECIPE = mpjax.DelayedScaling(history_length=4)
E5M2_MAX = 57344.0


class MLP(nn.Module):

  @nn.compact
  def __call__(self, x):
    x = nn.Dense(8)(x)
    x = nn.LayerNorm()(nn.relu(x))
    return nn.Dense(4)(x)


class NNXMLP(nnx.Module):

  def __init__(self, rngs):
    self.l1 = nnx.Linear(6, 8, rngs=rngs)
    self.ln = nnx.LayerNorm(8, rngs=rngs)
    self.l2 = nnx.Linear(8, 4, rngs=rngs)

  def __call__(self, x):
    return self.l2(self.ln(nnx.relu(self.l1(x))))


def loss_fn(params, batch, apply_fn, rng):
  del rng
  # d loss / d output = batch["c"]: the output gradients' amax is known.
  y = apply_fn({"params": params}, batch["x"]).astype(jnp.float32)
  return jnp.sum(y * batch["c"])


def batch_with(grad_amax, key=0):
  c = jnp.full((5, 4), 0.25).at[0, 0].set(grad_amax)
  return {"x": jax.random.normal(jax.random.key(key), (5, 6)), "c": c}


def linen_state(tx, policy="mixed_bfloat16", recipe=RECIPE):
  model = MLP()
  pm = mpjax.PolicyMap(policy, {nn.Dense: recipe})
  variables = mpjax.with_policy(model.init, pm)(jax.random.key(0),
                                                jnp.ones((5, 6)))
  return mpjax.TrainState.create(apply_fn=model.apply,
                                 params=variables["params"], tx=tx,
                                 policy=pm, model_state={OWG: variables[OWG]})


def grad_history(state, layer="Dense_1"):
  return np.asarray(state.model_state[OWG][layer]["output_grad_amax_history"])


def test_linen_init_under_the_map_creates_the_state():
  state = linen_state(optax.sgd(0.1))
  chex.assert_trees_all_equal(state.model_state[OWG]["Dense_0"],
                              RECIPE.init_state())
  assert set(state.model_state[OWG]) == {"Dense_0", "Dense_1"}


def test_linen_apply_without_the_state_names_the_fix():
  model = MLP()
  pm = mpjax.PolicyMap("mixed_bfloat16", {nn.Dense: RECIPE})
  params = model.init(jax.random.key(0), jnp.ones((5, 6)))["params"]
  with pytest.raises(ValueError, match=r"Dense_0.*with_policy\(model.init"):
    mpjax.with_policy(model.apply, pm)({"params": params}, jnp.ones((5, 6)))


def test_fp8_on_a_layer_without_matmul_names_it():
  model = MLP()
  pm = mpjax.PolicyMap("mixed_bfloat16", {"LayerNorm_0": RECIPE})
  with pytest.raises(ValueError, match=r"'LayerNorm_0' \(.*LayerNorm\)"):
    mpjax.with_policy(model.init, pm)(jax.random.key(0), jnp.ones((5, 6)))
  with pytest.raises(ValueError, match=r"'ln' \(.*LayerNorm\)"):
    mpjax.with_nnx_policy(NNXMLP(nnx.Rngs(0)), mpjax.PolicyMap(
        "mixed_bfloat16", {nnx.LayerNorm: RECIPE}))


def test_step_updates_the_state_and_runs_fp8_matmuls():
  state = linen_state(mpjax.loss_scaled(optax.sgd(0.01), mpjax.NoScaling()))
  step = mpjax.make_train_step(loss_fn)
  lowered = mpjax.audit_program(step, state, batch_with(3.0))
  flops = lowered.matmul_flops_by_dtype()
  assert set(flops) == {"float8_e4m3fn", "float8_e5m2*float8_e4m3fn"}
  state, _ = step(state, batch_with(3.0))
  state, _ = step(state, batch_with(2.0))
  np.testing.assert_array_equal(grad_history(state), [2.0, 3.0, 0.0, 0.0])
  # The second step's gradient scale came from the first step's amax.
  np.testing.assert_allclose(
      state.model_state[OWG]["Dense_1"]["output_grad_scale"],
      [3.0 / E5M2_MAX], rtol=1e-7)
  assert float(state.model_state[OWG]["Dense_0"]["kernel_amax_history"][0]) > 0


def test_skipped_step_leaves_histories_and_scales_untouched():
  scaling = mpjax.DynamicScaling.like_torch(initial_scale=4.0)
  state = linen_state(mpjax.loss_scaled(optax.sgd(0.01), scaling),
                      policy="mixed_float16")
  step = mpjax.make_train_step(loss_fn)
  state, _ = step(state, batch_with(3.0))
  before = jax.tree.map(np.asarray, state.model_state[OWG])
  state, metrics = step(state, batch_with(jnp.inf))
  assert not bool(metrics["grads_finite"])
  chex.assert_trees_all_equal(jax.tree.map(np.asarray,
                                           state.model_state[OWG]), before)


def test_float16_loss_scaling_e5m2_gradients_see_the_scaled_loss():
  scaling = mpjax.DynamicScaling.like_torch(initial_scale=2.0**10)
  state = linen_state(mpjax.loss_scaled(optax.sgd(0.01), scaling),
                      policy="mixed_float16")
  step = mpjax.make_train_step(loss_fn)
  state, metrics = step(state, batch_with(3.0))
  assert bool(metrics["grads_finite"])
  np.testing.assert_array_equal(grad_history(state)[0], 3.0 * 2.0**10)


def test_bfloat16_params_and_compute():
  pm_policy = "p=bf16,c=bf16,o=bf16"
  state = linen_state(mpjax.loss_scaled(optax.sgd(0.01), mpjax.NoScaling()),
                      policy=pm_policy)
  step = mpjax.make_train_step(loss_fn)
  state, metrics = step(state, batch_with(3.0))
  assert state.params["Dense_0"]["kernel"].dtype == jnp.bfloat16
  assert state.model_state[OWG]["Dense_0"]["input_scale"].dtype == jnp.float32
  np.testing.assert_array_equal(grad_history(state)[0], 3.0)
  assert np.isfinite(float(metrics["loss"]))


def test_accumulation_takes_the_max_over_micro_batches():
  # marin #7659: micro-batch gradient amaxes 10 and 1; averaging gives 5.5,
  # keeping the last gives 1; the next scale must come from 10.
  tx = mpjax.loss_scaled(optax.MultiSteps(optax.sgd(0.01), 2),
                         mpjax.NoScaling())
  state = linen_state(tx)
  step = mpjax.make_train_step(loss_fn)
  state, _ = step(state, batch_with(10.0, key=1))
  state, _ = step(state, batch_with(1.0, key=2))
  np.testing.assert_array_equal(grad_history(state)[:2], [1.0, 10.0])
  state, _ = step(state, batch_with(0.5, key=3))
  np.testing.assert_allclose(
      state.model_state[OWG]["Dense_1"]["output_grad_scale"],
      [10.0 / E5M2_MAX], rtol=1e-7)


def test_resume_is_bit_exact(tmp_path):
  tx = mpjax.loss_scaled(optax.adam(1e-2), mpjax.NoScaling())
  step = mpjax.make_train_step(loss_fn, donate=False)
  state = linen_state(tx)
  for i in range(2):
    state, _ = step(state, batch_with(1.0 + i, key=i))
  mpjax.save(str(tmp_path / "ckpt"), state)
  resumed = mpjax.restore(str(tmp_path / "ckpt"), like=linen_state(tx))
  for i in range(2, 4):
    state, _ = step(state, batch_with(1.0 + i, key=i))
    resumed, _ = step(resumed, batch_with(1.0 + i, key=i))
  chex.assert_trees_all_equal(jax.tree.map(np.asarray, resumed.params),
                              jax.tree.map(np.asarray, state.params))
  chex.assert_trees_all_equal(
      jax.tree.map(np.asarray, resumed.model_state[OWG]),
      jax.tree.map(np.asarray, state.model_state[OWG]))


@pytest.mark.parametrize("recipe", [RECIPE, mpjax.CurrentScaling()])
def test_nnx_step(recipe):
  model = NNXMLP(nnx.Rngs(0))
  pm = mpjax.PolicyMap("mixed_bfloat16", {nnx.Linear: recipe})
  state = mpjax.TrainState.from_nnx(
      model, tx=mpjax.loss_scaled(optax.sgd(0.01), mpjax.NoScaling()),
      policy=pm)
  step = mpjax.make_train_step(loss_fn)
  flops = mpjax.audit_program(step, state, batch_with(3.0)
                              ).matmul_flops_by_dtype()
  assert set(flops) == {"float8_e4m3fn", "float8_e5m2*float8_e4m3fn"}
  state, metrics = step(state, batch_with(3.0))
  assert np.isfinite(float(metrics["loss"]))
  if isinstance(recipe, fp8.DelayedScaling):
    history = state.model_state[OWG]["l2"]["fp8_output_grad_amax_history"]
    np.testing.assert_array_equal(np.asarray(history[...])[0], 3.0)
  else:
    assert state.model_state is None or OWG not in state.model_state


def test_attention_layer_entry_makes_its_projections_fp8():
  attn = nn.MultiHeadDotProductAttention(num_heads=2, qkv_features=8)
  pm = mpjax.PolicyMap("mixed_bfloat16",
                       {nn.MultiHeadDotProductAttention: RECIPE})
  x = jnp.ones((2, 3, 8))
  variables = mpjax.with_policy(attn.init, pm)(jax.random.key(0), x)
  assert set(variables[OWG]) == {"query", "key", "value", "out"}
  flops = mpjax.audit_program(
      lambda v, x: mpjax.with_policy(attn.apply, pm)(v, x), variables, x
  ).matmul_flops_by_dtype()
  assert flops["float8_e4m3fn"] == 4 * 2 * 6 * 8 * 8
  assert flops["bfloat16"] > 0  # the attention core stays 16-bit


def test_sharded_amax_is_the_global_max():
  worker = os.path.join(os.path.dirname(os.path.abspath(__file__)),
                        "fp8_sharding_worker.py")
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4",
             JAX_CPU_ENABLE_ASYNC_DISPATCH="false", JAX_PLATFORMS="cpu")
  proc = subprocess.run([sys.executable, worker], env=env, check=False,
                        capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-4000:]
  out = json.loads(proc.stdout.strip().splitlines()[-1])
  np.testing.assert_array_equal(
      out["data_parallel_4"]["Dense_1"]["output_grad_amax_history"][:3],
      [5.0, 4.0, 3.0])
  chex.assert_trees_all_equal(out["data_parallel_4"], out["single"])


def test_nnx_einsum_runs_its_einsum_in_fp8():
  layer = nnx.Einsum("btd,dh->bth", (6, 4), (4,), rngs=nnx.Rngs(0))
  pm = mpjax.PolicyMap("mixed_bfloat16", {nnx.Einsum: mpjax.CurrentScaling()})
  mpjax.with_nnx_policy(layer, pm)
  x = jnp.ones((2, 3, 6))
  graphdef, state = nnx.split(layer)

  def loss(state, x):
    return jnp.sum(nnx.merge(graphdef, state)(x).astype(jnp.float32))

  report = mpjax.audit_program(jax.value_and_grad(loss), state, x)
  assert set(report.matmul_flops_by_dtype()) == {
      "float8_e4m3fn", "float8_e5m2*float8_e4m3fn"}
  np.testing.assert_allclose(nnx.merge(graphdef, state)(x),
                             jnp.einsum("btd,dh->bth", x, layer.kernel[...])
                             + layer.bias[...], atol=0.1)  # fp8 error


def test_nnx_reapplying_a_map_keeps_the_fp8_state_and_removing_it_drops_it():
  model = NNXMLP(nnx.Rngs(0))
  pm = mpjax.PolicyMap("mixed_bfloat16", {nnx.Linear: RECIPE})
  mpjax.with_nnx_policy(model, pm)
  model.l1.fp8_input_scale[...] = jnp.full((1,), 0.5)
  mpjax.with_nnx_policy(model, mpjax.PolicyMap("mixed_bfloat16",
                                               {nnx.Linear: RECIPE}))
  assert float(model.l1.fp8_input_scale[...][0]) == 0.5
  mpjax.with_nnx_policy(model, "mixed_bfloat16")
  assert not hasattr(model.l1, "fp8_input_scale")
  mpjax.with_nnx_policy(model, mpjax.PolicyMap(
      "mixed_bfloat16", {nnx.Linear: mpjax.CurrentScaling()}))
  assert not hasattr(model.l1, "fp8_input_scale")
