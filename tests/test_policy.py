"""Tests for mpjax/_src/policy.py and whole-model casting (with_policy)."""

import chex
import jax
import jax.numpy as jnp
import jmp
import numpy as np
import pytest

import mpjax

F32, F16, BF16 = jnp.float32, jnp.float16, jnp.bfloat16


def dtypes(policy):
  return (jnp.dtype(policy.param_dtype), jnp.dtype(policy.compute_dtype),
          jnp.dtype(policy.output_dtype))


@pytest.mark.parametrize("name, expected", [
    ("float32", (F32, F32, F32)),
    ("float16", (F16, F16, F16)),
    ("bfloat16", (BF16, BF16, BF16)),
    ("mixed_float16", (F32, F16, F32)),
    ("mixed_bfloat16", (F32, BF16, F32)),
])
def test_presets_have_keras_dtypes(name, expected):
  assert dtypes(mpjax.get_policy(name)) == tuple(map(jnp.dtype, expected))


@pytest.mark.parametrize("spec, expected", [
    ("params=float32,compute=bfloat16,output=float32", (F32, BF16, F32)),
    ("p=f32,c=f16,o=f32", (F32, F16, F32)),
    ("p=f32,c=f16", (F32, F16, F16)),  # jmp: output follows compute
    ("c=bf16", (F32, BF16, BF16)),  # jmp: params default to float32
    (" p=f32, c=f16, o=f32 ", (F32, F16, F32)),  # spaces tolerated
])
def test_jmp_policy_strings_parse(spec, expected):
  assert dtypes(mpjax.get_policy(spec)) == tuple(map(jnp.dtype, expected))


def test_policy_object_passes_through():
  policy = jmp.Policy(F32, F16, F32)
  assert mpjax.get_policy(policy) is policy


@pytest.mark.parametrize("spec", [
    "mixed_float32", "fp16", "", "p=f32,c", "x=f32", "p=f32,c=f12", "p=f32,,c=f16"])
def test_unknown_spec_raises_naming_it_and_listing_presets(spec):
  with pytest.raises(ValueError) as info:
    mpjax.get_policy(spec)
  message = str(info.value)
  assert repr(spec) in message
  for preset in mpjax.PRESETS:
    assert preset in message


def test_non_string_spec_raises_type_error():
  with pytest.raises(TypeError, match="got 16"):
    mpjax.get_policy(16)


@pytest.mark.parametrize("name", sorted(mpjax.PRESETS))
def test_policy_name_round_trips(name):
  policy = mpjax.get_policy(name)
  assert dtypes(mpjax.get_policy(mpjax.policy_name(policy))) == dtypes(policy)


def test_policy_name_is_short():
  assert mpjax.policy_name("mixed_float16") == "p=f32,c=f16,o=f32"


def test_casting_a_params_tree_casts_floating_leaves_only():
  policy = mpjax.get_policy("mixed_bfloat16")
  tree = {
      "kernel": jnp.ones((2, 3), F32),
      "scale": np.ones(3, np.float32),
      "step": jnp.array(3, jnp.int32),
      "key": jax.random.key(0),
      "flag": jnp.array(True),
  }
  cast = policy.cast_to_compute(tree)
  chex.assert_type(cast["kernel"], BF16)
  chex.assert_type(cast["scale"], BF16)
  chex.assert_type(cast["step"], jnp.int32)
  chex.assert_type(cast["flag"], jnp.bool_)
  assert jax.dtypes.issubdtype(cast["key"].dtype, jax.dtypes.prng_key)
  back = policy.cast_to_param(cast)
  chex.assert_type(back["kernel"], F32)
  chex.assert_trees_all_equal(back["kernel"], tree["kernel"])


def test_with_policy_casts_inputs_variables_and_outputs():
  seen = {}

  def apply_fn(variables, x, ids, *, scale):
    seen.update(w=variables["w"].dtype, x=x.dtype, ids=ids.dtype,
                scale=scale.dtype)
    return {"logits": x @ variables["w"], "count": ids.sum()}

  apply = mpjax.with_policy(apply_fn, "mixed_float16")
  out = apply({"w": jnp.ones((3, 2))}, jnp.ones((4, 3)),
              jnp.arange(4), scale=jnp.ones(()))
  assert seen == {"w": jnp.dtype(F16), "x": jnp.dtype(F16),
                  "ids": jnp.dtype(jnp.int32), "scale": jnp.dtype(F16)}
  chex.assert_type(out["logits"], F32)
  chex.assert_type(out["count"], jnp.int32)
  chex.assert_shape(out["logits"], (4, 2))


def test_with_policy_gives_float32_gradients_for_float32_params():
  apply = mpjax.with_policy(lambda v, x: x @ v["w"], "mixed_float16")
  grads = jax.grad(lambda v: apply(v, jnp.ones((4, 3))).sum())(
      {"w": jnp.ones((3, 2), F32)})
  chex.assert_type(grads["w"], F32)
  chex.assert_trees_all_close(grads["w"], jnp.full((3, 2), 4.0))
