"""Tests for mpjax/_src/nnx_policy.py: a PolicyMap applied to NNX models."""

import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import lm_common
import lm_data
import lm_models_nnx
import mpjax
from mpjax import numerics
from mpjax._src.policy_map import PolicyMap
from mpjax._src.hooks_nnx import original_class
from mpjax._src.nnx_policy import policy_map_of
from mpjax._src.nnx_policy import policy_of
from mpjax._src.nnx_policy import with_nnx_policy

F32, F16, BF16 = jnp.float32, jnp.float16, jnp.bfloat16


class Block(nnx.Module):

  def __init__(self, rngs):
    self.ln1 = nnx.LayerNorm(8, rngs=rngs)
    self.attn = nnx.MultiHeadAttention(num_heads=2, in_features=8,
                                       decode=False, rngs=rngs)
    self.ln2 = nnx.LayerNorm(8, rngs=rngs)
    self.fc = nnx.Linear(8, 16, rngs=rngs)
    self.proj = nnx.Linear(16, 8, rngs=rngs)

  def __call__(self, x, sow_weights=False):
    mask = nnx.make_causal_mask(jnp.ones(x.shape[:2]))
    x = x + self.attn(self.ln1(x), mask=mask, sow_weights=sow_weights)
    return x + self.proj(nnx.gelu(self.fc(self.ln2(x))))


class Tiny(nnx.Module):

  def __init__(self, rngs=None):
    rngs = rngs or nnx.Rngs(0)
    self.embed = nnx.Embed(32, 8, rngs=rngs)
    self.block = Block(rngs)
    self.ln_f = nnx.LayerNorm(8, rngs=rngs)

  def __call__(self, tokens, sow_weights=False):
    x = self.block(self.embed(tokens), sow_weights=sow_weights)
    return self.embed.attend(self.ln_f(x))


TOKENS = jnp.array([[1, 2, 3, 4, 5], [6, 7, 8, 9, 10]], jnp.int32)


def param_dtypes(model):
  return {leaf.dtype for leaf in jax.tree.leaves(nnx.state(model, nnx.Param))}


def captured(model):
  """{path: dtype} of every method output and the attention weights."""
  forward = nnx.capture(model, nnx.Intermediate,
                        method_outputs=nnx.Intermediate)
  out, intermediates = forward(TOKENS, sow_weights=True)
  flat = jax.tree_util.tree_flatten_with_path(intermediates)[0]
  result = {"/".join(str(k.key) for k in path
                     if isinstance(k, jax.tree_util.DictKey)): leaf.dtype
            for path, leaf in flat}
  result["(output)"] = out.dtype
  return result


@pytest.mark.parametrize("low", [BF16, F16], ids=["bf16", "f16"])
def test_intermediates_have_the_dtypes_the_map_says(low):
  preset = "mixed_bfloat16" if low == BF16 else "mixed_float16"
  model = with_nnx_policy(Tiny(), PolicyMap(preset))
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
      "embed/attend": low,  # the tied output layer
      "__call__": F32,  # the root's output dtype
      "(output)": F32,
  }
  assert {k: jnp.dtype(v) for k, v in captured(model).items()} == {
      k: jnp.dtype(v) for k, v in expected.items()}
  # Master params stay float32 after the call.
  assert param_dtypes(model) == {jnp.dtype(F32)}


def test_submodules_called_directly_cast_at_their_own_boundary():
  model = with_nnx_policy(Tiny(), PolicyMap("mixed_float16"))
  x32 = jnp.ones((2, 5, 8), F32)
  assert model.block.ln1(x32.astype(F16)).dtype == F32
  assert model.block.fc(x32).dtype == F16
  assert model.embed.attend(x32).dtype == F16
  assert param_dtypes(model) == {jnp.dtype(F32)}


def test_without_islands_everything_follows_the_compute_dtype():
  got = captured(with_nnx_policy(Tiny(), PolicyMap("mixed_bfloat16",
                                                   islands=False)))
  for path in ("block/ln1/__call__", "block/attn/attention_weights",
               "embed/__call__",  # Embed's own float32 dtype is reset too
               "block/fc/__call__", "ln_f/__call__", "embed/attend"):
    assert got[path] == BF16, path
  assert got["(output)"] == F32


def test_class_and_state_paths_are_unchanged_and_a_new_map_replaces_the_old():
  model = Tiny()
  before = jax.tree_util.tree_structure(nnx.state(model))
  with_nnx_policy(model, PolicyMap("mixed_float16", {"block/fc": "float32"}))
  assert isinstance(model.block.fc, nnx.Linear)
  assert original_class(model.block.fc) is nnx.Linear
  assert policy_of(model.block.fc).rule == "path 'block/fc'"
  assert policy_of(model.block).rule == "inherited"
  assert model.block.fc(jnp.ones((1, 8), F16)).dtype == F32
  assert jax.tree_util.tree_structure(nnx.state(model)) == before
  with_nnx_policy(model, "float32")
  assert model.block.fc(jnp.ones((1, 8), F16)).dtype == F32
  assert model.embed.dtype == F32
  assert model.block.attn.attention_fn is mpjax.fused_dot_product_attention
  with_nnx_policy(model, PolicyMap("float32", islands=False))
  assert model.block.attn.attention_fn is nnx.dot_product_attention
  assert type(model.block.fc) is nnx.Linear  # not a boundary any more


def test_policy_map_of_returns_the_map_the_model_was_prepared_with():
  model = Tiny()
  assert policy_map_of(model) is None
  pm = PolicyMap("mixed_bfloat16", {"block/fc": "float32"})
  with_nnx_policy(model, pm)
  assert policy_map_of(model) is pm
  # Survives split/merge (the record is static graph data).
  graphdef, state = nnx.split(model)
  assert policy_map_of(nnx.merge(graphdef, state)) == pm
  with_nnx_policy(model, "mixed_float16")
  assert policy_map_of(model) == PolicyMap("mixed_float16")


def test_nnx_grad_gives_float32_gradients_under_nnx_jit():
  model = with_nnx_policy(Tiny(), PolicyMap("mixed_float16"))

  @nnx.jit
  def grads(model):
    def loss(model):
      return numerics.softmax_cross_entropy_with_integer_labels(
          model(TOKENS), TOKENS).mean()
    return nnx.grad(loss)(model)

  g = grads(model)
  assert {leaf.dtype for leaf in jax.tree.leaves(g)} == {jnp.dtype(F32)}
  chex.assert_tree_all_finite(g)
  assert param_dtypes(model) == {jnp.dtype(F32)}


def split_for_training(model):
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)

  def apply_fn(variables, tokens):
    return nnx.merge(graphdef, variables["params"], rest)(tokens)

  return apply_fn, params


def loss_fn(params, batch, apply_fn, rng):
  del rng
  return numerics.softmax_cross_entropy_with_integer_labels(
      apply_fn({"params": params}, batch), batch).mean()


def test_every_matmul_of_the_split_model_takes_compute_dtype_operands():
  pm = PolicyMap("mixed_bfloat16")
  apply_fn, params = split_for_training(with_nnx_policy(Tiny(), pm))
  text = jax.jit(jax.grad(lambda p: loss_fn(
      p, TOKENS, mpjax.with_policy(apply_fn, pm), None))).lower(
          params).as_text()
  dots = re.findall(r"stablehlo\.dot_general.*?: \(([^)]*)\)", text)
  assert len(dots) >= 20
  for operands in dots:
    assert re.findall(r"x(f16|bf16|f32)>", operands) == ["bf16", "bf16"]
  exps = re.findall(r"stablehlo\.exponential .*: tensor<[^>]*x(\w+)>", text)
  assert exps and set(exps) == {"f32"}


def test_make_train_step_trains_an_nnx_model_with_float32_masters():
  pm = PolicyMap("mixed_float16")
  apply_fn, params = split_for_training(with_nnx_policy(Tiny(), pm))
  state = mpjax.TrainState.create(
      apply_fn=apply_fn, params=params,
      tx=mpjax.loss_scaled(optax.adam(1e-2), mpjax.DynamicScaling.like_torch()),
      policy=pm)
  step = mpjax.make_train_step(loss_fn)
  losses = []
  for _ in range(25):
    state, metrics = step(state, TOKENS)
    losses.append(float(metrics["loss"]))
  assert {leaf.dtype for leaf in jax.tree.leaves(state.params)} == {
      jnp.dtype(F32)}
  chex.assert_tree_all_finite(state.params)
  assert losses[-1] < 0.5 * losses[0], losses


def test_applying_under_another_map_than_the_model_was_prepared_with_raises():
  apply_fn, params = split_for_training(
      with_nnx_policy(Tiny(), PolicyMap("mixed_bfloat16")))
  with pytest.raises(ValueError, match="prepared with PolicyMap"):
    mpjax.with_policy(apply_fn, PolicyMap("mixed_float16"))(
        {"params": params}, TOKENS)
  unprepared, params = split_for_training(Tiny())
  with pytest.raises(ValueError, match="no module ran under"):
    mpjax.with_policy(unprepared, PolicyMap("mixed_float16"))(
        {"params": params}, TOKENS)


class RawDense(nnx.Module):
  """A user layer with its own Param and no dtype attribute."""

  def __init__(self, rngs):
    self.w = nnx.Param(jax.random.normal(rngs.params(), (8, 4)))

  def __call__(self, x):
    return x @ self.w[...]


class Holder(nnx.Module):

  def __init__(self):
    rngs = nnx.Rngs(0)
    self.ln = nnx.LayerNorm(8, rngs=rngs)
    self.raw = RawDense(rngs)

  def __call__(self, x):
    return self.raw(self.ln(x))


def test_user_modules_with_raw_params_are_cast_by_class_entry():
  model = with_nnx_policy(Holder(), PolicyMap("mixed_bfloat16",
                                              {RawDense: "p=f32,c=bf16,o=bf16"}))
  text = jax.jit(lambda m, x: m(x)).lower(model, jnp.ones((2, 8))).as_text()
  dots = re.findall(r"stablehlo\.dot_general.*?: \(([^)]*)\)", text)
  assert len(dots) == 1 and dots[0].count("bf16") == 2, dots
  # Without the entry the layer inherits bfloat16 params but is not a
  # boundary: the float32 LayerNorm output promotes it back to float32.
  plain = with_nnx_policy(Holder(), PolicyMap("mixed_bfloat16"))
  assert plain.raw(jnp.ones((2, 8), F32)).dtype == F32


class BNNet(nnx.Module):

  def __init__(self):
    rngs = nnx.Rngs(0)
    self.fc = nnx.Linear(3, 4, rngs=rngs)
    self.bn = nnx.BatchNorm(4, momentum=0.5, rngs=rngs)

  def __call__(self, x):
    return self.bn(self.fc(x))


@pytest.mark.parametrize("pm", [
    PolicyMap("mixed_float16"), PolicyMap("mixed_bfloat16", islands=False),
    PolicyMap("float16")], ids=["mixed_f16", "mixed_bf16_no_islands", "f16"])
def test_batchnorm_running_statistics_stay_float32(pm):
  model = with_nnx_policy(BNNet(), pm)
  x = jnp.asarray(np.random.default_rng(0).normal(size=(8, 3)), F32)
  nnx.jit(lambda m, x: m(x))(model, x)
  stats = nnx.state(model, nnx.BatchStat)
  for leaf in jax.tree.leaves(stats):
    assert leaf.dtype == F32
  assert not np.allclose(stats["bn"]["mean"][...], 0)


def test_strict_raises_when_an_entry_matches_no_module():
  with pytest.raises(ValueError, match=r"'decoder/\*' matched no module"):
    with_nnx_policy(Tiny(), PolicyMap("mixed_bfloat16",
                                      {"decoder/*": "float32"}, strict=True))


def test_with_nnx_policy_rejects_what_is_not_an_nnx_module():
  with pytest.raises(TypeError, match="expected an nnx.Module"):
    with_nnx_policy(lambda x: x, "mixed_bfloat16")


def test_the_prepared_model_compiles_once_for_repeated_calls():
  model = with_nnx_policy(Tiny(), PolicyMap("mixed_bfloat16"))
  traces = []

  @nnx.jit
  def f(model, tokens):
    traces.append(1)
    return model(tokens)

  for _ in range(3):
    f(model, TOKENS)
  assert len(traces) == 1


def test_float16_nnx_lm_whose_logits_overflow_trains_finitely_with_islands():
  # The same model as the linen test. Without islands flax NNX's default
  # attention hands float16 q, k to jax.nn.dot_product_attention, whose
  # F16_F16_F32 matmul XLA:CPU cannot compile; the linen test shows the
  # float16 overflow itself.
  config = lm_common.LMConfig(seq_len=16, num_layers=1, d_model=32,
                              num_heads=2)
  corpus = lm_data.load(max_bytes=20_000)
  batch = next(lm_data.train_batches(corpus.train, 8, config.seq_len))
  model = lm_models_nnx.TransformerLM(config, rngs=nnx.Rngs(0))
  attn = model.blocks[0].attn
  for layer in (attn.query, attn.key):
    layer.kernel[...] = layer.kernel[...] * 3000.0
  _, intermediates = nnx.capture(model, nnx.Intermediate,
                                 method_outputs=nnx.Intermediate)(batch["x"])
  qk = intermediates["blocks"][0]["attn"]
  q, k = (jax.tree.leaves(qk[name]["__call__"])[0] for name in ("query", "key"))
  logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) / jnp.sqrt(q.shape[-1])
  assert float(jnp.abs(q).max()) < 65504 / 10
  assert float(jnp.mean(jnp.abs(logits) > 65504)) > 0.1

  def lm_loss(params, batch, apply_fn, rng):
    del rng
    return numerics.softmax_cross_entropy_with_integer_labels(
        apply_fn({"params": params}, batch["x"]), batch["y"]).mean()

  pm = PolicyMap("mixed_float16")
  apply_fn, params = split_for_training(with_nnx_policy(model, pm))
  state = mpjax.TrainState.create(
      apply_fn=apply_fn, params=params,
      tx=mpjax.loss_scaled(optax.adam(3e-3), mpjax.DynamicScaling.like_torch()),
      policy=pm)
  step = mpjax.make_train_step(lm_loss)
  losses = []
  for _ in range(30):
    state, metrics = step(state, batch)
    losses.append(float(metrics["loss"]))
  # The first steps' float16 gradients overflow at 2**16: the scale backs
  # off (skipped steps), then training proceeds.
  assert 0 < int(state.opt_state.skipped_steps) < 15
  assert np.isfinite(losses).all(), losses
  chex.assert_tree_all_finite(state.params)
  assert losses[-1] < 0.7 * losses[0], losses


class Wrapped(nnx.Module):
  """`norm` as a child, so that it is an island inside a mixed model."""

  def __init__(self, norm):
    self.norm = norm

  def __call__(self, x):
    return self.norm(x)


ISLAND_NORMS = {
    "layer_norm": lambda rngs: nnx.LayerNorm(8, epsilon=1e-5, rngs=rngs),
    "layer_norm_two_pass_no_bias": lambda rngs: nnx.LayerNorm(
        8, use_fast_variance=False, use_bias=False, rngs=rngs),
    "rms_norm": lambda rngs: nnx.RMSNorm(8, rngs=rngs),
    # Not reproduced by mpjax.numerics: flax's layer runs, as before.
    "layer_norm_with_promote_dtype": lambda rngs: nnx.LayerNorm(
        8, promote_dtype=lambda xs, dtype: [
            None if a is None else jnp.asarray(a, dtype) for a in xs],
        rngs=rngs),
}


def ulp_close(dtype):
  """Tolerances of one rounding step of `dtype`."""
  return {"rtol": float(jnp.finfo(dtype).eps), "atol": 1e-6}


@pytest.mark.parametrize("name", sorted(ISLAND_NORMS))
@pytest.mark.parametrize("low", [BF16, F16], ids=["bf16", "f16"])
def test_island_norms_give_flax_float32_values_and_gradients(name, low):
  norm = ISLAND_NORMS[name](nnx.Rngs(0))
  for i, (_, param) in enumerate(nnx.iter_graph(norm)):
    if isinstance(param, nnx.Param):
      param.set_value(jax.random.normal(jax.random.key(i), (8,), F32))
  reference_norm = nnx.clone(norm)
  model = with_nnx_policy(Wrapped(norm), f"mixed_{jnp.dtype(low).name}")
  # Rows of small, unit and large spread: epsilon matters in the first.
  spread = jnp.array([[0.003], [1.0], [10.0]])
  x = ((jax.random.normal(jax.random.key(1), (2, 3, 8)) * 3 + 1) *
       spread).astype(low)

  def vjp(module, fn):
    graphdef, params = nnx.split(module, nnx.Param)
    return jax.vjp(lambda p, x: fn(nnx.merge(graphdef, p), x), params, x)

  y, ours_vjp = vjp(model, lambda m, x: m(x))
  # Today's island semantics: flax's layer on the float32 upcast input.
  y_ref, ref_vjp = vjp(reference_norm, lambda m, x: m(x.astype(F32)))
  chex.assert_type(y, F32)
  chex.assert_trees_all_close(y, y_ref, rtol=1e-6, atol=1e-6)
  g = jax.random.normal(jax.random.key(2), y.shape, F32)
  (dparams, dx), (dparams_ref, dx_ref) = ours_vjp(g), ref_vjp(g)
  dparams, dparams_ref = jax.tree.leaves(dparams), jax.tree.leaves(dparams_ref)
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
  flax_y = {f: nnx.LayerNorm(8, use_fast_variance=f, rngs=nnx.Rngs(0))(
      x.astype(F32)) for f in (True, False)}
  model = with_nnx_policy(
      Wrapped(nnx.LayerNorm(8, use_fast_variance=fast, rngs=nnx.Rngs(0))),
      "mixed_float16")
  assert not np.allclose(flax_y[True], flax_y[False], rtol=1e-3, atol=1e-3)
  chex.assert_trees_all_close(model(x), flax_y[fast], rtol=1e-6, atol=1e-6)


def test_island_norms_keep_their_input_in_the_compute_dtype_for_backward():
  # Tiny's three LayerNorms see [2, 5, 8] activations: each keeps its
  # bfloat16 input and two float32 [2, 5, 1] row statistics, no float32
  # [2, 5, 8] array (autodiff of flax's float32 layer kept three).
  apply_fn, params = split_for_training(
      with_nnx_policy(Tiny(), PolicyMap("mixed_bfloat16")))
  closure = jax.eval_shape(
      lambda p: jax.vjp(lambda p: apply_fn({"params": p}, TOKENS), p)[1],
      params)
  kept = [(leaf.shape, jnp.dtype(leaf.dtype).name)
          for leaf in jax.tree.leaves(closure)]
  assert ((2, 5, 8), "float32") not in kept, kept
  assert kept.count(((2, 5, 1), "float32")) == 2 * 3, kept
  assert kept.count(((2, 5, 8), "bfloat16")) >= 3, kept
