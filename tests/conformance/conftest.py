"""Conformance against the real PyTorch and Keras 3 (the `conformance` extra).

Each test module skips itself, with the reason, when the library it compares
against (torch or keras) is not installed. (A skip raised here instead would
crash ``pytest tests/conformance``: pytest loads the conftest.py of a directory
given on the command line before collection, where a skip is not handled.)
Keras runs on JAX: `KERAS_BACKEND` is set here, before any test module imports
keras (keras 3 falls back to TensorFlow otherwise, which the extra does not
install).

The fixtures build what the torch and Keras tests share: a tiny least-squares
problem whose gradients stay far from float32's limits at every loss scale
the tests reach (2**-60 ... 2**127), so the *only* non-finite steps are the
ones a pattern poisons on purpose, and the mpjax side of every trajectory.
"""

import functools
import math
import os
import types

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import mpjax

os.environ["KERAS_BACKEND"] = "jax"

# The toy problem: loss = mean((x @ w + b - y)**2), x and y of order 2**-4,
# so the gradients are of order 2**-9 and the scaled ones stay finite up to
# a scale of 2**127 and normal (not subnormal) down to 2**-100.
IN_FEATURES, OUT_FEATURES, BATCH = 4, 2, 8

# Pattern codes: 0 = leave the gradients alone; 1..6 = poison one element.
# Codes 1-3 write +inf, NaN, -inf into w[0, 0]; codes 4-6 into b[1].
POISON_VALUES = (math.inf, math.nan, -math.inf)


def poison_of(code: int) -> tuple:
  """Returns ``(leaf, index, value)`` for a non-zero pattern code."""
  leaf, index = ("w", (0, 0)) if code <= 3 else ("b", (1,))
  return leaf, index, POISON_VALUES[(code - 1) % 3]


def _make_problem(seed: int) -> dict:
  """Initial params and one fixed batch, float32 numpy.

  `w` is [IN, OUT] (torch's `Linear.weight` is its transpose), `b` is [OUT].
  """
  rng = np.random.default_rng(seed)
  u = lambda *shape: rng.uniform(-1.0, 1.0, shape).astype(np.float32)
  return {
      "w": 0.5 * u(IN_FEATURES, OUT_FEATURES),
      "b": np.zeros(OUT_FEATURES, np.float32),
      "x": np.float32(2.0**-4) * u(BATCH, IN_FEATURES),
      "y": np.float32(2.0**-4) * u(BATCH, OUT_FEATURES),
  }


def _make_pattern(seed: int, steps: int, growth_interval: int,
                  initial_log2: int, band: tuple, floor_log2: int,
                  p_bad: float = 0.15) -> np.ndarray:
  """A random int32 [steps] pattern of codes (0 finite, 1..6 poisoned).

  The pattern is steered so that the loss scale wanders inside ``band``
  (log2 bounds): below the band a step is poisoned with probability 0.02,
  above it 0.6, inside it `p_bad`; no step is poisoned when the scale is at
  ``2**floor_log2``. The steering tracks log2 of the scale with the textbook
  rule (growth capped at 2**127, the largest power of two in float32); it
  only shapes the inputs, the tests compare the real libraries.
  """
  rng = np.random.default_rng(seed)
  lo, hi = band
  log2_scale, run = initial_log2, 0
  codes = np.zeros(steps, np.int32)
  for i in range(steps):
    p = 0.02 if log2_scale <= lo else (0.6 if log2_scale >= hi else p_bad)
    if log2_scale > floor_log2 and rng.random() < p:
      codes[i] = rng.integers(1, 7)
      log2_scale, run = log2_scale - 1, 0
    else:
      run += 1
      if run == growth_interval:
        log2_scale, run = min(log2_scale + 1, 127), 0
  return codes


def toy_loss(params, x, y):
  """The toy problem's loss, float32 [].

  Params are ``{"w": [IN, OUT], "b": [OUT]}``; x is [BATCH, IN], y [BATCH, OUT].
  """
  return jnp.mean((x @ params["w"] + params["b"] - y) ** 2)


def poison_grads(grads: dict, code) -> dict:
  """`poison_of` in jnp: writes the code's value into ``grads`` (int32 code)."""
  value = jnp.array((0.0,) + POISON_VALUES, jnp.float32)[(code - 1) % 3 + 1]
  return {
      "w": grads["w"].at[0, 0].set(
          jnp.where((code >= 1) & (code <= 3), value, grads["w"][0, 0])),
      "b": grads["b"].at[1].set(jnp.where(code >= 4, value, grads["b"][1])),
  }


@functools.partial(jax.jit, static_argnames=("scaling", "lr"))
def _mpjax_trajectory(params, x, y, codes, *, scaling, lr):
  tx = mpjax.loss_scaled(optax.adam(lr), scaling)

  def step(carry, code):
    params, state = carry
    grads = jax.grad(
        lambda p: mpjax.scale_loss(toy_loss(p, x, y), state))(params)
    grads = poison_grads(grads, code)
    updates, state = tx.update(grads, state, params)
    new_params = optax.apply_updates(params, updates)
    moved = jnp.any(jnp.stack(jax.tree.leaves(
        jax.tree.map(lambda a, b: jnp.any(a != b), new_params, params))))
    record = {
        "scale": state.scale,
        "growth_count": state.growth_count,
        "skipped": jnp.logical_not(state.last_grads_finite),
        "adam_count": optax.tree_utils.tree_get(state.inner_state, "count"),
        "params_moved": moved,
    }
    return (new_params, state), record

  init = (params, tx.init(params))
  return jax.lax.scan(step, init, codes)


def _run_mpjax(scaling, problem, codes, lr):
  """Runs `loss_scaled(optax.adam(lr), scaling)` on the toy problem.

  Returns ``(records, final)``:
  `records` maps ``scale`` (float32, after the step), ``growth_count``,
  ``skipped``, ``adam_count`` (the inner Adam's count) and ``params_moved``
  to numpy arrays [steps]; `final` holds the last ``params`` and the inner
  Adam's ``mu`` and ``nu``, numpy trees keyed like the params.
  """
  params = {"w": jnp.asarray(problem["w"]), "b": jnp.asarray(problem["b"])}
  (params, state), records = _mpjax_trajectory(
      params, jnp.asarray(problem["x"]), jnp.asarray(problem["y"]),
      jnp.asarray(codes), scaling=scaling, lr=lr)
  get = lambda name: optax.tree_utils.tree_get(state.inner_state, name)
  final = {"params": params, "mu": get("mu"), "nu": get("nu")}
  return jax.tree.map(np.asarray, records), jax.tree.map(np.asarray, final)


@pytest.fixture
def toy():
  """The shared toy problem: its data, patterns, poisoning and mpjax run.

  Attributes: ``make_problem(seed)``, ``make_pattern(...)``, ``poison_of(code)``
  (for torch's Python loop), ``poison_grads(grads, code)`` (jnp), ``loss``
  and ``run_mpjax(scaling, problem, codes, lr)``.
  """
  return types.SimpleNamespace(
      make_problem=_make_problem, make_pattern=_make_pattern,
      poison_of=poison_of, poison_grads=poison_grads, loss=toy_loss,
      run_mpjax=_run_mpjax, assert_same_trajectory=_assert_same_trajectory,
      assert_adam_states_close=_assert_adam_states_close)


def _assert_same_trajectory(ours, theirs, codes, peer):
  """Every step: same scale (exactly), counter, skip, Adam count, movement.

  `ours`/`theirs` map each field to a per-step array; the message names the
  first differing step, as `peer` (``"torch"``, ``"Keras"``) saw it.
  """
  for name in ("scale", "growth_count", "skipped", "adam_count",
               "params_moved"):
    mine = np.asarray(ours[name]).astype(np.asarray(theirs[name]).dtype)
    bad = np.flatnonzero(mine != theirs[name])
    assert bad.size == 0, (
        f"{name} differs from {peer} first at step {bad[0]}: mpjax "
        f"{ours[name][bad[0]]!r}, {peer} {theirs[name][bad[0]]!r} (code "
        f"{codes[bad[0]]}; {peer}'s previous scale "
        f"{theirs['scale'][bad[0] - 1] if bad[0] else None!r})")
  # The only non-finite steps are the poisoned ones, on both sides.
  np.testing.assert_array_equal(theirs["skipped"], codes > 0)


def _assert_adam_states_close(ours, theirs, *, params_atol, rtol, nu_atol):
  """Final params and Adam moments (``{"params"|"mu"|"nu": {"w", "b"}}``).

  The toy problem converges, so parameters and first moments end near 0 and
  take absolute tolerances (the first moment 1% of the gradients' root mean
  square); `nu_atol` is relative to the largest second moment, which any
  gradient unscaled by the wrong scale would change by a factor of 4.
  """
  for leaf in ("w", "b"):
    np.testing.assert_allclose(ours["params"][leaf], theirs["params"][leaf],
                               rtol=rtol, atol=params_atol,
                               err_msg=f"params[{leaf!r}]")
    grad_rms = np.sqrt(theirs["nu"][leaf].max())
    np.testing.assert_allclose(ours["mu"][leaf], theirs["mu"][leaf],
                               rtol=rtol, atol=1e-2 * grad_rms,
                               err_msg=f"mu[{leaf!r}]")
    np.testing.assert_allclose(ours["nu"][leaf], theirs["nu"][leaf],
                               rtol=rtol, atol=nu_atol * grad_rms**2,
                               err_msg=f"nu[{leaf!r}]")


@pytest.fixture(scope="module")
def one_torch_thread():
  """torch on one thread for the module: these models are tiny, and more
  threads only add synchronisation cost (and contend with XLA's)."""
  torch = pytest.importorskip("torch")
  threads = torch.get_num_threads()
  torch.set_num_threads(1)
  yield
  torch.set_num_threads(threads)
