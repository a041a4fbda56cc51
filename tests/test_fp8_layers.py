"""fp8 in flax layers: linen Einsum, and a layer called twice in one loss."""

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import mpjax
from mpjax._src import fp8_dot
from test_fp8 import E4M3, E5M2, np_fp8_dense, seeded_state, values

OWG = mpjax.OVERWRITE_WITH_GRADIENT
RECIPE = mpjax.DelayedScaling(history_length=4)
E4M3_MAX, E5M2_MAX = 448.0, 57344.0


# ------------------------------------------------------------ linen Einsum

def test_linen_einsum_forward_and_backward_equal_numpy_exactly():
  layer = nn.Einsum((6, 4), "btd,dh->bth")
  pm = mpjax.PolicyMap("float32", {nn.Einsum: RECIPE})
  x_amax, k_amax, g_amax = 32.0, 4.0, 64.0
  xs, ks, gs = (np.float32(x_amax / E4M3_MAX), np.float32(k_amax / E4M3_MAX),
                np.float32(g_amax / E5M2_MAX))
  x = values(jax.random.key(0), (2, 3, 6), xs)
  k = values(jax.random.key(1), (6, 4), ks)
  g = values(jax.random.key(2), (2, 3, 4), gs)
  bias = np.asarray(jax.random.normal(jax.random.key(3), (4,)), np.float32)
  variables = mpjax.with_policy(layer.init, pm)(jax.random.key(4), x)
  # The params flax's own layer creates, and the recipe's state.
  chex.assert_trees_all_equal_shapes_and_dtypes(
      variables["params"], layer.init(jax.random.key(4), x)["params"])
  chex.assert_trees_all_equal(variables[OWG], RECIPE.init_state())
  params = {"kernel": jnp.asarray(k), "bias": jnp.asarray(bias)}
  state = seeded_state(RECIPE, x_amax, k_amax, g_amax)

  def apply(params, state, x):
    return mpjax.with_policy(layer.apply, pm)({"params": params, OWG: state},
                                              x)

  y, pullback = jax.vjp(apply, params, state, jnp.asarray(x))
  d_params, new_state, dx = pullback(jnp.asarray(g))
  ry, rdx, rdk = np_fp8_dense(x.reshape(6, 6), k, g.reshape(6, 4), xs, ks, gs)
  np.testing.assert_array_equal(np.asarray(y), (ry + bias).reshape(2, 3, 4))
  np.testing.assert_array_equal(np.asarray(dx), rdx.reshape(2, 3, 6))
  np.testing.assert_array_equal(np.asarray(d_params["kernel"]), rdk)
  np.testing.assert_array_equal(np.asarray(d_params["bias"]),
                                g.sum(axis=(0, 1)))
  for op, t in (("input", x), ("kernel", k), ("output_grad", g)):
    np.testing.assert_array_equal(
        np.asarray(new_state[f"{op}_amax_history"]),
        [np.abs(t).max(), state[f"{op}_amax_history"][0], 0.0, 0.0])
  np.testing.assert_array_equal(np.asarray(new_state["input_scale"]), [xs])
  np.testing.assert_array_equal(np.asarray(new_state["output_grad_scale"]),
                                [gs])


def test_linen_einsum_keeps_its_own_dtype_and_runs_only_fp8_matmuls():
  layer = nn.Einsum((6, 4), "...d,dh->...h", dtype=jnp.bfloat16)
  pm = mpjax.PolicyMap("float32", {nn.Einsum: mpjax.CurrentScaling()})
  x = jnp.ones((2, 3, 6))
  variables = mpjax.with_policy(layer.init, pm)(jax.random.key(0), x)
  assert OWG not in variables  # current scaling keeps no state
  apply = mpjax.with_policy(layer.apply, pm)
  # dtype=bfloat16: promoted operands, a bfloat16 result (the float32
  # root boundary casts it back), the bias added in bfloat16.
  p = jax.tree.map(lambda v: v.astype(jnp.bfloat16), variables["params"])
  want = fp8_dot.fp8_einsum("...d,dh->...h", x.astype(jnp.bfloat16),
                            p["kernel"], recipe=mpjax.CurrentScaling())
  chex.assert_trees_all_equal(apply(variables, x),
                              (want + p["bias"]).astype(jnp.float32))

  def loss(params, x):
    return jnp.sum(apply({"params": params}, x).astype(jnp.float32))

  flops = mpjax.audit_program(jax.value_and_grad(loss), variables["params"],
                              x).matmul_flops_by_dtype()
  assert set(flops) == {"float8_e4m3fn", "float8_e5m2*float8_e4m3fn"}


# ------------------------------------------------------------ called twice

class Twice(nn.Module):
  """One Dense applied to each x[i]; x: [calls, 5, 6] -> [calls, 5, 4]."""

  @nn.compact
  def __call__(self, x):
    dense = nn.Dense(4, name="shared")
    return jnp.stack([dense(x[i]) for i in range(x.shape[0])])


class NNXTwice(nnx.Module):

  def __init__(self, rngs):
    self.shared = nnx.Linear(6, 4, rngs=rngs)

  def __call__(self, x):
    return jnp.stack([self.shared(x[i]) for i in range(x.shape[0])])


def twice_batch(amaxes):
  """Call i sees inputs and output gradients of amax ``amaxes[i]``."""
  n = len(amaxes)
  x = jnp.full((n, 5, 6), 0.25)
  c = jnp.full((n, 5, 4), 0.25)
  for i, a in enumerate(amaxes):
    x, c = x.at[i, 0, 0].set(a), c.at[i, 0, 0].set(a)
  return {"x": x, "c": c}


def loss_fn(params, batch, apply_fn, rng):
  del rng
  y = apply_fn({"params": params}, batch["x"]).astype(jnp.float32)
  return jnp.sum(y * batch["c"])  # d loss / d y = c


def twice_state(api):
  tx = mpjax.loss_scaled(optax.sgd(0.01), mpjax.NoScaling())
  if api == "linen":
    model = Twice()
    pm = mpjax.PolicyMap("float32", {nn.Dense: RECIPE})
    variables = mpjax.with_policy(model.init, pm)(jax.random.key(0),
                                                  twice_batch([1.0])["x"])
    return mpjax.TrainState.create(
        apply_fn=model.apply, params=variables["params"], tx=tx, policy=pm,
        model_state={OWG: variables[OWG]})
  return mpjax.TrainState.from_nnx(
      NNXTwice(nnx.Rngs(0)), tx=tx,
      policy=mpjax.PolicyMap("float32", {nnx.Linear: RECIPE}))


def shared_state(state):
  layer = state.model_state[OWG]["shared"]
  prefix = "" if "input_scale" in layer else "fp8_"
  return {k[len(prefix):]: np.asarray(v[...]) for k, v in layer.items()}


def test_a_layer_called_twice_takes_the_max_not_the_sum():
  # marin #7659's numbers: amaxes 10 and 1 give 10 (not 11, not 5.5).
  step = mpjax.make_train_step(loss_fn)
  for api in ("linen", "nnx"):
    for amaxes in ([10.0, 1.0], [1.0, 10.0, 3.0]):
      state = twice_state(api)
      kernel_amax = float(jnp.abs(state.params["shared"]["kernel"]
                                  [...]).max())
      state, _ = step(state, twice_batch(amaxes))
      new = shared_state(state)
      for op in ("input", "output_grad"):
        np.testing.assert_array_equal(new[f"{op}_amax_history"],
                                      [10.0, 0.0, 0.0, 0.0], err_msg=op)
      np.testing.assert_array_equal(new["kernel_amax_history"][0],
                                    kernel_amax)
      for op in ("input", "kernel", "output_grad"):
        np.testing.assert_array_equal(new[f"{op}_scale"], [1.0])
      # The next step's scales come from 10.
      state, _ = step(state, twice_batch([0.5] * len(amaxes)))
      new = shared_state(state)
      np.testing.assert_array_equal(new["output_grad_scale"],
                                    np.float32(10.0 / E5M2_MAX) *
                                    np.ones(1, np.float32))
      np.testing.assert_array_equal(new["input_scale"],
                                    np.float32(10.0) *
                                    np.float32(1.0 / E4M3_MAX) *
                                    np.ones(1, np.float32))


def test_chained_calls_leave_the_gradients_of_separate_calls():
  k = jnp.asarray(values(jax.random.key(1), (6, 4), 1.0))
  batch = twice_batch([10.0, 1.0])
  state = RECIPE.init_state()
  dims = (((1,), (0,)), ((), ()))

  def chained(k, state):
    y0, token = fp8_dot.fp8_dot_general_chained(
        batch["x"][0], k, dims, recipe=RECIPE, state=state)
    y1, _ = fp8_dot.fp8_dot_general_chained(
        batch["x"][1], k, dims, recipe=RECIPE, state=state, previous=token)
    return jnp.sum(y0 * batch["c"][0]) + jnp.sum(y1 * batch["c"][1])

  def separate(k, i):
    y = fp8_dot.fp8_dot_general(batch["x"][i], k, dims, recipe=RECIPE,
                                state=state)
    return jnp.sum(y * batch["c"][i])

  loss, (dk, new) = jax.value_and_grad(chained, argnums=(0, 1))(k, state)
  chex.assert_trees_all_equal(loss, separate(k, 0) + separate(k, 1))
  chex.assert_trees_all_equal(dk, jax.grad(separate)(k, 0) +
                              jax.grad(separate)(k, 1))
  np.testing.assert_array_equal(new["output_grad_amax_history"][0], 10.0)
