"""Tests for mpjax/_src/scaling.py: the scale rules, clamps and validation."""

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mpjax

F32_MAX = float(np.finfo(np.float32).max)


def reference_trajectory(config, pattern):
  """The rules written out step by step with NumPy float32 scalars.

  Returns the scale *used* at each step and the counter after it.
  """
  scale, count = np.float32(config.initial_scale), 0
  scales, counts = [], []
  for finite in pattern:
    scales.append(float(scale))
    if finite:
      count += 1
      if count == config.growth_interval:
        with np.errstate(over="ignore"):
          grown = scale * np.float32(config.growth_factor)
        if np.isfinite(grown):
          scale = grown
        count = 0
    else:
      scale = scale * np.float32(config.backoff_factor)
      count = 0
    scale = np.float32(min(max(scale, config.min_scale), config.max_scale))
    counts.append(count)
  return scales, counts


def run(config, pattern, jit=False):
  adjust = jax.jit(config.adjust) if jit else config.adjust
  scale, count = config.init()
  scales, counts = [], []
  for finite in pattern:
    scales.append(float(scale))
    scale, count = adjust(scale, count, jnp.asarray(finite))
    chex.assert_type(scale, jnp.float32)
    chex.assert_type(count, jnp.int32)
    chex.assert_shape((scale, count), ())
    counts.append(int(count))
  return scales, counts


def test_grows_on_the_interval_th_consecutive_finite_step():
  config = mpjax.DynamicScaling(initial_scale=8.0, growth_interval=3)
  scales, counts = run(config, [True] * 7)
  # Steps 1-3 use 8; the third finite step grows, so step 4 uses 16.
  assert scales == [8, 8, 8, 16, 16, 16, 32]
  assert counts == [1, 2, 0, 1, 2, 0, 1]


def test_backs_off_and_resets_the_counter():
  config = mpjax.DynamicScaling(initial_scale=64.0, growth_interval=3)
  scales, counts = run(config, [True, True, False, True, True, True, False])
  assert scales == [64, 64, 64, 32, 32, 32, 64]
  assert counts == [1, 2, 0, 1, 2, 0, 0]


@pytest.mark.parametrize("jit", [False, True])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_pattern_matches_reference(seed, jit):
  rng = np.random.default_rng(seed)
  pattern = list(rng.random(300) < 0.85)
  config = mpjax.DynamicScaling(initial_scale=2.0**10, growth_interval=4,
                                growth_factor=4.0, backoff_factor=0.25,
                                min_scale=2.0**-3, max_scale=2.0**20)
  assert run(config, pattern, jit=jit) == reference_trajectory(config, pattern)


def test_only_completed_optimizer_steps_count_towards_growth():
  config = mpjax.DynamicScaling(initial_scale=4.0, growth_interval=2)
  adjust = jax.jit(config.adjust)
  scale, count = config.init()
  seen = []
  # (finite, stepped): micro-batches of windows of two, one bad in window 3.
  for finite, stepped in ((True, False), (True, True), (True, False),
                          (True, True), (True, False), (False, False),
                          (True, True)):
    scale, count = adjust(scale, count, jnp.array(finite), jnp.array(stepped))
    seen.append((float(scale), int(count)))
  assert seen == [(4.0, 0), (4.0, 1), (4.0, 1), (8.0, 0), (8.0, 0),
                  (4.0, 0), (4.0, 1)]


def test_never_grows_to_inf():
  config = mpjax.DynamicScaling(initial_scale=2.0**127, growth_interval=1)
  scales, _ = run(config, [True] * 5, jit=True)
  assert scales == [2.0**127] * 5
  assert all(math.isfinite(s) for s in scales)


def test_min_scale_holds_under_jit():
  config = mpjax.DynamicScaling(initial_scale=16.0, growth_interval=2,
                                min_scale=4.0)
  scales, _ = run(config, [False] * 6, jit=True)
  assert scales == [16, 8, 4, 4, 4, 4]


def test_default_floor_is_one():
  config = mpjax.DynamicScaling.like_torch()
  scales, _ = run(config, [False] * 20, jit=True)
  assert scales[-1] == 1.0 and scales[16] == 1.0 and scales[15] == 2.0


def test_floor_can_be_lowered_to_follow_torch_below_one():
  config = mpjax.DynamicScaling.like_torch(min_scale=2.0**-126)
  scales, _ = run(config, [False] * 20, jit=True)
  assert scales[-1] == 2.0**(16 - 19)


def test_max_scale_holds_under_jit():
  config = mpjax.DynamicScaling(initial_scale=256.0, growth_interval=1,
                                max_scale=1000.0)
  scales, _ = run(config, [True] * 4, jit=True)
  assert scales == [256, 512, 1000, 1000]


def test_static_and_no_scaling_never_change():
  for config, value in [(mpjax.StaticScaling(128), 128.0),
                        (mpjax.NoScaling(), 1.0)]:
    scales, counts = run(config, [True, False, True, False], jit=True)
    assert scales == [value] * 4
    assert counts == [0] * 4


def test_presets_have_the_peers_defaults():
  torch_like = mpjax.DynamicScaling.like_torch()
  keras_like = mpjax.DynamicScaling.like_keras()
  assert (torch_like.initial_scale, torch_like.growth_interval,
          torch_like.growth_factor, torch_like.backoff_factor) == (
              2.0**16, 2000, 2.0, 0.5)
  assert (keras_like.initial_scale, keras_like.growth_interval,
          keras_like.growth_factor, keras_like.backoff_factor) == (
              2.0**15, 2000, 2.0, 0.5)


def test_presets_take_overrides():
  config = mpjax.DynamicScaling.like_torch(growth_interval=10, min_scale=2.0)
  assert config.growth_interval == 10 and config.min_scale == 2.0
  assert config.initial_scale == 2.0**16


def test_configs_are_frozen_and_hashable():
  a = mpjax.DynamicScaling(initial_scale=2**16, growth_interval=5)
  b = mpjax.DynamicScaling(initial_scale=65536.0, growth_interval=5)
  assert a == b and hash(a) == hash(b)
  assert len({a, b, mpjax.NoScaling(), mpjax.StaticScaling(2.0)}) == 3
  with pytest.raises(Exception):
    a.initial_scale = 4.0  # frozen
  # Hashable configs can be static jit arguments.
  f = jax.jit(lambda c, s, n: c.adjust(s, n, jnp.array(True)),
              static_argnums=0)
  scale, count = f(a, *a.init())
  chex.assert_trees_all_equal((scale, count), (jnp.float32(2.0**16),
                                               jnp.int32(1)))


@pytest.mark.parametrize("kwargs, error, fragment", [
    (dict(initial_scale=0.0, growth_interval=1), ValueError, "initial_scale"),
    (dict(initial_scale=-2.0, growth_interval=1), ValueError, "-2.0"),
    (dict(initial_scale=float("inf"), growth_interval=1), ValueError, "inf"),
    (dict(initial_scale=float("nan"), growth_interval=1), ValueError, "nan"),
    (dict(initial_scale=1e39, growth_interval=1), ValueError, "1e+39"),
    (dict(initial_scale=1e-50, growth_interval=1), ValueError, "rounds to 0"),
    (dict(initial_scale="8", growth_interval=1), TypeError, "'8'"),
    (dict(initial_scale=True, growth_interval=1), TypeError, "True"),
    (dict(initial_scale=8.0, growth_interval=0), ValueError, "growth_interval"),
    (dict(initial_scale=8.0, growth_interval=2**31), ValueError, "2147483648"),
    (dict(initial_scale=8.0, growth_interval=2.5), TypeError, "2.5"),
    (dict(initial_scale=8.0, growth_interval=True), TypeError, "True"),
    (dict(initial_scale=8.0, growth_interval=1, growth_factor=1.0), ValueError,
     "growth_factor"),
    (dict(initial_scale=8.0, growth_interval=1, growth_factor=None), TypeError,
     "None"),
    (dict(initial_scale=8.0, growth_interval=1, backoff_factor=1.0),
     ValueError, "backoff_factor"),
    (dict(initial_scale=8.0, growth_interval=1, backoff_factor=0.0),
     ValueError, "backoff_factor"),
    (dict(initial_scale=8.0, growth_interval=1, min_scale=16.0), ValueError,
     "min_scale=16.0"),
    (dict(initial_scale=8.0, growth_interval=1, max_scale=4.0), ValueError,
     "max_scale=4.0"),
    (dict(initial_scale=8.0, growth_interval=1, min_scale=0.0), ValueError,
     "min_scale"),
])
def test_dynamic_scaling_rejects_bad_arguments(kwargs, error, fragment):
  with pytest.raises(error) as info:
    mpjax.DynamicScaling(**kwargs)
  assert fragment in str(info.value)


@pytest.mark.parametrize("value, error", [
    (0, ValueError), (-1.0, ValueError), (float("inf"), ValueError),
    ("2", TypeError), (None, TypeError), (False, TypeError)])
def test_static_scaling_rejects_bad_scale(value, error):
  with pytest.raises(error, match="scale"):
    mpjax.StaticScaling(value)
