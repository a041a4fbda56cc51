"""float32 training numerics: torch's Adam + CrossEntropyLoss against mpjax.

The seed's MLP (64 -> Dense(128, relu) -> Dense(10), `experiments/models.py`)
on scikit-learn's digits (`experiments/datasets.py`), batches of 128, Adam
(lr 1e-3, betas 0.9/0.999, eps 1e-8) from the same initial weights on the same
batches: torch (`torch.optim.Adam`, `nn.CrossEntropyLoss`) against mpjax
(`make_train_step`, `optax.adam`,
`optax.softmax_cross_entropy_with_integer_labels`).

Epsilon sits in the same place in both: ``lr * m_hat / (sqrt(v_hat) + eps)``,
outside the square root of the bias-corrected second moment (Keras's Adam
adds it before the bias correction instead; see
test_keras_loss_scale_optimizer.py).

The one difference between torch and `optax.adam` is the precision of the
bias corrections ``1 - beta**t``:
torch computes them in float64 on the host, optax in float32 from
``float32(beta)``, and ``float32(0.999) = 0.99900001287`` makes optax's
``1 - beta2`` 1.29e-5 too small. optax's updates are therefore ~6.7e-6
(relative) smaller than torch's at step 1 and a few 1e-6 later on. Over 200
steps that is enough to flip a ReLU of the seed MLP now and then, after which
the runs drift apart by up to ~2.5e-4 relative in the loss (measured over 8
seeds in docs/conformance.md). `mpjax.adam` is `optax.adam` with the bias
corrections accurate to float32. The tests pin both facts: the step-1 ratio
of each exactly, and `mpjax.adam`'s losses equal to torch's within 1e-5
relative at every one of 200 steps.
"""

import math

import datasets
import jax
import jax.numpy as jnp
import models
import numpy as np
import optax
import pytest

import mpjax

torch = pytest.importorskip(
    "torch", reason="torch is not installed; it comes with the `conformance` "
    "extra: pip install -e '.[conformance]'")

STEPS = 200
BATCH = 128
LR = 1e-3


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def digits():
  return datasets.load_digits(seed=0)


def make_run(split, seed):
  """flax's initial params of the seed MLP and 200 batches, numpy float32."""
  rng = np.random.default_rng(seed)
  index = np.stack([rng.choice(len(split.x_train), BATCH, replace=False)
                    for _ in range(STEPS)])
  batches = {"x": split.x_train[index], "y": split.y_train[index]}
  params = models.MLP().init(jax.random.key(seed), batches["x"][0])["params"]
  return jax.tree.map(np.array, params), batches


def torch_run(params, batches, use_scaler, lr=LR):
  """Trains torch's copy of the MLP; returns every step's loss and the net."""
  layers = []
  for name in ("Dense_0", "Dense_1"):
    kernel = params[name]["kernel"]
    layer = torch.nn.Linear(*kernel.shape)
    with torch.no_grad():
      layer.weight.copy_(torch.from_numpy(kernel.T.copy()))
      layer.bias.copy_(torch.from_numpy(params[name]["bias"].copy()))
    layers.append(layer)
  net = torch.nn.Sequential(layers[0], torch.nn.ReLU(), layers[1])
  optimizer = torch.optim.Adam(net.parameters(), lr=lr)
  criterion = torch.nn.CrossEntropyLoss()
  scaler = torch.amp.GradScaler("cpu", enabled=use_scaler)
  losses = []
  for x, y in zip(batches["x"], batches["y"]):
    optimizer.zero_grad(set_to_none=True)
    loss = criterion(net(torch.from_numpy(x)), torch.from_numpy(y).long())
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()
    losses.append(loss.item())
  if use_scaler:
    # float32 gradients of these sizes never overflow: no step was skipped.
    assert scaler.get_scale() == 2.0**16
  kernels = {"Dense_0": layers[0].weight.detach().numpy().T,
             "Dense_1": layers[1].weight.detach().numpy().T}
  return np.asarray(losses, np.float32), kernels


def mpjax_run(params, batches, scaling, lr=LR, adam=optax.adam):
  """Trains the flax MLP with `make_train_step`; returns losses and state."""
  def loss_fn(params, batch, apply_fn, rng):
    del rng
    logits = apply_fn({"params": params}, batch["x"])
    return optax.softmax_cross_entropy_with_integer_labels(
        logits, batch["y"]).mean()

  tx = adam(lr)
  if scaling is not None:
    tx = mpjax.loss_scaled(tx, scaling)
  state = mpjax.TrainState.create(
      apply_fn=models.MLP().apply, params=jax.tree.map(jnp.asarray, params),
      tx=tx, policy="float32")
  step = mpjax.make_train_step(loss_fn)
  losses = []
  for x, y in zip(batches["x"], batches["y"]):
    state, metrics = step(state, {"x": jnp.asarray(x), "y": jnp.asarray(y)})
    losses.append(metrics["loss"])
  return np.asarray(jax.device_get(losses), np.float32), state


@pytest.mark.parametrize("accurate_bias_correction", [False, True],
                         ids=["optax.adam", "mpjax.adam"])
def test_first_adam_step_differs_from_torch_only_by_the_bias_correction(
    digits, accurate_bias_correction):
  params, batches = make_run(digits, seed=0)
  one = jax.tree.map(lambda b: b[:1], batches)
  # lr 1: the step (+-1) dwarfs the float32 rounding of the new params.
  _, theirs = torch_run(params, one, use_scaler=False, lr=1.0)
  _, state = mpjax_run(
      params, one, scaling=None, lr=1.0,
      adam=mpjax.adam if accurate_bias_correction else optax.adam)
  f32 = np.float32
  # optax: m_hat = float32(1 - b1) g / (1 - float32(b1)), the same for v.
  expected = 1.0 if accurate_bias_correction else (
      float(f32(0.1) / (f32(1) - f32(0.9)))
      / math.sqrt(float(f32(0.001) / (f32(1) - f32(0.999)))))
  for name in ("Dense_0", "Dense_1"):
    ours_delta = np.asarray(state.params[name]["kernel"], np.float64) - params[
        name]["kernel"]
    their_delta = theirs[name].astype(np.float64) - params[name]["kernel"]
    # Adam's first step is +-lr wherever the gradient dwarfs eps.
    moved = np.abs(their_delta) > 0.999
    assert moved.sum() > 100
    ratio = ours_delta[moved] / their_delta[moved]
    np.testing.assert_allclose(ratio, expected, rtol=0, atol=5e-7,
                               err_msg=name)
  if not accurate_bias_correction:
    assert 1.0 - expected == pytest.approx(6.68e-6, abs=1e-8)


@pytest.mark.parametrize("loss_scaling", ["none", "like_torch"])
@pytest.mark.parametrize("seed", [0, 1])
def test_adam_losses_match_torch_at_every_step(digits, seed, loss_scaling):
  params, batches = make_run(digits, seed)
  use_scaler = loss_scaling == "like_torch"
  theirs, _ = torch_run(params, batches, use_scaler)
  ours, state = mpjax_run(
      params, batches,
      mpjax.DynamicScaling.like_torch() if use_scaler else None,
      adam=mpjax.adam)
  relative = np.abs(ours - theirs) / np.abs(theirs)
  worst = int(relative.argmax())
  assert relative.max() < 1e-5, (
      f"step {worst}: mpjax loss {ours[worst]}, torch {theirs[worst]} "
      f"(relative {relative.max():.2e})")
  # The run trained, and no step was skipped on the mpjax side either.
  assert theirs[-10:].mean() < 0.5 * theirs[:10].mean()
  if use_scaler:
    assert int(mpjax.loss_scale_state(state.opt_state).skipped_steps) == 0


def test_fused_skip_adamw_matches_torch_and_mpjax_adam_bit_for_bit(digits):
  """`mpjax.adamw(weight_decay=0.0)` under `loss_scaled` takes the skip
  decision into its own update (mpjax/_src/fused_skip.py); the run is
  `mpjax.adam`'s (the select path) bit for bit, so torch's within 1e-5."""
  params, batches = make_run(digits, 0)
  theirs, _ = torch_run(params, batches, True)
  runs = [mpjax_run(params, batches, mpjax.DynamicScaling.like_torch(),
                    adam=adam)
          for adam in (mpjax.adam,
                       lambda lr: mpjax.adamw(lr, weight_decay=0.0))]
  (select_losses, select), (fused_losses, fused) = runs
  np.testing.assert_array_equal(fused_losses, select_losses)
  jax.tree.map(np.testing.assert_array_equal, fused.params, select.params)
  jax.tree.map(np.testing.assert_array_equal, fused.opt_state.inner_state.mu,
               select.opt_state.inner_state[0].mu)
  assert np.max(np.abs(fused_losses - theirs) / np.abs(theirs)) < 1e-5
