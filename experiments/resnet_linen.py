"""A small ResNet with BatchNorm in flax linen, three precisions.

Trains `resnet_models_linen.ResNet` (CIFAR layout: 3x3 stem, stages of
16/32/64 channels with one residual block each, BatchNorm after every
convolution, 78,042 params and 672 batch statistics) on `resnet_data`'s
synthetic 32x32x3 images (10 classes of colour gratings, 5,000 train / 1,000
eval, generated from the seed; no download) in float32, mixed_bfloat16 and
mixed_float16 + dynamic loss scaling (``like_torch``), each as an
`mpjax.PolicyMap` (every BatchNorm a float32 island; convolutions and the head
in the low dtype), with `mpjax.TrainState` (the ``batch_stats`` collection in
its ``model_state``), `mpjax.make_train_step` and `mpjax.loss_scaled`.
Evaluates in eval mode (the running averages) and prints one table (final
train loss, eval accuracy and its gap to float32, skipped steps, final loss
scale, time) and writes it as JSON.

Command (from the repository root, after `pip install -e .`):

  python experiments/resnet_linen.py     # ~40 s a configuration, idle 2 cores

Expected with the defaults (300 steps x 64, Nesterov SGD 0.1 with warm-up and
cosine decay, weight decay 5e-4, seed 0): eval accuracy about 92% in every
configuration, the mixed ones within 3 points of float32 (measured 92.4%
float32, -0.3 points bfloat16, -1.1 points float16 on CPU; the script exits
with an error beyond --max-gap-points), final train loss about 0.14, 0
skipped steps in mixed_float16 (the scale stays 65536: 300 steps are fewer
than the 2000-step growth interval), the batch statistics float32 under every
policy. Times on a CPU say little: XLA:CPU converts float16 and bfloat16
convolutions to float32, and the recorded run shared its 2 cores with other
jobs (load average ~20: 17 minutes for the three configurations).
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import cli  # pylint: disable=g-import-not-at-top,wrong-import-position

if __name__ == "__main__":
  # --help and flag errors are answered before jax is imported.
  cli.parse_resnet_args(sys.argv[1:], "linen")

import jax
import jax.numpy as jnp

import mpjax  # pylint: disable=g-import-not-at-top,wrong-import-position
import resnet_common  # pylint: disable=g-import-not-at-top,wrong-import-position
import resnet_data  # pylint: disable=g-import-not-at-top,wrong-import-position
import resnet_models_linen  # pylint: disable=g-import-not-at-top,wrong-import-position


def init_state(config, policy, tx, seed) -> mpjax.TrainState:
  """float32 params and batch statistics; the train step applies `policy`."""
  model = resnet_models_linen.ResNet(config)
  images = jnp.zeros((1, resnet_data.IMAGE, resnet_data.IMAGE,
                      config.channels), jnp.float32)
  # Eagerly: each random op compiles once per shape and is reused by the
  # next configuration (a jitted init recompiles its whole graph each time).
  variables = model.init(jax.random.key(seed), images, train=False)
  return mpjax.TrainState.create(
      apply_fn=model.apply, params=variables["params"],
      model_state={"batch_stats": variables["batch_stats"]}, tx=tx,
      policy=policy)


def loss_fn(params, batch, apply_fn, rng):
  """Training mode: the step adds ``batch_stats`` and marks it mutable."""
  del rng
  logits = apply_fn({"params": params}, batch["x"], train=True)
  return resnet_common.cross_entropy(logits, batch["y"])


def logits(state, images):
  """Eval mode: the running averages, under the state's policy."""
  return mpjax.with_policy(state.apply_fn, state.policy)(
      state.variables, images, train=False)


def debug(apply_fn, policy, params, model_state, images):
  """The training-mode forward pass of the step, module by module."""
  return mpjax.debug_forward(
      mpjax.with_policy(apply_fn, policy),
      {"params": params, **model_state}, images, train=True,
      mutable=list(model_state))


API = resnet_common.Api("linen", init_state, loss_fn, logits, debug)


def main(argv):
  return resnet_common.main(argv, API)


if __name__ == "__main__":
  main(sys.argv)
