"""mpjax.fused_dot_product_attention: cuDNN on GPU targets, the island on CPU."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest

import mpjax
from mpjax import numerics


def _qkv(dtype, shape=(2, 128, 4, 64)):
  keys = jax.random.split(jax.random.key(0), 3)
  return tuple(jax.random.normal(k, shape, dtype) for k in keys)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16, jnp.float32])
def test_on_cpu_it_is_the_float32_island(dtype):
  q, k, v = _qkv(dtype)
  mask = nn.make_causal_mask(jnp.ones(q.shape[:2]))
  fused = jax.jit(mpjax.fused_dot_product_attention)(q, k, v, mask=mask)
  island = jax.jit(numerics.dot_product_attention)(q, k, v, mask=mask)
  assert fused.dtype == island.dtype == dtype
  assert bool(jnp.all(fused == island))


def _training_program(dtype, attention):
  def loss(q, k, v):
    mask = nn.make_causal_mask(jnp.ones(q.shape[:2]))
    return attention(q, k, v, mask=mask).astype(jnp.float32).sum()
  grads = jax.grad(loss, argnums=(0, 1, 2))
  return mpjax.audit_compiled(mpjax.compile_for_target(
      grads, *_qkv(dtype, (4, 512, 4, 64)), target="h100"))


def test_on_an_h100_a_16_bit_attention_is_one_cudnn_kernel_and_small():
  fused = _training_program(jnp.bfloat16, mpjax.fused_dot_product_attention)
  island = _training_program(jnp.bfloat16, numerics.dot_product_attention)
  assert fused.implementations() == {"cuDNN fused attention": 2}  # fwd, bwd
  assert "cuDNN fused attention" not in island.implementations()
  # No [batch, heads, q, kv] array: 4 x 4 x 512 x 512 x 2 bytes = 8 MiB.
  assert fused.memory["peak_bytes"] < island.memory["peak_bytes"] / 2


def test_float32_attention_stays_the_island_on_an_h100():
  report = _training_program(jnp.float32, mpjax.fused_dot_product_attention)
  assert "cuDNN fused attention" not in report.implementations()


def test_policy_map_attention_island_is_fused_on_an_h100_by_default():
  class Block(nn.Module):
    @nn.compact
    def __call__(self, x):
      mask = nn.make_causal_mask(jnp.ones(x.shape[:2]))
      return nn.MultiHeadDotProductAttention(num_heads=4)(x, mask=mask)

  model = Block()
  x = jnp.ones((2, 256, 256), jnp.float32)
  params = model.init(jax.random.key(0), x)["params"]
  apply = mpjax.with_policy(model.apply, mpjax.PolicyMap("mixed_bfloat16"))
  grad = jax.grad(lambda p, x: apply({"params": p}, x).sum())
  report = mpjax.audit_compiled(mpjax.compile_for_target(grad, params, x,
                                                         target="h100"))
  assert report.implementations().get("cuDNN fused attention") == 2


def test_an_older_local_gpu_keeps_the_unfused_island(monkeypatch):
  class FakeV100:
    compute_capability = "7.0"

  from mpjax._src import fused_attention  # pylint: disable=g-import-not-at-top
  fused_attention.local_gpus_run_flash_attention.cache_clear()
  monkeypatch.setattr(jax, "devices", lambda *a: [FakeV100()])
  try:
    assert not fused_attention.local_gpus_run_flash_attention()
  finally:
    fused_attention.local_gpus_run_flash_attention.cache_clear()
  monkeypatch.undo()
  assert fused_attention.local_gpus_run_flash_attention()  # this CPU machine
