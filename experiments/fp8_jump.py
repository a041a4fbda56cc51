"""Delayed scaling recovers from a 100x activation jump: saturates, catches up.

A small linen MLP regression (Dense layers in fp8 with `DelayedScaling`
(history 16), bfloat16 around them) trains for 120 steps; from step 60 on
its inputs are 100 times larger. At the jump the first layer's input
saturates (its scale still comes from the history of small inputs); the
history records the new amax in that same step, so from the next step on
the scale covers it again. Each step's record in metrics.jsonl has the
loss, the skip counters, ``max_overshoot`` (the largest ``amax / (scale *
fp8_max)`` over the fp8 operands: input, kernel and output gradient of each
layer; above 1 the operand's largest values were clipped) and
``saturated``: the operands whose overshoot exceeds ``--threshold`` (1.5),
read from the fp8 state after the step.

Command (about a minute on 2 cores)::

  python experiments/fp8_jump.py --metrics benchmarks/fp8/jump_metrics.jsonl

Expected: ``saturated`` is empty before step 60 and names layer 0's input
(overshoot about 100) at step 60 and for at most a step or two after; the
loss stays finite and recovers; no step is skipped.
"""

import argparse
import json


def parse_args(argv=None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--steps", type=int, default=120)
  parser.add_argument("--jump-at", type=int, default=60)
  parser.add_argument("--metrics", default=None)
  parser.add_argument("--threshold", type=float, default=1.5,
                      help="an operand counts as saturated above this "
                           "amax / (scale * fp8_max)")
  return parser.parse_args(argv)


if __name__ == "__main__":
  # --help and flag errors are answered before jax is imported.
  parse_args()

# pylint: disable=g-import-not-at-top,wrong-import-position
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import mpjax

OWG = mpjax.OVERWRITE_WITH_GRADIENT
LIMITS = {"input": 448.0, "kernel": 448.0, "output_grad": 57344.0}


class MLP(nn.Module):

  @nn.compact
  def __call__(self, x):
    x = nn.LayerNorm()(nn.Dense(64, name="layer0")(x))
    return nn.Dense(1, name="layer1")(nn.gelu(x))


def overshoot(fp8_state):
  """``{layer/operand: amax / (scale * fp8_max)}`` of this step's amaxes.

  Above 1 the operand saturated: its largest values were clipped. Delayed
  scaling overshoots slightly whenever a tensor grows past its history's
  max (weights do, step by step); a factor well above 1 is lost range.
  """
  out = {}
  for layer, s in fp8_state.items():
    for op, limit in LIMITS.items():
      amax = float(s[f"{op}_amax_history"][0])
      out[f"{layer}/{op}"] = amax / (float(s[f"{op}_scale"][0]) * limit)
  return out


def main(argv=None):
  args = parse_args(argv)
  model = MLP()
  pm = mpjax.PolicyMap("mixed_bfloat16",
                       {nn.Dense: mpjax.DelayedScaling(history_length=16)})
  variables = mpjax.with_policy(model.init, pm)(jax.random.key(0),
                                                jnp.ones((64, 16)))
  state = mpjax.TrainState.create(
      apply_fn=model.apply, params=variables["params"],
      tx=mpjax.loss_scaled(optax.adam(3e-3), mpjax.NoScaling()), policy=pm,
      model_state={OWG: variables[OWG]})
  w = jax.random.normal(jax.random.key(1), (16, 1))

  def loss_fn(params, batch, apply_fn, rng):
    del rng
    y = apply_fn({"params": params}, batch["x"]).astype(jnp.float32)
    return jnp.mean((y - batch["y"]) ** 2)

  step = mpjax.make_train_step(loss_fn)
  records = []
  for i in range(args.steps):
    x = jax.random.normal(jax.random.key(100 + i), (64, 16))
    batch = {"x": x * (100.0 if i >= args.jump_at else 1.0),
             "y": jnp.tanh(x @ w)}  # the same target: LayerNorm absorbs it
    state, metrics = step(state, batch)
    ratios = overshoot(state.model_state[OWG])
    records.append({"step": i, "loss": float(metrics["loss"]),
                    "grads_finite": bool(metrics["grads_finite"]),
                    "skipped_steps": int(metrics["skipped_steps"]),
                    "max_overshoot": max(ratios.values()),
                    "saturated": sorted(k for k, v in ratios.items()
                                        if v > args.threshold)})
  if args.metrics:
    with open(args.metrics, "w") as f:
      for r in records:
        f.write(json.dumps(r) + "\n")
  for r in records:
    if r["saturated"] or r["step"] in (0, args.jump_at - 1, args.jump_at + 5,
                                       args.steps - 1):
      print(r)
  losses = np.array([r["loss"] for r in records])
  assert np.all(np.isfinite(losses)), "non-finite loss"
  return records


if __name__ == "__main__":
  main()
