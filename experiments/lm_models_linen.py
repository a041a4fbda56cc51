"""The pre-norm causal transformer language model, in flax linen.

GPT-2's layout: token and learned position embeddings, ``num_layers`` blocks
of ``x + attn(ln(x))`` and ``x + mlp(ln(x))`` with causal self-attention, a
final LayerNorm and an output layer tied to the token embedding
(``Embed.attend``). No module sets a dtype: a policy decides
(``mpjax.with_policy(model.apply, mpjax.PolicyMap("mixed_bfloat16"))``).
`lm_models_nnx` is the same model in NNX; `lm_common.LMConfig.gpt2_124m()`
gives GPT-2 small's shape.
"""

import flax.linen as nn
import jax.numpy as jnp

from lm_common import LMConfig


class Block(nn.Module):
  """One pre-norm block; x: [batch, seq, d_model] -> the same shape."""
  config: LMConfig

  @nn.compact
  def __call__(self, x, mask):
    c = self.config
    h = nn.LayerNorm(epsilon=1e-5, name="ln1")(x)
    x = x + nn.MultiHeadDotProductAttention(
        num_heads=c.num_heads, kernel_init=nn.initializers.normal(0.02),
        out_kernel_init=nn.initializers.normal(c.residual_init_std),
        name="attn")(h, mask=mask)
    h = nn.LayerNorm(epsilon=1e-5, name="ln2")(x)
    h = nn.Dense(c.mlp_ratio * c.d_model,
                 kernel_init=nn.initializers.normal(0.02), name="fc")(h)
    h = nn.gelu(h)
    return x + nn.Dense(c.d_model,
                        kernel_init=nn.initializers.normal(c.residual_init_std),
                        name="proj")(h)


class TransformerLM(nn.Module):
  """tokens: int32 [batch, seq] (seq <= seq_len) -> logits [batch, seq, vocab]."""
  config: LMConfig

  @nn.compact
  def __call__(self, tokens):
    c = self.config
    embed = nn.Embed(c.vocab_size, c.d_model,
                     embedding_init=nn.initializers.normal(0.02), name="embed")
    pos = nn.Embed(c.seq_len, c.d_model,
                   embedding_init=nn.initializers.normal(0.01), name="pos")
    x = embed(tokens) + pos(jnp.arange(tokens.shape[-1]))
    mask = nn.make_causal_mask(tokens)
    for i in range(c.num_layers):
      x = Block(c, name=f"block_{i}")(x, mask)
    return embed.attend(nn.LayerNorm(epsilon=1e-5, name="ln_f")(x))
