"""When float16 goes wrong: mpjax says where, on two runs that go wrong on purpose.

Both train the seed MLP (Dense(128, relu) -> Dense(10)) on scikit-learn's
digits with `mixed_float16` and PyTorch's loss-scaling defaults, but feed it
pixels that were never normalised, a classic slip:

  unnormalized  pixels in [0, 255] (as raw MNIST bytes): the float16
                *gradients* overflow at the initial scale 2**16. The scale backs
                off, attribution names the layers whose gradients were inf on
                each skipped step, and training recovers.
  overflow      pixels in [0, 60000]: the float16 *forward* pass overflows, so
                no loss scale can help. The guard stops the run after
                --max-consecutive-skips skipped steps, names the leaves, and
                the forward debug mode names the module whose output went inf.

Command (from the repository root, after `pip install -e .`):

  python experiments/float16_failure.py --out runs/float16_failure

Expected: the first run skips ~8 steps while its scale falls from 2**16 to
2**9, naming Dense_0/kernel and Dense_1/kernel, then trains; the second stops
after 20 skips and names Dense_0 as the first module with an inf output. It
writes metrics.jsonl per run, and float16_failure.png (loss, scale with the
skipped steps marked, underflow fraction per layer).
"""

import argparse
import os
import sys
from typing import List

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import cli  # pylint: disable=g-import-not-at-top,wrong-import-position


def parse_args(argv: List[str]) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--out", default=os.path.join("runs", "float16_failure"))
  parser.add_argument("--steps", type=int, default=60)
  parser.add_argument("--batch-size", type=int, default=128)
  parser.add_argument("--growth-interval", type=int, default=20)
  parser.add_argument("--stats-every", type=int, default=5)
  parser.add_argument("--max-consecutive-skips", type=int, default=20)
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args(argv)
  cli.require_module(parser, "matplotlib", "the figure", "experiments")
  cli.require_module(parser, "sklearn", "the digits data", "experiments")
  return args


if __name__ == "__main__":
  # --help and flag errors are answered before jax is imported.
  parse_args(sys.argv[1:])

import jax
import numpy as np
import optax

import mpjax

import datasets  # pylint: disable=g-import-not-at-top,wrong-import-position
import models  # pylint: disable=g-import-not-at-top,wrong-import-position
import seed_mlp  # pylint: disable=g-import-not-at-top,wrong-import-position

SCENARIOS = {"unnormalized": 255.0, "overflow": 60000.0}


def train(name: str, pixel_max: float, args: argparse.Namespace) -> dict:
  """Trains one scenario; returns what happened (skips, names, the error)."""
  split = datasets.load_digits(seed=args.seed)
  x, y = split.x_train * pixel_max, split.y_train  # digits come in [0, 1]
  model = models.MLP(hidden=(128,), num_classes=10)
  params = model.init(jax.random.key(args.seed), x[:1])["params"]
  tx = mpjax.loss_scaled(optax.adam(1e-3), mpjax.DynamicScaling.like_torch(
      growth_interval=args.growth_interval))
  state = mpjax.TrainState.create(apply_fn=model.apply, params=params, tx=tx,
                                  policy="mixed_float16")
  step = mpjax.make_train_step(seed_mlp.loss_fn, attribution=True,
                               grad_stats_every=args.stats_every)
  guard = mpjax.SkipGuard(args.max_consecutive_skips, like=state.params)
  rng = np.random.default_rng(args.seed)
  skipped, error, report = [], None, None
  path = os.path.join(args.out, f"{name}.jsonl")
  with mpjax.MetricsWriter(path) as log:
    for i in range(args.steps):
      idx = rng.choice(len(x), args.batch_size, replace=False)
      batch = {"x": x[idx], "y": y[idx]}
      state, metrics = step(state, batch)
      record = log.write(i, jax.device_get(metrics), like=state.params,
                         run=name)
      if record["skipped"]:
        skipped.append((i, record["loss_scale"], record["nonfinite_leaves"]))
      try:
        guard.update(record)
      except mpjax.NonFiniteTrainingError as e:
        error = e
        report = mpjax.debug_forward(
            mpjax.with_policy(model.apply, "mixed_float16"),
            {"params": state.params}, batch["x"])
        break
  return {"name": name, "pixel_max": pixel_max, "skipped": skipped,
          "steps_run": i + 1, "final_loss": record["loss"],
          "final_scale": record["loss_scale"], "error": error,
          "report": report, "metrics": path}


def describe(result: dict) -> str:
  """What a user would read after the run."""
  lines = [f"== {result['name']}: pixels in [0, {result['pixel_max']:g}], "
           f"{result['steps_run']} steps, {len(result['skipped'])} skipped"]
  for step, scale, leaves in result["skipped"]:
    lines.append(f"  step {step:3d}  skipped at scale {scale:g}: non-finite "
                 f"gradients in {', '.join(leaves)}")
  if result["error"] is None:
    lines.append(f"  trained on: final loss {result['final_loss']:.4f}, "
                 f"scale {result['final_scale']:g}")
  else:
    lines.append(f"  stopped: {type(result['error']).__name__}: "
                 f"{result['error']}")
    lines.append("  forward debug mode on the last batch:")
    lines.extend("    " + line for line in str(result["report"]).splitlines())
  return "\n".join(lines)


def main(argv: List[str]) -> List[dict]:
  args = parse_args(argv[1:])
  os.makedirs(args.out, exist_ok=True)
  results = [train(name, pixel_max, args)
             for name, pixel_max in SCENARIOS.items()]
  for result in results:
    print(describe(result))
  from mpjax import plot  # pylint: disable=g-import-not-at-top
  png = os.path.join(args.out, "float16_failure.png")
  plot.plot_runs(plot.load_runs([r["metrics"] for r in results]), png,
                 title="mixed_float16, unnormalised pixels")
  print(f"wrote {png}")
  return results


if __name__ == "__main__":
  main(sys.argv)
