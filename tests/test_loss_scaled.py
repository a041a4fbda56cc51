"""Tests for mpjax/_src/loss_scaled.py: the loss_scaled optax wrapper."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import mpjax


def make_params():
  return {"dense": {"kernel": jnp.arange(6.0).reshape(2, 3) / 10,
                    "bias": jnp.array([0.5, -0.5, 0.25])}}


def grads_like(params, value, dtype=jnp.float32):
  return jax.tree.map(lambda p: jnp.full(p.shape, value, dtype), params)


def poisoned(grads, value=jnp.inf):
  grads = jax.tree.map(lambda g: g, grads)
  grads["dense"]["bias"] = grads["dense"]["bias"].at[1].set(value)
  return grads


def adam_state(state):
  return mpjax.loss_scale_state(state).inner_state[0]


@pytest.mark.parametrize("bad", [jnp.inf, -jnp.inf, jnp.nan])
def test_skipped_step_leaves_params_and_adam_state_bit_identical(bad):
  params = make_params()
  tx = mpjax.loss_scaled(optax.adam(1e-2),
                         mpjax.DynamicScaling(initial_scale=4.0,
                                              growth_interval=10))
  state = tx.init(params)
  # One applied step first, so mu/nu/count are not trivially zero.
  updates, state = tx.update(grads_like(params, 0.4), state, params)
  params = optax.apply_updates(params, updates)
  before_params, before_inner = params, adam_state(state)

  updates, state = tx.update(poisoned(grads_like(params, 0.4), bad), state,
                             params)
  chex.assert_trees_all_equal(updates, grads_like(params, 0.0))
  after_params = optax.apply_updates(params, updates)
  chex.assert_trees_all_equal(after_params, before_params)
  chex.assert_trees_all_equal(adam_state(state), before_inner)
  assert int(adam_state(state).count) == 1
  assert float(state.scale) == 2.0
  assert (int(state.applied_steps), int(state.skipped_steps),
          int(state.consecutive_skips)) == (1, 1, 1)
  assert not bool(state.last_grads_finite)


def test_finite_step_matches_inner_fed_unscaled_gradients():
  params = make_params()
  scale = 2.0**12
  tx = mpjax.loss_scaled(optax.adam(1e-2), mpjax.StaticScaling(scale))
  plain = optax.adam(1e-2)
  state, plain_state = tx.init(params), plain.init(params)
  rng = np.random.default_rng(0)
  for _ in range(5):
    true_grads = jax.tree.map(
        lambda p: jnp.asarray(rng.normal(size=p.shape), jnp.float32), params)
    scaled = jax.tree.map(lambda g: g * scale, true_grads)
    updates, state = tx.update(scaled, state, params)
    expected, plain_state = plain.update(true_grads, plain_state, params)
    chex.assert_trees_all_equal(updates, expected)  # power-of-2 scale: exact
    params = optax.apply_updates(params, updates)
  chex.assert_trees_all_equal(adam_state(state), plain_state[0])


def test_float16_and_bfloat16_gradients_are_unscaled_in_float32():
  params = make_params()
  tx = mpjax.loss_scaled(optax.sgd(1.0), mpjax.StaticScaling(2.0**14))
  state = tx.init(params)
  for dtype in (jnp.float16, jnp.bfloat16):
    # 2**14 * 2**-20 = 2**-6: fine in float16, but 2**-20 alone is subnormal.
    grads = grads_like(params, 2.0**-6, dtype)
    updates, state = tx.update(grads, state, params)
    chex.assert_trees_all_equal_dtypes(updates, grads_like(params, 0.0))
    chex.assert_trees_all_close(updates, grads_like(params, -(2.0**-20)),
                                rtol=0, atol=0)


def test_one_non_finite_leaf_skips_every_leaf():
  params = make_params()
  tx = mpjax.loss_scaled(optax.sgd(1.0), mpjax.NoScaling())
  state = tx.init(params)
  grads = grads_like(params, 1.0)
  grads["dense"]["kernel"] = grads["dense"]["kernel"].at[0, 0].set(jnp.nan)
  updates, state = tx.update(grads, state, params)
  chex.assert_trees_all_equal(updates, grads_like(params, 0.0))
  assert int(state.skipped_steps) == 1


def test_counters_track_applied_skipped_and_consecutive():
  params = make_params()
  tx = mpjax.loss_scaled(optax.sgd(0.1), mpjax.DynamicScaling(
      initial_scale=2.0**10, growth_interval=100))
  state = tx.init(params)
  update = jax.jit(tx.update)
  pattern = [True, False, False, True, False, True, True]
  seen = []
  for finite in pattern:
    grads = grads_like(params, 1.0)
    grads = grads if finite else poisoned(grads)
    _, state = update(grads, state, params)
    seen.append((int(state.applied_steps), int(state.skipped_steps),
                 int(state.consecutive_skips), bool(state.last_grads_finite)))
  assert seen == [(1, 0, 0, True), (1, 1, 1, False), (1, 2, 2, False),
                  (2, 2, 0, True), (2, 3, 1, False), (3, 3, 0, True),
                  (4, 3, 0, True)]


def test_schedule_inside_counts_applied_steps_only():
  params = make_params()
  schedule = optax.linear_schedule(1.0, 0.0, transition_steps=10)
  tx = mpjax.loss_scaled(optax.sgd(schedule), mpjax.NoScaling())
  state = tx.init(params)
  for _ in range(3):  # three skipped steps
    _, state = tx.update(poisoned(grads_like(params, 1.0)), state, params)
  updates, state = tx.update(grads_like(params, 1.0), state, params)
  # The first applied step still uses the schedule's step-0 value, 1.0.
  chex.assert_trees_all_close(updates, grads_like(params, -1.0))


def test_clip_inside_sees_unscaled_gradients():
  params = make_params()
  scale = 2.0**15
  inner = optax.chain(optax.clip_by_global_norm(1.0), optax.sgd(1.0))
  tx = mpjax.loss_scaled(inner, mpjax.StaticScaling(scale))
  true_grads = grads_like(params, 0.1)  # norm ~0.245 < 1: not clipped
  updates, _ = tx.update(jax.tree.map(lambda g: g * scale, true_grads),
                         tx.init(params), params)
  chex.assert_trees_all_close(updates, grads_like(params, -0.1), rtol=1e-6)


def test_composes_with_chain_and_is_found_there():
  params = make_params()
  tx = optax.chain(optax.add_decayed_weights(0.0),
                   mpjax.loss_scaled(optax.adam(1e-2),
                                     mpjax.StaticScaling(64.0)))
  state = tx.init(params)
  assert float(mpjax.current_loss_scale(state)) == 64.0
  chex.assert_trees_all_close(mpjax.scale_loss(jnp.float16(1.5), state),
                              jnp.float32(96.0))
  chex.assert_type(mpjax.scale_loss(jnp.float16(1.5), state), jnp.float32)
  updates, state = jax.jit(tx.update)(poisoned(grads_like(params, 1.0)),
                                      state, params)
  chex.assert_trees_all_equal(updates, grads_like(params, 0.0))


def test_multisteps_around_loss_scaled_accumulates_scaled_gradients():
  params = make_params()
  tx = optax.MultiSteps(mpjax.loss_scaled(optax.sgd(1.0),
                                          mpjax.StaticScaling(4.0)),
                        every_k_schedule=2)
  state = tx.init(params)
  assert float(mpjax.current_loss_scale(state)) == 4.0
  u1, state = tx.update(grads_like(params, 4.0), state, params)
  chex.assert_trees_all_equal(u1, grads_like(params, 0.0))
  u2, state = tx.update(grads_like(params, 12.0), state, params)
  # Mean of the scaled gradients (8) unscaled by 4, times -lr.
  chex.assert_trees_all_close(u2, grads_like(params, -2.0))
  # A non-finite micro-batch makes its whole window a skipped step. (Later
  # windows stay poisoned: MultiSteps resets its accumulator as acc * 0, and
  # inf * 0 is NaN. Hence loss_scaled goes outside MultiSteps; next test.)
  _, state = tx.update(poisoned(grads_like(params, 4.0)), state, params)
  u4, state = tx.update(grads_like(params, 4.0), state, params)
  chex.assert_trees_all_equal(u4, grads_like(params, 0.0))
  scaled_state = mpjax.loss_scale_state(state)
  assert (int(scaled_state.applied_steps),
          int(scaled_state.skipped_steps)) == (1, 1)


def test_loss_scaled_around_multisteps_drops_only_the_bad_micro_batch():
  params = make_params()
  tx = mpjax.loss_scaled(optax.MultiSteps(optax.sgd(1.0), every_k_schedule=2),
                         mpjax.DynamicScaling(initial_scale=4.0,
                                              growth_interval=100))
  state = tx.init(params)
  _, state = tx.update(grads_like(params, 4.0), state, params)  # true g = 1
  _, state = tx.update(poisoned(grads_like(params, 4.0)), state, params)
  assert float(mpjax.current_loss_scale(state)) == 2.0  # backed off
  updates, state = tx.update(grads_like(params, 6.0), state, params)  # g = 3
  # The poisoned micro-batch never reached MultiSteps: mean(1, 3) = 2, and
  # each micro-batch was unscaled by its own scale before accumulation.
  chex.assert_trees_all_close(updates, grads_like(params, -2.0))
  for _ in range(4):  # and every later window trains normally
    updates, state = tx.update(grads_like(params, 2.0), state, params)
  chex.assert_trees_all_close(updates, grads_like(params, -1.0))
  assert int(mpjax.loss_scale_state(state).skipped_steps) == 1


def test_composes_with_inject_hyperparams_inside_and_outside():
  params = make_params()
  inner = optax.inject_hyperparams(optax.sgd)(learning_rate=0.5)
  tx = mpjax.loss_scaled(inner, mpjax.StaticScaling(2.0))
  state = tx.init(params)
  updates, state = tx.update(grads_like(params, 2.0), state, params)
  chex.assert_trees_all_close(updates, grads_like(params, -0.5))

  outer = optax.inject_hyperparams(
      lambda learning_rate: mpjax.loss_scaled(optax.sgd(learning_rate),
                                              mpjax.StaticScaling(8.0)))(
                                                  learning_rate=0.25)
  state = outer.init(params)
  assert float(mpjax.current_loss_scale(state)) == 8.0
  state.hyperparams["learning_rate"] = jnp.asarray(1.0)
  updates, state = jax.jit(outer.update)(grads_like(params, 8.0), state,
                                         params)
  chex.assert_trees_all_close(updates, grads_like(params, -1.0))


def test_current_loss_scale_finds_the_state_in_a_train_state():
  params = make_params()
  tx = mpjax.loss_scaled(optax.adam(1e-3),
                         mpjax.DynamicScaling.like_keras())
  state = mpjax.TrainState.create(apply_fn=lambda v, x: x, params=params,
                                  tx=tx, policy="mixed_float16")
  scale = mpjax.current_loss_scale(state)
  chex.assert_type(scale, jnp.float32)
  chex.assert_shape(scale, ())
  assert float(scale) == 2.0**15


def test_missing_or_ambiguous_state_raises():
  params = make_params()
  with pytest.raises(ValueError, match="found no"):
    mpjax.current_loss_scale(optax.adam(1e-3).init(params))
  two = optax.chain(mpjax.loss_scaled(optax.sgd(1.0), mpjax.NoScaling()),
                    mpjax.loss_scaled(optax.sgd(1.0), mpjax.NoScaling()))
  with pytest.raises(ValueError, match="found 2"):
    mpjax.scale_loss(1.0, two.init(params))


def test_state_round_trips_through_tree_util_and_jit():
  params = make_params()
  tx = mpjax.loss_scaled(optax.adam(1e-3), mpjax.DynamicScaling(
      initial_scale=2.0**8, growth_interval=3, min_scale=2.0))
  state = tx.init(params)
  _, state = tx.update(poisoned(grads_like(params, 1.0)), state, params)
  leaves, treedef = jax.tree_util.tree_flatten(state)
  rebuilt = jax.tree_util.tree_unflatten(treedef, leaves)
  assert isinstance(rebuilt, mpjax.LossScaledState)
  chex.assert_trees_all_equal(rebuilt, state)
  chex.assert_trees_all_equal(jax.jit(lambda s: s)(state), state)
  chex.assert_type([state.scale, state.growth_count, state.skipped_steps],
                   [jnp.float32, jnp.int32, jnp.int32])


def test_update_compiles_once_over_many_steps():
  params = make_params()
  tx = mpjax.loss_scaled(optax.adam(1e-3), mpjax.DynamicScaling(
      initial_scale=2.0**8, growth_interval=2))

  @jax.jit
  @chex.assert_max_traces(n=1)
  def update(grads, state, params):
    return tx.update(grads, state, params)

  state = tx.init(params)
  for i in range(20):
    grads = grads_like(params, 1.0)
    _, state = update(poisoned(grads) if i % 3 == 0 else grads, state, params)
  assert int(state.skipped_steps) == 7
  chex.clear_trace_counter()


def test_extra_args_are_forwarded_to_the_inner_transformation():
  params = make_params()
  seen = {}

  def update_fn(updates, state, params=None, *, value=None):
    seen["value"] = value
    return updates, state

  inner = optax.GradientTransformationExtraArgs(lambda p: optax.EmptyState(),
                                                update_fn)
  tx = mpjax.loss_scaled(inner, mpjax.NoScaling())
  tx.update(grads_like(params, 1.0), tx.init(params), params, value=3)
  assert seen == {"value": 3}


@pytest.mark.parametrize("inner, scaling, fragment", [
    ("adam", mpjax.NoScaling(), "'adam'"),
    (optax.adam(1e-3), "dynamic", "'dynamic'"),
    (optax.adam(1e-3), 2.0**15, "32768.0"),
])
def test_loss_scaled_rejects_bad_arguments(inner, scaling, fragment):
  with pytest.raises(TypeError) as info:
    mpjax.loss_scaled(inner, scaling)
  assert fragment in str(info.value)


def test_leaf_finiteness_names_the_bad_leaf_of_the_last_step():
  params = make_params()
  tx = mpjax.loss_scaled(optax.adam(1e-3), mpjax.StaticScaling(2.0))
  state = tx.init(params)
  chex.assert_trees_all_equal(state.leaf_grads_finite,
                              jnp.array([True, True]))
  update = jax.jit(tx.update)
  _, state = update(poisoned(grads_like(params, 1.0)), state, params)
  # Tree-leaves order: dense/bias, dense/kernel.
  chex.assert_trees_all_equal(state.leaf_grads_finite,
                              jnp.array([False, True]))
  assert mpjax.nonfinite_leaf_paths(state.leaf_grads_finite,
                                    like=params) == ["dense/bias"]
  _, state = update(grads_like(params, 1.0), state, params)
  chex.assert_trees_all_equal(state.leaf_grads_finite,
                              jnp.array([True, True]))


def test_finite_flags_packs_one_flag_per_leaf_in_tree_order():
  tree = {"b": jnp.array([1.0, jnp.nan]), "a": jnp.ones(2),
          "n": jnp.arange(3), "h": jnp.array([jnp.inf], jnp.float16)}
  flags = mpjax.finite_flags(tree)
  chex.assert_shape(flags, (4,))
  chex.assert_type(flags, jnp.bool_)
  assert flags.tolist() == [True, False, False, True]  # a, b, h, n
  chex.assert_shape(mpjax.finite_flags({}), (0,))
