"""Tests for mpjax/_src/grad_stats.py against a NumPy reference."""

import math

import chex
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from mpjax._src import grad_stats as gs

F16_TINY = 2.0**-14  # float16's smallest normal
F16_MAX = 65504.0
BF16_MAX = float(ml_dtypes.finfo(ml_dtypes.bfloat16).max)


def reference(g, scale, dtype):
  """NumPy (and ml_dtypes for bfloat16) statistics of one tensor."""
  info = ml_dtypes.finfo(dtype)
  g = np.asarray(g, np.float32)
  finite = np.isfinite(g)
  nonzero = finite & (g != 0)
  with np.errstate(over="ignore", under="ignore", invalid="ignore"):
    cast = (g * np.float32(scale)).astype(dtype).astype(np.float64)
  underflow = nonzero & (np.abs(cast) < float(info.smallest_normal))
  overflow = nonzero & ~np.isfinite(cast)
  max_abs = float(np.max(np.abs(np.where(finite, g, 0)), initial=0))
  with np.errstate(divide="ignore"):
    headroom = (math.log2(float(info.max)) - np.log2(max_abs)
                - math.log2(scale))
  return dict(size=g.size, nonzero=int(nonzero.sum()),
              underflow=int(underflow.sum()), overflow=int(overflow.sum()),
              nonfinite=int((~finite).sum()), max_abs=max_abs,
              headroom_log2=float(headroom))


def as_dict(stats):
  stats = jax.device_get(stats)
  return {field: (float(v) if field in ("max_abs", "headroom_log2")
                  else int(v)) for field, v in stats._asdict().items()}


def assert_matches(stats, expected):
  got = as_dict(stats)
  for field in ("size", "nonzero", "underflow", "overflow", "nonfinite"):
    assert got[field] == expected[field], (field, got, expected)
  np.testing.assert_allclose(got["max_abs"], expected["max_abs"], rtol=1e-6)
  np.testing.assert_allclose(got["headroom_log2"], expected["headroom_log2"],
                             rtol=1e-5, atol=1e-5)


def shuffled(values, seed=0):
  values = np.asarray(values, np.float32)
  return values[np.random.default_rng(seed).permutation(values.size)]


def float16_case():
  """Known counts at scale 1024 (scaled value = g * 2**10)."""
  scale = 1024.0
  s = lambda scaled: np.float32(scaled / scale)
  values = (
      [0.0] * 5                                   # zeros: not counted
      + [s(10.0), s(-0.5), s(1e-3)] * 2 + [s(F16_TINY)]  # 7 normal
      + [s(65519.0)]                              # rounds down to 65504: normal
      + [s(1e-8), s(-3e-8)] + [s(2.0**-26)]       # 3 below the smallest subnormal
      + [s(1e-5), s(-4e-5), s(6e-5), s(2.0**-24)]  # 4 subnormal
      + [s(F16_TINY - 2.0**-26)]                  # rounds up to the smallest normal
      + [s(1e5), s(-7e4), s(65520.0)]             # 3 overflow (65520 ties to inf)
      + [np.inf, -np.inf, np.nan])                # already non-finite
  counts = dict(size=len(values), nonzero=len(values) - 5 - 3,
                underflow=7, overflow=3, nonfinite=3)
  return shuffled(values), scale, counts


def bfloat16_underflow_case():
  """Scale 2**-40: g = 1e-30 lands far below bfloat16's smallest normal."""
  scale = 2.0**-40
  values = [0.0] * 2 + [1.0, -3.0, 1e-20, 1e-25] + [1e-30, -2e-29, 5e-28]
  return shuffled(values), scale, dict(size=9, nonzero=7, underflow=3,
                                       overflow=0, nonfinite=0)


def bfloat16_overflow_case():
  """Scale 2**40: entries past bfloat16's max, one exactly at it."""
  scale = 2.0**40
  values = ([0.0, 1.0, -2e10, BF16_MAX / scale]           # max itself is finite
            + [1e27, -3e30, (2 - 2.0**-8) * 2.0**87])     # last ties to inf
  return shuffled(values), scale, dict(size=7, nonzero=6, underflow=0,
                                       overflow=3, nonfinite=0)


@pytest.mark.parametrize("case, dtype", [
    (float16_case, np.float16),
    (bfloat16_underflow_case, ml_dtypes.bfloat16),
    (bfloat16_overflow_case, ml_dtypes.bfloat16),
], ids=["float16", "bfloat16-underflow", "bfloat16-overflow"])
def test_grad_stats_equals_numpy_reference_and_known_counts(case, dtype):
  g, scale, counts = case()
  expected = reference(g, scale, dtype)
  for field, count in counts.items():
    assert expected[field] == count, (field, expected)  # the case is as built
  stats = jax.jit(gs.grad_stats, static_argnums=2)(
      {"layer": {"w": jnp.asarray(g)}}, scale, jnp.dtype(dtype))
  assert_matches(stats.leaves["layer"]["w"], expected)
  assert_matches(stats.layers["layer"], expected)
  assert_matches(stats.total, expected)
  np.testing.assert_allclose(
      float(stats.layers["layer"].underflow_fraction),
      counts["underflow"] / counts["nonzero"], rtol=1e-6)
  np.testing.assert_allclose(
      float(stats.layers["layer"].overflow_fraction),
      counts["overflow"] / counts["nonzero"], rtol=1e-6)


def grads_tree(seed=0):
  rng = np.random.default_rng(seed)
  logs = lambda shape: np.float32(10.0**rng.uniform(-12, 2, shape)
                                  * rng.choice([-1, 1], shape))
  return {
      "Dense_0": {"kernel": logs((16, 8)), "bias": logs((8,))},
      "Dense_1": {"kernel": logs((8, 4)),
                  "bias": np.zeros((4,), np.float32)},
      "head": logs((5,)).astype(np.float16),
  }


def test_layers_and_total_sum_their_leaves():
  grads = grads_tree()
  stats = gs.grad_stats(jax.tree.map(jnp.asarray, grads), 256.0)
  leaves = {
      "Dense_0": [grads["Dense_0"]["bias"], grads["Dense_0"]["kernel"]],
      "Dense_1": [grads["Dense_1"]["bias"], grads["Dense_1"]["kernel"]],
      "head": [grads["head"]],
  }
  assert set(stats.layers) == set(leaves)
  for name, tensors in leaves.items():
    flat = np.concatenate([np.ravel(t).astype(np.float32) for t in tensors])
    assert_matches(stats.layers[name], reference(flat, 256.0, np.float16))
  flat = np.concatenate([np.ravel(t).astype(np.float32)
                         for t in jax.tree.leaves(grads)])
  assert_matches(stats.total, reference(flat, 256.0, np.float16))
  # An all-zero leaf loses nothing and has unbounded headroom.
  bias = stats.leaves["Dense_1"]["bias"]
  assert int(bias.nonzero) == 0 and float(bias.underflow_fraction) == 0.0
  assert float(bias.headroom_log2) == math.inf


def test_layer_depth_groups_by_a_longer_path_prefix():
  grads = {"params": {"a": {"w": jnp.ones(2)}, "b": {"w": jnp.ones(3)}}}
  assert set(gs.grad_stats(grads, 1.0).layers) == {"params"}
  stats = gs.grad_stats(grads, 1.0, layer_depth=2)
  assert set(stats.layers) == {"params/a", "params/b"}
  assert int(stats.layers["params/b"].size) == 3


def test_grad_stats_gives_zero_counts_to_non_floating_leaves():
  stats = gs.grad_stats({"w": jnp.ones(3), "step": jnp.arange(4)}, 2.0)
  assert as_dict(stats.leaves["step"])["size"] == 0
  assert int(stats.total.nonzero) == 3


def test_grad_stats_compiles_once_and_matches_eager():
  grads = jax.tree.map(jnp.asarray, grads_tree())

  @jax.jit
  @chex.assert_max_traces(n=1)
  def stats_fn(g, scale):
    return gs.grad_stats(g, scale, jnp.bfloat16)

  for scale in (1.0, 2.0**20, 2.0**-30):
    chex.assert_trees_all_close(stats_fn(grads, scale),
                                gs.grad_stats(grads, scale, jnp.bfloat16))


def test_periodic_grad_stats_computes_only_every_n_steps():
  grads = jax.tree.map(jnp.asarray, grads_tree())
  periodic = jax.jit(gs.periodic_grad_stats, static_argnums=(3,))
  full = gs.grad_stats(grads, 128.0)
  for step in range(4):
    stats = periodic(grads, 128.0, step, 2)
    if step % 2 == 0:
      assert bool(stats.computed)
      chex.assert_trees_all_close(stats, full)
    else:
      assert not bool(stats.computed)
      assert int(stats.total.nonzero) == 0 and float(stats.loss_scale) == 128.0
      chex.assert_trees_all_equal_structs(stats, full)


def test_grad_stats_summary_gives_plain_numbers():
  grads = {"Dense_0": {"kernel": jnp.array([1e-9, 1e-3, 0.0, 100.0])}}
  summary = gs.grad_stats_summary(gs.grad_stats(grads, 1024.0))
  layer = summary["layers"]["Dense_0"]
  assert summary["dtype"] == "float16" and summary["loss_scale"] == 1024.0
  assert layer["nonzero"] == 3 and layer["underflow"] == 1
  assert layer["overflow"] == 1  # 100 * 1024 > 65504
  assert layer["underflow_fraction"] == pytest.approx(1 / 3)
  assert layer["headroom_log2"] == pytest.approx(math.log2(F16_MAX / 102400))
  assert summary["leaves"]["Dense_0/kernel"] == layer
  assert all(type(v) in (int, float) for v in layer.values())
  assert "leaves" not in gs.grad_stats_summary(gs.grad_stats(grads, 1.0),
                                               leaves=False)


@pytest.mark.parametrize("kwargs, error, fragment", [
    (dict(dtype=jnp.int32), TypeError, "floating"),
    (dict(dtype="not-a-dtype"), TypeError, "floating"),
    (dict(layer_depth=0), ValueError, ">= 1"),
    (dict(layer_depth=1.5), TypeError, "int"),
    (dict(loss_scale=jnp.ones(2)), ValueError, "scalar"),
])
def test_grad_stats_rejects_bad_arguments(kwargs, error, fragment):
  kwargs = dict(dict(loss_scale=1.0), **kwargs)
  with pytest.raises(error, match=fragment):
    gs.grad_stats({"w": jnp.ones(2)}, **kwargs)


def test_periodic_grad_stats_rejects_a_bad_interval():
  with pytest.raises(ValueError, match=">= 1"):
    gs.periodic_grad_stats({"w": jnp.ones(2)}, 1.0, 0, 0)
