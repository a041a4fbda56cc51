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


def test_loss_scaled_inside_a_chain_raises_with_the_fix():
  params = make_params()
  scaled = mpjax.loss_scaled(optax.adam(1e-2), mpjax.StaticScaling(64.0))
  for tx in (optax.chain(optax.add_decayed_weights(0.1), scaled),
             optax.chain(scaled, optax.scale(2.0))):
    state = tx.init(params)
    for use in (mpjax.current_loss_scale, mpjax.loss_scale_state,
                lambda s: mpjax.scale_loss(1.0, s)):
      with pytest.raises(ValueError, match=r"outermost(.|\n)*inside "
                         r"optax.chain of 2(.|\n)*mpjax.loss_scaled\("
                         r"optax.chain\(\.\.\.\), scaling\)"):
        use(state)
  # A chain of one transformation around it changes nothing.
  state = optax.chain(optax.chain(scaled)).init(params)
  assert float(mpjax.current_loss_scale(state)) == 64.0
  chex.assert_type(mpjax.scale_loss(jnp.float16(1.5), state), jnp.float32)


def test_multisteps_around_loss_scaled_raises_with_the_fix():
  params = make_params()
  tx = optax.MultiSteps(mpjax.loss_scaled(optax.sgd(1.0),
                                          mpjax.StaticScaling(4.0)),
                        every_k_schedule=2)
  with pytest.raises(ValueError, match=r"inside optax.MultiSteps(.|\n)*"
                     r"mpjax.loss_scaled\(optax.MultiSteps\(inner, k\)"):
    mpjax.current_loss_scale(tx.init(params))
  train_state = mpjax.TrainState.create(apply_fn=lambda v, x: x,
                                        params=params, tx=optax.sgd(1.0))
  with pytest.raises(ValueError, match="inside optax.MultiSteps"):
    mpjax.loss_scale_state(train_state.replace(opt_state=tx.init(params)))


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


def test_inject_hyperparams_goes_inside_and_raises_outside():
  params = make_params()
  inner = optax.inject_hyperparams(optax.sgd)(learning_rate=0.5)
  tx = mpjax.loss_scaled(inner, mpjax.StaticScaling(2.0))
  state = tx.init(params)
  updates, state = jax.jit(tx.update)(grads_like(params, 2.0), state, params)
  chex.assert_trees_all_close(updates, grads_like(params, -0.5))

  outer = optax.inject_hyperparams(
      lambda learning_rate: mpjax.loss_scaled(optax.sgd(learning_rate),
                                              mpjax.StaticScaling(8.0)))(
                                                  learning_rate=0.25)
  with pytest.raises(ValueError, match=r"inside optax.inject_hyperparams(.|"
                     r"\n)*counts? skipped steps"):
    mpjax.current_loss_scale(outer.init(params))


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


@pytest.mark.parametrize("scale", [0.5, 3.0, 2.0**-126, 2.0**127, 3e38])
def test_finite_flags_with_a_scale_equal_the_flags_of_the_unscaled_tree(
    scale):
  big = jnp.finfo(jnp.float32).max
  tree = {"over": jnp.array([1.0, big]),  # inf once unscaled by 0.5
          "nan": jnp.array([jnp.nan, 1.0]), "ok": jnp.array([-2.5, 1e-30]),
          "f16": jnp.array([60000.0, -1.0], jnp.float16),
          "c": jnp.array([1.0 + 1e38j]), "empty": jnp.zeros([0]),
          "neg_inf": jnp.array([-jnp.inf])}
  scale = jnp.float32(scale)
  chex.assert_trees_all_equal(
      jax.jit(mpjax.finite_flags)(tree, scale),
      mpjax.finite_flags(jax.jit(mpjax.unscale_gradients)(tree, scale)))
  assert not bool(mpjax.finite_flags(tree, jnp.float32(0.5))[3])  # "over"


@pytest.mark.parametrize("bad", [jnp.nan, jnp.inf])
@pytest.mark.parametrize("scaling", [
    mpjax.StaticScaling(4.0),  # scale >= 1: the raw gradients are checked
    mpjax.DynamicScaling(initial_scale=4.0, growth_interval=10,
                         min_scale=2.0**-10)])  # the unscaled ones
def test_one_bad_element_of_a_large_leaf_skips_the_jitted_update(
    bad, scaling):
  # XLA:CPU's vectorized reductions kick in from 4096 elements; its max
  # drops NaN, which a max-based check would let through.
  params = {"w": jnp.zeros((64, 128)), "b": jnp.zeros(3)}
  tx = mpjax.loss_scaled(optax.adam(1e-3), scaling)
  state = tx.init(params)
  for position in [(0, 5), (31, 64), (63, 127)]:
    grads = {"w": jnp.ones((64, 128)).at[position].set(bad),
             "b": jnp.ones(3)}
    updates, new = jax.jit(tx.update)(grads, state, params)
    assert int(new.skipped_steps) == 1, position
    assert new.leaf_grads_finite.tolist() == [True, False]  # b, w
    chex.assert_trees_all_equal(updates, jax.tree.map(jnp.zeros_like,
                                                      params))
    assert not bool(jax.jit(mpjax.finite_flags)(grads)[1])


def test_a_finite_gradient_that_unscaling_overflows_is_skipped():
  params = {"w": jnp.zeros(8192)}
  tx = mpjax.loss_scaled(optax.sgd(1.0), mpjax.StaticScaling(0.5))
  grads = {"w": jnp.ones(8192).at[7].set(jnp.finfo(jnp.float32).max)}
  _, state = jax.jit(tx.update)(grads, tx.init(params), params)
  assert int(state.skipped_steps) == 1


def test_unscaling_multiplies_by_the_reciprocal_even_above_two_to_126():
  g = jnp.array([3.0 * 2.0**100, 1.5 * 2.0**30, -2.0**120], jnp.float32)
  for scale in (2.0**127, 2.0**16, 1.0, 2.0**-6):
    want = np.asarray(g, np.float64) / scale  # exact: powers of two
    got = jax.jit(mpjax.unscale_gradients)(g, jnp.float32(scale))
    np.testing.assert_array_equal(np.asarray(got, np.float64),
                                  want.astype(np.float32))
  # Not a power of two: torch's g * float32(1 / scale).
  scale = 3e37
  got = jax.jit(mpjax.unscale_gradients)(g, jnp.float32(scale))
  inverse = np.float32(1.0 / np.float64(np.float32(scale)))
  np.testing.assert_array_equal(np.asarray(got), np.asarray(g) * inverse)


def dtypes(tree):
  return jax.tree.map(lambda x: x.dtype, tree)


SIXTEEN_BIT_INNERS = {
    "adam": lambda: optax.adam(1e-2),
    "adamw": lambda: optax.adamw(1e-2, weight_decay=0.1),
    "sgd_momentum": lambda: optax.sgd(1e-2, momentum=0.9),
    "lion": lambda: optax.lion(1e-3),
    "chain_clip_adam": lambda: optax.chain(optax.clip_by_global_norm(1.0),
                                           optax.adam(1e-2)),
    "mpjax_adam": lambda: mpjax.adam(1e-2),
    "adam_float32_mu": lambda: optax.adam(1e-2, mu_dtype=jnp.float32),
    "multisteps_adam": lambda: optax.MultiSteps(optax.adam(1e-2), 2),
}


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16],
                         ids=["bf16", "f16"])
@pytest.mark.parametrize("name", sorted(SIXTEEN_BIT_INNERS))
def test_16_bit_params_keep_their_update_and_state_dtypes(name, dtype):
  params = jax.tree.map(lambda p: p.astype(dtype), make_params())
  tx = mpjax.loss_scaled(SIXTEEN_BIT_INNERS[name](), mpjax.DynamicScaling(
      initial_scale=2.0**8, growth_interval=2))
  state = tx.init(params)
  want = dtypes(state)
  update = jax.jit(tx.update)
  start = params
  for bad in (False, False, True, False):
    grads = grads_like(params, 2.0**6, dtype)  # what jax.grad gives: 16-bit
    before = state.inner_state
    updates, state = update(poisoned(grads) if bad else grads, state, params)
    assert dtypes(state) == want
    # float32 updates: apply_updates rounds p + u to the params' dtype once.
    assert set(jax.tree.leaves(dtypes(updates))) == {jnp.dtype(jnp.float32)}
    if bad:
      chex.assert_trees_all_equal(state.inner_state, before)
      chex.assert_trees_all_equal(updates, jax.tree.map(jnp.zeros_like,
                                                        params))
    params = optax.apply_updates(params, updates)
  assert dtypes(params) == dtypes(start)
  assert int(state.applied_steps) == 3
  assert not np.allclose(params["dense"]["kernel"], start["dense"]["kernel"])


@pytest.mark.parametrize("policy", ["bfloat16", "float16"])
def test_train_step_trains_16_bit_params_with_adam(policy):
  def loss_fn(params, batch, apply_fn, rng):
    del rng
    return jnp.mean((apply_fn(params, batch["x"]) - batch["y"]) ** 2)

  tx = mpjax.loss_scaled(optax.adam(1e-2), mpjax.DynamicScaling(
      initial_scale=2.0**10, growth_interval=2))
  state = mpjax.TrainState.create(
      apply_fn=lambda p, x: x @ p["w"] + p["b"],
      params={"w": jnp.full((3, 2), 0.5), "b": jnp.zeros(2)}, tx=tx,
      policy=policy)
  want = dtypes((state.params, state.opt_state))
  assert want[0]["w"] == jnp.dtype(policy)
  step = mpjax.make_train_step(loss_fn, donate=False)
  batch = {"x": jnp.ones((4, 3)), "y": jnp.zeros((4, 2))}
  losses = []
  for x in (batch["x"], batch["x"], batch["x"].at[0, 0].set(jnp.inf),
            batch["x"]):
    before = state.params
    state, metrics = step(state, dict(batch, x=x))
    losses.append(float(metrics["loss"]))
    assert dtypes((state.params, state.opt_state)) == want
    if not bool(metrics["grads_finite"]):
      chex.assert_trees_all_equal(state.params, before)
  assert int(mpjax.loss_scale_state(state).applied_steps) == 3
  assert losses[3] < losses[0]


def test_growth_counts_optimizer_steps_under_multisteps():
  params = make_params()
  tx = mpjax.loss_scaled(optax.MultiSteps(optax.sgd(1.0), every_k_schedule=4),
                         mpjax.DynamicScaling(initial_scale=4.0,
                                              growth_interval=2))
  state = tx.init(params)
  update = jax.jit(tx.update)
  scales, counts = [], []
  for _ in range(16):  # four windows of four finite micro-batches, true g = 1
    updates, state = update(grads_like(params, float(state.scale)), state,
                            params)
    scales.append(float(state.scale))
    counts.append(int(state.growth_count))
  # The scale grows after the second window, not the second micro-batch.
  assert scales == [4.0] * 7 + [8.0] * 8 + [16.0]
  assert counts == ([0] * 3 + [1] * 4 + [0]) * 2
  chex.assert_trees_all_close(updates, grads_like(params, -1.0))


def test_non_finite_micro_batch_backs_off_at_once_and_is_dropped_alone():
  params = make_params()
  tx = mpjax.loss_scaled(optax.MultiSteps(optax.sgd(1.0), every_k_schedule=3),
                         mpjax.DynamicScaling(initial_scale=8.0,
                                              growth_interval=1))
  state = tx.init(params)
  seen = []
  for true_g, bad in ((1.0, False), (5.0, True), (2.0, False), (3.0, False)):
    scale = float(state.scale)
    grads = grads_like(params, true_g * scale)
    updates, state = tx.update(poisoned(grads) if bad else grads, state,
                               params)
    seen.append((float(state.scale), int(state.inner_state.mini_step)))
  # Backed off at the bad micro-batch, which did not move MultiSteps; the
  # window then completed with three finite ones and the scale grew.
  assert seen == [(8.0, 1), (4.0, 1), (4.0, 2), (8.0, 0)]
  chex.assert_trees_all_close(updates, grads_like(params, -2.0))  # mean 1,2,3
  assert (int(state.applied_steps), int(state.skipped_steps)) == (3, 1)


def test_unscales_with_the_scale_of_the_step_not_the_grown_one():
  params = make_params()
  tx = mpjax.loss_scaled(optax.sgd(1.0), mpjax.DynamicScaling(
      initial_scale=4.0, growth_interval=1))
  state = tx.init(params)
  update = jax.jit(tx.update)
  for _ in range(4):  # the scale grows on every step
    scale = float(mpjax.current_loss_scale(state))
    updates, state = update(grads_like(params, 0.5 * scale), state, params)
    chex.assert_trees_all_equal(updates, grads_like(params, -0.5))
    assert float(state.scale) == 2 * scale


def test_counters_saturate_at_the_int32_maximum():
  params = make_params()
  tx = mpjax.loss_scaled(optax.sgd(1.0), mpjax.StaticScaling(2.0))
  top = jnp.asarray(np.iinfo(np.int32).max, jnp.int32)
  state = tx.init(params)._replace(applied_steps=top, skipped_steps=top,
                                   consecutive_skips=top)
  update = jax.jit(tx.update)
  _, applied = update(grads_like(params, 1.0), state, params)
  _, skipped = update(poisoned(grads_like(params, 1.0)), state, params)
  for counter in (applied.applied_steps, skipped.skipped_steps,
                  skipped.consecutive_skips):
    chex.assert_trees_all_equal(counter, top)
  assert int(applied.consecutive_skips) == 0


def test_complex_gradients_are_unscaled():
  params = {"z": jnp.ones(2, jnp.complex64)}
  tx = mpjax.loss_scaled(optax.sgd(1.0), mpjax.StaticScaling(4.0))
  grads = {"z": jnp.array([4.0 + 8.0j, -4.0j], jnp.complex64)}
  updates, _ = tx.update(grads, tx.init(params), params)
  chex.assert_trees_all_equal(
      updates, {"z": jnp.array([-1.0 - 2.0j, 1.0j], jnp.complex64)})


def _without_bias(grads):
  return {"dense": {"kernel": grads["dense"]["kernel"]}}


def _wide_bias(grads):
  return {"dense": dict(grads["dense"], bias=jnp.ones(4))}


def _int_kernel(grads):
  return {"dense": dict(grads["dense"],
                        kernel=jnp.ones((2, 3), jnp.int32))}


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
@pytest.mark.parametrize("bend, error, message", [
    (_without_bias, ValueError, r"params' structure.*missing.*'dense/bias'"),
    (_wide_bias, ValueError, r"'dense/bias' has shape \(4,\), its param has "
     r"shape \(3,\)"),
    (_int_kernel, TypeError, r"'dense/kernel' has dtype int32; gradients "
     r"must be floating or complex"),
])
def test_bad_gradients_raise_naming_the_leaf(bend, error, message, jit):
  params = make_params()
  tx = mpjax.loss_scaled(optax.adam(1e-3), mpjax.StaticScaling(2.0))
  update = jax.jit(tx.update) if jit else tx.update
  with pytest.raises(error, match=message):
    update(bend(grads_like(params, 1.0)), tx.init(params), params)


def test_a_state_that_is_not_loss_scaled_raises_naming_its_type():
  params = make_params()
  tx = mpjax.loss_scaled(optax.adam(1e-3), mpjax.StaticScaling(2.0))
  with pytest.raises(TypeError, match=r"expects the mpjax.LossScaledState.*"
                     "got tuple"):
    tx.update(grads_like(params, 1.0), optax.adam(1e-3).init(params), params)
  with pytest.raises(TypeError, match="It contains one"):
    tx.update(grads_like(params, 1.0), (tx.init(params),), params)


def _marking_inner(seen):
  """sgd whose state counts every update, applied or not, and which takes
  loss_scaled's decision (so loss_scaled must keep its state as returned)."""
  def update_fn(updates, state, params=None, **extra_args):
    decision = mpjax.FiniteDecision.from_extra_args(extra_args)
    seen.append(decision)
    new = (state[0] + 1,)
    if decision is not None:
      decision.take(new)
    return jax.tree.map(lambda g: -g, updates), new

  return optax.GradientTransformationExtraArgs(
      lambda params: (jnp.zeros([], jnp.int32),), update_fn)


def test_the_decision_is_handed_to_an_inner_that_takes_it():
  params = make_params()
  seen = []
  tx = mpjax.loss_scaled(optax.chain(optax.clip_by_global_norm(10.0),
                                     _marking_inner(seen)), mpjax.NoScaling())
  state = tx.init(params)
  updates, state = tx.update(poisoned(grads_like(params, 1.0)), state, params)
  assert isinstance(seen[-1], mpjax.FiniteDecision)
  assert not bool(seen[-1].finite)
  # The taken state is kept as returned (its own skip is its business);
  # the clip's state and the updates are still selected and zeroed.
  assert int(state.inner_state[1][0]) == 1
  chex.assert_trees_all_equal(updates, grads_like(params, 0.0))


def test_opaque_inners_are_not_handed_the_decision_and_are_selected():
  params = make_params()
  seen = []
  marking = _marking_inner(seen)
  narrow = optax.GradientTransformationExtraArgs(  # no **extra_args
      marking.init, lambda u, s, p=None: marking.update(u, s, p))
  for inner in (optax.GradientTransformation(*_marking_inner(seen)), narrow):
    tx = mpjax.loss_scaled(inner, mpjax.NoScaling())
    state = tx.init(params)
    _, state = tx.update(poisoned(grads_like(params, 1.0)), state, params)
    assert seen[-1] is None
    assert int(state.inner_state[0]) == 0  # selected: the skip kept it


def test_finite_decision_is_reserved():
  params = make_params()
  tx = mpjax.loss_scaled(optax.sgd(1.0), mpjax.NoScaling())
  with pytest.raises(TypeError, match="finite_decision"):
    tx.update(grads_like(params, 1.0), tx.init(params), params,
              finite_decision=mpjax.FiniteDecision(jnp.array(True)))


def _moment_copies(tx) -> list:
  """``copy`` ops of donated moment buffers in the CPU-compiled train step."""
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  model = nn.Sequential([nn.Dense(16), nn.relu, nn.Dense(4)])
  batch = {"x": jnp.ones((4, 8)), "y": jnp.zeros((4, 4))}
  params = model.init(jax.random.key(0), batch["x"])["params"]
  state = mpjax.TrainState.create(apply_fn=model.apply, params=params, tx=tx,
                                  policy="float32")

  def loss_fn(params, batch, apply_fn, rng):
    del rng
    return jnp.mean((apply_fn({"params": params}, batch["x"]) - batch["y"])**2)

  text = mpjax.make_train_step(loss_fn).lower(state, batch).compile().as_text()
  return [line for line in text.splitlines()
          if " copy(" in line and ("mu_" in line or "nu_" in line)]


def test_mpjax_adam_takes_the_decision_so_no_donated_moment_is_copied():
  dynamic = mpjax.DynamicScaling.like_torch()
  for inner in (mpjax.adam(1e-3), mpjax.adamw(1e-3, weight_decay=0.0),
                optax.chain(optax.clip_by_global_norm(1.0), mpjax.adam(1e-3))):
    assert _moment_copies(mpjax.loss_scaled(inner, dynamic)) == []
  # The negative control: around an opaque optax.adam the select path makes
  # XLA:CPU copy each donated mu/nu leaf (4 params: 8 copies).
  assert len(_moment_copies(mpjax.loss_scaled(optax.adam(1e-3),
                                              dynamic))) == 8
