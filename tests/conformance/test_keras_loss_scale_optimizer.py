"""mpjax's `DynamicScaling.like_keras` against Keras 3's `LossScaleOptimizer`.

Keras runs on JAX (conftest.py sets `KERAS_BACKEND`) and is driven the way
Keras-on-JAX's own trainer drives it (`keras/src/backend/jax/trainer.py`): the
loss is scaled with `optimizer.scale_loss` inside a `StatelessScope` holding
the optimizer variables, and the step is `optimizer.stateless_apply`, here
inside one jitted `lax.scan` over the whole pattern. Both sides train the toy
problem of conftest.py with Adam; after every step the tests compare the scale,
the growth counter (Keras's `step_counter`), the skip decision (Keras's own
`check_finite`), Adam's count (`iterations`) and whether the parameters moved.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mpjax

keras = pytest.importorskip(
    "keras", reason="keras is not installed; it comes with the `conformance` "
    "extra: pip install -e '.[conformance]'")

STEPS = 2400
LR = 1e-3
# optax.adam's default; Keras's own default is 1e-7.
EPSILON = 1e-8


@pytest.fixture(autouse=True, scope="module")
def _keras_on_jax():
  if keras.backend.backend() != "jax":
    pytest.skip(f"keras was imported with the {keras.backend.backend()!r} "
                "backend before conftest.py could set KERAS_BACKEND=jax")


def run_keras(problem, codes, poison_grads, loss_fn, **optimizer_kwargs):
  """Runs `LossScaleOptimizer(Adam)` on the toy problem, the trainer's way.

  Returns ``(records, final)`` shaped like the mpjax side's (conftest.py):
  ``adam_count`` is Keras's `iterations`, ``growth_count`` its `step_counter`.
  """
  variables = [keras.Variable(problem["w"], name="w"),
               keras.Variable(problem["b"], name="b")]
  optimizer = keras.optimizers.LossScaleOptimizer(
      keras.optimizers.Adam(learning_rate=LR, epsilon=EPSILON),
      **optimizer_kwargs)
  optimizer.build(variables)
  index = lambda var: next(i for i, v in enumerate(optimizer.variables)
                           if v is var)
  i_scale, i_counter = index(optimizer.dynamic_scale), index(
      optimizer.step_counter)
  i_iterations = index(optimizer.iterations)
  x, y = jnp.asarray(problem["x"]), jnp.asarray(problem["y"])

  @jax.jit
  def trajectory(trainable, optimizer_values, codes):
    def step(carry, code):
      trainable, optimizer_values = carry
      mapping = list(zip(optimizer.variables, optimizer_values))

      def scaled_loss(trainable):
        loss = loss_fn({"w": trainable[0], "b": trainable[1]}, x, y)
        with keras.StatelessScope(state_mapping=mapping):
          return optimizer.scale_loss(loss)

      grads = jax.grad(scaled_loss)(trainable)
      grads = poison_grads({"w": grads[0], "b": grads[1]}, code)
      grads = [grads["w"], grads["b"]]
      finite = optimizer.check_finite(grads)
      new_trainable, optimizer_values = optimizer.stateless_apply(
          optimizer_values, grads, trainable)
      moved = jnp.any(jnp.stack(
          [jnp.any(a != b) for a, b in zip(new_trainable, trainable)]))
      record = {
          "scale": optimizer_values[i_scale],
          "growth_count": optimizer_values[i_counter],
          "skipped": jnp.logical_not(finite),
          "adam_count": optimizer_values[i_iterations],
          "params_moved": moved,
      }
      return (new_trainable, optimizer_values), record

    return jax.lax.scan(step, (trainable, optimizer_values), codes)

  (trainable, optimizer_values), records = trajectory(
      [v.value for v in variables], [v.value for v in optimizer.variables],
      jnp.asarray(codes))
  # Adam's moments, one per variable in build order (Keras's `_momentums`
  # and `_velocities`, the slots `update_step` reads).
  inner = optimizer.inner_optimizer
  moments = lambda slots: {
      name: np.asarray(optimizer_values[index(slot)])
      for name, slot in zip(("w", "b"), slots)}
  final = {
      "params": {"w": np.asarray(trainable[0]), "b": np.asarray(trainable[1])},
      "mu": moments(inner._momentums),
      "nu": moments(inner._velocities),
  }
  return jax.tree.map(np.asarray, records), final


def assert_same_final_state(toy, ours, theirs):
  """Same updates taken, up to rounding and Adam's epsilon placement.

  Keras adds epsilon to sqrt(v) before bias correction (optax after it), so
  its effective epsilon is ``eps / sqrt(1 - beta2**t)``; near convergence,
  where sqrt(v) is small, that moves parameters by up to ~5e-6 over the run
  (measured with keras 3.15.1), against a tolerance of 3e-5; the second
  moment is compared to 0.1% of its largest element.
  """
  toy.assert_adam_states_close(ours, theirs, params_atol=LR * 3e-2,
                               rtol=1e-3, nu_atol=1e-3)


@pytest.mark.parametrize("seed,growth_interval", [(10, 2), (11, 3), (12, 5)])
def test_scale_skips_and_iterations_match_keras_on_random_patterns(
    toy, seed, growth_interval):
  problem = toy.make_problem(seed)
  codes = toy.make_pattern(seed, STEPS, growth_interval, initial_log2=15,
                           band=(8, 100), floor_log2=2)
  theirs, their_final = run_keras(problem, codes, toy.poison_grads, toy.loss,
                                  dynamic_growth_steps=growth_interval)
  # Keras 3 has no floor and no ceiling: keep both out of the picture here.
  assert 1.0 <= theirs["scale"].min() and theirs["scale"].max() < 2.0**127
  ours, our_final = toy.run_mpjax(
      mpjax.DynamicScaling.like_keras(growth_interval=growth_interval),
      problem, codes, LR)
  toy.assert_same_trajectory(ours, theirs, codes, "Keras")
  assert_same_final_state(toy, our_final, their_final)
  assert np.sum(np.diff(np.log2(theirs["scale"])) > 0) > 50
  assert np.sum(codes > 0) > 100


def test_scale_below_one_matches_keras_with_min_scale_lowered(toy):
  growth_interval = 3
  problem = toy.make_problem(13)
  codes = toy.make_pattern(13, STEPS, growth_interval, initial_log2=15,
                           band=(-40, -20), floor_log2=-60, p_bad=0.3)
  theirs, their_final = run_keras(problem, codes, toy.poison_grads, toy.loss,
                                  dynamic_growth_steps=growth_interval)
  assert theirs["scale"].min() < 2.0**-30
  ours, our_final = toy.run_mpjax(
      mpjax.DynamicScaling.like_keras(growth_interval=growth_interval,
                                      min_scale=2.0**-126),
      problem, codes, LR)
  toy.assert_same_trajectory(ours, theirs, codes, "Keras")
  assert_same_final_state(toy, our_final, their_final)


def test_keras_grows_its_scale_to_inf_and_stops_training_mpjax_does_not(toy):
  # From 2**120 with a growth on every finite step, and never a poisoned one.
  problem = toy.make_problem(14)
  codes = np.zeros(20, np.int32)
  theirs, _ = run_keras(problem, codes, toy.poison_grads, toy.loss,
                        initial_scale=2.0**120, dynamic_growth_steps=1)
  ours, _ = toy.run_mpjax(
      mpjax.DynamicScaling.like_keras(initial_scale=2.0**120,
                                      growth_interval=1),
      problem, codes, LR)
  # Keras: 2**121 ... 2**127, then 2**128 = inf after the 8th step. From
  # then on loss * inf has non-finite gradients, every step is skipped and
  # inf / 2 is inf: training has stopped for good.
  np.testing.assert_array_equal(theirs["scale"][:7], 2.0**np.arange(121, 128))
  assert np.all(np.isinf(theirs["scale"][7:]))
  np.testing.assert_array_equal(theirs["skipped"], np.arange(20) >= 8)
  np.testing.assert_array_equal(theirs["adam_count"],
                                np.minimum(np.arange(1, 21), 8))
  # mpjax: the growth that would overflow keeps 2**127; every step trains.
  np.testing.assert_array_equal(
      ours["scale"], np.minimum(2.0**np.arange(121, 141), 2.0**127))
  assert not ours["skipped"].any()
  np.testing.assert_array_equal(ours["adam_count"], np.arange(1, 21))
