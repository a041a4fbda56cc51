"""The pre-norm causal transformer language model, in flax NNX.

The same model as `lm_models_linen` (GPT-2's layout, tied output embedding),
written once for NNX. No module is given a dtype: apply a policy with
``mpjax.with_nnx_policy(model, mpjax.PolicyMap("mixed_bfloat16"))``.
"""

import jax.numpy as jnp
from flax import nnx

from lm_common import LMConfig


class Block(nnx.Module):
  """One pre-norm block; x: [batch, seq, d_model] -> the same shape."""

  def __init__(self, config: LMConfig, *, rngs: nnx.Rngs):
    c = config
    d, hidden = c.d_model, c.mlp_ratio * c.d_model
    self.ln1 = nnx.LayerNorm(d, epsilon=1e-5, rngs=rngs)
    self.attn = nnx.MultiHeadAttention(
        num_heads=c.num_heads, in_features=d, decode=False,
        kernel_init=nnx.initializers.normal(0.02),
        out_kernel_init=nnx.initializers.normal(c.residual_init_std),
        rngs=rngs)
    self.ln2 = nnx.LayerNorm(d, epsilon=1e-5, rngs=rngs)
    self.fc = nnx.Linear(d, hidden, kernel_init=nnx.initializers.normal(0.02),
                         rngs=rngs)
    self.proj = nnx.Linear(
        hidden, d, kernel_init=nnx.initializers.normal(c.residual_init_std),
        rngs=rngs)

  def __call__(self, x, mask):
    x = x + self.attn(self.ln1(x), mask=mask)
    return x + self.proj(nnx.gelu(self.fc(self.ln2(x))))


class TransformerLM(nnx.Module):
  """tokens: int32 [batch, seq] (seq <= seq_len) -> logits [batch, seq, vocab]."""

  def __init__(self, config: LMConfig, *, rngs: nnx.Rngs):
    c = self.config = config
    self.embed = nnx.Embed(c.vocab_size, c.d_model,
                           embedding_init=nnx.initializers.normal(0.02),
                           rngs=rngs)
    self.pos = nnx.Embed(c.seq_len, c.d_model,
                         embedding_init=nnx.initializers.normal(0.01),
                         rngs=rngs)
    self.blocks = nnx.List([Block(c, rngs=rngs) for _ in range(c.num_layers)])
    self.ln_f = nnx.LayerNorm(c.d_model, epsilon=1e-5, rngs=rngs)

  def __call__(self, tokens):
    x = self.embed(tokens) + self.pos(jnp.arange(tokens.shape[-1]))
    mask = nnx.make_causal_mask(tokens)
    for block in self.blocks:
      x = block(x, mask)
    return self.embed.attend(self.ln_f(x))
