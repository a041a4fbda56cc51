"""Tests for mpjax/_src/train_state.py and train_step.py, end to end."""

import re
import warnings

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import mpjax
import models
import seed_mlp


def tiny_batch(n=16, features=8, classes=4, seed=0):
  rng = np.random.default_rng(seed)
  return {"x": jnp.asarray(rng.random((n, features)), jnp.float32),
          "y": jnp.asarray(rng.integers(0, classes, n), jnp.int32)}


def make_state(policy="float32", scaling=mpjax.NoScaling(), lr=1e-2,
               hidden=(16,), classes=4, rng=None, tx=None):
  model = models.MLP(hidden=hidden, num_classes=classes)
  params = model.init(jax.random.key(0), tiny_batch()["x"])["params"]
  tx = tx or mpjax.loss_scaled(optax.adam(lr), scaling)
  return mpjax.TrainState.create(apply_fn=model.apply, params=params, tx=tx,
                                 policy=policy, rng=rng)


def all_finite(tree):
  return all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(tree))


@pytest.mark.parametrize("config", seed_mlp.CONFIGS, ids=lambda c: c.name)
def test_seed_mlp_trains_in_each_configuration(config):
  state = make_state(config.policy, config.scaling)
  step = mpjax.make_train_step(seed_mlp.loss_fn)
  batch = tiny_batch()
  losses = []
  for _ in range(30):
    state, metrics = step(state, batch)
    losses.append(float(metrics["loss"]))
  chex.assert_tree_all_finite(state.params)
  chex.assert_trees_all_equal_dtypes(
      state.params, jax.tree.map(lambda p: p.astype(jnp.float32),
                                 state.params))
  assert losses[-1] < 0.8 * losses[0], losses
  chex.assert_type([metrics["loss"], metrics["loss_scale"],
                    metrics["grad_norm"], metrics["grads_finite"],
                    metrics["skipped_steps"]],
                   [jnp.float32, jnp.float32, jnp.float32, jnp.bool_,
                    jnp.int32])
  assert int(state.step) == 30


def test_float16_from_absurd_scale_backs_off_then_trains():
  state = make_state("p=f32,c=f16,o=f16",
                     mpjax.DynamicScaling(initial_scale=2.0**40,
                                          growth_interval=1000))
  step = mpjax.make_train_step(seed_mlp.loss_fn)
  batch = tiny_batch()
  scales, finite = [], []
  for _ in range(60):
    state, metrics = step(state, batch)
    chex.assert_tree_all_finite(state.params)
    scales.append(float(metrics["loss_scale"]))
    finite.append(bool(metrics["grads_finite"]))
  first_ok = finite.index(True)
  assert first_ok > 10  # 2**40 cannot work with float16 gradients
  # Halved on every skipped step, then held once gradients were finite.
  assert scales[:first_ok + 1] == [2.0**(40 - i) for i in range(first_ok + 1)]
  assert all(finite[first_ok:])
  assert int(state.opt_state.skipped_steps) == first_ok
  assert int(state.opt_state.applied_steps) == 60 - first_ok
  assert int(state.opt_state.inner_state[0].count) == 60 - first_ok
  initial_loss = seed_mlp.loss_fn(
      make_state().params, batch, make_state().apply_fn, None)
  assert float(metrics["loss"]) < 0.8 * float(initial_loss)


def test_gradients_reach_float32_master_params_in_float32():
  state = make_state("mixed_bfloat16")
  seen = {}

  def loss_fn(params, batch, apply_fn, rng):
    seen["params"] = jax.tree.map(lambda p: p.dtype, params)
    logits = apply_fn({"params": params}, batch["x"])
    seen["logits"] = logits.dtype
    return seed_mlp.loss_fn(params, batch, apply_fn, rng)

  state, metrics = mpjax.make_train_step(loss_fn)(state, tiny_batch())
  assert set(jax.tree.leaves(seen["params"])) == {jnp.dtype(jnp.float32)}
  assert seen["logits"] == jnp.dtype(jnp.float32)  # output dtype
  chex.assert_tree_all_finite(state.params)
  for p in jax.tree.leaves(state.params):
    chex.assert_type(p, jnp.float32)


def dot_operand_types(lowered_text):
  return re.findall(r"stablehlo\.dot_general[^\n]*:\s*\((tensor<[^>]*>),\s*"
                    r"(tensor<[^>]*>)\)", lowered_text)


@pytest.mark.parametrize("policy, dtype", [("mixed_float16", "f16"),
                                           ("mixed_bfloat16", "bf16"),
                                           ("float32", "f32")])
def test_every_matmul_of_the_step_runs_in_the_compute_dtype(policy, dtype):
  state = make_state(policy)
  step = mpjax.make_train_step(seed_mlp.loss_fn)
  text = step.lower(state, tiny_batch()).as_text()
  dots = dot_operand_types(text)
  assert len(dots) == 5  # 2 forward; backward dW2, dh, dW1 (dx is not needed)
  for lhs, rhs in dots:
    assert lhs.endswith(f"x{dtype}>") and rhs.endswith(f"x{dtype}>"), (lhs, rhs)


def test_step_compiles_once_over_many_steps():
  traces = []

  def loss_fn(params, batch, apply_fn, rng):
    traces.append(1)
    return seed_mlp.loss_fn(params, batch, apply_fn, rng)

  state = make_state("mixed_float16", mpjax.DynamicScaling(
      initial_scale=2.0**20, growth_interval=2))
  step = mpjax.make_train_step(loss_fn)
  for i in range(12):
    state, _ = step(state, tiny_batch(seed=i))
  assert len(traces) == 1
  assert int(state.step) == 12


def test_rng_is_folded_with_the_step():
  keys = []

  def loss_fn(params, batch, apply_fn, rng):
    return seed_mlp.loss_fn(params, batch, apply_fn, None), rng

  step = mpjax.make_train_step(loss_fn, has_aux=True)
  state = make_state(rng=jax.random.key(7))
  for _ in range(3):
    state, metrics = step(state, tiny_batch())
    keys.append(jax.random.key_data(metrics["aux"]))
  expected = [jax.random.key_data(jax.random.fold_in(jax.random.key(7), i))
              for i in range(3)]
  chex.assert_trees_all_equal(keys, expected)

  state = make_state()  # no key: the loss function gets None
  _, metrics = step(state, tiny_batch())
  assert metrics["aux"] is None


def test_plain_optimizer_works_and_float16_without_scaling_warns():
  state = make_state("float32", tx=optax.adam(1e-2))
  step = mpjax.make_train_step(seed_mlp.loss_fn)
  state, metrics = step(state, tiny_batch())
  assert float(metrics["loss_scale"]) == 1.0 and bool(metrics["grads_finite"])
  with pytest.warns(UserWarning, match="without loss scaling"):
    mpjax.make_train_step(seed_mlp.loss_fn)(
        make_state("mixed_float16", tx=optax.adam(1e-2)), tiny_batch())


def test_train_state_round_trips_through_tree_util():
  state = make_state("mixed_float16", mpjax.DynamicScaling.like_torch(),
                     rng=jax.random.key(1))
  leaves, treedef = jax.tree_util.tree_flatten(state)
  rebuilt = jax.tree_util.tree_unflatten(treedef, leaves)
  assert rebuilt.policy == state.policy
  chex.assert_trees_all_equal(rebuilt, state)
  step = mpjax.make_train_step(seed_mlp.loss_fn, donate=False)
  new, _ = step(rebuilt, tiny_batch())
  assert new.policy == mpjax.get_policy("mixed_float16")


def test_donated_state_buffers_are_consumed():
  state = make_state()
  step = mpjax.make_train_step(seed_mlp.loss_fn)
  old_kernel = state.params["Dense_0"]["kernel"]
  state, _ = step(state, tiny_batch())
  assert old_kernel.is_deleted()


def test_bad_arguments_raise():
  with pytest.raises(TypeError, match="loss_fn must be callable"):
    mpjax.make_train_step("loss")
  with pytest.raises(TypeError, match="has_aux must be a bool"):
    mpjax.make_train_step(seed_mlp.loss_fn, has_aux="yes")
  with pytest.raises(TypeError, match="mpjax.TrainState"):
    mpjax.make_train_step(seed_mlp.loss_fn)({"params": {}}, tiny_batch())
  with pytest.raises(ValueError, match="'mixed_float8'"):
    make_state("mixed_float8")
  with pytest.raises(ValueError, match=r"shape"):
    mpjax.make_train_step(lambda p, b, f, r: jnp.ones(3))(make_state(),
                                                          tiny_batch())


def test_params_are_stored_in_the_param_dtype():
  model = nn.Dense(3)
  params = model.init(jax.random.key(0), jnp.ones((1, 2), jnp.bfloat16))
  params = jax.tree.map(lambda p: p.astype(jnp.bfloat16), params["params"])
  state = mpjax.TrainState.create(apply_fn=model.apply, params=params,
                                  tx=optax.sgd(0.1), policy="mixed_bfloat16")
  for p in jax.tree.leaves(state.params):
    chex.assert_type(p, jnp.float32)
  chex.assert_type(state.step, jnp.int32)


def test_create_copies_the_callers_params_so_donation_keeps_them():
  model = models.MLP(hidden=(8,), num_classes=4)
  params = model.init(jax.random.key(0), tiny_batch()["x"])["params"]
  state = mpjax.TrainState.create(apply_fn=model.apply, params=params,
                                  tx=optax.adam(1e-2), policy="float32")
  state, _ = mpjax.make_train_step(seed_mlp.loss_fn)(state, tiny_batch())
  chex.assert_tree_all_finite(params)  # would raise if donated away


def test_optimizer_state_aliasing_params_can_be_donated():
  # An optimizer whose state keeps the initial params (a proximal anchor).
  anchored = optax.GradientTransformation(
      lambda params: {"anchor": params},
      lambda updates, state, params=None: (updates, state))
  tx = optax.chain(anchored, optax.sgd(0.1))
  state = make_state(tx=tx)
  step = mpjax.make_train_step(seed_mlp.loss_fn)
  for _ in range(3):
    state, metrics = step(state, tiny_batch())
  chex.assert_tree_all_finite(state.params)
  chex.assert_tree_all_finite(state.opt_state[0]["anchor"])
  assert bool(metrics["grads_finite"])


@pytest.mark.parametrize("tx", [
    mpjax.loss_scaled(optax.sgd(0.1), mpjax.NoScaling()), optax.sgd(0.1)],
    ids=["loss_scaled", "plain"])
def test_attribution_metrics_name_the_non_finite_leaf(tx):
  def loss_fn(params, batch, apply_fn, rng):
    loss = seed_mlp.loss_fn(params, batch, apply_fn, rng)
    # Poison the second layer's bias gradient only: d/db of b * inf.
    return loss + jnp.sum(params["Dense_1"]["bias"] * batch["poison"])

  state = make_state(tx=tx)
  step = mpjax.make_train_step(loss_fn, attribution=True, donate=False)
  batch = dict(tiny_batch(), poison=jnp.float32(jnp.inf))
  _, metrics = step(state, batch)
  chex.assert_shape(metrics["leaf_grads_finite"], (4,))
  assert mpjax.nonfinite_leaf_paths(metrics["leaf_grads_finite"],
                                    like=state.params) == ["Dense_1/bias"]
  assert not bool(metrics["grads_finite"])
  _, metrics = mpjax.make_train_step(loss_fn, donate=False)(state, batch)
  assert "leaf_grads_finite" not in metrics


def test_grad_stats_are_computed_every_n_steps_only():
  state = make_state("mixed_float16", mpjax.DynamicScaling(
      initial_scale=2.0**8, growth_interval=100))
  step = mpjax.make_train_step(seed_mlp.loss_fn, grad_stats_every=3)
  computed = []
  for _ in range(7):
    state, metrics = step(state, tiny_batch())
    stats = metrics["grad_stats"]
    computed.append(bool(stats.computed))
    if computed[-1]:
      assert stats.dtype == jnp.dtype(jnp.float16)
      assert int(stats.total.size) == sum(
          p.size for p in jax.tree.leaves(state.params))
      assert int(stats.total.nonzero) > 0
      assert float(stats.loss_scale) == 2.0**8
  assert computed == [True, False, False, True, False, False, True]
  with pytest.raises(ValueError, match="grad_stats_every"):
    mpjax.make_train_step(seed_mlp.loss_fn, grad_stats_every=-1)


def test_consecutive_skips_metric_counts_the_streak():
  state = make_state("p=f32,c=f16,o=f16", mpjax.DynamicScaling(
      initial_scale=2.0**40, growth_interval=1000))
  step = mpjax.make_train_step(seed_mlp.loss_fn)
  streak = []
  for _ in range(4):
    state, metrics = step(state, tiny_batch())
    streak.append(int(metrics["consecutive_skips"]))
  assert streak == [1, 2, 3, 4]
