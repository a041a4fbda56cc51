"""Tests for mpjax/_src/policy_map.py: PolicyMap's matching rule and errors."""

import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import jmp
import pytest
from flax import nnx

import mpjax
from mpjax._src.policy_map import PolicyMap

F32, F16, BF16 = jnp.float32, jnp.float16, jnp.bfloat16


def dtypes(policy):
  return tuple(jnp.dtype(d) for d in (policy.param_dtype, policy.compute_dtype,
                                      policy.output_dtype))


def resolve(pm, *chain):
  """chain: (path, class) pairs below a root nn.Module."""
  return pm.resolve((("", nn.Module),) + tuple(chain))


class MyBlock(nn.Module):
  pass


class MySubBlock(MyBlock):
  pass


def test_policy_map_is_a_jmp_policy_with_the_default_dtypes():
  pm = PolicyMap("mixed_float16", {"head": "float32"})
  assert isinstance(pm, jmp.Policy)
  assert dtypes(pm) == (F32, F16, F32)
  assert mpjax.policy_name(pm) == "p=f32,c=f16,o=f32"
  assert mpjax.get_policy(pm) is pm
  tree = pm.cast_to_param({"w": jnp.ones(2, F16)})
  assert tree["w"].dtype == F32


def test_equal_maps_are_equal_and_hash_alike_whatever_the_entry_order():
  a = PolicyMap("mixed_bfloat16", {"x/*": "float32", nn.LayerNorm: "float32"})
  b = PolicyMap("mixed_bfloat16", [(nn.LayerNorm, "float32"),
                                   ("x/*", "p=f32,c=f32,o=f32")])
  assert a == b and hash(a) == hash(b)
  assert a != PolicyMap("mixed_bfloat16")
  assert a != PolicyMap("mixed_bfloat16", {"x/*": "float32",
                                           nn.LayerNorm: "float32"},
                        islands=False)
  assert PolicyMap("float32") != mpjax.get_policy("float32")
  # Hashable and static: usable as a jit static argument.
  f = jax.jit(lambda x, pm: x.astype(pm.compute_dtype), static_argnums=1)
  assert f(jnp.ones(2), a).dtype == BF16


def test_root_runs_the_default_policy_and_is_a_boundary():
  pm = PolicyMap("mixed_bfloat16")
  root = pm.resolve((("", MyBlock),))
  assert root.boundary and root.rule == "default"
  assert dtypes(root.policy) == (F32, BF16, F32)


def test_islands_put_norms_in_float32_and_matmuls_in_the_low_dtype():
  pm = PolicyMap("mixed_float16")
  for cls in (nn.LayerNorm, nn.RMSNorm, nn.BatchNorm, nn.GroupNorm,
              nnx.LayerNorm, nnx.RMSNorm, nnx.BatchNorm, nnx.GroupNorm):
    r = resolve(pm, ("n", cls))
    assert r.boundary and r.rule == "float32 island", cls
    assert dtypes(r.policy) == (F32, F32, F32), cls
  for cls in (nn.Dense, nn.DenseGeneral, nn.Conv, nn.Einsum, nn.Embed,
              nnx.Linear, nnx.LinearGeneral, nnx.Conv, nnx.Einsum, nnx.Embed):
    r = resolve(pm, ("d", cls))
    assert r.boundary and r.rule == "low-precision layer", cls
    assert dtypes(r.policy) == (F32, F16, F16), cls
  assert resolve(pm, ("a", nn.MultiHeadDotProductAttention)).attention_island
  assert resolve(pm, ("a", nnx.MultiHeadAttention)).attention_island


def test_islands_off_everything_inherits_the_default():
  pm = PolicyMap("mixed_float16", islands=False)
  for cls in (nn.LayerNorm, nn.Dense, nn.MultiHeadDotProductAttention):
    r = resolve(pm, ("m", cls))
    assert not r.boundary and r.rule == "inherited"
    assert not r.attention_island
    assert jnp.dtype(r.policy.compute_dtype) == F16


def test_unnamed_modules_inherit_from_the_nearest_named_ancestor():
  pm = PolicyMap("mixed_bfloat16", {"decoder": "float32"})
  block = resolve(pm, ("decoder", MyBlock), ("decoder/0", MyBlock))
  assert not block.boundary and jnp.dtype(block.policy.compute_dtype) == F32
  # A matmul layer inside the float32 subtree follows float32, not bfloat16.
  dense = resolve(pm, ("decoder", MyBlock), ("decoder/0", MyBlock),
                  ("decoder/0/fc", nn.Dense))
  assert dtypes(dense.policy) == (F32, F32, F32)
  outside = resolve(pm, ("encoder", MyBlock), ("encoder/fc", nn.Dense))
  assert dtypes(outside.policy) == (F32, BF16, BF16)


def test_more_literal_segments_win_and_double_star_matches_any_depth():
  pm = PolicyMap("mixed_bfloat16", {
      "**/attn": "p=f32,c=f16,o=f16",
      "decoder/*/attn": "float32",
      "decoder/**": "mixed_float16",
  })
  chain = (("decoder", MyBlock), ("decoder/3", MyBlock),
           ("decoder/3/attn", MyBlock))
  r = resolve(pm, *chain)
  assert r.rule == "path 'decoder/*/attn'"
  assert set(r.matched) == {"**/attn", "decoder/*/attn", "decoder/**"}
  assert resolve(pm, ("encoder", MyBlock),
                 ("encoder/attn", MyBlock)).rule == "path '**/attn'"
  # '**' also matches zero segments.
  assert resolve(pm, ("attn", MyBlock)).rule == "path '**/attn'"
  assert resolve(pm, ("decoder", MyBlock)).rule == "path 'decoder/**'"


def test_wildcards_match_inside_one_segment_only():
  pm = PolicyMap("mixed_bfloat16", {"block_*/fc?": "float32"})
  assert resolve(pm, ("block_12", MyBlock),
                 ("block_12/fc1", nn.Dense)).rule == "path 'block_*/fc?'"
  assert resolve(pm, ("block_1", MyBlock), ("block_1/x", MyBlock),
                 ("block_1/x/fc1", nn.Dense)).rule == "low-precision layer"


def test_equally_specific_patterns_raise_naming_both():
  # One literal segment, two segments, four literal characters each.
  pm = PolicyMap("mixed_bfloat16", {"decd/*": "float32",
                                    "*/attn": "p=f32,c=f16,o=f16"})
  with pytest.raises(ValueError, match=r"'\*/attn' and 'decd/\*' both match "
                                       r"module 'decd/attn'"):
    resolve(pm, ("decd", MyBlock), ("decd/attn", MyBlock))
  # One more literal character breaks the tie.
  pm = PolicyMap("mixed_bfloat16", {"decod/*": "float32",
                                    "*/attn": "p=f32,c=f16,o=f16"})
  assert resolve(pm, ("decod", MyBlock),
                 ("decod/attn", MyBlock)).rule == "path 'decod/*'"


def test_nearest_class_in_the_mro_wins_and_path_beats_class():
  pm = PolicyMap("mixed_bfloat16", {nn.Module: "p=f32,c=f16,o=f16",
                                    MyBlock: "float32",
                                    "special": "mixed_bfloat16"})
  assert resolve(pm, ("b", MySubBlock)).rule == "class MyBlock"
  assert resolve(pm, ("d", nn.Dense)).rule == "class Module"
  r = resolve(pm, ("special", MySubBlock))
  assert r.rule == "path 'special'" and set(r.matched) == {
      "special", MyBlock, nn.Module}


def test_user_entries_beat_the_islands():
  pm = PolicyMap("mixed_bfloat16", {nn.Dense: "float32",
                                    nn.LayerNorm: "mixed_bfloat16"})
  assert dtypes(resolve(pm, ("d", nn.Dense)).policy) == (F32, F32, F32)
  assert dtypes(resolve(pm, ("n", nn.LayerNorm)).policy) == (F32, BF16, F32)


def test_unknown_dtype_in_an_entry_names_the_entry():
  with pytest.raises(ValueError, match=r"entry 'head'.*p=f32,c=f17"):
    PolicyMap("mixed_float16", {"head": "p=f32,c=f17"})
  with pytest.raises(ValueError, match="entry Dense.*mixed_float61"):
    PolicyMap("mixed_float16", {nn.Dense: "mixed_float61"})


def test_non_policy_values_and_keys_raise_type_errors_naming_them():
  with pytest.raises(TypeError, match="entry 'head': 3 .*not a policy"):
    PolicyMap("mixed_float16", {"head": 3})
  with pytest.raises(TypeError, match="entry LayerNorm: .*float32.*not a "
                                      "policy"):
    PolicyMap("mixed_float16", {nn.LayerNorm: jnp.float32})
  with pytest.raises(TypeError, match="cannot be an entry"):
    PolicyMap("mixed_float16", {"a": PolicyMap("float32")})
  with pytest.raises(TypeError, match="key 3 .*path pattern.*class"):
    PolicyMap("mixed_float16", {3: "float32"})
  with pytest.raises(TypeError, match="islands must be a bool"):
    PolicyMap("mixed_float16", islands="yes")
  with pytest.raises(ValueError, match="Unknown precision policy"):
    PolicyMap("mixed_float17")


@pytest.mark.parametrize("pattern", ["", "a//b", "/a", "a/**b"])
def test_malformed_patterns_raise(pattern):
  with pytest.raises(ValueError, match="PolicyMap entry"):
    PolicyMap("float32", {pattern: "float32"})


@pytest.mark.parametrize("pattern", ["[bad", "blocks/[0-3/fc", "a[!x", "[]",
                                     "[!]"])
def test_unclosed_character_classes_raise_naming_the_pattern(pattern):
  with pytest.raises(ValueError, match=re.escape(repr(pattern)) +
                     ".*no closing ']'"):
    PolicyMap("mixed_bfloat16", {pattern: "float32"})


def test_character_classes_match_one_character_of_the_class():
  pm = PolicyMap("mixed_bfloat16", {"blocks_[0-1]/fc": "float32",
                                    "blocks_[!0-1]/[]q]": "mixed_float16",
                                    "x[[]": "float32"})
  rule = lambda *path: resolve(pm, *((p, nn.Module) for p in path)).rule
  assert rule("blocks_0", "blocks_0/fc") == "path 'blocks_[0-1]/fc'"
  assert rule("blocks_2", "blocks_2/fc") == "inherited"
  assert rule("blocks_2", "blocks_2/q") == "path 'blocks_[!0-1]/[]q]'"
  assert rule("blocks_2", "blocks_2/]") == "path 'blocks_[!0-1]/[]q]'"
  assert rule("blocks_1", "blocks_1/q") == "inherited"
  assert rule("x[") == "path 'x[[]'"


def test_an_entry_that_stores_params_differently_raises_with_a_fix():
  with pytest.raises(ValueError,
                     match=r"entry 'head'.*bfloat16.*'p=f32,c=bf16,o=bf16'"):
    PolicyMap("mixed_float16", {"head": "bfloat16"})


def test_strict_names_each_entry_that_matched_nothing():
  pm = PolicyMap("mixed_float16", {"dec/*": "float32", nn.Conv: "float32",
                                   nn.Dense: "float32"}, strict=True)
  with pytest.raises(ValueError, match=r"'dec/\*', Conv matched no module"):
    pm.check_matched({nn.Dense}, ["enc", "enc/fc"])
  pm.check_matched({nn.Dense, nn.Conv, "dec/*"})
  PolicyMap("mixed_float16", {"dec/*": "float32"}).check_matched(set())


def test_with_output_dtype_keeps_the_entries():
  pm = PolicyMap("mixed_float16", {"head": "float32"}, islands=False)
  pm16 = pm.with_output_dtype(F16)
  assert isinstance(pm16, PolicyMap)
  assert dtypes(pm16) == (F32, F16, F16)
  assert pm16.overrides == pm.overrides and not pm16.islands
