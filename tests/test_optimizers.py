"""Tests for mpjax/_src/optimizers.py and its parts: stochastic_rounding.py,
master_update.py, fused_skip.py."""

import warnings

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import mpjax
from mpjax._src import fused_skip
from mpjax._src import master_update
from mpjax._src import stochastic_rounding

BF16 = jnp.bfloat16


def bits(tree):
  """Every leaf as its raw bits (uint), so -0.0 != 0.0 and NaN == NaN."""
  def view(x):
    x = jnp.asarray(x)
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
      return jax.random.key_data(x)
    if jnp.issubdtype(x.dtype, jnp.floating):
      return jax.lax.bitcast_convert_type(
          x, {2: jnp.uint16, 4: jnp.uint32, 8: jnp.uint64}[x.dtype.itemsize])
    return x
  return jax.tree.map(view, tree)


def assert_bit_equal(a, b):
  chex.assert_trees_all_equal_structs(a, b)
  chex.assert_trees_all_equal(bits(a), bits(b))


def params_like(dtype=jnp.float32):
  return {"w": jnp.linspace(-1.0, 1.0, 12, dtype=jnp.float32).reshape(3, 4)
               .astype(dtype), "b": jnp.ones(4, dtype)}


def random_grads(params, rng):
  return jax.tree.map(lambda p: jnp.asarray(
      rng.normal(size=p.shape), jnp.float32), params)


def opaque(tx):
  """`tx` behind a plain GradientTransformation: no extra args reach it."""
  return optax.GradientTransformation(
      tx.init, lambda u, s, p=None: tx.update(u, s, p))


CONFIGS = {
    "f32": dict(),
    "bf16-moments": dict(mu_dtype=BF16, nu_dtype=BF16),
    "bf16-sr": dict(mu_dtype=BF16, nu_dtype=BF16, rounding="stochastic",
                    moment_rounding="stochastic", key=jax.random.key(3)),
    "bf16-kahan": dict(mu_dtype=BF16, nu_dtype=BF16, rounding="kahan"),
    "bf16-nearest": dict(mu_dtype=BF16, nu_dtype=BF16),
}
PARAM_DTYPES = {"f32": jnp.float32, "bf16-moments": jnp.float32,
                "mpjax.adam": jnp.float32, "mpjax.adam-bf16-mu": jnp.float32}


def adamw(name, **kwargs):
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    return mpjax.adamw(1e-2, b2=0.99, weight_decay=1e-2, **CONFIGS[name],
                       **kwargs)


# --- stochastic rounding ---------------------------------------------------


def _neighbours(x):
  """The bfloat16 values just below and above float32 `x` (toward/away 0)."""
  x = np.asarray(x, np.float32)
  b = x.view(np.uint32)
  down = (b & np.uint32(0xFFFF0000)).view(np.float32)
  up = ((b & np.uint32(0xFFFF0000)) + np.uint32(0x10000)).view(np.float32)
  exact = (b & np.uint32(0xFFFF)) == 0
  return down, np.where(exact, down, up)


X = np.concatenate([np.random.default_rng(0).normal(size=40),
                    np.random.default_rng(1).uniform(1e-6, 1e6, 20),
                    [1.0 + 2.0**-10, -(1.0 + 3 * 2.0**-10), 3.0, 0.0]]
                   ).astype(np.float32)


def test_stochastic_round_is_unbiased():
  n = 4000
  keys = jax.random.split(jax.random.key(0), n)
  y = jax.vmap(lambda k: mpjax.stochastic_round(X, k))(keys)
  mean = np.asarray(y.astype(jnp.float32), np.float64).mean(0)
  down, up = _neighbours(X)
  gap = np.abs(np.asarray(up, np.float64) - down)
  # Each draw is down or up: std <= gap / 2, so the mean is within 6 sigma.
  np.testing.assert_array_less(np.abs(mean - X), 6 * gap / (2 * np.sqrt(n))
                               + 1e-30)
  # Round to nearest is biased on the same values (the test has power).
  nearest = np.asarray(jnp.asarray(X).astype(BF16).astype(jnp.float32))
  assert np.sum(np.abs(nearest - X) > 6 * gap / (2 * np.sqrt(n))) > 40


def test_stochastic_round_is_never_further_than_one_ulp():
  y = jax.vmap(lambda k: mpjax.stochastic_round(X, k))(
      jax.random.split(jax.random.key(1), 200))
  y = np.asarray(y.astype(jnp.float32))
  down, up = _neighbours(X)
  assert np.all((y == down) | (y == up))
  # Both are reached where each has probability >= 5% (a miss in 200 draws:
  # < 4e-5); 1/550 of an ulp (X[52]) may well be missed, and is.
  p_up = (X.view(np.uint32) & np.uint32(0xFFFF)) / 2.0**16
  likely = (p_up >= 0.05) & (p_up <= 0.95)
  assert likely.sum() > 50
  assert np.all(np.any(y == up, axis=0) | ~likely)
  assert np.all(np.any(y == down, axis=0) | ~likely)


def test_stochastic_round_is_deterministic_per_key():
  a = mpjax.stochastic_round(X, jax.random.key(7))
  b = jax.jit(mpjax.stochastic_round)(X, jax.random.key(7))
  assert_bit_equal(a, b)
  c = mpjax.stochastic_round(X, jax.random.key(8))
  assert not np.array_equal(np.asarray(bits(a)), np.asarray(bits(c)))


def test_stochastic_rounding_lets_small_updates_add_up():
  tx = mpjax.sgd(1.0, rounding="stochastic", key=jax.random.key(0))
  params = jnp.ones(256, BF16)
  state = tx.init(params)

  def step(carry, _):
    p, s = carry
    u, s = tx.update(jnp.full(p.shape, -1e-3), s, p)
    return (optax.apply_updates(p, u), s), None

  (params, state), _ = jax.lax.scan(step, (params, state), None, length=1000)
  assert abs(float(params.astype(jnp.float32).mean()) - 2.0) < 0.02
  assert int(state.count) == 1000


# --- master update contract and Kahan -------------------------------------


@pytest.mark.parametrize("rounding", ["nearest", "stochastic", "kahan"])
def test_apply_updates_gives_exactly_the_rounded_params(rounding):
  rng = np.random.default_rng(0)
  p = jnp.asarray(rng.normal(size=4096) * 10.0 ** rng.integers(-4, 4, 4096),
                  jnp.float32).astype(BF16)
  # Updates from 1e-9 to 0.5 of each param, both signs.
  u = (p.astype(jnp.float32) * jnp.asarray(
      rng.choice([-1, 1], 4096) * 10.0 ** rng.uniform(-9, np.log10(0.5), 4096),
      jnp.float32))
  seed = stochastic_rounding.key_seed(jax.random.key(0))
  comp = jnp.zeros_like(p)
  updates, _ = master_update.write_back(p, u, rounding=rounding, seed=seed,
                                        compensation=comp)
  chex.assert_type(updates, jnp.float32)
  target = p.astype(jnp.float32) + u
  expected = (stochastic_rounding.round_with_seed(target, seed)
              if rounding == "stochastic" else target.astype(BF16))
  assert_bit_equal(optax.apply_updates(p, updates), expected)


def test_loss_scaled_keeps_the_exact_write_back():
  # Casting the float32 updates to the params' dtype would re-round ~2% here.
  rng = np.random.default_rng(0)
  params = {"w": jnp.asarray(rng.normal(size=4096) * 0.02, BF16)}
  grads = {"w": jnp.asarray(rng.normal(size=4096), jnp.float32)}
  tx = mpjax.sgd(1e-3, rounding="stochastic", key=jax.random.key(0))
  direct, _ = tx.update(grads, tx.init(params), params)
  wrapped = mpjax.loss_scaled(tx, mpjax.NoScaling())
  through, _ = wrapped.update(grads, wrapped.init(params), params)
  assert_bit_equal(optax.apply_updates(params, through),
                   optax.apply_updates(params, direct))


def test_kahan_recovers_updates_below_half_an_ulp_exactly():
  tiny = 2.0**-10  # a quarter of bfloat16's half-ulp at 1.0
  kahan, nearest = (mpjax.sgd(1.0, rounding=r) for r in ("kahan", "nearest"))

  def run(tx):
    params = jnp.ones(3, BF16)

    def step(carry, _):
      p, s = carry
      u, s = tx.update(jnp.full(p.shape, -tiny), s, p)
      p = optax.apply_updates(p, u)
      comp = 0.0 if s.compensation is None else s.compensation.astype(
          jnp.float32)
      return (p, s), p.astype(jnp.float32) + comp

    (params, _), totals = jax.lax.scan(step, (params, tx.init(params)), None,
                                       length=1024)
    return params, totals

  params, totals = run(kahan)
  # params + compensation is the exact sum after every step; params end at 2.
  np.testing.assert_array_equal(
      np.asarray(totals[:, 0]), 1.0 + tiny * np.arange(1, 1025))
  np.testing.assert_array_equal(np.asarray(params, np.float32), 2.0)
  params, _ = run(nearest)
  np.testing.assert_array_equal(np.asarray(params, np.float32), 1.0)


# --- skips and the fused path ---------------------------------------------


def _select_step(tx, grads, state, params, finite):
  """What loss_scaled does around an opaque optimizer."""
  updates, new = opaque(tx).update(grads, state, params)
  new = jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, state)
  return jax.tree.map(lambda u: jnp.where(finite, u, 0.0), updates), new


def _fused_step(tx, grads, state, params, finite):
  """The protocol's side of loss_scaled (fused_skip module docstring)."""
  decision = fused_skip.FiniteDecision(finite)
  updates, new = tx.update(grads, state, params, finite_decision=decision)
  # adamw/sgd take their whole state; mpjax.adam (a chain) its Adam state.
  assert any(decision.taken(x)
             for x in jax.tree.leaves(new, is_leaf=decision.taken))
  return (jax.tree.map(lambda u: jnp.where(finite, u, 0.0), updates),
          decision.select(new, state))


def _make(name):
  if name == "mpjax.adam":
    return mpjax.adam(1e-2, b2=0.99)
  if name == "mpjax.adam-bf16-mu":  # a 16-bit moment and float32 gradients
    return mpjax.adam(1e-2, b2=0.99, mu_dtype=BF16)
  if name.startswith("sgd"):
    return mpjax.sgd(1e-1, momentum=0.9, mu_dtype=BF16,
                     rounding=name.split("-")[1],
                     key=jax.random.key(1) if "stochastic" in name else None)
  return adamw(name)


NAMES = ["f32", "bf16-moments", "bf16-sr", "bf16-kahan", "sgd-stochastic",
         "mpjax.adam", "mpjax.adam-bf16-mu"]


@pytest.mark.parametrize("name", NAMES)
def test_skipped_step_leaves_params_moments_buffers_and_key_bit_identical(name):
  tx = _make(name)
  params = params_like(PARAM_DTYPES.get(name, BF16))
  state = tx.init(params)
  rng = np.random.default_rng(0)
  for _ in range(3):  # non-trivial moments, buffers
    updates, state = tx.update(random_grads(params, rng), state, params)
    params = optax.apply_updates(params, updates)
  grads = random_grads(params, rng)
  grads["w"] = grads["w"].at[1, 2].set(jnp.nan)
  updates, new = jax.jit(_fused_step, static_argnums=0)(
      tx, grads, state, params, jnp.array(False))
  assert_bit_equal(new, state)
  assert_bit_equal(optax.apply_updates(params, updates), params)
  # And through loss_scaled itself (wired or not), counters aside.
  wrapped = mpjax.loss_scaled(tx, mpjax.NoScaling())
  outer = wrapped.init(params)._replace(inner_state=state)
  updates, outer = wrapped.update(grads, outer, params)
  assert_bit_equal(outer.inner_state, state)
  assert int(outer.skipped_steps) == 1


@pytest.mark.parametrize("name", NAMES)
def test_fused_skip_equals_the_select_path_bit_for_bit(name):
  tx = _make(name)
  params = params_like(PARAM_DTYPES.get(name, BF16))
  paths = {"fused": (params, tx.init(params)),
           "select": (params, tx.init(params))}
  rng = np.random.default_rng(1)
  steps = {"fused": jax.jit(_fused_step, static_argnums=0),
           "select": jax.jit(_select_step, static_argnums=0)}
  for pattern in ["ok", "inf", "ok", "nan", "ok", "both", "ok", "ok"]:
    grads = random_grads(params, rng)
    if pattern in ("inf", "both"):
      grads["b"] = grads["b"].at[0].set(-jnp.inf)
    if pattern in ("nan", "both"):
      grads["w"] = grads["w"].at[0, 0].set(jnp.nan)
    finite = jnp.array(pattern == "ok")
    for path, (p, s) in paths.items():
      updates, s = steps[path](tx, grads, s, p, finite)
      paths[path] = (optax.apply_updates(p, updates), s)
    assert_bit_equal(paths["fused"], paths["select"])
  assert int(optax.tree.get(paths["fused"][1], "count")) == 5


def test_loss_scaled_gives_the_same_bits_with_or_without_the_protocol():
  name = "bf16-sr"
  params = params_like(BF16)
  runs = {}
  for label, inner in (("aware", adamw(name)), ("opaque", opaque(adamw(name)))):
    tx = mpjax.loss_scaled(inner, mpjax.DynamicScaling.like_torch())
    p, s = params, tx.init(params)
    rng = np.random.default_rng(2)
    update = jax.jit(tx.update)
    for i in range(5):
      grads = jax.tree.map(lambda g: g * 65536.0, random_grads(p, rng))
      if i == 2:
        grads["b"] = grads["b"].at[1].set(jnp.inf)
      u, s = update(grads, s, p)
      p = optax.apply_updates(p, u)
    runs[label] = (p, s)
  assert_bit_equal(runs["aware"], runs["opaque"])
  assert int(runs["aware"][1].skipped_steps) == 1


# --- dtypes, equality with mpjax.adam / optax.sgd --------------------------


def test_state_dtypes_are_what_was_asked():
  params = params_like(BF16)
  tx = mpjax.adamw(1e-3, mu_dtype=jnp.float32, nu_dtype=BF16, b2=0.95,
                   rounding="kahan")
  init = tx.init(params)
  updates, state = jax.jit(tx.update)(
      random_grads(params, np.random.default_rng(0)), init, params)
  for s in (init, state):  # the same dtypes before and after a step
    chex.assert_type(s.count, jnp.int32)
    chex.assert_trees_all_equal_dtypes(s.mu, jax.tree.map(
        lambda p: p.astype(jnp.float32), params))
    chex.assert_trees_all_equal_dtypes(s.nu, params)
    chex.assert_trees_all_equal_shapes_and_dtypes(s.compensation, params)
    assert s.key is None
  chex.assert_trees_all_equal_dtypes(updates, state.mu)
  sr = mpjax.sgd(1e-3, momentum=0.9, mu_dtype=jnp.float16,
                 rounding="stochastic", key=jax.random.key(0))
  s = sr.init(params)
  chex.assert_type(s.key, jnp.uint32)
  chex.assert_trees_all_equal_dtypes(
      s.mu, jax.tree.map(lambda p: p.astype(jnp.float16), params))
  assert s.compensation is None
  # float32 params need no compensation buffer.
  comp = mpjax.adamw(1e-3, rounding="kahan").init(params_like()).compensation
  assert all(c.shape == (0,) for c in jax.tree.leaves(comp))


@pytest.mark.parametrize("learning_rate", [1e-2, optax.linear_schedule(
    1e-2, 0.0, 20)])
def test_float32_everything_equals_mpjax_adam_exactly(learning_rate):
  ours = mpjax.adamw(learning_rate, weight_decay=0.0)
  ref = mpjax.adam(learning_rate)
  params = params_like()
  p_ours, s_ours = params, ours.init(params)
  p_ref, s_ref = params, ref.init(params)
  rng = np.random.default_rng(0)
  for _ in range(15):
    g = random_grads(params, rng)
    u, s_ours = jax.jit(ours.update)(g, s_ours, p_ours)
    p_ours = optax.apply_updates(p_ours, u)
    u, s_ref = jax.jit(ref.update)(g, s_ref, p_ref)
    p_ref = optax.apply_updates(p_ref, u)
  assert_bit_equal((p_ours, s_ours.mu, s_ours.nu),
                   (p_ref, s_ref[0].mu, s_ref[0].nu))


@pytest.mark.parametrize("momentum, nesterov", [(None, False), (0.9, False),
                                                (0.9, True)])
def test_float32_sgd_equals_optax_sgd_exactly(momentum, nesterov):
  ours, ref = (f(0.1, momentum, nesterov) for f in (mpjax.sgd, optax.sgd))
  p_ours = p_ref = params_like()
  s_ours, s_ref = ours.init(p_ours), ref.init(p_ref)
  rng = np.random.default_rng(0)
  for _ in range(8):
    g = random_grads(p_ref, rng)
    u, s_ours = ours.update(g, s_ours, p_ours)
    p_ours = optax.apply_updates(p_ours, u)
    u, s_ref = ref.update(g, s_ref, p_ref)
    p_ref = optax.apply_updates(p_ref, u)
  assert_bit_equal(p_ours, p_ref)


def test_composes_with_chain_inject_hyperparams_and_multisteps():
  params = params_like()
  rng = np.random.default_rng(0)
  grads = [random_grads(params, rng) for _ in range(4)]
  plain = optax.chain(optax.clip_by_global_norm(1.0),
                      mpjax.adamw(1e-2, weight_decay=1e-3))
  injected = optax.chain(optax.clip_by_global_norm(1.0),
                         optax.inject_hyperparams(mpjax.adamw)(
                             learning_rate=1e-2, weight_decay=1e-3))
  multi = optax.MultiSteps(plain, every_k_schedule=2)
  out = {}
  for name, tx in (("plain", plain), ("injected", injected),
                   ("multi", multi)):
    p, s = params, tx.init(params)
    for g in grads:
      u, s = jax.jit(tx.update)(g, s, p)
      p = optax.apply_updates(p, u)
    out[name] = p
  chex.assert_trees_all_close(out["plain"], out["injected"], rtol=1e-6)
  assert not np.allclose(out["multi"]["w"], params["w"])  # two applied steps


def test_trains_bfloat16_master_params_with_make_train_step():
  x = jnp.asarray(np.random.default_rng(0).normal(size=(32, 4)), jnp.float32)
  y = x @ jnp.array([1.0, -2.0, 0.5, 3.0])
  apply_fn = lambda v, x: x @ v["params"]["w"]
  loss_fn = lambda p, b, apply, rng: jnp.mean((apply({"params": p}, b["x"])
                                               - b["y"]) ** 2)
  tx = mpjax.loss_scaled(
      mpjax.adamw(0.1, weight_decay=0.0, mu_dtype=BF16, nu_dtype=BF16,
                  b2=0.95, rounding="stochastic", key=jax.random.key(0)),
      mpjax.DynamicScaling.like_torch())
  state = mpjax.TrainState.create(apply_fn=apply_fn,
                                  params={"w": jnp.zeros(4)}, tx=tx,
                                  policy="p=bf16,c=bf16,o=f32")
  step = mpjax.make_train_step(loss_fn)
  losses = []
  for _ in range(80):
    state, metrics = step(state, {"x": x, "y": y})
    losses.append(float(metrics["loss"]))
  chex.assert_type(state.params["w"], BF16)
  assert losses[-1] < 0.05 * losses[0]


def test_checkpoint_round_trip_is_bit_identical(tmp_path):
  params = params_like(BF16)
  apply_fn = lambda v, x: x @ v["params"]["w"] + v["params"]["b"]
  loss_fn = lambda p, b, apply, rng: jnp.mean(apply({"params": p}, b) ** 2)
  tx = mpjax.loss_scaled(adamw("bf16-sr"), mpjax.NoScaling())
  make = lambda: mpjax.TrainState.create(apply_fn=apply_fn, params=params,
                                         tx=tx, policy="bfloat16")
  batch = jnp.asarray(np.random.default_rng(0).normal(size=(8, 3)),
                      jnp.float32)
  step = mpjax.make_train_step(loss_fn)
  state = make()
  for _ in range(3):
    state, _ = step(state, batch)
  mpjax.save(str(tmp_path / "ckpt"), state)
  restored = mpjax.restore(str(tmp_path / "ckpt"), jax.eval_shape(make))
  assert_bit_equal(restored, jax.tree.map(jnp.copy, state))
  runs = []
  for s in (state, restored):
    for _ in range(3):
      s, _ = step(s, batch)
    runs.append(s)
  assert_bit_equal(runs[0], runs[1])


SHARDED = r"""
import os
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
import jax, jax.numpy as jnp, numpy as np, optax, mpjax
mesh = jax.make_mesh((4,), ("fsdp",))
plan = mpjax.fsdp(mesh, min_shard_elements=16)
rng = np.random.default_rng(0)
params = {"w": jnp.asarray(rng.normal(size=(64, 32)), jnp.bfloat16),
          "b": jnp.zeros(32, jnp.bfloat16)}
grads = jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape),
                                           jnp.float32), params)
out = []
for rounding in ("stochastic", "kahan"):
  tx = mpjax.loss_scaled(mpjax.adamw(
      1e-2, mu_dtype=jnp.bfloat16, nu_dtype=jnp.bfloat16, b2=0.95,
      rounding=rounding,
      key=jax.random.key(0) if rounding == "stochastic" else None),
      mpjax.NoScaling())
  state = tx.init(params)
  def run(p, s):
    for _ in range(3):
      u, s = tx.update(grads, s, p)
      p = optax.apply_updates(p, u)
    return p, s
  one = jax.jit(run)(params, state)
  shard = plan.state_shardings((params, state))
  placed = jax.device_put((params, state), shard)
  many = jax.jit(run, in_shardings=shard, out_shardings=shard)(*placed)
  assert len(many[0]["w"].sharding.device_set) == 4
  same = jax.tree.map(lambda a, b: bool(jnp.array_equal(
      jax.lax.bitcast_convert_type(a, jnp.uint16) if a.dtype == jnp.bfloat16
      else a, jax.lax.bitcast_convert_type(b, jnp.uint16)
      if b.dtype == jnp.bfloat16 else b)), one, many)
  out.append(all(jax.tree.leaves(same)))
print("SHARDED", out)
"""


def test_fsdp_sharded_updates_are_bit_identical_to_one_device():
  import subprocess, sys  # pylint: disable=g-import-not-at-top,multiple-imports
  run = subprocess.run([sys.executable, "-c", SHARDED], capture_output=True,
                       text=True, timeout=600)
  assert "SHARDED [True, True]" in run.stdout, run.stderr[-2000:]


# --- warnings and argument errors -----------------------------------------


def test_bfloat16_beta2_warning_fires():
  with pytest.warns(UserWarning, match=r"b2=0.999 is 1.0 in bfloat16"):
    mpjax.adamw(1e-3, nu_dtype=BF16)
  with pytest.warns(UserWarning, match=r"eps\*\*2 = 1e-16 is 0 in float16"):
    mpjax.adamw(1e-3, b2=0.9, nu_dtype=jnp.float16)
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    mpjax.adamw(1e-3, nu_dtype=BF16, b2=0.95)
    mpjax.adamw(1e-3, mu_dtype=BF16)  # b1 = 0.9 is 0.8984375, not 1.0
    mpjax.adamw(1e-3, nu_dtype=BF16, moment_rounding="stochastic",
                key=jax.random.key(0))  # unbiased: b2 = 0.999 is fine


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(mu_dtype=jnp.int32), TypeError, "int32"),
    (dict(nu_dtype="float8_e4m3fn"), TypeError, "float8_e4m3fn"),
    (dict(rounding="stochastic", key=0), TypeError, "got 0 "),
    (dict(rounding="stochastic", key=jnp.arange(2)), TypeError,
     r"Array\(\[0, 1\]"),
    (dict(rounding="round"), ValueError, "'round'"),
    (dict(moment_rounding="kahan"), ValueError, "'kahan'"),
    (dict(rounding="stochastic"), ValueError, "needs a key"),
    (dict(key=jax.random.key(0)), ValueError, "only used"),
])
def test_bad_arguments_raise_naming_the_value(kwargs, error, match):
  with pytest.raises(error, match=match):
    mpjax.adamw(1e-3, **kwargs)
  if "nu_dtype" not in kwargs:
    with pytest.raises(error, match=match):
      mpjax.sgd(1e-3, momentum=0.9, **kwargs)
