"""Tests for mpjax/_src/skip_guard.py: SkipGuard and its errors and warnings."""

import warnings

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import mpjax
import seed_mlp
from mpjax._src import skip_guard
from poisoned import make_state
from poisoned import poisoned_loss_fn
from poisoned import tiny_batch


def test_guard_stops_an_always_non_finite_run_after_exactly_k_skips():
  k = 4
  state = make_state(tx=mpjax.loss_scaled(
      optax.adam(1e-2), mpjax.DynamicScaling(initial_scale=2.0**10,
                                             growth_interval=100)))
  step = mpjax.make_train_step(poisoned_loss_fn("Dense_0"), attribution=True)
  guard = skip_guard.SkipGuard(max_consecutive_skips=k, like=state.params)
  batch = dict(tiny_batch(), poison=jnp.array(True))
  steps_run = 0
  with pytest.raises(skip_guard.NonFiniteTrainingError) as info:
    for i in range(3 * k):
      state, metrics = step(state, batch)
      steps_run += 1
      guard.update(jax.device_get(metrics), step=i)
  assert steps_run == k
  error = info.value
  assert error.consecutive_skips == k and error.step == k - 1
  assert error.leaf_paths == ("Dense_0/bias", "Dense_0/kernel")
  assert "Dense_0/bias, Dense_0/kernel" in str(error)
  assert f"{k} consecutive steps" in str(error)
  assert error.loss_scale == 2.0**(10 - k + 1)
  assert "collapsing" not in str(error)  # the scale is still far above 1


def test_guard_never_stops_a_healthy_float16_run():
  state = make_state("mixed_float16", mpjax.loss_scaled(
      optax.adam(1e-2), mpjax.DynamicScaling(initial_scale=2.0**30,
                                             growth_interval=2)))
  step = mpjax.make_train_step(seed_mlp.loss_fn, attribution=True)
  guard = skip_guard.SkipGuard(max_consecutive_skips=30, like=state.params)
  for i in range(40):  # skips first (2**30 overflows), then grows/backs off
    state, metrics = step(state, tiny_batch())
    guard.update(jax.device_get(metrics), step=i)
  assert int(metrics["skipped_steps"]) > 0  # the guard saw skips, and let them be
  assert bool(metrics["grads_finite"])
  chex.assert_tree_all_finite(state.params)


def test_guard_tolerates_skip_streaks_shorter_than_k_forever():
  guard = skip_guard.SkipGuard(max_consecutive_skips=3)
  for i in range(300):
    guard.update({"loss": 1.0, "loss_scale": 2.0**16,
                  "grads_finite": i % 3 == 2})
  assert guard.consecutive_skips == 0


def test_guard_stops_at_the_first_nan_loss_without_loss_scaling():
  guard = skip_guard.SkipGuard(max_consecutive_skips=100, loss_scaled=False)
  guard.update({"loss": 2.3, "grads_finite": True, "loss_scale": 1.0})
  with pytest.raises(skip_guard.NonFiniteTrainingError) as info:
    guard.update({"loss": float("nan"), "grads_finite": False,
                  "loss_scale": 1.0,
                  "leaf_grads_finite": {"w": False, "b": False}}, step=1)
  assert "no loss scaling" in str(info.value)
  assert "debug_forward" in str(info.value)
  assert info.value.leaf_paths == ("b", "w")  # tree (sorted-key) order
  assert np.isnan(info.value.loss)


def test_guard_lets_a_loss_scaled_run_skip_a_nan_loss_step():
  guard = skip_guard.SkipGuard(max_consecutive_skips=3, loss_scaled=True)
  guard.update({"loss": float("inf"), "grads_finite": False,
                "loss_scale": 2.0**15})
  guard.update({"loss": 1.0, "grads_finite": True, "loss_scale": 2.0**14})
  assert guard.consecutive_skips == 0


def test_guard_uses_consecutive_skips_when_called_every_few_steps():
  guard = skip_guard.SkipGuard(max_consecutive_skips=10)
  guard.update({"loss": 1.0, "consecutive_skips": 9})
  with pytest.raises(skip_guard.NonFiniteTrainingError) as info:
    guard.update({"loss": 1.0, "consecutive_skips": 12, "step": 40})
  assert info.value.step == 40 and info.value.consecutive_skips == 12
  assert "attribution=True" in str(info.value)  # no leaves were given


def test_guard_reads_metrics_log_records():
  guard = skip_guard.SkipGuard(max_consecutive_skips=2)
  record = {"step": 5, "loss": 1.0, "skipped": True, "loss_scale": 1.0,
            "nonfinite_leaves": ["Dense_0/kernel"]}
  guard.update(record)
  with pytest.raises(skip_guard.NonFiniteTrainingError) as info:
    guard.update(dict(record, step=6))
  assert info.value.leaf_paths == ("Dense_0/kernel",)
  assert "the scale keeps collapsing: this model may need bfloat16" in str(
      info.value).lower()


def test_guard_warns_once_when_the_scale_collapses_repeatedly():
  guard = skip_guard.SkipGuard(max_consecutive_skips=100)
  scales = [2.0**4, 2.0, 1.0, 1.0, 2.0, 4.0, 1.0, 2.0, 1.0]
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    for scale in scales:
      guard.update({"loss": 1.0, "grads_finite": True, "loss_scale": scale})
  collapse = [w for w in caught
              if issubclass(w.category, skip_guard.ScaleCollapseWarning)]
  assert guard.collapses == 3
  assert len(collapse) == 1
  assert "bfloat16" in str(collapse[0].message)


def test_guard_names_packed_flags_with_like():
  params = {"a": jnp.zeros(2), "b": jnp.zeros(3)}
  guard = skip_guard.SkipGuard(max_consecutive_skips=1, like=params)
  with pytest.raises(skip_guard.NonFiniteTrainingError) as info:
    guard.update({"grads_finite": False,
                  "leaf_grads_finite": jnp.array([True, False])})
  assert info.value.leaf_paths == ("b",)


def test_guard_counts_the_streak_of_each_leaf():
  guard = skip_guard.SkipGuard(max_consecutive_skips=3)
  leaves = [{"a": False, "b": True}, {"a": False, "b": False},
            {"a": True, "b": False}]
  with pytest.raises(skip_guard.NonFiniteTrainingError) as info:
    for flags in leaves:
      guard.update({"grads_finite": False, "leaf_grads_finite": flags})
  assert info.value.leaf_paths == ("b",)
  assert "a (2 of 3)" in str(info.value) and "b (2 of 3)" in str(info.value)


@pytest.mark.parametrize("kwargs, error, fragment", [
    (dict(max_consecutive_skips=0), ValueError, ">= 1"),
    (dict(max_consecutive_skips=2.5), TypeError, "int"),
    (dict(max_consecutive_skips=True), TypeError, "int"),
    (dict(loss_scaled="yes"), TypeError, "bool"),
    (dict(collapse_scale=0.0), ValueError, "collapse_scale"),
])
def test_guard_rejects_bad_arguments(kwargs, error, fragment):
  with pytest.raises(error, match=fragment):
    skip_guard.SkipGuard(**kwargs)


def test_guard_update_needs_skip_or_loss_information():
  with pytest.raises(KeyError, match="grads_finite"):
    skip_guard.SkipGuard().update({"loss_scale": 1.0})
  with pytest.raises(ValueError, match="scalar"):
    skip_guard.SkipGuard().update({"loss": np.ones(3)})


def test_messages_say_no_step_and_no_named_layers_when_they_have_none():
  guard = skip_guard.SkipGuard(max_consecutive_skips=2)
  with pytest.raises(skip_guard.NonFiniteTrainingError) as info:
    for _ in range(2):
      guard.update({"loss": 1.0, "loss_scale": 1.0, "grads_finite": False})
  message = str(info.value)
  assert "2 consecutive steps were skipped" in message
  assert "step ?" not in message and "at step" not in message
  assert "the layers named above" not in message
  assert "attribution=True" in message  # says how to get them named
  with pytest.raises(skip_guard.NonFiniteTrainingError) as info:
    skip_guard.SkipGuard(max_consecutive_skips=1).update(
        {"loss": 1.0, "loss_scale": 1.0, "grads_finite": False}, step=7)
  assert "at step 7" in str(info.value)
