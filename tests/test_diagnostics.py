"""Tests for mpjax/_src/diagnostics.py: attribution, forward debug mode, guard."""

import collections
import warnings

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import mpjax
import models
import seed_mlp
from mpjax._src import diagnostics


def tiny_batch(n=8, features=6, classes=3, seed=0):
  rng = np.random.default_rng(seed)
  return {"x": jnp.asarray(rng.random((n, features)), jnp.float32),
          "y": jnp.asarray(rng.integers(0, classes, n), jnp.int32)}


def make_state(policy="float32", tx=None):
  model = models.MLP(hidden=(8,), num_classes=3)
  params = model.init(jax.random.key(0), tiny_batch()["x"])["params"]
  tx = tx or mpjax.loss_scaled(optax.sgd(0.1), mpjax.NoScaling())
  return mpjax.TrainState.create(apply_fn=model.apply, params=params, tx=tx,
                                 policy=policy)


@jax.custom_vjp
def inf_cotangent(x, poison):
  """Identity whose backward pass returns inf cotangents where `poison`."""
  del poison
  return x


def _inf_fwd(x, poison):
  return x, poison


def _inf_bwd(poison, g):
  bad = jax.tree.map(lambda t: jnp.where(poison, jnp.inf, t), g)
  return bad, jnp.zeros_like(poison)


inf_cotangent.defvjp(_inf_fwd, _inf_bwd)


def poisoned_loss_fn(layer):
  """seed_mlp.loss_fn whose `layer` gets inf gradients when batch['poison']."""
  def loss_fn(params, batch, apply_fn, rng):
    params = dict(params)
    params[layer] = inf_cotangent(params[layer], batch["poison"])
    return seed_mlp.loss_fn(params, batch, apply_fn, rng)
  return loss_fn


# ---------------------------------------------------------------- attribution


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
  assert diagnostics.nonfinite_leaf_paths(flags) == [
      "Dense_1/kernel", "blocks/1/w", "pair/first", "state/mu/w"]


def test_nonfinite_leaf_paths_is_empty_when_every_leaf_is_finite():
  flags = {"a": jnp.array(True), "b": [jnp.array(True)]}
  assert diagnostics.nonfinite_leaf_paths(flags) == []
  assert diagnostics.nonfinite_leaf_paths({}) == []


def test_nonfinite_leaf_paths_flags_a_stacked_leaf_if_any_step_was_bad():
  flags = {"a": jnp.array([True, False, True]), "b": jnp.array([True, True])}
  assert diagnostics.nonfinite_leaf_paths(flags) == ["a"]


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
    named.append(diagnostics.nonfinite_leaf_paths(
        metrics["leaf_grads_finite"], like=state.params))
    assert bool(metrics["grads_finite"]) == (i not in poisoned_steps)
  assert named == [["Dense_1/bias", "Dense_1/kernel"] if i in poisoned_steps
                   else [] for i in range(7)]
  assert int(metrics["skipped_steps"]) == len(poisoned_steps)


# ------------------------------------------------------------- forward debug


def overflowing_mlp_params():
  """MLP params whose second Dense overflows float16 (|out| ~ 8 * 1e2 * 1e3)."""
  model = models.MLP(hidden=(8,), num_classes=3)
  params = model.init(jax.random.key(0), tiny_batch()["x"])["params"]
  params = jax.tree.map(lambda p: p, params)
  params["Dense_0"]["kernel"] = jnp.full_like(params["Dense_0"]["kernel"], 20.0)
  params["Dense_1"]["kernel"] = jnp.full_like(params["Dense_1"]["kernel"],
                                              1e3)
  return model, params


@pytest.mark.parametrize("jit", [True, False], ids=["jit", "eager"])
def test_debug_forward_names_the_linen_module_that_overflowed(jit):
  model, params = overflowing_mlp_params()
  apply_fn = mpjax.with_policy(model.apply, "p=f32,c=f16,o=f16")
  report = diagnostics.debug_forward(apply_fn, {"params": params},
                                     tiny_batch()["x"], jit=jit)
  first = report.first_nonfinite
  assert first is not None
  assert (first.path, first.module_type, first.method) == (
      "Dense_1", "Dense", "__call__")
  assert first.inputs_finite and not first.outputs_finite
  assert first.output_dtypes == ("float16",)
  calls = {c.path: c for c in report.calls}
  assert set(calls) == {"Dense_0", "Dense_1", ""}
  assert calls["Dense_0"].outputs_finite
  assert 0 < calls["Dense_0"].output_absmax < 65504
  assert first.output_nonfinite > 0
  assert not report.output_finite
  assert "Dense_1 (Dense.__call__)" in str(report)
  assert "float16 65504" in report.summary()


def test_debug_forward_reports_a_finite_forward_as_finite():
  model = models.MLP(hidden=(8,), num_classes=3)
  variables = model.init(jax.random.key(0), tiny_batch()["x"])
  apply_fn = mpjax.with_policy(model.apply, "mixed_float16")
  report = diagnostics.debug_forward(apply_fn, variables, tiny_batch()["x"])
  assert report.first_nonfinite is None and report.output_finite
  assert [c.path for c in report.calls] == ["Dense_0", "Dense_1", ""]
  chex.assert_trees_all_close(report.output, apply_fn(variables,
                                                      tiny_batch()["x"]),
                              rtol=1e-3)
  assert "finite" in report.summary()


def test_debug_forward_blames_nothing_when_the_loss_goes_non_finite():
  model = models.MLP(hidden=(8,), num_classes=3)
  variables = model.init(jax.random.key(0), tiny_batch()["x"])
  fn = lambda v, x: jnp.log(model.apply(v, x) * 0.0).sum()
  report = diagnostics.debug_forward(fn, variables, tiny_batch()["x"])
  assert report.first_nonfinite is None and not report.output_finite
  assert "outside the modules" in report.summary()


def test_debug_forward_passes_python_values_through_unchanged():
  class Gate(nn.Module):
    @nn.compact
    def __call__(self, x, *, blow_up: bool):
      y = nn.Dense(2)(x)
      return y * jnp.inf if blow_up else y

  model = Gate()
  variables = model.init(jax.random.key(0), jnp.ones((1, 3)), blow_up=False)
  report = diagnostics.debug_forward(model.apply, variables, jnp.ones((1, 3)),
                                     blow_up=True)
  assert report.first_nonfinite.path == ""  # Dense_0 was fine; Gate was not
  assert [c.outputs_finite for c in report.calls] == [True, False]


class NnxBlock(nnx.Module):

  def __init__(self, rngs):
    self.lin = nnx.Linear(4, 4, dtype=jnp.float16, rngs=rngs)

  def __call__(self, x):
    return jax.nn.relu(self.lin(x))


class NnxModel(nnx.Module):

  def __init__(self, rngs):
    self.stem = nnx.Linear(3, 4, dtype=jnp.float16, rngs=rngs)
    self.blocks = nnx.List([NnxBlock(rngs), NnxBlock(rngs)])
    self.norm = nnx.BatchNorm(4, rngs=rngs)

  def __call__(self, x):
    x = self.stem(x)
    for block in self.blocks:
      x = block(x)
    return self.norm(x.astype(jnp.float32))


@pytest.mark.parametrize("jit", [True, False], ids=["jit", "eager"])
def test_debug_forward_names_the_nnx_module_that_overflowed(jit):
  model = NnxModel(nnx.Rngs(0))
  model.stem.kernel[...] = jnp.full((3, 4), 10.0)
  model.blocks[1].lin.kernel[...] = jnp.full((4, 4), 1e4)
  x = jnp.ones((2, 3))
  mean_before = np.asarray(model.norm.mean[...])
  original_call = vars(nnx.Linear)["__call__"]
  report = diagnostics.debug_forward(model, x, jit=jit)
  assert report.first_nonfinite.path == "blocks/1/lin"
  assert report.first_nonfinite.module_type == "Linear"
  assert report.first_nonfinite.inputs_finite
  assert [c.path for c in report.calls] == [
      "stem", "blocks/0/lin", "blocks/0", "blocks/1/lin", "blocks/1", "norm",
      ""]
  assert [c.outputs_finite for c in report.calls] == [True] * 3 + [False] * 4
  # The debug run leaves the model and the patched classes as they were.
  np.testing.assert_array_equal(model.norm.mean[...], mean_before)
  assert vars(nnx.Linear)["__call__"] is original_call


def test_debug_forward_finds_nnx_modules_among_the_arguments():
  model = NnxModel(nnx.Rngs(0))
  model.blocks[0].lin.kernel[...] = jnp.full((4, 4), jnp.inf)
  report = diagnostics.debug_forward(lambda m, x: m(x).sum(), model,
                                     jnp.ones((2, 3)))
  assert report.first_nonfinite.path == "blocks/0/lin"


def test_debug_forward_rejects_a_non_callable():
  with pytest.raises(TypeError, match="callable"):
    diagnostics.debug_forward(3, jnp.ones(2))


# ------------------------------------------------------------------- guard


def test_guard_stops_an_always_non_finite_run_after_exactly_k_skips():
  k = 4
  state = make_state(tx=mpjax.loss_scaled(
      optax.adam(1e-2), mpjax.DynamicScaling(initial_scale=2.0**10,
                                             growth_interval=100)))
  step = mpjax.make_train_step(poisoned_loss_fn("Dense_0"), attribution=True)
  guard = diagnostics.SkipGuard(max_consecutive_skips=k, like=state.params)
  batch = dict(tiny_batch(), poison=jnp.array(True))
  steps_run = 0
  with pytest.raises(diagnostics.NonFiniteTrainingError) as info:
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
  guard = diagnostics.SkipGuard(max_consecutive_skips=30, like=state.params)
  for i in range(40):  # skips first (2**30 overflows), then grows/backs off
    state, metrics = step(state, tiny_batch())
    guard.update(jax.device_get(metrics), step=i)
  assert int(metrics["skipped_steps"]) > 0  # the guard saw skips, and let them be
  assert bool(metrics["grads_finite"])
  chex.assert_tree_all_finite(state.params)


def test_guard_tolerates_skip_streaks_shorter_than_k_forever():
  guard = diagnostics.SkipGuard(max_consecutive_skips=3)
  for i in range(300):
    guard.update({"loss": 1.0, "loss_scale": 2.0**16,
                  "grads_finite": i % 3 == 2})
  assert guard.consecutive_skips == 0


def test_guard_stops_at_the_first_nan_loss_without_loss_scaling():
  guard = diagnostics.SkipGuard(max_consecutive_skips=100, loss_scaled=False)
  guard.update({"loss": 2.3, "grads_finite": True, "loss_scale": 1.0})
  with pytest.raises(diagnostics.NonFiniteTrainingError) as info:
    guard.update({"loss": float("nan"), "grads_finite": False,
                  "loss_scale": 1.0,
                  "leaf_grads_finite": {"w": False, "b": False}}, step=1)
  assert "no loss scaling" in str(info.value)
  assert "debug_forward" in str(info.value)
  assert info.value.leaf_paths == ("b", "w")  # tree (sorted-key) order
  assert np.isnan(info.value.loss)


def test_guard_lets_a_loss_scaled_run_skip_a_nan_loss_step():
  guard = diagnostics.SkipGuard(max_consecutive_skips=3, loss_scaled=True)
  guard.update({"loss": float("inf"), "grads_finite": False,
                "loss_scale": 2.0**15})
  guard.update({"loss": 1.0, "grads_finite": True, "loss_scale": 2.0**14})
  assert guard.consecutive_skips == 0


def test_guard_uses_consecutive_skips_when_called_every_few_steps():
  guard = diagnostics.SkipGuard(max_consecutive_skips=10)
  guard.update({"loss": 1.0, "consecutive_skips": 9})
  with pytest.raises(diagnostics.NonFiniteTrainingError) as info:
    guard.update({"loss": 1.0, "consecutive_skips": 12, "step": 40})
  assert info.value.step == 40 and info.value.consecutive_skips == 12
  assert "attribution=True" in str(info.value)  # no leaves were given


def test_guard_reads_metrics_log_records():
  guard = diagnostics.SkipGuard(max_consecutive_skips=2)
  record = {"step": 5, "loss": 1.0, "skipped": True, "loss_scale": 1.0,
            "nonfinite_leaves": ["Dense_0/kernel"]}
  guard.update(record)
  with pytest.raises(diagnostics.NonFiniteTrainingError) as info:
    guard.update(dict(record, step=6))
  assert info.value.leaf_paths == ("Dense_0/kernel",)
  assert "the scale keeps collapsing: this model may need bfloat16" in str(
      info.value).lower()


def test_guard_warns_once_when_the_scale_collapses_repeatedly():
  guard = diagnostics.SkipGuard(max_consecutive_skips=100)
  scales = [2.0**4, 2.0, 1.0, 1.0, 2.0, 4.0, 1.0, 2.0, 1.0]
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    for scale in scales:
      guard.update({"loss": 1.0, "grads_finite": True, "loss_scale": scale})
  collapse = [w for w in caught
              if issubclass(w.category, diagnostics.ScaleCollapseWarning)]
  assert guard.collapses == 3
  assert len(collapse) == 1
  assert "bfloat16" in str(collapse[0].message)


def test_guard_names_packed_flags_with_like():
  params = {"a": jnp.zeros(2), "b": jnp.zeros(3)}
  guard = diagnostics.SkipGuard(max_consecutive_skips=1, like=params)
  with pytest.raises(diagnostics.NonFiniteTrainingError) as info:
    guard.update({"grads_finite": False,
                  "leaf_grads_finite": jnp.array([True, False])})
  assert info.value.leaf_paths == ("b",)


def test_packed_flags_without_like_are_named_by_index():
  assert diagnostics.nonfinite_leaf_paths(
      jnp.array([True, False, False])) == ["leaf[1]", "leaf[2]"]


def test_guard_counts_the_streak_of_each_leaf():
  guard = diagnostics.SkipGuard(max_consecutive_skips=3)
  leaves = [{"a": False, "b": True}, {"a": False, "b": False},
            {"a": True, "b": False}]
  with pytest.raises(diagnostics.NonFiniteTrainingError) as info:
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
    diagnostics.SkipGuard(**kwargs)


def test_guard_update_needs_skip_or_loss_information():
  with pytest.raises(KeyError, match="grads_finite"):
    diagnostics.SkipGuard().update({"loss_scale": 1.0})
  with pytest.raises(ValueError, match="scalar"):
    diagnostics.SkipGuard().update({"loss": np.ones(3)})


def test_nonfinite_leaf_paths_unpacks_one_flag_vector_per_leaf_of_like():
  params = {"Dense_0": {"bias": 0, "kernel": 0}, "Dense_1": {"kernel": 0}}
  packed = jnp.array([True, False, False])
  assert diagnostics.nonfinite_leaf_paths(packed, like=params) == [
      "Dense_0/kernel", "Dense_1/kernel"]
  tree = {"Dense_0": {"bias": True, "kernel": True}, "Dense_1": {"kernel": False}}
  assert diagnostics.nonfinite_leaf_paths(tree, like=params) == ["Dense_1/kernel"]
  with pytest.raises(ValueError, match="3 flags"):
    diagnostics.nonfinite_leaf_paths(jnp.array([True, False]), like=params)
