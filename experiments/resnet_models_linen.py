"""A small CIFAR-style ResNet with BatchNorm, in flax linen.

He et al.'s CIFAR layout (v1, post-activation): a 3x3 stem convolution, then
one stage per entry of ``ResNetConfig.widths`` of ``blocks_per_stage``
residual blocks (two 3x3 convolutions, each followed by BatchNorm; the first
block of every stage after the first halves the resolution with stride 2 and
projects its shortcut with a 1x1 convolution + BatchNorm), global average
pooling and a Dense classifier. Convolutions have no bias (BatchNorm's shift
replaces it). No module sets a dtype: a policy decides, and a `PolicyMap`
keeps every BatchNorm a float32 island (statistics, running averages and
output in float32).

`train=True` normalises with the batch's statistics and updates the running
averages in the ``batch_stats`` collection (call with
``mutable=["batch_stats"]``, which `mpjax.make_train_step` does for the
collections in the state's ``model_state``); ``train=False`` uses the running
averages. `resnet_models_nnx` is the same model in NNX.
"""

import functools

import flax.linen as nn
import jax.numpy as jnp

from resnet_common import ResNetConfig


class ResidualBlock(nn.Module):
  """x: [batch, h, w, c] -> [batch, h / strides, w / strides, features]."""
  config: ResNetConfig
  features: int
  strides: int = 1

  @nn.compact
  def __call__(self, x, train: bool):
    norm = functools.partial(nn.BatchNorm, use_running_average=not train,
                             momentum=self.config.bn_momentum,
                             epsilon=self.config.bn_epsilon)
    strides = (self.strides, self.strides)
    y = nn.Conv(self.features, (3, 3), strides, use_bias=False,
                name="conv1")(x)
    y = nn.relu(norm(name="bn1")(y))
    y = nn.Conv(self.features, (3, 3), use_bias=False, name="conv2")(y)
    y = norm(name="bn2")(y)
    if self.strides != 1 or x.shape[-1] != self.features:
      x = nn.Conv(self.features, (1, 1), strides, use_bias=False,
                  name="proj")(x)
      x = norm(name="proj_bn")(x)
    return nn.relu(x + y)


class ResNet(nn.Module):
  """images: float32 [batch, 32, 32, 3] (NHWC) -> logits [batch, classes]."""
  config: ResNetConfig

  @nn.compact
  def __call__(self, x, train: bool):
    c = self.config
    x = nn.Conv(c.widths[0], (3, 3), use_bias=False, name="stem")(x)
    x = nn.BatchNorm(use_running_average=not train, momentum=c.bn_momentum,
                     epsilon=c.bn_epsilon, name="stem_bn")(x)
    x = nn.relu(x)
    for stage, width in enumerate(c.widths):
      for block in range(c.blocks_per_stage):
        strides = 2 if stage > 0 and block == 0 else 1
        x = ResidualBlock(c, width, strides,
                          name=f"stage{stage}_block{block}")(x, train)
    x = jnp.mean(x, axis=(1, 2))
    return nn.Dense(c.num_classes, name="head")(x)
