"""Attention as one cuDNN kernel on NVIDIA GPUs, the float32 island elsewhere.

`fused_dot_product_attention` is a drop-in ``attention_fn`` for flax's
attention layers, like `mpjax.numerics.dot_product_attention` (the float32
island), whose contract it keeps: logits and softmax in float32, the
probabilities rounded to the compute dtype for ``probs @ value``, a result
in the compute dtype. When the program is compiled for CUDA (a GPU, or a
GPU target on any machine: `mpjax.compile_for_target`), the inputs are
16-bit, no dropout or weight sowing is asked for and cuDNN is installed,
it is cuDNN's fused flash attention (``jax.nn.dot_product_attention(...,
implementation="cudnn")``, custom calls ``__cudnn$fmhaSoftmax`` and
``__cudnn$fmhaSoftmaxBackward``): float32 accumulation and softmax inside
the kernel, bfloat16/float16 probabilities for the value matmul, and for the
backward pass only the output and float32 per-row softmax statistics, not a
``[batch, heads, q, kv]`` array per layer. That is what makes a mixed step
need less than half of float32's memory: cuDNN's kernel takes 16-bit inputs
only, so a float32 step keeps its probabilities.

Elsewhere (CPU, float32, dropout, ...) it is the float32 island itself:
the same numbers as `mpjax.numerics.dot_product_attention`. Differences on
the cuDNN path: the ``1/sqrt(d)`` scale is applied to the float32 logits
(the island scales the query in the compute dtype first) and the softmax is
computed blockwise (online rescaling), so results differ from the island's
by rounding only.
"""

import functools
import importlib.util
from typing import Any, Optional

import jax
import jax.numpy as jnp

from mpjax._src import numerics

_SIXTEEN_BIT = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))


@functools.lru_cache(maxsize=None)
def cudnn_available() -> bool:
  """Whether cuDNN's libraries are installed (``nvidia-cudnn-cu12``, which
  ``jax[cuda12]`` brings, or a system cuDNN): compiling a cuDNN kernel, on
  a GPU or for a GPU target, needs them."""
  if importlib.util.find_spec("nvidia") is not None:
    try:
      if importlib.util.find_spec("nvidia.cudnn") is not None:
        return True
    except ModuleNotFoundError:
      pass
  import ctypes.util  # pylint: disable=g-import-not-at-top
  return ctypes.util.find_library("cudnn") is not None


@functools.lru_cache(maxsize=None)
def local_gpus_run_flash_attention() -> bool:
  """False when this machine has an NVIDIA GPU older than Ampere (sm_80),
  which cuDNN's flash attention does not support (V100, T4); True otherwise,
  including machines without a GPU that compile for a target
  (`mpjax.compile_for_target`'s targets are all sm_80 or newer)."""
  try:
    gpus = jax.devices("cuda")
  except RuntimeError:
    return True
  for device in gpus:
    capability = getattr(device, "compute_capability", None)
    if capability is not None and float(capability) < 8.0:
      return False
  return True


def _fusable(query, key, value, dtype, dropout_rate, deterministic,
             module) -> bool:
  if jnp.dtype(dtype) not in _SIXTEEN_BIT or module is not None:
    return False
  if dropout_rate > 0.0 and not deterministic:
    return False
  if query.ndim != 4 or key.ndim != 4 or value.ndim != 4:
    return False
  depth = query.shape[-1]
  if depth % 8 or depth > 128 or query.shape[-2] % key.shape[-2]:
    return False
  return cudnn_available() and local_gpus_run_flash_attention()


def fused_dot_product_attention(query: jax.Array, key: jax.Array,
                                value: jax.Array,
                                bias: Optional[jax.Array] = None,
                                mask: Optional[jax.Array] = None,
                                broadcast_dropout: bool = True,
                                dropout_rng: Optional[jax.Array] = None,
                                dropout_rate: float = 0.0,
                                deterministic: bool = False,
                                dtype: Any = None,
                                precision: Any = None,
                                module: Any = None,
                                is_causal: bool = False) -> jax.Array:
  """cuDNN flash attention on CUDA for 16-bit inputs, else the island.

  Arguments, shapes and dtypes as `mpjax.numerics.dot_product_attention`
  (``[batch, q_length, heads, head_dim]``; `mask` broadcastable to
  ``[batch, heads, q_length, kv_length]``, boolean). Give it as the
  ``attention_fn`` of ``flax.linen.MultiHeadDotProductAttention``:
  mpjax's policies leave an attention function that is not flax's default
  in place.

  Returns:
    ``[batch, q_length, heads, head_dim]`` in the compute dtype.
  """
  island = functools.partial(
      numerics.dot_product_attention, bias=bias, mask=mask,
      broadcast_dropout=broadcast_dropout, dropout_rng=dropout_rng,
      dropout_rate=dropout_rate, deterministic=deterministic, dtype=dtype,
      precision=precision, module=module, is_causal=is_causal)
  compute = dtype if dtype is not None else jnp.result_type(query, key, value)
  if not _fusable(query, key, value, compute, dropout_rate, deterministic,
                  module):
    return island(query, key, value)
  query, key, value = (jnp.asarray(a).astype(compute)
                       for a in (query, key, value))

  def cudnn(q, k, v):
    return jax.nn.dot_product_attention(
        q, k, v, bias=None if bias is None else bias.astype(compute),
        mask=None if mask is None else mask.astype(jnp.bool_),
        is_causal=is_causal, implementation="cudnn")

  # Chosen when the program is lowered for a platform: a CPU program never
  # sees the cuDNN call.
  return jax.lax.platform_dependent(query, key, value, cuda=cudnn,
                                    default=island)
