"""Runs sharded training on 8 host CPU devices; prints one JSON line of results.

Started by tests/test_sharding.py in a subprocess (XLA_FLAGS must be set
before jax is imported): data-parallel on (8,), FSDP on (2, 4) and a single
device train the same model on the same batches, with float16 compute,
dynamic loss scaling, and batches where one example, on one device's shard
only, is inf; a BatchNorm model whose running statistics are compared; and
bfloat16 master weights trained with stochastic rounding, whose params,
moments and rounding key are compared bit for bit.
"""

import dataclasses
import json
import os
import sys

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
import jax.numpy as jnp  # pylint: disable=wrong-import-position
import numpy as np  # pylint: disable=wrong-import-position
import optax  # pylint: disable=wrong-import-position
from flax import linen as nn  # pylint: disable=wrong-import-position

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))), "experiments"))
import mpjax  # pylint: disable=wrong-import-position
import models  # pylint: disable=wrong-import-position
import seed_mlp  # pylint: disable=wrong-import-position

STEPS, BATCH, FEATURES, HIDDEN = 50, 32, 64, (256, 256)
POISONED_STEPS = (7, 8, 23, 40)


def batches():
  rng = np.random.default_rng(0)
  out = []
  for i in range(STEPS):
    x = rng.random((BATCH, FEATURES)).astype(np.float32)
    if i in POISONED_STEPS:
      x[BATCH - 3, 5] = np.inf  # example 29: on the last data shard only
    out.append({"x": x, "y": rng.integers(0, 10, BATCH).astype(np.int32)})
  return out


def new_state(policy):
  model = models.MLP(hidden=HIDDEN, num_classes=10)
  params = model.init(jax.random.key(0), jnp.ones((1, FEATURES)))["params"]
  # float32 params are compared leaf by leaf, so float32 uses momentum SGD:
  # Adam divides near-zero gradients by their own magnitude, which turns
  # reduction-order rounding (1e-7 relative) into visible differences.
  inner = (optax.sgd(0.05, momentum=0.9) if policy == "float32"
           else optax.adam(1e-3))
  tx = mpjax.loss_scaled(inner, mpjax.DynamicScaling(
      initial_scale=2.0**10, growth_interval=5))
  return mpjax.TrainState.create(apply_fn=model.apply, params=params, tx=tx,
                                 policy=policy)


def train(plan, policy):
  state = new_state(policy)
  step = mpjax.make_train_step(seed_mlp.loss_fn, sharding=plan)
  if plan is not None:
    state = plan.shard_state(state)
  scales, finite = [], []
  memory = None
  for i, batch in enumerate(batches()):
    if plan is not None:
      batch = plan.shard_batch(batch)
    if i == 0:
      memory = step.lower(state, batch).compile().memory_analysis()
    state, metrics = step(state, batch)
    scales.append(float(metrics["loss_scale"]))
    finite.append(bool(metrics["grads_finite"]))
  params = jax.tree.map(np.asarray, state.params)
  inner = jax.tree.map(np.asarray, state.opt_state.inner_state)
  state_bytes = sum(x.nbytes for x in jax.tree.leaves((params, inner)))
  moved = max(float(np.max(np.abs(a - b))) for a, b in zip(
      jax.tree.leaves(params), jax.tree.leaves(new_state(policy).params)))
  layouts = {
      jax.tree_util.keystr(path): str(leaf.sharding.spec)
      if hasattr(leaf.sharding, "spec") else "single"
      for path, leaf in jax.tree_util.tree_leaves_with_path(state.params)}
  return {
      "params": params, "scales": scales, "finite": finite, "moved": moved,
      "argument_bytes_per_device": memory.argument_size_in_bytes,
      "state_bytes": state_bytes, "layouts": layouts,
      "scale_sharding": str(state.opt_state.scale.sharding),
      "devices": len(state.params["Dense_0"]["kernel"].devices()),
  }


def compare(policy):
  """Trains single-device and sharded; returns each run's summary."""
  single = train(None, policy)
  runs = {
      "data_parallel_8": mpjax.data_parallel(
          jax.make_mesh((8,), ("data",))),
      "fsdp_2x4": mpjax.fsdp(jax.make_mesh((2, 4), ("data", "fsdp"))),
      "fsdp_8": mpjax.fsdp(jax.make_mesh((8,), ("fsdp",))),
  }
  results = {"single": single}
  results.update({name: train(plan, policy) for name, plan in runs.items()})
  out = {}
  for name, r in results.items():
    diffs = jax.tree.map(lambda a, b: float(np.max(np.abs(a - b))),
                         r["params"], single["params"])
    abs_diffs = np.concatenate([
        np.abs(a - b).ravel() for a, b in zip(jax.tree.leaves(r["params"]),
                                              jax.tree.leaves(single["params"]))])
    out[name] = {
        "max_param_diff": max(jax.tree.leaves(diffs)),
        "median_param_diff": float(np.median(abs_diffs)),
        "params_finite": all(np.isfinite(x).all()
                             for x in jax.tree.leaves(r["params"])),
        **{k: v for k, v in r.items() if k != "params"},
    }
  return out


class BatchNormMLP(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.BatchNorm(use_running_average=False, momentum=0.5)(nn.Dense(64)(x))
    return nn.Dense(10)(nn.relu(x))


def batch_norm_compare():
  """BatchNorm statistics of the global batch, single device and sharded."""
  model = BatchNormMLP()
  variables = model.init(jax.random.key(0), jnp.ones((2, FEATURES)))

  def run(plan):
    state = mpjax.TrainState.create(
        apply_fn=model.apply, params=variables["params"],
        model_state={"batch_stats": variables["batch_stats"]},
        tx=mpjax.loss_scaled(optax.sgd(0.05), mpjax.NoScaling()),
        policy="float32")
    step = mpjax.make_train_step(seed_mlp.loss_fn, sharding=plan)
    if plan is not None:
      state = plan.shard_state(state)
    for batch in batches()[:5]:
      batch = dict(batch, x=np.nan_to_num(batch["x"], posinf=0.0))
      state, _ = step(state, batch if plan is None else plan.shard_batch(batch))
    return state

  single = run(None)
  out = {}
  for name, plan in (("data_parallel_8", mpjax.data_parallel(
      jax.make_mesh((8,), ("data",)))), ("fsdp_8", mpjax.fsdp(
          jax.make_mesh((8,), ("fsdp",)), min_shard_elements=32))):
    state = run(plan)
    stats = state.model_state["batch_stats"]["BatchNorm_0"]
    out[name] = {
        "max_stats_diff": max(float(np.max(np.abs(np.asarray(a) - b))) for a, b
                              in zip(jax.tree.leaves(state.model_state),
                                     jax.tree.leaves(single.model_state))),
        "stats_moved": float(np.max(np.abs(np.asarray(stats["mean"])))),
        "mean_spec": str(stats["mean"].sharding.spec),
    }
  return out


SR_STEPS, SR_SKIPPED = 4, 2


def stochastic_rounding_compare():
  """bfloat16 masters, `mpjax.adamw(rounding="stochastic")`, bfloat16
  moments, through `loss_scaled` (the fused skip): single device and sharded.

  The loss is linear in the params and the inputs small integers, so every
  gradient is an exact sum (the same bits in any reduction order): what
  remains to differ under a plan is the update itself, the rounding noise
  included. Step `SR_SKIPPED` has an inf on the last data shard only.
  """
  model = nn.Dense(128)
  rng = np.random.default_rng(0)
  xs = rng.integers(-2, 3, (SR_STEPS, BATCH, FEATURES)).astype(np.float32)
  xs[SR_SKIPPED, BATCH - 3, 5] = np.inf
  ys = rng.integers(-1, 2, (SR_STEPS, BATCH, 128)).astype(np.float32)
  policy = dataclasses.replace(mpjax.get_policy("float32"),
                               param_dtype=jnp.bfloat16)

  def loss_fn(params, batch, apply_fn, rng):
    del rng
    return jnp.mean(apply_fn({"params": params}, batch["x"]) * batch["y"])

  def run(plan):
    params = model.init(jax.random.key(0), jnp.ones((1, FEATURES)))["params"]
    tx = mpjax.loss_scaled(
        mpjax.adamw(1e-4, weight_decay=0.0, mu_dtype=jnp.bfloat16,
                    nu_dtype=jnp.bfloat16, b2=0.95, rounding="stochastic",
                    key=jax.random.key(3)),
        mpjax.DynamicScaling(initial_scale=2.0**10, growth_interval=100))
    state = mpjax.TrainState.create(apply_fn=model.apply, params=params,
                                    tx=tx, policy=policy)
    step = mpjax.make_train_step(loss_fn, sharding=plan)
    if plan is not None:
      state = plan.shard_state(state)
    finite = []
    for x, y in zip(xs, ys):
      batch = {"x": x, "y": y}
      state, metrics = step(state, batch if plan is None
                            else plan.shard_batch(batch))
      finite.append(bool(metrics["grads_finite"]))
    inner = state.opt_state.inner_state
    return state.params, inner, finite

  def raw(tree):
    return [np.asarray(x).tobytes() for x in jax.tree.leaves(tree)]

  params0 = model.init(jax.random.key(0), jnp.ones((1, FEATURES)))["params"]
  single = run(None)
  out = {"single": {
      "finite": single[2], "count": int(single[1].count),
      "dtypes": sorted({str(x.dtype) for x in jax.tree.leaves(single[:2])}),
      # Updates mostly below half an ulp: only rounding up at random moves
      # those params (round to nearest would leave them).
      "changed_fraction": float(np.mean(np.concatenate([
          (np.asarray(a, np.float32) != np.asarray(
              jnp.asarray(b, jnp.bfloat16), np.float32)).ravel()
          for a, b in zip(jax.tree.leaves(single[0]),
                          jax.tree.leaves(params0))])))}}
  for name, plan in (
      ("data_parallel_8", mpjax.data_parallel(jax.make_mesh((8,), ("data",)))),
      ("fsdp_2x4", mpjax.fsdp(jax.make_mesh((2, 4), ("data", "fsdp")))),
      ("fsdp_8", mpjax.fsdp(jax.make_mesh((8,), ("fsdp",))))):
    params, inner, finite = run(plan)
    out[name] = {
        "finite": finite,
        "params_bit_equal": raw(params) == raw(single[0]),
        "mu_nu_bit_equal": raw((inner.mu, inner.nu)) == raw(
            (single[1].mu, single[1].nu)),
        "key_count_bit_equal": raw((inner.key, inner.count)) == raw(
            (single[1].key, single[1].count)),
        "kernel_spec": str(params["kernel"].sharding.spec),
    }
  return out


def main():
  assert jax.device_count() == 8, jax.devices()
  print(json.dumps({"poisoned_steps": POISONED_STEPS, "steps": STEPS,
                    **{p: compare(p) for p in ("float32", "mixed_float16")},
                    "batch_norm": batch_norm_compare(),
                    "stochastic_rounding": stochastic_rounding_compare()}))


if __name__ == "__main__":
  main()
