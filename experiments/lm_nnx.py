"""A small transformer language model in flax NNX, three precisions.

The NNX twin of `lm_linen.py`: the same model (`lm_models_nnx`), data,
configurations and table. The policy is applied to the module graph with
`mpjax.with_nnx_policy` before it is split into a graph definition and
float32 params for `mpjax.TrainState`.

Command (from the repository root, after `pip install -e .`):

  python experiments/lm_nnx.py                   # ~1.5 min on 2 CPU cores

Expected with the defaults: as `lm_linen.py` (validation loss about 2.04
nats/byte, mixed runs within 2% of float32: measured +0.15% bfloat16, +0.27%
float16 on CPU; 0 skipped steps). The NNX model draws its initial weights
from other random streams than the linen one, so the losses differ slightly.
"""

import os
import sys
from typing import Any, Callable, Tuple

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import cli  # pylint: disable=g-import-not-at-top,wrong-import-position

if __name__ == "__main__":
  # --help and flag errors are answered before jax is imported.
  cli.parse_lm_args(sys.argv[1:], "nnx")

from flax import nnx

import mpjax

import lm_common  # pylint: disable=g-import-not-at-top,wrong-import-position
import lm_models_nnx  # pylint: disable=g-import-not-at-top,wrong-import-position


def build(config: lm_common.LMConfig, policy: Any,
          seed: int) -> Tuple[Callable, Any]:
  """(apply_fn, float32 params) of a model prepared with `policy`."""
  model = mpjax.with_nnx_policy(
      lm_models_nnx.TransformerLM(config, rngs=nnx.Rngs(seed)), policy)
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)

  def apply_fn(variables, tokens):
    return nnx.merge(graphdef, variables["params"], rest)(tokens)

  return apply_fn, params


def main(argv):
  return lm_common.main(argv, "nnx", build, doctor_model=lambda config, seed:
                        lm_models_nnx.TransformerLM(config,
                                                    rngs=nnx.Rngs(seed)))


if __name__ == "__main__":
  main(sys.argv)
