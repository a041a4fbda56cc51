"""A small transformer language model in flax NNX, three precisions (and fp8).

The NNX twin of `lm_linen.py`: the same model (`lm_models_nnx`), data,
configurations and table. `mpjax.TrainState.from_nnx` applies the policy to
the module graph (`mpjax.with_nnx_policy`; an fp8 map adds each fp8 layer's
scales and amax histories) and splits it into float32 params and the model
state.

Command (from the repository root, after `pip install -e .`):

  python experiments/lm_nnx.py                   # ~1.5 min on 2 CPU cores
  python experiments/lm_nnx.py --configs mixed_bfloat16 fp8_delayed fp8_current

Expected with the defaults: as `lm_linen.py` (validation loss about 2.04
nats/byte, mixed runs within 2% of float32: measured +0.22% bfloat16, +0.31%
float16 on CPU; 0 skipped steps). The NNX model draws its initial weights
from other random streams than the linen one, so the losses differ slightly.

Measured in fp8 (``--configs mixed_bfloat16 fp8_delayed fp8_current``,
2026-12-02 on CPU):
validation loss +0.68% (delayed) and -0.18% (current) from mixed_bfloat16's
(docs/fp8.md).
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import cli  # pylint: disable=g-import-not-at-top,wrong-import-position

if __name__ == "__main__":
  # --help and flag errors are answered before jax is imported.
  cli.parse_lm_args(sys.argv[1:], "nnx")

import optax
from flax import nnx

import mpjax

import lm_common  # pylint: disable=g-import-not-at-top,wrong-import-position
import lm_models_nnx  # pylint: disable=g-import-not-at-top,wrong-import-position


def build(config: lm_common.LMConfig, policy: mpjax.PolicyMap, seed: int,
          tx: optax.GradientTransformation) -> mpjax.TrainState:
  """The fresh train state of a model prepared with `policy`."""
  return mpjax.TrainState.from_nnx(
      lm_models_nnx.TransformerLM(config, rngs=nnx.Rngs(seed)), tx=tx,
      policy=policy)


def main(argv):
  return lm_common.main(argv, "nnx", build, doctor_model=lambda config, seed:
                        lm_models_nnx.TransformerLM(config,
                                                    rngs=nnx.Rngs(seed)))


if __name__ == "__main__":
  main(sys.argv)
