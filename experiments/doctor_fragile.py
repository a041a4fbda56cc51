"""The precision doctor on a model with one deliberately fragile module.

`FragileNet` is the seed MLP with a hand-written RMS normalisation
(`HandNorm`: ``x * rsqrt(mean(x * x))``) after its first Dense, trained on
digits pixels left in [0, 255]. Its first Dense's outputs reach a few hundred,
which float16 holds, but their squares exceed float16's 65504: under
``mixed_float16`` the norm's ``mean(x * x)`` is inf, its output 0, and the
model learns through its biases only. Nothing else in the model is fragile.

The script (1) runs `mpjax.precision_doctor` on the untrained model under
``mixed_float16`` and prints its diagnosis, (2) trains float32, the
unmodified ``mixed_float16`` PolicyMap and the doctor's suggested PolicyMap
(``DynamicScaling.like_torch()``), (3) writes one JSON (device, versions,
date, command, diagnosis, runs) and, with --plot, the error along the depth.

Command (from the repository root):

  python experiments/doctor_fragile.py --json benchmarks/doctor/fragile_cpu.json \\
      --plot benchmarks/doctor/fragile_depth.png

Expected: the doctor names ``HandNorm_0`` and nothing else; the suggested
map ends within 1% of float32's final loss; the unmodified map ends more
than 1% behind (the script exits with an error otherwise).
"""

import argparse
import json
import os
import sys
from typing import Any, Dict, List

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import cli  # pylint: disable=g-import-not-at-top,wrong-import-position


def parse_args(argv: List[str]) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--steps", type=int, default=300)
  parser.add_argument("--batch-size", type=int, default=128)
  parser.add_argument("--lr", type=float, default=1e-3)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--pixel-scale", type=float, default=255.0,
                      help="pixels in [0, this]")
  parser.add_argument("--window", type=int, default=20,
                      help="final loss = mean of the last N steps")
  parser.add_argument("--doctor-batches", type=int, default=2)
  parser.add_argument("--json", default=None)
  parser.add_argument("--plot", default=None)
  args = parser.parse_args(argv)
  if args.plot:
    cli.require_module(parser, "matplotlib", "--plot", "experiments")
  cli.require_module(parser, "sklearn", "the digits data", "experiments")
  return args


if __name__ == "__main__":
  # --help and flag errors are answered before jax is imported.
  parse_args(sys.argv[1:])

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import mpjax

import datasets  # pylint: disable=g-import-not-at-top,wrong-import-position
import report  # pylint: disable=g-import-not-at-top,wrong-import-position


class HandNorm(nn.Module):
  """RMS normalisation written by hand: its squares overflow in float16."""

  @nn.compact
  def __call__(self, x):
    return x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + 1e-6)


class FragileNet(nn.Module):
  """Dense(128) -> HandNorm -> relu -> Dense(10); logits."""
  hidden: int = 128
  num_classes: int = 10

  @nn.compact
  def __call__(self, x):
    x = HandNorm()(nn.Dense(self.hidden)(x))
    return nn.Dense(self.num_classes)(nn.relu(x))


def loss_fn(params, batch, apply_fn, rng):
  """Mean softmax cross-entropy in float32."""
  del rng
  logits = apply_fn({"params": params}, batch["x"])
  return mpjax.numerics.softmax_cross_entropy_with_integer_labels(
      logits, batch["y"]).mean()


def batches(split: datasets.Split, batch_size: int, steps: int,
            seed: int) -> List[Dict[str, np.ndarray]]:
  rng = np.random.default_rng(seed)
  out = []
  while len(out) < steps:
    order = rng.permutation(len(split.x_train))
    for i in range(len(order) // batch_size):
      idx = order[i * batch_size:(i + 1) * batch_size]
      out.append({"x": split.x_train[idx], "y": split.y_train[idx]})
  return out[:steps]


def train(policy: Any, scaling: mpjax.LossScaling, params: Any,
          data: List[Dict[str, np.ndarray]], lr: float,
          window: int) -> Dict[str, Any]:
  model = FragileNet()
  tx = mpjax.loss_scaled(optax.adam(lr), scaling)
  state = mpjax.TrainState.create(apply_fn=model.apply, params=params, tx=tx,
                                  policy=policy)
  step = mpjax.make_train_step(loss_fn)
  losses = []
  for batch in data:
    state, metrics = step(state, batch)
    losses.append(metrics["loss"])
  losses = np.asarray(jax.device_get(losses), np.float64)
  scale_state = mpjax.loss_scale_state(state.opt_state)
  return {"policy": repr(policy), "scaling": repr(scaling),
          "final_loss": float(np.mean(losses[-window:])),
          "finite": bool(np.all(np.isfinite(losses[-window:]))),
          "skipped_steps": int(scale_state.skipped_steps),
          "final_loss_scale": float(scale_state.scale),
          "loss_curve": [float(x) for x in losses]}


def main(argv: List[str]) -> Dict[str, Any]:
  args = parse_args(argv[1:])

  split = datasets.load_digits(seed=args.seed)
  split = datasets.Split(split.x_train * args.pixel_scale, split.y_train,
                         split.x_test * args.pixel_scale, split.y_test,
                         split.name)
  data = batches(split, args.batch_size, args.steps, args.seed)
  params = FragileNet().init(jax.random.key(args.seed),
                             data[0]["x"][:1])["params"]
  candidate = mpjax.PolicyMap("mixed_float16")
  diagnosis = mpjax.precision_doctor(
      FragileNet().apply, data[:args.doctor_batches], loss_fn, candidate,
      params=params)
  print(diagnosis)
  suggested = diagnosis.prescription.policy_map
  scaling = mpjax.DynamicScaling.like_torch()
  runs = {
      "float32": train("float32", mpjax.NoScaling(), params, data, args.lr,
                       args.window),
      "mixed_float16": train(candidate, scaling, params, data, args.lr,
                             args.window),
      "mixed_float16+doctor": train(suggested, scaling, params, data,
                                    args.lr, args.window),
  }
  reference = runs["float32"]["final_loss"]
  print("\n| run | policy | final loss | vs float32 | skipped | final scale |")
  print("|---|---|---|---|---|---|")
  for name, run in runs.items():
    run["gap_pct"] = 100 * (run["final_loss"] / reference - 1)
    print(f"| {name} | `{run['policy']}` | {run['final_loss']:.4f} | "
          f"{run['gap_pct']:+.2f}% | {run['skipped_steps']} | "
          f"{run['final_loss_scale']:g} |")
  named = [k for k, _ in diagnosis.prescription.keep_float32]
  checks = {
      "names_only_the_fragile_module": named == ["HandNorm_0"],
      "suggested_within_1pct": abs(runs["mixed_float16+doctor"]["gap_pct"])
                               <= 1.0,
      "unmodified_behind_or_diverged": (
          not runs["mixed_float16"]["finite"] or
          runs["mixed_float16"]["gap_pct"] > 1.0),
  }
  print("\n" + "\n".join(f"{k}: {v}" for k, v in checks.items()))
  result = {"environment": report.environment(argv),
            "settings": vars(args), "diagnosis": diagnosis.to_dict(),
            "runs": runs, "checks": checks}
  if args.json:
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w") as f:
      json.dump(result, f, indent=2)
    print(f"wrote {args.json}")
  if args.plot:
    diagnosis.plot(args.plot, title="FragileNet under mixed_float16")
    print(f"wrote {args.plot}")
  if not all(checks.values()):
    raise SystemExit("doctor_fragile: " + ", ".join(
        k for k, v in checks.items() if not v))
  return result


if __name__ == "__main__":
  main(sys.argv)
