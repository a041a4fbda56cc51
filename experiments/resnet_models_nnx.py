"""The small CIFAR-style ResNet with BatchNorm, in flax NNX.

The same model as `resnet_models_linen` (stem, ``widths`` stages of
``blocks_per_stage`` residual blocks, global average pooling, Dense head),
written once for NNX. No module is given a dtype: apply a policy with
``mpjax.with_nnx_policy(model, mpjax.PolicyMap("mixed_bfloat16"))`` (or
`mpjax.TrainState.from_nnx`, which does). The module starts in training mode
(BatchNorm normalises with the batch's statistics and updates its
``BatchStat`` running averages); ``model.eval()`` switches every BatchNorm to
the running averages.
"""

import jax.numpy as jnp
from flax import nnx

from resnet_common import ResNetConfig


def _batch_norm(config: ResNetConfig, features: int,
                rngs: nnx.Rngs) -> nnx.BatchNorm:
  return nnx.BatchNorm(features, momentum=config.bn_momentum,
                       epsilon=config.bn_epsilon, rngs=rngs)


class ResidualBlock(nnx.Module):
  """x: [batch, h, w, in_features] -> [batch, h / strides, w / strides, features]."""

  def __init__(self, config: ResNetConfig, in_features: int, features: int,
               strides: int = 1, *, rngs: nnx.Rngs):
    self.conv1 = nnx.Conv(in_features, features, (3, 3), strides=strides,
                          use_bias=False, rngs=rngs)
    self.bn1 = _batch_norm(config, features, rngs)
    self.conv2 = nnx.Conv(features, features, (3, 3), use_bias=False,
                          rngs=rngs)
    self.bn2 = _batch_norm(config, features, rngs)
    if strides != 1 or in_features != features:
      self.proj = nnx.Conv(in_features, features, (1, 1), strides=strides,
                           use_bias=False, rngs=rngs)
      self.proj_bn = _batch_norm(config, features, rngs)
    else:
      self.proj = self.proj_bn = None

  def __call__(self, x):
    y = nnx.relu(self.bn1(self.conv1(x)))
    y = self.bn2(self.conv2(y))
    if self.proj is not None:
      x = self.proj_bn(self.proj(x))
    return nnx.relu(x + y)


class ResNet(nnx.Module):
  """images: float32 [batch, 32, 32, 3] (NHWC) -> logits [batch, classes]."""

  def __init__(self, config: ResNetConfig, *, rngs: nnx.Rngs):
    c = self.config = config
    self.stem = nnx.Conv(c.channels, c.widths[0], (3, 3), use_bias=False,
                         rngs=rngs)
    self.stem_bn = _batch_norm(c, c.widths[0], rngs)
    blocks, features = [], c.widths[0]
    for stage, width in enumerate(c.widths):
      for block in range(c.blocks_per_stage):
        strides = 2 if stage > 0 and block == 0 else 1
        blocks.append(ResidualBlock(c, features, width, strides, rngs=rngs))
        features = width
    self.blocks = nnx.List(blocks)
    self.head = nnx.Linear(features, c.num_classes, rngs=rngs)

  def __call__(self, x):
    x = nnx.relu(self.stem_bn(self.stem(x)))
    for block in self.blocks:
      x = block(x)
    return self.head(jnp.mean(x, axis=(1, 2)))
