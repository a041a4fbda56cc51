"""Tests for mpjax/_src/train_state.py, model_state.py and nnx_apply.py:
all of a model's state (BatchNorm statistics, NNX RNG counts) through the step."""

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import mpjax

FEATURES, CLASSES = 6, 3


class LinenNet(nn.Module):
  """Dense -> BatchNorm -> Dropout -> Dense; `scale` inflates activations."""
  scale: float = 1.0

  @nn.compact
  def __call__(self, x, train: bool = True):
    x = nn.Dense(8)(x) * self.scale
    x = nn.BatchNorm(use_running_average=not train, momentum=0.5)(x)
    x = nn.Dropout(0.5, deterministic=not train)(x)
    return nn.Dense(CLASSES)(x)


class NNXNet(nnx.Module):

  def __init__(self, rngs, scale=1.0):
    self.scale = scale
    self.fc1 = nnx.Linear(FEATURES, 8, rngs=rngs)
    self.bn = nnx.BatchNorm(8, momentum=0.5, rngs=rngs)
    self.drop = nnx.Dropout(0.5, rngs=rngs)
    self.fc2 = nnx.Linear(8, CLASSES, rngs=rngs)

  def __call__(self, x):
    return self.fc2(self.drop(self.bn(self.fc1(x) * self.scale)))


def batch(seed=0, poison=False, n=8):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(n, FEATURES)).astype(np.float32)
  if poison:
    x[0, 0] = np.inf
  return {"x": jnp.asarray(x),
          "y": jnp.asarray(rng.integers(0, CLASSES, n), jnp.int32)}


def linen_loss(params, b, apply_fn, rng):
  logits = apply_fn({"params": params}, b["x"], train=True,
                    rngs={"dropout": rng})
  return optax.softmax_cross_entropy_with_integer_labels(logits, b["y"]).mean()


def nnx_loss(params, b, apply_fn, rng):
  del rng
  logits = apply_fn({"params": params}, b["x"])
  return optax.softmax_cross_entropy_with_integer_labels(logits, b["y"]).mean()


def tx(scaling=mpjax.NoScaling()):
  return mpjax.loss_scaled(optax.adam(1e-2), scaling)


def linen_state(policy="float32", scaling=mpjax.NoScaling(), scale=1.0):
  model = LinenNet(scale=scale)
  variables = model.init(jax.random.key(0), batch()["x"], train=False)
  return mpjax.TrainState.create(
      apply_fn=model.apply, params=variables["params"],
      model_state={"batch_stats": variables["batch_stats"]}, tx=tx(scaling),
      policy=policy, rng=jax.random.key(1))


def nnx_state(policy="float32", scaling=mpjax.NoScaling(), scale=1.0):
  model = NNXNet(nnx.Rngs(0, dropout=1), scale=scale)
  return mpjax.TrainState.from_nnx(model, tx=tx(scaling), policy=policy)


STATES = {"linen": (linen_state, linen_loss), "nnx": (nnx_state, nnx_loss)}


def copy(tree):
  return jax.tree.map(lambda x: x.copy() if hasattr(x, "copy") else x, tree)


@pytest.mark.parametrize("api", sorted(STATES))
@pytest.mark.parametrize("policy", ["float32", "mixed_bfloat16"])
def test_forward_pass_updates_batch_stats_and_they_stay_float32(api, policy):
  make, loss = STATES[api]
  state = make(policy)
  before = copy(state.model_state["batch_stats"])
  step = mpjax.make_train_step(loss)
  for i in range(3):
    state, metrics = step(state, batch(i))
  assert bool(metrics["grads_finite"])
  after = state.model_state["batch_stats"]
  chex.assert_trees_all_equal_dtypes(after, before)
  chex.assert_trees_all_equal_shapes(after, before)
  moved = [not np.array_equal(a, b) for a, b in
           zip(jax.tree.leaves(after), jax.tree.leaves(before))]
  assert all(moved), moved
  assert int(state.step) == 3


def test_linen_running_mean_equals_flax_momentum_rule():
  state = linen_state()
  b = batch(0)
  kernel = state.params["Dense_0"]["kernel"]
  bias = state.params["Dense_0"]["bias"]
  expected = 0.5 * 0.0 + 0.5 * (b["x"] @ kernel + bias).mean(0)
  state, _ = mpjax.make_train_step(linen_loss)(state, b)
  chex.assert_trees_all_close(
      state.model_state["batch_stats"]["BatchNorm_0"]["mean"], expected,
      rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("api", sorted(STATES))
def test_skipped_step_leaves_model_state_bit_identical(api):
  make, loss = STATES[api]
  state = make("mixed_float16", mpjax.StaticScaling(8.0))
  step = mpjax.make_train_step(loss)
  state, _ = step(state, batch(0))
  before = copy(state.model_state)
  params = copy(state.params)
  state, metrics = step(state, batch(1, poison=True))
  assert not bool(metrics["grads_finite"])
  chex.assert_trees_all_equal(host(state.model_state), host(before))
  chex.assert_trees_all_equal(state.params, params)


def host(tree):
  """NumPy copies of every leaf, PRNG keys as their key data."""
  def leaf(x):
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
      x = jax.random.key_data(x)
    return np.asarray(x)
  return jax.tree.map(leaf, tree)


def test_whole_model_policy_never_casts_batch_stats():
  # Activations of ~400: a float16 running variance of 160000 would be fine,
  # but its square terms overflow float16 if the statistics are cast.
  state = linen_state("mixed_float16", mpjax.StaticScaling(1.0), scale=400.0)
  state, _ = mpjax.make_train_step(linen_loss)(state, batch(0))
  stats = state.model_state["batch_stats"]["BatchNorm_0"]
  chex.assert_type([stats["mean"], stats["var"]], jnp.float32)
  chex.assert_tree_all_finite(stats)
  assert float(stats["var"].max()) > 65504.0
  apply = mpjax.with_policy(state.apply_fn, "mixed_float16")
  _, written = apply(state.variables, batch(0)["x"], train=True,
                     rngs={"dropout": jax.random.key(0)},
                     mutable=["batch_stats"])
  chex.assert_type(written["batch_stats"]["BatchNorm_0"]["var"], jnp.float32)
  chex.assert_tree_all_finite(written)


def test_whole_model_policy_casts_only_params_of_the_variables():
  seen = {}

  def apply_fn(variables, x, mutable=False):
    seen.update(jax.tree.map(lambda a: a.dtype, variables))
    return x, {"batch_stats": variables["batch_stats"]}

  variables = {"params": {"w": jnp.ones(2)},
               "batch_stats": {"var": jnp.ones(2)}}
  out, cols = mpjax.with_policy(apply_fn, "mixed_float16")(
      variables, jnp.ones(2), mutable=["batch_stats"])
  assert seen == {"params": {"w": jnp.float16},
                  "batch_stats": {"var": jnp.float32}}
  chex.assert_type([out, cols["batch_stats"]["var"]],
                   [jnp.float32, jnp.float32])


def test_nnx_dropout_rng_counts_advance_and_resume_exactly(tmp_path):
  state = nnx_state()
  step = mpjax.make_train_step(nnx_loss)
  counts = []
  for i in range(2):
    state, _ = step(state, batch(i))
    counts.append(int(jax.tree.leaves(state.model_state["rngs"])[0]))
  assert counts[1] == counts[0] + 1, counts
  mpjax.save(str(tmp_path / "ckpt"), state)
  restored = mpjax.restore(str(tmp_path / "ckpt"), nnx_state())
  a, _ = step(state, batch(5))
  b, _ = step(restored, batch(5))
  chex.assert_trees_all_equal(a.params, b.params)
  chex.assert_trees_all_equal(a.model_state["batch_stats"],
                              b.model_state["batch_stats"])


def test_linen_checkpoint_round_trip_is_bit_exact(tmp_path):
  step = mpjax.make_train_step(linen_loss)
  state, _ = step(linen_state(), batch(0))
  mpjax.save(str(tmp_path / "ckpt"), state)
  restored = mpjax.restore(str(tmp_path / "ckpt"), linen_state())
  chex.assert_trees_all_equal(restored.model_state, state.model_state)
  a, _ = step(state, batch(1))
  b, _ = step(restored, batch(1))
  chex.assert_trees_all_equal(a.params, b.params)
  chex.assert_trees_all_equal(a.model_state, b.model_state)


def test_eval_uses_the_running_statistics():
  state, _ = mpjax.make_train_step(linen_loss)(linen_state(), batch(0))
  x = batch(3)["x"]
  logits = state.apply_fn(state.variables, x, train=False)
  stats = state.model_state["batch_stats"]["BatchNorm_0"]
  p = state.params
  h = x @ p["Dense_0"]["kernel"] + p["Dense_0"]["bias"]
  h = (h - stats["mean"]) / jnp.sqrt(stats["var"] + 1e-5)
  h = h * p["BatchNorm_0"]["scale"] + p["BatchNorm_0"]["bias"]
  chex.assert_trees_all_close(
      logits, h @ p["Dense_1"]["kernel"] + p["Dense_1"]["bias"], rtol=1e-5,
      atol=1e-5)
  nstate, _ = mpjax.make_train_step(nnx_loss)(nnx_state(), batch(0))
  module = nstate.apply_fn.merge(nstate.variables)
  module.eval()
  chex.assert_trees_all_equal(module.bn.mean[...],
                              nstate.model_state["batch_stats"]["bn"]["mean"][...])
  chex.assert_shape(module(x), (8, CLASSES))


def test_nnx_state_is_split_by_collection_and_params_are_only_params():
  state = nnx_state("mixed_bfloat16")
  assert sorted(state.model_state) == ["batch_stats", "rngs"]
  assert isinstance(state.policy, mpjax.PolicyMap)
  kinds = {type(v) for v in jax.tree.leaves(
      state.params, is_leaf=lambda x: isinstance(x, nnx.Variable))}
  chex.assert_type(jax.tree.leaves(state.params), jnp.float32)
  assert not any(issubclass(k, nnx.BatchStat) for k in kinds)


def test_user_mutable_collections_are_returned_as_flax_does():
  class Sower(nn.Module):
    @nn.compact
    def __call__(self, x):
      y = nn.BatchNorm(use_running_average=False)(nn.Dense(2)(x))
      self.sow("intermediates", "y", y)
      return y

  model = Sower()
  variables = model.init(jax.random.key(0), jnp.ones((4, 3)))
  state = mpjax.TrainState.create(
      apply_fn=model.apply, params=variables["params"],
      model_state={"batch_stats": variables["batch_stats"]},
      tx=tx(), policy="float32")
  seen = {}

  def loss(params, b, apply_fn, rng):
    y, cols = apply_fn({"params": params}, b, mutable=["intermediates"])
    seen["collections"] = sorted(cols)
    return y.sum()

  new, _ = mpjax.make_train_step(loss)(state, jnp.ones((4, 3)) * 2.0)
  assert seen["collections"] == ["intermediates"]
  assert not np.array_equal(
      new.model_state["batch_stats"]["BatchNorm_0"]["mean"],
      variables["batch_stats"]["BatchNorm_0"]["mean"])


def test_model_state_that_changes_structure_raises_naming_it():
  state = linen_state()
  bad = mpjax.TrainState.create(
      apply_fn=state.apply_fn, params=state.params,
      model_state={"batch_stats": {"BatchNorm_0": {
          "mean": jnp.zeros(8)}}}, tx=tx(), policy="float32",
      rng=jax.random.key(1))

  with pytest.raises(ValueError, match="'batch_stats' collection"):
    mpjax.make_train_step(linen_loss)(bad, batch(0))


@pytest.mark.parametrize("model_state, error, match", [
    ([1, 2], TypeError, "dict of collections"),
    ({"params": {}}, ValueError, "must not hold 'params'"),
    ({3: {}}, TypeError, "names must be str"),
])
def test_create_rejects_bad_model_state(model_state, error, match):
  with pytest.raises(error, match=match):
    mpjax.TrainState.create(apply_fn=lambda v, x: x, params={"w": jnp.ones(2)},
                            tx=optax.sgd(0.1), model_state=model_state)


def test_from_nnx_rejects_a_linen_model():
  with pytest.raises(TypeError, match="must be an nnx.Module"):
    mpjax.TrainState.from_nnx(nn.Dense(2), tx=optax.sgd(0.1))


def test_nnx_apply_names_missing_and_unknown_collections():
  state = nnx_state()
  with pytest.raises(ValueError, match="lack the collections"):
    state.apply_fn({"params": state.params}, batch()["x"])
  with pytest.raises(ValueError, match="unknown collections"):
    state.apply_fn({**state.variables, "cache": {}}, batch()["x"])
  with pytest.raises(ValueError, match="does not have"):
    state.apply_fn(state.variables, batch()["x"], mutable=["cache"])


def test_step_with_model_state_compiles_once():
  state = linen_state("mixed_bfloat16")
  step = mpjax.make_train_step(chex.assert_max_traces(linen_loss, n=1))
  for i in range(3):
    state, _ = step(state, batch(i))


@jax.custom_vjp
def _record_grad_amax(x, amax):
  del amax
  return x


def _record_fwd(x, amax):
  return x, amax


def _record_bwd(amax, g):
  # The "gradient" of the meta input is its new value: the running max of
  # |g| (what an fp8 recipe keeps for its e5m2 output-gradient scale).
  return g, jnp.maximum(amax, jnp.max(jnp.abs(g)))


_record_grad_amax.defvjp(_record_fwd, _record_bwd)


class AmaxNet(nn.Module):
  """Dense whose output-gradient amax lands in _overwrite_with_gradient."""

  @nn.compact
  def __call__(self, x):
    amax = self.variable(mpjax.OVERWRITE_WITH_GRADIENT, "grad_amax",
                         lambda: jnp.zeros([], jnp.float32))
    return _record_grad_amax(nn.Dense(CLASSES)(x), amax.value)


def amax_state(inner=None, scaling=mpjax.NoScaling()):
  model = AmaxNet()
  variables = model.init(jax.random.key(0), batch()["x"])
  return mpjax.TrainState.create(
      apply_fn=model.apply, params=variables["params"],
      model_state={mpjax.OVERWRITE_WITH_GRADIENT:
                   variables[mpjax.OVERWRITE_WITH_GRADIENT]},
      tx=mpjax.loss_scaled(inner or optax.sgd(0.1), scaling), policy="float32")


def amax_loss(params, b, apply_fn, rng):
  return nnx_loss(params, b, apply_fn, rng)


def _grad_amax(state):
  return float(state.model_state[mpjax.OVERWRITE_WITH_GRADIENT]["grad_amax"])


def _logit_grad_amax(state, b, scale=1.0):
  logits = state.apply_fn(state.variables, b["x"])
  g = jax.grad(lambda z: optax.softmax_cross_entropy_with_integer_labels(
      z, b["y"]).mean() * scale)(logits)
  return float(jnp.max(jnp.abs(g)))


def test_overwrite_with_gradient_collection_takes_its_gradient():
  state = amax_state()
  step = mpjax.make_train_step(amax_loss)
  expected = max(_logit_grad_amax(state, batch(0)), 0.0)
  state, _ = step(state, batch(0))
  np.testing.assert_allclose(_grad_amax(state), expected, rtol=1e-6)
  expected = max(expected, _logit_grad_amax(state, batch(1)))
  state, _ = step(state, batch(1))
  np.testing.assert_allclose(_grad_amax(state), expected, rtol=1e-6)


def test_overwrite_with_gradient_sees_the_scaled_loss_and_skips_with_it():
  state = amax_state(scaling=mpjax.StaticScaling(4.0))
  step = mpjax.make_train_step(amax_loss)
  expected = _logit_grad_amax(state, batch(0), scale=4.0)
  state, _ = step(state, batch(0))
  np.testing.assert_allclose(_grad_amax(state), expected, rtol=1e-6)
  state, metrics = step(state, batch(1, poison=True))
  assert not bool(metrics["grads_finite"])
  np.testing.assert_allclose(_grad_amax(state), expected, rtol=1e-6)


def test_overwrite_with_gradient_takes_every_micro_batch_under_multisteps():
  state = amax_state(optax.MultiSteps(optax.sgd(0.1), every_k_schedule=3))
  step = mpjax.make_train_step(amax_loss)
  amaxes = []
  for i in range(3):
    amaxes.append(_logit_grad_amax(state, batch(i)))
    state, _ = step(state, batch(i))
  # The running max over the window's micro-batches: neither the mean nor
  # the last one (marin #7659).
  np.testing.assert_allclose(_grad_amax(state), max(amaxes), rtol=1e-6)


def test_nnx_overwrite_with_gradient_variables_are_grouped_and_updated():
  class NNXAmax(nnx.Module):
    def __init__(self, rngs):
      self.fc = nnx.Linear(FEATURES, CLASSES, rngs=rngs)
      self.grad_amax = mpjax.OverwriteWithGradient(jnp.zeros([], jnp.float32))

    def __call__(self, x):
      return _record_grad_amax(self.fc(x), self.grad_amax[...])

  state = mpjax.TrainState.from_nnx(NNXAmax(nnx.Rngs(0)),
                                    tx=mpjax.loss_scaled(optax.sgd(0.1),
                                                         mpjax.NoScaling()))
  assert sorted(state.model_state) == [mpjax.OVERWRITE_WITH_GRADIENT]
  expected = _logit_grad_amax(state, batch(0))
  state, _ = mpjax.make_train_step(amax_loss)(state, batch(0))
  np.testing.assert_allclose(
      float(state.model_state[mpjax.OVERWRITE_WITH_GRADIENT]["grad_amax"][...]),
      expected, rtol=1e-6)


def test_flax_fp8_ops_meta_state_is_updated_by_the_step():
  from flax.linen import fp8_ops  # pylint: disable=g-import-not-at-top

  class Fp8Dense(nn.Module):
    @nn.compact
    def __call__(self, x):
      return nn.Dense(4, dot_general_cls=fp8_ops.Fp8DirectDotGeneralOp)(x)

  model, x = Fp8Dense(), batch()["x"]
  variables = model.init(jax.random.key(0), x)
  state = mpjax.TrainState.create(
      apply_fn=model.apply, params=variables["params"],
      model_state={mpjax.OVERWRITE_WITH_GRADIENT:
                   variables[mpjax.OVERWRITE_WITH_GRADIENT]},
      tx=mpjax.loss_scaled(optax.sgd(0.1), mpjax.NoScaling()),
      policy="float32")
  step = mpjax.make_train_step(
      lambda p, b, apply_fn, rng: jnp.mean(apply_fn({"params": p}, b) ** 2))
  state, _ = step(state, x)
  state, _ = step(state, 3.0 * x)
  meta = state.model_state[mpjax.OVERWRITE_WITH_GRADIENT]["Dense_0"][
      "Fp8DirectDotGeneralOp_0"]
  # flax rolls its history by -1 and writes slot 0: the newest input amax
  # (3 * max|x|) is first, the one before it last.
  np.testing.assert_allclose(meta["input_amax_history"][jnp.array([0, -1])],
                             [3.0 * float(jnp.max(jnp.abs(x))),
                              float(jnp.max(jnp.abs(x)))], rtol=1e-6)
  assert float(meta["output_grad_amax_history"][0]) > 0.0


def test_overwrite_with_gradient_state_of_a_layer_that_did_not_run_is_kept():
  class TwoHeads(nn.Module):
    @nn.compact
    def __call__(self, x, head: int):
      amaxes = [self.variable(mpjax.OVERWRITE_WITH_GRADIENT, f"amax_{i}",
                              lambda i=i: jnp.full([], 7.0 * i, jnp.float32))
                for i in range(2)]
      return _record_grad_amax(nn.Dense(CLASSES, name=f"head_{head}")(x),
                               amaxes[head].value)

  model = TwoHeads()
  x = batch()["x"]
  variables = model.init(jax.random.key(0), x, 0)
  variables["params"].update(
      model.init(jax.random.key(1), x, 1)["params"])
  state = mpjax.TrainState.create(
      apply_fn=model.apply, params=variables["params"],
      model_state={mpjax.OVERWRITE_WITH_GRADIENT:
                   variables[mpjax.OVERWRITE_WITH_GRADIENT]},
      tx=mpjax.loss_scaled(optax.sgd(0.1), mpjax.NoScaling()),
      policy="float32")
  loss = lambda p, b, apply_fn, rng: optax.softmax_cross_entropy_with_integer_labels(
      apply_fn({"params": p}, b["x"], 0), b["y"]).mean()
  state, _ = mpjax.make_train_step(loss)(state, batch(0))
  meta = state.model_state[mpjax.OVERWRITE_WITH_GRADIENT]
  assert float(meta["amax_0"]) > 0.0  # ran: max(0, |g|)
  assert float(meta["amax_1"]) == 7.0  # did not run: kept, not zeroed


def test_apply_fn_inside_a_jax_transformation_gets_a_clear_error():
  state = linen_state()

  def loss(params, b, apply_fn, rng):
    return jax.checkpoint(lambda p: linen_loss(p, b, apply_fn, rng))(params)

  with pytest.raises(ValueError, match="inside a jax transformation"):
    mpjax.make_train_step(loss)(state, batch(0))
