"""The seed experiment, done right: one MLP trained in four precision configurations.

The seed compared Keras `mixed_float16` + a GradientTape loop with PyTorch
`autocast` + `GradScaler` on a Dense(128, relu) -> Dense(10) classifier. This
script trains that model (on logits, Adam(1e-3), softmax cross-entropy,
10 epochs, batch 128, seed 0) four ways in one invocation and prints one table:

  float32                  float32 everywhere, no loss scaling
  mixed_float16+keras      the TF half: params f32, compute f16, outputs f32,
                           Keras 3 LossScaleOptimizer semantics (like_keras)
  float16_autocast+torch   the PyTorch half: params f32, compute f16, outputs
                           f16 like autocast, loss upcast to f32, GradScaler
                           semantics (like_torch)
  mixed_bfloat16           params f32, compute bf16, outputs f32, no scaling

Command (from the repository root, after `pip install -e .`):

  python experiments/seed_mlp.py                       # digits, bundled
  python experiments/seed_mlp.py --data-dir ~/mnist    # MNIST IDX files

Expected on digits (1,348 train / 449 test, 100 steps): about 90% test
accuracy in every configuration, the mixed ones within 1.0 point of float32,
0 skipped steps, exported half-precision params half the bytes of float32.
The table is also written as JSON (--json, default runs/seed_mlp.json).
"""

import argparse
import dataclasses
import os
import sys
import time
from typing import Dict, List, Optional, Tuple

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import cli  # pylint: disable=g-import-not-at-top,wrong-import-position

# The names of CONFIGS below, for the flags (they are parsed before jax loads).
CONFIG_NAMES = ("float32", "mixed_float16+keras", "float16_autocast+torch",
                "mixed_bfloat16")


def parse_args(argv: List[str]) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--data-dir", default=None,
                      help="directory with the four MNIST IDX files (raw or "
                           ".gz); default: scikit-learn's bundled digits")
  parser.add_argument("--epochs", type=int, default=10)
  parser.add_argument("--batch-size", type=int, default=128)
  parser.add_argument("--lr", type=float, default=1e-3)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--warmup", type=int, default=5,
                      help="steps left out of the median step time")
  parser.add_argument("--configs", nargs="+", default=list(CONFIG_NAMES),
                      choices=CONFIG_NAMES)
  parser.add_argument("--json", default=os.path.join("runs", "seed_mlp.json"),
                      help="where to write the table as JSON")
  cli.add_optimizer_precision_argument(parser)
  cli.add_run_arguments(parser, "seed_mlp")
  args = parser.parse_args(argv)
  for name in ("epochs", "batch_size"):
    if getattr(args, name) < 1:
      parser.error(f"--{name.replace('_', '-')} must be >= 1, got "
                   f"{getattr(args, name)}")
  if args.warmup < 0:
    parser.error(f"--warmup must be >= 0, got {args.warmup}")
  cli.check_run_arguments(parser, args)
  if args.data_dir is None:
    cli.require_module(parser, "sklearn", "the bundled digits (no --data-dir)",
                       "experiments")
  return args


if __name__ == "__main__":
  parse_args(sys.argv[1:])  # --help and flag errors before jax is imported

# pylint: disable=g-import-not-at-top,wrong-import-position
import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np
import optax

import mpjax

import datasets  # pylint: disable=g-import-not-at-top,wrong-import-position
import models  # pylint: disable=g-import-not-at-top,wrong-import-position
import optimizer_precision  # pylint: disable=g-import-not-at-top,wrong-import-position
import report  # pylint: disable=g-import-not-at-top,wrong-import-position
import training  # pylint: disable=g-import-not-at-top,wrong-import-position
# pylint: enable=g-import-not-at-top,wrong-import-position


@dataclasses.dataclass(frozen=True)
class Config:
  name: str
  policy: str
  scaling: mpjax.LossScaling


CONFIGS = (
    Config("float32", "float32", mpjax.NoScaling()),
    Config("mixed_float16+keras", "mixed_float16",
           mpjax.DynamicScaling.like_keras()),
    Config("float16_autocast+torch", "p=f32,c=f16,o=f16",
           mpjax.DynamicScaling.like_torch()),
    Config("mixed_bfloat16", "mixed_bfloat16", mpjax.NoScaling()),
)


def loss_fn(params, batch, apply_fn, rng):
  """Mean softmax cross-entropy on logits, computed in float32."""
  del rng
  logits = apply_fn({"params": params}, batch["x"])
  # Autocast runs cross_entropy in float32 whatever the logits' dtype.
  return optax.softmax_cross_entropy_with_integer_labels(
      logits.astype(jnp.float32), batch["y"]).mean()


def epoch_batches(split: datasets.Split, batch_size: int,
                  rng: np.random.Generator) -> List[Dict[str, np.ndarray]]:
  """One epoch of shuffled full batches (the remainder is dropped)."""
  order = rng.permutation(len(split.x_train))
  n = len(order) // batch_size
  return [{"x": split.x_train[idx], "y": split.y_train[idx]}
          for idx in np.split(order[:n * batch_size], n)]


def new_state(config: Config, split: datasets.Split,
              args: argparse.Namespace) -> Tuple[models.MLP, mpjax.TrainState]:
  """The model and its fresh train state (also the template for --resume)."""
  num_classes = int(max(split.y_train.max(), split.y_test.max())) + 1
  model = models.MLP(hidden=(128,), num_classes=num_classes)
  params = model.init(jax.random.key(args.seed), split.x_train[:1])["params"]
  inner = (optax.adam(args.lr) if args.optimizer_precision is None else
           optimizer_precision.optimizer(args.optimizer_precision, args.lr,
                                         args.seed))
  tx = mpjax.loss_scaled(inner, config.scaling)
  policy = optimizer_precision.with_param_dtype(config.policy,
                                                args.optimizer_precision)
  return model, mpjax.TrainState.create(apply_fn=model.apply, params=params,
                                        tx=tx, policy=policy)


def run_config(config: Config, split: datasets.Split,
               args: argparse.Namespace,
               log: Optional[mpjax.MetricsWriter] = None) -> dict:
  """Trains one configuration; returns its row of the table."""
  model, state = new_state(config, split, args)
  step = mpjax.make_train_step(loss_fn, attribution=args.attribution,
                               grad_stats_every=args.stats_every)
  data_rng = np.random.default_rng(args.seed)
  epochs = [epoch_batches(split, args.batch_size, data_rng)
            for _ in range(args.epochs)]
  if not epochs or not epochs[0]:
    raise ValueError(
        f"--batch-size {args.batch_size} leaves no full batch in "
        f"{len(split.x_train)} training examples.")
  batches = [(epoch, batch) for epoch, epoch_list in enumerate(epochs)
             for batch in epoch_list]
  training.doctor(args, config.name, state, (b for _, b in batches), loss_fn)

  start = time.perf_counter()
  compiled = step.lower(state, batches[0][1]).compile()
  compile_s = time.perf_counter() - start

  checkpoints, state = training.open_checkpoints(args, config.name, state)
  first = int(state.step)  # batches already consumed (skipped steps count)
  apply = mpjax.with_policy(model.apply, config.policy)
  loop = training.run(
      compiled, state, lambda i: batches[i][1], name=config.name,
      last=len(batches), args=args, log=log, checkpoints=checkpoints,
      loss_scaled=not isinstance(config.scaling, mpjax.NoScaling),
      time_each_step=True,
      debug=lambda params, batch: mpjax.debug_forward(
          apply, {"params": params}, batch["x"]),
      extra=lambda i: {"epoch": batches[i][0]})
  state, step_times = loop.state, loop.step_times
  losses_by_epoch = [[] for _ in epochs]
  for i, loss in zip(range(first, len(batches)), jax.device_get(loop.losses)):
    losses_by_epoch[batches[i][0]].append(float(loss))
  losses = [float(np.mean(epoch_losses)) if epoch_losses else None
            for epoch_losses in losses_by_epoch]

  predict = jax.jit(lambda p, x: jnp.argmax(
      mpjax.with_policy(model.apply, config.policy)({"params": p}, x), -1))
  accuracy = float(np.mean(
      np.asarray(predict(state.params, split.x_test)) == split.y_test))
  test_loss = float(jax.jit(loss_fn, static_argnums=2)(
      state.params, {"x": split.x_test, "y": split.y_test}, apply, None))
  scale_state = mpjax.loss_scale_state(state.opt_state)
  exported = mpjax.get_policy(config.policy).cast_to_compute(state.params)
  timed = step_times[args.warmup:] or step_times
  return {
      "config": config.name,
      "policy": mpjax.policy_name(state.policy),
      "scaling": repr(config.scaling),
      "test_accuracy": accuracy,
      "test_loss": test_loss,
      "optimizer_precision": args.optimizer_precision,
      "final_train_loss": losses[-1],
      "resumed_at_step": first,
      "epoch_losses": losses,
      "median_step_ms": 1e3 * float(np.median(timed)),
      "timed_steps": len(timed),
      "compile_s": compile_s,
      **report.xla_memory(compiled),
      "steps": len(batches),
      "steps_this_run": len(step_times),
      "stopped_at_step": loop.stopped_at,
      "skipped_steps": int(scale_state.skipped_steps),
      "final_loss_scale": float(scale_state.scale),
      "params_all_finite": bool(all(
          np.isfinite(np.asarray(p)).all()
          for p in jax.tree.leaves(state.params))),
      "export_dtype": str(jnp.dtype(mpjax.get_policy(config.policy).compute_dtype)),
      "export_bytes": len(flax.serialization.to_bytes(exported)),
      "device": f"{jax.devices()[0].platform}:{jax.devices()[0].device_kind}",
  }


COLUMNS = (
    ("config", "config", "{}"),
    ("policy", "policy", "{}"),
    ("test acc %", "test_accuracy", "{:.2%}"),
    ("train loss", "final_train_loss", "{:.4f}"),
    ("step ms (median)", "median_step_ms", "{:.3f}"),
    ("compile s", "compile_s", "{:.2f}"),
    ("XLA temp B", "xla_temp_bytes", "{}"),
    ("XLA args B", "xla_argument_bytes", "{}"),
    ("skipped", "skipped_steps", "{}"),
    ("final scale", "final_loss_scale", "{:g}"),
    ("export B", "export_bytes", "{}"),
    ("device", "device", "{}"),
)


def accuracy_gap(points_below: float) -> str:
  """'0.45 points below float32', '0.22 points above float32' or 'equal to
  float32's' (two decimals, no signed zero)."""
  if round(points_below, 2) == 0:
    return "equal to float32's"
  side = "below" if points_below > 0 else "above"
  return f"{abs(points_below):.2f} points {side} float32"


def main(argv: List[str]) -> dict:
  args = parse_args(argv[1:])
  split = (datasets.load_mnist(args.data_dir) if args.data_dir
           else datasets.load_digits(seed=args.seed))
  env = report.environment(argv)
  env.update(dataset=split.name, train_examples=len(split.x_train),
             test_examples=len(split.x_test), features=split.x_train.shape[1],
             epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
             seed=args.seed)
  configs = [c for c in CONFIGS if c.name in args.configs]
  rows = training.run_configs(
      lambda c, log: run_config(c, split, args, log), configs, args)
  result = {"environment": env, "rows": rows}

  print(f"seed MLP on {split.name} ({len(split.x_train)} train / "
        f"{len(split.x_test)} test, {split.x_train.shape[1]} features), "
        f"{args.epochs} epochs, batch {args.batch_size}")
  print(f"{env['device']}  jax {env['jax']}  flax {env['flax']}  optax "
        f"{env['optax']}  {env['date']}")
  print(report.markdown_table(rows, COLUMNS))
  reference = next((r for r in rows if r["config"] == "float32"), None)
  if reference is not None:
    gaps = {r["config"]: 100 * (reference["test_accuracy"] - r["test_accuracy"])
            for r in rows if r is not reference}
    result["accuracy_gap_points"] = gaps
    for name, gap in gaps.items():
      print(f"{name}: test accuracy {accuracy_gap(gap)} "
            f"({'within' if gap <= 1.0 else 'NOT within'} 1.0 point)")
  training.finish(result, rows, args, argv, title=f"seed MLP on {split.name}")
  return result


if __name__ == "__main__":
  main(sys.argv)
