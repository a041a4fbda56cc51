"""A decoder built only from stock flax linen layers, as a flax user writes it.

Unlike `lm_models_linen.TransformerLM` (GPT-2's layout, tied output layer,
GELU), this one is laid out like flax's own sequence examples: ``nn.Embed``
for tokens and positions, blocks of ``nn.LayerNorm`` -> ``nn.SelfAttention``
(flax's default attention function, no bias terms) and ``nn.LayerNorm`` ->
``nn.Dense`` -> ReLU -> ``nn.Dense``, a final ``nn.LayerNorm`` and an untied
``nn.Dense`` vocabulary projection. No layer sets a dtype: the benchmark's
policy decides (`lm_common.lm_policy`). The benchmark compiles it as the
"model mpjax did not write": every layer is flax's.
"""

import flax.linen as nn
import jax.numpy as jnp

from lm_common import LMConfig


class StockBlock(nn.Module):
  """x: [batch, seq, d_model] -> the same shape."""
  config: LMConfig

  @nn.compact
  def __call__(self, x, mask):
    c = self.config
    h = nn.SelfAttention(num_heads=c.num_heads, use_bias=False,
                         deterministic=True)(nn.LayerNorm()(x), mask=mask)
    x = x + h
    h = nn.Dense(c.mlp_ratio * c.d_model)(nn.LayerNorm()(x))
    return x + nn.Dense(c.d_model)(nn.relu(h))


class StockLM(nn.Module):
  """tokens: int32 [batch, seq] -> logits [batch, seq, vocab]."""
  config: LMConfig

  @nn.compact
  def __call__(self, tokens):
    c = self.config
    x = nn.Embed(c.vocab_size, c.d_model)(tokens)
    x = x + nn.Embed(c.seq_len, c.d_model)(jnp.arange(tokens.shape[-1]))
    mask = nn.make_causal_mask(tokens)
    for _ in range(c.num_layers):
      x = StockBlock(c)(x, mask)
    return nn.Dense(c.vocab_size, use_bias=False)(nn.LayerNorm()(x))
