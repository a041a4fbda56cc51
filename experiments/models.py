"""Models shared by the experiments."""

from typing import Sequence

import flax.linen as nn


class MLP(nn.Module):
  """The seed's classifier: Dense(128, relu) -> Dense(10), returning logits.

  Computes in the dtype of its inputs and params (no `dtype` attribute): a
  policy casts both, so the same module runs in float32, float16 or bfloat16.
  Input: [batch, features]; output: logits [batch, num_classes].
  """
  hidden: Sequence[int] = (128,)
  num_classes: int = 10

  @nn.compact
  def __call__(self, x):
    for width in self.hidden:
      x = nn.relu(nn.Dense(width)(x))
    return nn.Dense(self.num_classes)(x)
