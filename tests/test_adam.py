"""Tests for mpjax/_src/adam.py: optax's Adam with accurate bias corrections."""


import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import mpjax
from mpjax._src import adam as adam_lib


@pytest.mark.parametrize("beta", [0.9, 0.98, 0.999, 0.9999])
def test_bias_correction_is_float32_accurate(beta):
  counts = jnp.array([1, 2, 3, 10, 100, 1000, 10_000, 1_000_000], jnp.int32)
  ours = np.asarray(adam_lib.one_minus_power(beta, counts), np.float64)
  exact = np.array([1 - beta**int(t) for t in counts])
  np.testing.assert_allclose(ours, exact, rtol=3e-7)
  # optax's float32 power is visibly off at t = 1 for beta = 0.999...
  if beta >= 0.999:
    optax_way = 1 - jnp.float32(beta) ** jnp.float32(1)
    assert abs(float(optax_way) / (1 - beta) - 1) > 1e-6


def test_matches_optax_adam_up_to_the_bias_correction():
  params = {"w": jnp.linspace(-1.0, 1.0, 6).reshape(2, 3), "b": jnp.ones(3)}
  ours, theirs = mpjax.adam(1e-2), optax.adam(1e-2)
  s_ours, s_theirs = ours.init(params), theirs.init(params)
  chex.assert_trees_all_equal_structs(s_ours, s_theirs)
  rng = np.random.default_rng(0)
  for _ in range(20):
    g = jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape),
                                           jnp.float32), params)
    u_ours, s_ours = ours.update(g, s_ours, params)
    u_theirs, s_theirs = theirs.update(g, s_theirs, params)
    chex.assert_trees_all_close(u_ours, u_theirs, rtol=5e-5)
  chex.assert_trees_all_close(s_ours[0].mu, s_theirs[0].mu, rtol=1e-6)
  chex.assert_trees_all_close(s_ours[0].nu, s_theirs[0].nu, rtol=1e-6)
  assert int(s_ours[0].count) == 20
  chex.assert_type(s_ours[0].count, jnp.int32)


def test_first_step_is_minus_lr_times_sign_like_torch():
  tx = mpjax.adam(0.5)
  updates, _ = tx.update(jnp.array([3.0, -0.25]), tx.init(jnp.zeros(2)))
  # lr * g / (|g| + eps): exact up to eps / |g| (4e-8 here) and rounding.
  chex.assert_trees_all_close(updates, jnp.array([-0.5, 0.5]), rtol=3e-7)
  theirs, _ = optax.adam(0.5).update(jnp.array([3.0, -0.25]),
                                     optax.adam(0.5).init(jnp.zeros(2)))
  assert abs(float(theirs[0]) / -0.5 - 1) > 5e-6  # optax.adam's is 6.7e-6 off


def test_skipped_steps_leave_its_count_alone():
  params = {"w": jnp.ones(3)}
  tx = mpjax.loss_scaled(mpjax.adam(1e-3), mpjax.NoScaling())
  state = tx.init(params)
  _, state = tx.update({"w": jnp.array([1.0, jnp.nan, 1.0])}, state, params)
  assert int(state.inner_state[0].count) == 0


def test_mu_dtype_and_schedules():
  params = {"w": jnp.ones(4)}
  tx = mpjax.adam(optax.linear_schedule(1.0, 0.0, 10), mu_dtype=jnp.bfloat16)
  state = tx.init(params)
  chex.assert_type(state[0].mu["w"], jnp.bfloat16)
  updates, state = jax.jit(tx.update)({"w": jnp.ones(4)}, state)
  chex.assert_trees_all_close(updates, {"w": -jnp.ones(4)}, rtol=1e-6)
  chex.assert_type(state[0].mu["w"], jnp.bfloat16)


@pytest.mark.parametrize("kwargs, error", [
    (dict(b1=1.0), ValueError), (dict(b2=-0.1), ValueError),
    (dict(b1="0.9"), TypeError), (dict(b2=True), TypeError)])
def test_bad_betas_raise(kwargs, error):
  with pytest.raises(error, match=next(iter(kwargs))):
    mpjax.adam(1e-3, **kwargs)


def test_b1_zero_has_no_first_moment_correction_like_torch():
  tx = mpjax.adam(0.5, b1=0.0)
  params = {"w": jnp.zeros(2)}
  state = tx.init(params)
  updates, state = tx.update({"w": jnp.array([3.0, -0.25])}, state)
  # torch's Adam(betas=(0, 0.999)): lr * g / (|g| + eps) on the first step.
  chex.assert_trees_all_close(updates, {"w": jnp.array([-0.5, 0.5])},
                              rtol=3e-7)
  chex.assert_trees_all_close(
      adam_lib.one_minus_power(0.0, jnp.array([1, 7], jnp.int32)),
      jnp.ones(2))
  # Later steps equal optax's (whose float32 0**t is exact) up to b2's
  # correction.
  theirs = optax.adam(0.5, b1=0.0)
  their_state = theirs.init(params)
  _, their_state = theirs.update({"w": jnp.array([3.0, -0.25])}, their_state)
  for g in ([1.0, 2.0], [-0.5, 0.125]):
    ours, state = tx.update({"w": jnp.array(g)}, state)
    want, their_state = theirs.update({"w": jnp.array(g)}, their_state)
    chex.assert_trees_all_close(ours, want, rtol=5e-5)
