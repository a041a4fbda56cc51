"""Tests for mpjax/_src/linen_policy.py: a PolicyMap applied to linen models."""

import re

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lm_common
import lm_data
import lm_models_linen
import mpjax
from mpjax import numerics
from mpjax._src.policy_map import PolicyMap

F32, F16, BF16 = jnp.float32, jnp.float16, jnp.bfloat16


class Block(nn.Module):
  """Pre-norm attention + MLP block with the layers the islands care about."""

  @nn.compact
  def __call__(self, x):
    mask = nn.make_causal_mask(jnp.ones(x.shape[:2]))
    h = nn.LayerNorm(name="ln1")(x)
    x = x + nn.MultiHeadDotProductAttention(num_heads=2, name="attn")(
        h, mask=mask, sow_weights=True)
    h = nn.Dense(16, name="fc")(nn.LayerNorm(name="ln2")(x))
    return x + nn.Dense(8, name="proj")(nn.gelu(h))


class Tiny(nn.Module):
  """Embed -> Block -> LayerNorm -> tied output layer (Embed.attend)."""

  @nn.compact
  def __call__(self, tokens):
    embed = nn.Embed(32, 8, name="embed")
    x = Block(name="block")(embed(tokens))
    return embed.attend(nn.LayerNorm(name="ln_f")(x))


TOKENS = jnp.array([[1, 2, 3, 4, 5], [6, 7, 8, 9, 10]], jnp.int32)


def tiny_variables():
  return Tiny().init(jax.random.key(0), TOKENS)


def captured(pm, **kwargs):
  """{path: dtype} of every module output and the attention weights."""
  variables = tiny_variables()
  apply = mpjax.with_policy(Tiny().apply, pm)
  out, state = jax.jit(lambda v: apply(
      v, TOKENS, capture_intermediates=True, mutable=["intermediates"],
      **kwargs))(variables)
  flat = jax.tree_util.tree_flatten_with_path(state["intermediates"])[0]
  result = {"/".join(str(k.key) for k in path[:-1]): leaf.dtype
            for path, leaf in flat}
  result["(output)"] = out.dtype
  return result


@pytest.mark.parametrize("low", [BF16, F16], ids=["bf16", "f16"])
def test_intermediates_have_the_dtypes_the_map_says(low):
  pm = PolicyMap(mpjax.get_policy("mixed_bfloat16" if low == BF16
                                  else "mixed_float16"))
  got = captured(pm)
  expected = {
      "embed/__call__": low,
      "block/ln1/__call__": F32,
      "block/attn/query/__call__": low,
      "block/attn/key/__call__": low,
      "block/attn/value/__call__": low,
      "block/attn/attention_weights": F32,  # the softmax island
      "block/attn/out/__call__": low,
      "block/attn/__call__": low,
      "block/ln2/__call__": F32,
      "block/fc/__call__": low,
      "block/proj/__call__": low,
      "block/__call__": low,
      "ln_f/__call__": F32,
      "__call__": F32,  # the root's output dtype
      "(output)": F32,
  }
  assert {k: jnp.dtype(v) for k, v in got.items()} == {
      k: jnp.dtype(v) for k, v in expected.items()}


def test_without_islands_norms_and_softmax_follow_the_compute_dtype():
  got = captured(PolicyMap("mixed_bfloat16", islands=False))
  for path in ("block/ln1/__call__", "block/attn/attention_weights",
               "block/fc/__call__", "ln_f/__call__", "block/__call__"):
    assert got[path] == BF16, path
  assert got["(output)"] == F32


def test_overrides_by_path_and_class_change_those_modules_only():
  got = captured(PolicyMap("mixed_bfloat16", {"block/fc": "float32",
                                              nn.Embed: "float32"}))
  assert got["block/fc/__call__"] == F32
  assert got["embed/__call__"] == F32
  assert got["block/proj/__call__"] == BF16
  assert got["block/attn/query/__call__"] == BF16


def grads_and_lowered(pm):
  variables = tiny_variables()
  apply = mpjax.with_policy(Tiny().apply, pm)

  def loss(params):
    logits = apply({"params": params}, TOKENS)
    return numerics.softmax_cross_entropy_with_integer_labels(
        logits, TOKENS).mean()

  grad_fn = jax.jit(jax.grad(loss))
  return grad_fn(variables["params"]), grad_fn.lower(
      variables["params"]).as_text()


def test_every_matmul_forward_and_backward_takes_compute_dtype_operands():
  grads, text = grads_and_lowered(PolicyMap("mixed_float16"))
  dots = re.findall(r"stablehlo\.dot_general.*?: \(([^)]*)\)", text)
  assert len(dots) >= 20
  for operands in dots:
    assert re.findall(r"x(f16|bf16|f32)>", operands) == ["f16", "f16"], operands
  # Every exp is in a float32 island (attention softmax, cross-entropy).
  exps = re.findall(r"stablehlo\.exponential .*: tensor<[^>]*x(\w+)>", text)
  assert exps and set(exps) == {"f32"}, exps
  chex.assert_trees_all_equal_dtypes(
      grads, jax.tree.map(lambda p: p.astype(F32), grads))


def test_without_islands_the_softmax_runs_in_the_compute_dtype():
  _, text = grads_and_lowered(PolicyMap("mixed_float16", islands=False))
  exps = re.findall(r"stablehlo\.exponential .*: tensor<[^>]*x(\w+)>", text)
  assert "f16" in exps


def test_train_state_keeps_float32_masters_and_make_train_step_trains():
  variables = tiny_variables()
  pm = PolicyMap("mixed_float16")
  state = mpjax.TrainState.create(
      apply_fn=Tiny().apply, params=variables["params"],
      tx=mpjax.loss_scaled(optax.adam(1e-2), mpjax.DynamicScaling.like_torch()),
      policy=pm)
  assert state.policy is pm

  def loss_fn(params, batch, apply_fn, rng):
    del rng
    logits = apply_fn({"params": params}, batch)
    assert logits.dtype == F32
    return numerics.softmax_cross_entropy_with_integer_labels(
        logits, batch).mean()

  step = mpjax.make_train_step(loss_fn)
  losses = []
  for _ in range(25):
    state, metrics = step(state, TOKENS)
    losses.append(float(metrics["loss"]))
  chex.assert_tree_all_finite(state.params)
  for leaf in jax.tree.leaves(state.params):
    assert leaf.dtype == F32
  assert losses[-1] < 0.5 * losses[0], losses


class BNNet(nn.Module):

  @nn.compact
  def __call__(self, x, train: bool):
    x = nn.Dense(4)(x)
    return nn.BatchNorm(use_running_average=not train, momentum=0.5)(x)


@pytest.mark.parametrize("pm", [
    PolicyMap("mixed_float16"), PolicyMap("mixed_bfloat16", islands=False),
    PolicyMap("float16"), PolicyMap("bfloat16", islands=False)],
    ids=["mixed_f16", "mixed_bf16_no_islands", "float16", "bfloat16_no_isl"])
def test_batchnorm_running_statistics_stay_float32_under_every_policy(pm):
  x = jnp.asarray(np.random.default_rng(0).normal(size=(8, 3)), F32)
  variables = BNNet().init(jax.random.key(0), x, train=False)
  variables = {"params": pm.cast_to_param(variables["params"]),
               "batch_stats": variables["batch_stats"]}
  apply = mpjax.with_policy(BNNet().apply, pm)
  _, updates = jax.jit(lambda v: apply(v, x, train=True,
                                       mutable=["batch_stats"]))(variables)
  for leaf in jax.tree.leaves(updates["batch_stats"]):
    assert leaf.dtype == F32
  assert not np.allclose(updates["batch_stats"]["BatchNorm_0"]["mean"], 0)


def test_a_user_attention_fn_is_kept():
  calls = []

  def my_attention(query, key, value, mask=None, dtype=None):
    calls.append(query.dtype)
    return nn.dot_product_attention(query, key, value, mask=mask, dtype=dtype)

  class Net(nn.Module):

    @nn.compact
    def __call__(self, x):
      return nn.MultiHeadDotProductAttention(
          num_heads=2, attention_fn=my_attention)(x)

  x = jnp.ones((1, 3, 4))
  variables = Net().init(jax.random.key(0), x)
  calls.clear()
  mpjax.with_policy(Net().apply, PolicyMap("mixed_bfloat16"))(variables, x)
  assert calls[-1] == BF16  # the real call (discovery traces it first)


def test_an_apply_fn_that_runs_no_module_raises():
  apply = mpjax.with_policy(lambda variables, x: x * 2,
                            PolicyMap("mixed_bfloat16"))
  with pytest.raises(ValueError, match="no module ran under"):
    apply({"params": {}}, jnp.ones(2))


def test_strict_raises_for_an_entry_matching_no_module_of_the_model():
  pm = PolicyMap("mixed_bfloat16", {"block/fc": "float32",
                                    "decoder/**": "float32"}, strict=True)
  with pytest.raises(ValueError, match=r"'decoder/\*\*' matched no module"):
    mpjax.with_policy(Tiny().apply, pm)(tiny_variables(), TOKENS)
  ok = PolicyMap("mixed_bfloat16", {"block/fc": "float32"}, strict=True)
  mpjax.with_policy(Tiny().apply, ok)(tiny_variables(), TOKENS)


def test_whole_model_policies_keep_their_old_behaviour():
  variables = tiny_variables()
  out = mpjax.with_policy(Tiny().apply, "mixed_bfloat16")(variables, TOKENS)
  assert out.dtype == F32
  _, state = Tiny().apply(
      mpjax.get_policy("mixed_bfloat16").cast_to_compute(variables), TOKENS,
      capture_intermediates=True, mutable=["intermediates"])
  assert state["intermediates"]["ln_f"]["__call__"][0].dtype == BF16


def overflowing_lm():
  """A 1-layer float16 LM whose attention logits exceed float16's range.

  Its query and key kernels are scaled by 3000: q and k stay well inside
  float16 (|q| ~ 1e3), but q.k / sqrt(d) reaches ~4e5 > 65504.
  """
  config = lm_common.LMConfig(seq_len=16, num_layers=1, d_model=32,
                              num_heads=2)
  model = lm_models_linen.TransformerLM(config)
  corpus = lm_data.load(max_bytes=20_000)
  batch = next(lm_data.train_batches(corpus.train, 8, config.seq_len))
  params = jax.jit(model.init)(jax.random.key(0), batch["x"])["params"]
  attn = params["block_0"]["attn"]
  for name in ("query", "key"):
    attn[name]["kernel"] = attn[name]["kernel"] * 3000.0
  return model, params, batch


def lm_loss(params, batch, apply_fn, rng):
  del rng
  return numerics.softmax_cross_entropy_with_integer_labels(
      apply_fn({"params": params}, batch["x"]), batch["y"]).mean()


def train(model, params, batch, pm, steps):
  state = mpjax.TrainState.create(
      apply_fn=model.apply, params=params,
      tx=mpjax.loss_scaled(optax.adam(3e-3), mpjax.DynamicScaling.like_torch()),
      policy=pm)
  step = mpjax.make_train_step(lm_loss)
  losses = []
  for _ in range(steps):
    state, metrics = step(state, batch)
    losses.append(float(metrics["loss"]))
  return state, losses


def test_float16_lm_whose_logits_overflow_trains_finitely_with_islands():
  model, params, batch = overflowing_lm()
  # The overflow is genuine: the float16 projections are finite, the float32
  # logits are finite, and many exceed float16's largest value.
  _, state = jax.jit(lambda p: model.apply(
      {"params": p}, batch["x"], capture_intermediates=True,
      mutable=["intermediates"]))(params)
  attn = state["intermediates"]["block_0"]["attn"]
  q, k = attn["query"]["__call__"][0], attn["key"]["__call__"][0]
  logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) / jnp.sqrt(q.shape[-1])
  assert float(jnp.abs(q).max()) < 65504 / 10
  chex.assert_tree_all_finite(logits)
  assert float(jnp.mean(jnp.abs(logits) > 65504)) > 0.1

  # Without islands every float16 forward pass is non-finite: each step is
  # skipped and the scale falls.
  state, losses = train(model, params, batch,
                        PolicyMap("mixed_float16", islands=False), steps=4)
  assert not np.isfinite(losses).any()
  assert int(state.opt_state.skipped_steps) == 4

  state, losses = train(model, params, batch, PolicyMap("mixed_float16"),
                        steps=20)
  assert np.isfinite(losses).all(), losses
  chex.assert_tree_all_finite(state.params)
  assert losses[-1] < 0.7 * losses[0], losses


class ScannedLayer(nn.Module):

  @nn.compact
  def __call__(self, x, _):
    return nn.Dense(8, name="fc")(nn.LayerNorm(name="ln")(x)), None


class Lifted(nn.Module):

  @nn.compact
  def __call__(self, x):
    x = nn.remat(nn.Dense)(8, name="remat_fc")(x)
    x, _ = nn.scan(ScannedLayer,
                   variable_axes={"params": 0, "intermediates": 0},
                   split_rngs={"params": True}, length=3)(name="layers")(
                       x, None)
    return x


def test_lifted_transforms_keep_the_per_module_policy():
  x = jnp.ones((2, 8))
  variables = Lifted().init(jax.random.key(0), x)
  apply = mpjax.with_policy(Lifted().apply, PolicyMap("mixed_bfloat16"))
  out, state = jax.jit(lambda v: apply(v, x, capture_intermediates=True,
                                       mutable=["intermediates"]))(variables)
  assert out.dtype == F32
  inter = state["intermediates"]
  assert inter["remat_fc"]["__call__"][0].dtype == BF16
  assert inter["layers"]["fc"]["__call__"][0].dtype == BF16
  assert inter["layers"]["ln"]["__call__"][0].dtype == F32
  text = jax.jit(jax.grad(lambda v: apply(v, x).sum())).lower(
      variables).as_text()
  dots = re.findall(r"stablehlo\.dot_general.*?: \(([^)]*)\)", text)
  assert dots and all(d.count("bf16") == 2 for d in dots), dots


class Wrapped(nn.Module):
  """`norm` as a child, so that it is an island inside a mixed model."""
  norm: nn.Module

  @nn.compact
  def __call__(self, x):
    return self.norm(x)


ISLAND_NORMS = {
    "layer_norm": nn.LayerNorm(epsilon=1e-5),
    "layer_norm_two_pass_no_bias": nn.LayerNorm(use_fast_variance=False,
                                                use_bias=False),
    "rms_norm": nn.RMSNorm(),
    # Not reproduced by mpjax.numerics: flax's layer runs, as before.
    "layer_norm_two_axes": nn.LayerNorm(reduction_axes=(-2, -1)),
}


def ulp_close(dtype):
  """Tolerances of one rounding step of `dtype`."""
  return {"rtol": float(jnp.finfo(dtype).eps), "atol": 1e-6}


@pytest.mark.parametrize("name", sorted(ISLAND_NORMS))
@pytest.mark.parametrize("low", [BF16, F16], ids=["bf16", "f16"])
def test_island_norms_give_flax_float32_values_and_gradients(name, low):
  norm = ISLAND_NORMS[name]
  # Rows of small, unit and large spread: epsilon matters in the first.
  spread = jnp.array([[0.003], [1.0], [10.0]])
  x = ((jax.random.normal(jax.random.key(1), (2, 3, 8)) * 3 + 1) *
       spread).astype(low)
  params = jax.tree.map(
      lambda p: jax.random.normal(jax.random.key(p.size), p.shape, F32),
      norm.init(jax.random.key(0), x)["params"])
  apply = mpjax.with_policy(Wrapped(norm).apply,
                            PolicyMap(f"mixed_{jnp.dtype(low).name}"))
  ours = lambda p, x: apply({"params": {"norm": p}}, x)
  # Today's island semantics: flax's layer on the float32 upcast input.
  reference = lambda p, x: norm.apply({"params": p}, x.astype(F32))
  y, ours_vjp = jax.vjp(ours, params, x)
  y_ref, ref_vjp = jax.vjp(reference, params, x)
  chex.assert_type(y, F32)
  chex.assert_trees_all_close(y, y_ref, rtol=1e-6, atol=1e-6)
  g = jax.random.normal(jax.random.key(2), y.shape, F32)
  (dparams, dx), (dparams_ref, dx_ref) = ours_vjp(g), ref_vjp(g)
  chex.assert_trees_all_equal_dtypes((dparams, dx), (dparams_ref, dx_ref))
  chex.assert_trees_all_close(dparams, dparams_ref, rtol=1e-5, atol=1e-5)
  # Rounded to `low` once from float32 values equal up to float32 rounding.
  chex.assert_trees_all_close(dx.astype(F32), dx_ref.astype(F32),
                              **ulp_close(low))


@pytest.mark.parametrize("fast", [True, False], ids=["fast", "two_pass"])
def test_layer_norm_island_keeps_the_modules_use_fast_variance(fast):
  # A mean far above the spread: the one-pass variance E[x^2] - E[x]^2
  # cancels in float32, so the two settings differ and each must reach the
  # island as the module has it.
  x = (1000.0 + jax.random.normal(jax.random.key(1), (4, 8))).astype(F16)
  norm = nn.LayerNorm(use_fast_variance=fast)
  params = norm.init(jax.random.key(0), x)["params"]
  apply = mpjax.with_policy(Wrapped(norm).apply, PolicyMap("mixed_float16"))
  y = apply({"params": {"norm": params}}, x)
  flax_y = {f: nn.LayerNorm(use_fast_variance=f).apply({"params": params},
                                                       x.astype(F32))
            for f in (True, False)}
  assert not np.allclose(flax_y[True], flax_y[False], rtol=1e-3, atol=1e-3)
  chex.assert_trees_all_close(y, flax_y[fast], rtol=1e-6, atol=1e-6)


def kept_for_backward(fn, params):
  """(shape, dtype name) of every array ``jax.vjp(fn, params)`` keeps."""
  closure = jax.eval_shape(lambda p: jax.vjp(fn, p)[1], params)
  return [(leaf.shape, jnp.dtype(leaf.dtype).name)
          for leaf in jax.tree.leaves(closure)]


def test_island_norms_keep_their_input_in_the_compute_dtype_for_backward():
  # Tiny's three LayerNorms see [2, 5, 8] activations. Autodiff of flax's
  # float32 layer kept three float32 arrays of that shape per norm; now each
  # keeps its bfloat16 input and two float32 [2, 5, 1] row statistics.
  params = tiny_variables()["params"]
  apply = mpjax.with_policy(Tiny().apply, PolicyMap("mixed_bfloat16"))
  kept = kept_for_backward(lambda p: apply({"params": p}, TOKENS), params)
  assert ((2, 5, 8), "float32") not in kept, kept
  assert kept.count(((2, 5, 1), "float32")) == 2 * 3, kept
  assert kept.count(((2, 5, 8), "bfloat16")) >= 3, kept
