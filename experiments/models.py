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


class CNN(nn.Module):
  """A small CIFAR-shaped classifier for the benchmarks, returning logits.

  Per entry of `features`: two 3x3 convolutions (same padding, relu) and a
  2x2 average pool; then a Dense to `num_classes` on the flattened map. Like
  `MLP`, it sets no dtype: a policy decides.
  Input: [batch, height, width, channels] (CIFAR: 32, 32, 3); output: logits
  [batch, num_classes].
  """
  features: Sequence[int] = (16, 32)
  num_classes: int = 10

  @nn.compact
  def __call__(self, x):
    for width in self.features:
      x = nn.relu(nn.Conv(width, (3, 3))(x))
      x = nn.relu(nn.Conv(width, (3, 3))(x))
      x = nn.avg_pool(x, (2, 2), strides=(2, 2))
    return nn.Dense(self.num_classes)(x.reshape((x.shape[0], -1)))
