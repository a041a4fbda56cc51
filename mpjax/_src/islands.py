"""Which layers are float32 islands, and how they keep their memory low.

Like autocast's two op lists, as layers: normalisation layers
(`FLOAT32_LAYERS`) compute in float32 and return float32; matmul-like layers
(`LOW_PRECISION_LAYERS`) compute in the inherited compute dtype and return
it; attention layers (`ATTENTION_LAYERS`) that use flax's default attention
function (`is_flax_attention_fn`) get `ATTENTION_ISLAND_FN`,
`mpjax.fused_dot_product_attention`: `mpjax.numerics.dot_product_attention`
(float32 logits and softmax) wherever the program is not compiled for CUDA,
and cuDNN's fused flash attention, with the same contract, when it is (16-bit
inputs, cuDNN installed): the backward pass then keeps no
``[batch, heads, q, kv]`` array per layer. `mpjax.PolicyMap` applies these
lists (rule 3 of its matching rule) when ``islands=True``.

`float32_norm` runs a float32-island LayerNorm/RMSNorm as
`mpjax.numerics.layer_norm`/`rms_norm` where that is exact: flax's values,
less residual memory for the backward pass.
"""

from typing import Any, Callable, Mapping, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import jmp
import numpy as np
from flax import nnx
from flax.nnx.nn import dtypes as nnx_dtypes

from mpjax._src import fused_attention
from mpjax._src import numerics

# What attention layers run instead of flax's default attention function: the
# float32 island, fused by cuDNN on CUDA (GPT-2 124M's H100-compiled mixed
# step peaks at 0.436x float32 with it, 0.622x with the unfused island).
ATTENTION_ISLAND_FN: Callable[..., Any] = (
    fused_attention.fused_dot_product_attention)

# autocast's float32 list, as layers.
FLOAT32_LAYERS: Tuple[type, ...] = (
    nn.LayerNorm, nn.RMSNorm, nn.BatchNorm, nn.GroupNorm, nn.InstanceNorm,
    nnx.LayerNorm, nnx.RMSNorm, nnx.BatchNorm, nnx.GroupNorm, nnx.InstanceNorm,
)
# autocast's lower-precision list (matmuls and convolutions), as layers.
LOW_PRECISION_LAYERS: Tuple[type, ...] = (
    nn.Dense, nn.DenseGeneral, nn.Conv, nn.ConvTranspose, nn.ConvLocal,
    nn.Einsum, nn.Embed,
    nnx.Linear, nnx.LinearGeneral, nnx.Conv, nnx.ConvTranspose, nnx.Einsum,
    nnx.Embed,
)
# Layers that run their matmul in fp8 under an fp8 entry of a PolicyMap
# (their dot_general / einsum_op is swapped for the call; linen's Einsum,
# which has neither, is computed by fp8_layers.linen_einsum_call).
FP8_LAYERS: Tuple[type, ...] = (nn.Dense, nn.DenseGeneral, nn.Einsum,
                                nnx.Linear, nnx.LinearGeneral, nnx.Einsum)
# Flax layers with no matmul fp8 can run: an fp8 entry naming one raises.
NO_FP8_LAYERS: Tuple[type, ...] = FLOAT32_LAYERS + (
    nn.Conv, nn.ConvTranspose, nn.ConvLocal, nn.Embed, nn.Dropout,
    nnx.Conv, nnx.ConvTranspose, nnx.Embed, nnx.Dropout)
# Layers whose softmax runs inside flax's attention function.
ATTENTION_LAYERS: Tuple[type, ...] = (nn.MultiHeadDotProductAttention,
                                      nnx.MultiHeadAttention)
_FLAX_ATTENTION_FNS = (nn.dot_product_attention, nnx.dot_product_attention)


def is_flax_attention_fn(fn: Any) -> bool:
  """Whether `fn` is flax's default attention function (linen or NNX).

  Examples:
    >>> import flax.linen as nn
    >>> is_flax_attention_fn(nn.dot_product_attention)
    True
  """
  return any(fn is f for f in _FLAX_ATTENTION_FNS)


# flax's own norm layers whose float32 island `float32_norm` computes with
# `mpjax.numerics`; True for LayerNorm (centred), False for RMSNorm.
_NUMERICS_NORMS = {nn.LayerNorm: True, nnx.LayerNorm: True,
                   nn.RMSNorm: False, nnx.RMSNorm: False}
_HALF_OR_SINGLE = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16),
                   jnp.dtype(jnp.float32))


def _last_axis_only(axes: Any, ndim: int) -> bool:
  axes = (axes,) if isinstance(axes, int) else tuple(axes)
  return (all(isinstance(a, int) and -ndim <= a < ndim for a in axes) and
          {a % ndim for a in axes} == {ndim - 1})


def float32_norm(module: Any, cls: type, policy: jmp.Policy, args: tuple,
                 kwargs: Mapping[str, Any]) -> Optional[Callable[..., Any]]:
  """Runs a float32 LayerNorm/RMSNorm island with `mpjax.numerics`, if exact.

  Why: autodiff of flax's float32 LayerNorm keeps, for the backward pass, the
  float32 upcast of the input and float32 intermediates (``x - mean``, ...):
  three float32 arrays of the input's shape per layer, for a bfloat16
  transformer most of what its norms keep. `numerics.layer_norm` and
  `numerics.rms_norm` compute flax's float32 forward values (its operations,
  in its order, with the module's ``use_fast_variance``) and the float32
  graph's gradients (up to float32 rounding) but keep only the input, in its
  own dtype, and float32 per-row statistics. The boundary must then leave the
  input uncast: the float32 copy it would make is what autodiff would keep.

  Only configurations reproduced exactly qualify: flax's own ``LayerNorm`` or
  ``RMSNorm`` class (not a subclass, whose ``__call__`` may differ),
  computing in float32, called on one bfloat16/float16/float32 array without
  a mask, normalising and scaling the last axis only, with no ``axis_name``,
  ``dtype`` None or float32, ``force_float32_reductions`` (linen) and the
  default ``promote_dtype`` (NNX). Anything else runs flax's layer as before.

  Args:
    module: the linen or NNX module.
    cls: its class (for NNX, the class before `with_nnx_policy`).
    policy: the module's resolved policy.
    args: the call's positional arguments, not cast.
    kwargs: its keyword arguments, not cast.

  Returns:
    None (run the layer), or a function of the layer's ``(scale, bias)``
    (None for a missing one) returning its float32 output.
  """
  center = _NUMERICS_NORMS.get(cls)
  if center is None or jnp.dtype(policy.compute_dtype) != jnp.float32:
    return None
  if len(args) != 1 or any(k != "mask" or v is not None
                           for k, v in kwargs.items()):
    return None
  x = args[0]
  if not (isinstance(x, (jax.Array, np.ndarray)) and x.ndim >= 1 and
          jnp.dtype(x.dtype) in _HALF_OR_SINGLE):
    return None
  if (module.axis_name is not None or module.axis_index_groups is not None or
      (module.dtype is not None and
       jnp.dtype(module.dtype) != jnp.float32) or
      not _last_axis_only(module.reduction_axes, x.ndim) or
      not _last_axis_only(module.feature_axes, x.ndim) or
      not getattr(module, "force_float32_reductions", True) or
      getattr(module, "promote_dtype",
              nnx_dtypes.promote_dtype) is not nnx_dtypes.promote_dtype):
    return None

  def run(scale, bias):
    for name, p in (("scale", scale), ("bias", bias)):
      if p is not None and jnp.shape(p) != x.shape[-1:]:
        raise ValueError(
            f"{cls.__name__}: {name} of shape {jnp.shape(p)} does not match "
            f"the input's last axis, {x.shape[-1]}.")
    if center:
      return numerics.layer_norm(
          x, scale, bias, epsilon=module.epsilon,
          use_fast_variance=module.use_fast_variance)
    return numerics.rms_norm(x, scale, epsilon=module.epsilon)

  return run
