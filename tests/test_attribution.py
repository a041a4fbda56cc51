"""Tests for mpjax/_src/attribution.py: non-finite gradient leaves by path."""

import collections

import jax.numpy as jnp
import numpy as np
import optax
import pytest

import mpjax
from mpjax._src import attribution
from poisoned import make_state
from poisoned import poisoned_loss_fn
from poisoned import tiny_batch


class Pair(collections.namedtuple("Pair", "first second")):
  pass


def test_nonfinite_leaf_paths_joins_dict_attribute_and_sequence_keys():
  flags = {
      "Dense_1": {"kernel": np.bool_(False), "bias": jnp.array(True)},
      "blocks": [jnp.array(True), {"w": jnp.array(False)}],
      "pair": Pair(first=False, second=True),
      "state": optax.ScaleByAdamState(count=jnp.array(True),
                                      mu={"w": jnp.array(False)},
                                      nu={"w": jnp.array(True)}),
  }
  assert attribution.nonfinite_leaf_paths(flags) == [
      "Dense_1/kernel", "blocks/1/w", "pair/first", "state/mu/w"]


def test_nonfinite_leaf_paths_is_empty_when_every_leaf_is_finite():
  flags = {"a": jnp.array(True), "b": [jnp.array(True)]}
  assert attribution.nonfinite_leaf_paths(flags) == []
  assert attribution.nonfinite_leaf_paths({}) == []


def test_nonfinite_leaf_paths_flags_a_stacked_leaf_if_any_step_was_bad():
  flags = {"a": jnp.array([True, False, True]), "b": jnp.array([True, True])}
  assert attribution.nonfinite_leaf_paths(flags) == ["a"]


@pytest.mark.parametrize("scaling", [
    mpjax.DynamicScaling(initial_scale=2.0**8, growth_interval=3),
    mpjax.NoScaling()], ids=["dynamic", "none"])
def test_attribution_names_exactly_the_poisoned_layer_on_exactly_those_steps(
    scaling):
  poisoned_steps = {2, 5}
  state = make_state(tx=mpjax.loss_scaled(optax.adam(1e-2), scaling))
  step = mpjax.make_train_step(poisoned_loss_fn("Dense_1"), attribution=True)
  named = []
  for i in range(7):
    batch = dict(tiny_batch(), poison=jnp.array(i in poisoned_steps))
    state, metrics = step(state, batch)
    # The loss stays finite: only the gradient is poisoned.
    assert np.isfinite(float(metrics["loss"]))
    named.append(attribution.nonfinite_leaf_paths(
        metrics["leaf_grads_finite"], like=state.params))
    assert bool(metrics["grads_finite"]) == (i not in poisoned_steps)
  assert named == [["Dense_1/bias", "Dense_1/kernel"] if i in poisoned_steps
                   else [] for i in range(7)]
  assert int(metrics["skipped_steps"]) == len(poisoned_steps)


def test_packed_flags_without_like_are_named_by_index():
  assert attribution.nonfinite_leaf_paths(
      jnp.array([True, False, False])) == ["leaf[1]", "leaf[2]"]


def test_nonfinite_leaf_paths_unpacks_one_flag_vector_per_leaf_of_like():
  params = {"Dense_0": {"bias": 0, "kernel": 0}, "Dense_1": {"kernel": 0}}
  packed = jnp.array([True, False, False])
  assert attribution.nonfinite_leaf_paths(packed, like=params) == [
      "Dense_0/kernel", "Dense_1/kernel"]
  tree = {"Dense_0": {"bias": True, "kernel": True}, "Dense_1": {"kernel": False}}
  assert attribution.nonfinite_leaf_paths(tree, like=params) == ["Dense_1/kernel"]
  with pytest.raises(ValueError, match="3 flags"):
    attribution.nonfinite_leaf_paths(jnp.array([True, False]), like=params)
