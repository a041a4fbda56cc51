"""A small ResNet with BatchNorm in flax NNX, three precisions.

The NNX twin of `resnet_linen.py`: the same model (`resnet_models_nnx`), data,
configurations and table. `mpjax.TrainState.from_nnx` applies the policy to
the module graph (`mpjax.with_nnx_policy`) and splits it into float32 params
and the rest (the ``BatchStat`` running averages, in ``model_state``); the
step updates the statistics in training mode, and the evaluation merges the
state back into a module and calls ``module.eval()``.

Command (from the repository root, after `pip install -e .`):

  python experiments/resnet_nnx.py      # ~40 s a configuration, idle 2 cores

Expected with the defaults: as `resnet_linen.py` (eval accuracy about 92%,
mixed runs within 3 points of float32: measured 93.1% float32, -1.2 points
bfloat16, -0.7 points float16 on CPU; 0 skipped steps, batch statistics
float32). The NNX model draws its initial weights from other random streams
than the linen one, so the numbers differ slightly.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import cli  # pylint: disable=g-import-not-at-top,wrong-import-position

if __name__ == "__main__":
  # --help and flag errors are answered before jax is imported.
  cli.parse_resnet_args(sys.argv[1:], "nnx")

from flax import nnx

import mpjax  # pylint: disable=g-import-not-at-top,wrong-import-position
import resnet_common  # pylint: disable=g-import-not-at-top,wrong-import-position
import resnet_models_nnx  # pylint: disable=g-import-not-at-top,wrong-import-position


def init_state(config, policy, tx, seed) -> mpjax.TrainState:
  """float32 params and BatchStats of a module prepared with `policy`."""
  model = resnet_models_nnx.ResNet(config, rngs=nnx.Rngs(seed))
  return mpjax.TrainState.from_nnx(model, tx=tx, policy=policy)


def loss_fn(params, batch, apply_fn, rng):
  """Training mode (the module's default): BatchNorm updates its BatchStats."""
  del rng
  logits = apply_fn({"params": params}, batch["x"])
  return resnet_common.cross_entropy(logits, batch["y"])


def logits(state, images):
  """Eval mode: the running averages (the graph definition carries the policy)."""
  module = state.apply_fn.merge(state.variables)
  module.eval()
  return module(images)


def debug(apply_fn, policy, params, model_state, images):
  """The training-mode forward pass of the step, module by module."""
  del policy  # the graph definition carries it
  return mpjax.debug_forward(apply_fn.merge({"params": params, **model_state}),
                             images)


API = resnet_common.Api("nnx", init_state, loss_fn, logits, debug)


def main(argv):
  return resnet_common.main(argv, API)


if __name__ == "__main__":
  main(sys.argv)
