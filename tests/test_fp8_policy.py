"""fp8 entries of a PolicyMap: which modules run fp8, in which dtypes."""

import flax.linen as nn
import jax.numpy as jnp
import pytest
from flax import nnx

import mpjax

RECIPE = mpjax.DelayedScaling(history_length=8)


class Block(nn.Module):
  pass


def chain(*items):
  return (("", nn.Sequential),) + tuple(items)


def test_fp8_dense_computes_like_a_low_precision_layer():
  pm = mpjax.PolicyMap("mixed_bfloat16", {nn.Dense: RECIPE})
  got = pm.resolve(chain(("d", nn.Dense)))
  assert got.fp8 == RECIPE and got.boundary
  assert got.rule == "class Dense (fp8)"
  assert (jnp.dtype(got.policy.compute_dtype),
          jnp.dtype(got.policy.output_dtype)) == (jnp.bfloat16, jnp.bfloat16)


def test_container_entry_passes_the_recipe_to_its_matmul_layers_only():
  pm = mpjax.PolicyMap("mixed_bfloat16", {"block": RECIPE})
  block = ("block", Block)
  container = pm.resolve(chain(block))
  assert container.fp8 == RECIPE and not container.boundary
  dense = pm.resolve(chain(block, ("block/d", nn.Dense)))
  assert dense.fp8 == RECIPE and dense.rule == "low-precision layer (fp8)"
  norm = pm.resolve(chain(block, ("block/ln", nn.LayerNorm)))
  assert norm.fp8 is None and norm.rule == "float32 island"
  embed = pm.resolve(chain(block, ("block/e", nn.Embed)))
  assert embed.fp8 is None


def test_a_user_entry_below_an_fp8_container_wins():
  pm = mpjax.PolicyMap("mixed_bfloat16", {"block": RECIPE,
                                          "block/head": "float32"})
  head = pm.resolve(chain(("block", Block), ("block/head", nn.Dense)))
  assert head.fp8 is None and jnp.dtype(head.policy.compute_dtype) == \
      jnp.float32


def test_attention_entry_reaches_its_projections():
  pm = mpjax.PolicyMap("mixed_bfloat16",
                       {nnx.MultiHeadAttention: mpjax.CurrentScaling()})
  attn = ("attn", nnx.MultiHeadAttention)
  assert pm.resolve(chain(attn)).attention_island
  q = pm.resolve(chain(attn, ("attn/query", nnx.LinearGeneral)))
  assert q.fp8 == mpjax.CurrentScaling()


@pytest.mark.parametrize("cls", [nn.LayerNorm, nn.Embed, nn.Conv,
                                 nnx.Dropout, nnx.Embed])
def test_fp8_on_a_layer_without_matmul_raises_naming_it(cls):
  pm = mpjax.PolicyMap("mixed_bfloat16", {"x": RECIPE})
  with pytest.raises(ValueError, match=rf"'x' \(.*{cls.__name__}\)"):
    pm.resolve(chain(("x", cls)))


def test_repr_and_hash_with_a_recipe():
  pm = mpjax.PolicyMap("mixed_bfloat16", {nn.Dense: RECIPE})
  assert "Dense: DelayedScaling(history_length=8" in repr(pm)
  assert hash(pm) == hash(mpjax.PolicyMap("mixed_bfloat16",
                                          {nn.Dense: RECIPE}))


def test_a_value_neither_policy_nor_recipe_names_both():
  with pytest.raises(TypeError, match="fp8 recipe"):
    mpjax.PolicyMap("mixed_bfloat16", {nn.Dense: 8})
