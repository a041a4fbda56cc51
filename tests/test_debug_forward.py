"""Tests for mpjax/_src/debug_forward.py: the first non-finite module output."""

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import models
import mpjax
from mpjax._src import debug_forward as debug_forward_lib
from poisoned import tiny_batch


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
  report = debug_forward_lib.debug_forward(apply_fn, {"params": params},
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
  report = debug_forward_lib.debug_forward(apply_fn, variables, tiny_batch()["x"])
  assert report.first_nonfinite is None and report.output_finite
  assert [c.path for c in report.calls] == ["Dense_0", "Dense_1", ""]
  chex.assert_trees_all_close(report.output, apply_fn(variables,
                                                      tiny_batch()["x"]),
                              rtol=1e-3)
  assert "finite" in report.summary()


@pytest.mark.parametrize("jit", [True, False], ids=["jit", "eager"])
def test_debug_forward_sees_a_linen_policy_map_call_once_per_module(jit):
  # The map's shape-only discovery trace runs inside the call: the observer
  # must not see it (its tracers would leak into the report).
  model = models.MLP(hidden=(8,), num_classes=3)
  variables = model.init(jax.random.key(0), tiny_batch()["x"])
  apply_fn = mpjax.with_policy(model.apply, mpjax.PolicyMap("mixed_float16"))
  report = debug_forward_lib.debug_forward(apply_fn, variables,
                                           tiny_batch()["x"], jit=jit)
  assert [(c.path, c.output_dtypes) for c in report.calls] == [
      ("Dense_0", ("float16",)), ("Dense_1", ("float16",)), ("", ("float32",))]
  assert report.first_nonfinite is None and report.output_finite


def test_debug_forward_blames_nothing_when_the_loss_goes_non_finite():
  model = models.MLP(hidden=(8,), num_classes=3)
  variables = model.init(jax.random.key(0), tiny_batch()["x"])
  fn = lambda v, x: jnp.log(model.apply(v, x) * 0.0).sum()
  report = debug_forward_lib.debug_forward(fn, variables, tiny_batch()["x"])
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
  report = debug_forward_lib.debug_forward(model.apply, variables, jnp.ones((1, 3)),
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
  report = debug_forward_lib.debug_forward(model, x, jit=jit)
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
  report = debug_forward_lib.debug_forward(lambda m, x: m(x).sum(), model,
                                     jnp.ones((2, 3)))
  assert report.first_nonfinite.path == "blocks/0/lin"


def test_debug_forward_rejects_a_non_callable():
  with pytest.raises(TypeError, match="callable"):
    debug_forward_lib.debug_forward(3, jnp.ones(2))
