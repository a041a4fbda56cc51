"""What the two ResNet examples share: the config, the run, the table.

`resnet_linen.py` and `resnet_nnx.py` each define the model once in their API
(`resnet_models_linen`, `resnet_models_nnx`) and an `Api` (how to build the
train state with its BatchNorm statistics, the loss, eval-mode logits); this
module trains it with `mpjax.TrainState`, `mpjax.make_train_step` and
`mpjax.loss_scaled` under each precision configuration on `resnet_data`'s
synthetic images, evaluates with the running averages, and prints one table.
"""

import argparse
import dataclasses
import time
from typing import Any, Callable, Dict, List, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

import cli
import mpjax
import report
import resnet_data
import training
from mpjax import numerics


@dataclasses.dataclass(frozen=True)
class ResNetConfig:
  """Shape of the CIFAR-style ResNet.

  Attributes:
    widths: channels of each stage; every stage after the first halves the
      resolution (32 -> 16 -> 8 for three stages).
    blocks_per_stage: residual blocks per stage (1: ResNet-8 for 3 stages).
    num_classes: outputs of the classifier.
    channels: input channels (3: RGB).
    bn_momentum: BatchNorm's running-average decay (flax's convention;
      PyTorch's momentum=0.1 is 0.9 here).
    bn_epsilon: BatchNorm's variance epsilon.
  """
  widths: Tuple[int, ...] = (16, 32, 64)
  blocks_per_stage: int = 1
  num_classes: int = 10
  channels: int = resnet_data.CHANNELS
  bn_momentum: float = 0.9
  bn_epsilon: float = 1e-5

  def __post_init__(self):
    if (not isinstance(self.widths, tuple) or not self.widths or
        not all(isinstance(w, int) and w >= 1 for w in self.widths)):
      raise ValueError("ResNetConfig.widths must be a non-empty tuple of "
                       f"positive ints, got {self.widths!r}.")
    for name in ("blocks_per_stage", "num_classes", "channels"):
      value = getattr(self, name)
      if not isinstance(value, int) or value < 1:
        raise ValueError(f"ResNetConfig.{name} must be a positive int, got "
                         f"{value!r}.")
    if not 0.0 <= self.bn_momentum < 1.0 or self.bn_epsilon <= 0:
      raise ValueError("ResNetConfig: bn_momentum must be in [0, 1) and "
                       f"bn_epsilon > 0, got {self.bn_momentum}, "
                       f"{self.bn_epsilon}.")


@dataclasses.dataclass(frozen=True)
class RunConfig:
  name: str
  policy: mpjax.PolicyMap
  scaling: mpjax.LossScaling


# PolicyMaps: every BatchNorm is a float32 island (statistics and running
# averages float32), convolutions and the head compute in the low dtype,
# logits come back float32.
CONFIGS = (
    RunConfig("float32", mpjax.PolicyMap("float32"), mpjax.NoScaling()),
    RunConfig("mixed_bfloat16", mpjax.PolicyMap("mixed_bfloat16"),
              mpjax.NoScaling()),
    RunConfig("mixed_float16", mpjax.PolicyMap("mixed_float16"),
              mpjax.DynamicScaling.like_torch()),
)


@dataclasses.dataclass(frozen=True)
class Api:
  """How one flax API builds, trains and evaluates the ResNet.

  Attributes:
    name: ``"linen"`` or ``"nnx"``.
    init_state: ``(config, policy, tx, seed) -> mpjax.TrainState`` whose
      ``model_state`` holds the BatchNorm statistics.
    loss_fn: ``(params, batch, apply_fn, rng) -> loss`` for
      `mpjax.make_train_step`, the model in training mode.
    logits: ``(state, x) -> logits``, the model in eval mode (the running
      averages), under the state's policy; traced under `jax.jit`.
    debug: ``(apply_fn, policy, params, model_state, x) ->
      mpjax.ForwardReport`` of the training-mode forward pass (what the step
      ran: batch statistics, so any `model_state` of the right shapes does),
      printed when the skip guard stops a run.
  """
  name: str
  init_state: Callable[..., mpjax.TrainState]
  loss_fn: Callable[..., jax.Array]
  logits: Callable[[mpjax.TrainState, jax.Array], jax.Array]
  debug: Callable[..., Any]


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Mean softmax cross-entropy (nats), computed in float32."""
  return numerics.softmax_cross_entropy_with_integer_labels(
      logits, labels).mean()


def make_optimizer(args: argparse.Namespace,
                   scaling: mpjax.LossScaling) -> optax.GradientTransformation:
  """Weight decay + Nesterov SGD, warm-up then cosine, inside `loss_scaled`
  (so the decay and the schedule see unscaled gradients and applied steps)."""
  warmup = min(args.warmup_steps, args.steps - 1)
  schedule = optax.warmup_cosine_decay_schedule(
      0.0, args.lr, warmup, max(args.steps, warmup + 1), end_value=0.0)
  inner = optax.chain(optax.add_decayed_weights(args.weight_decay),
                      optax.sgd(schedule, momentum=0.9, nesterov=True))
  return mpjax.loss_scaled(inner, scaling)


def tree_size(tree: Any) -> int:
  return int(sum(np.size(x) for x in jax.tree.leaves(tree)))


def run_config(run: RunConfig, api: Api, config: ResNetConfig,
               data: resnet_data.Dataset, args: argparse.Namespace,
               log: Optional[mpjax.MetricsWriter] = None) -> dict:
  """Trains one configuration; returns its row."""
  state = api.init_state(config, run.policy, make_optimizer(args, run.scaling),
                         args.seed)
  initial_stats = jax.device_get(state.model_state)  # host copy: not donated
  step = mpjax.make_train_step(api.loss_fn, attribution=args.attribution,
                               grad_stats_every=args.stats_every)
  batch_at = training.sequential(resnet_data.train_batches(
      data.x_train, data.y_train, args.batch_size, seed=args.seed))
  training.doctor(args, run.name, state, resnet_data.train_batches(
      data.x_train, data.y_train, args.batch_size, seed=args.seed),
                  api.loss_fn)
  start = time.perf_counter()
  compiled = step.lower(state, batch_at(0)).compile()
  compile_s = time.perf_counter() - start

  checkpoints, state = training.open_checkpoints(args, run.name, state)
  loop = training.run(
      compiled, state, batch_at, name=run.name, last=args.steps, args=args,
      log=log, checkpoints=checkpoints,
      loss_scaled=not isinstance(run.scaling, mpjax.NoScaling),
      warmup=args.timing_warmup,
      debug=lambda params, batch: api.debug(
          state.apply_fn, state.policy, params, initial_stats, batch["x"]))
  state = loop.state
  losses = np.asarray(jax.device_get(loop.losses), np.float64)
  if not np.all(np.isfinite(losses[-args.report_window:])):
    raise FloatingPointError(f"{run.name}: non-finite loss at the end of "
                             "training.")

  logits = jax.jit(api.logits)
  correct, eval_losses = 0, []
  for batch in resnet_data.eval_batches(data.x_eval, data.y_eval,
                                        args.eval_batch_size):
    out = logits(state, batch["x"])
    correct += int(jnp.sum(jnp.argmax(out, -1) == batch["y"]))
    eval_losses.append(float(cross_entropy(out, batch["y"])) * len(batch["y"]))
  stats = jax.device_get(state.model_state)
  scale_state = mpjax.loss_scale_state(state.opt_state)
  device = jax.devices()[0]
  return {
      "config": run.name,
      "policy": repr(run.policy),
      "scaling": repr(run.scaling),
      "final_train_loss": float(losses[-args.report_window:].mean()),
      "eval_accuracy": correct / len(data.y_eval),
      "eval_loss": float(np.sum(eval_losses) / len(data.y_eval)),
      "train_s": loop.elapsed_s,
      "ms_per_step": (1e3 * loop.elapsed_s / loop.timed_steps
                      if loop.timed_steps else None),
      "images_per_s": (loop.timed_steps * args.batch_size / loop.elapsed_s
                       if loop.timed_steps else None),
      "timed_steps": loop.timed_steps,
      "resumed_at_step": args.steps - len(loop.losses),
      "steps": args.steps,
      "stopped_at_step": loop.stopped_at,
      "skipped_steps": int(scale_state.skipped_steps),
      "final_loss_scale": float(scale_state.scale),
      "compile_s": compile_s,
      **report.xla_memory(compiled),
      "param_count": tree_size(state.params),
      "batch_stats_count": tree_size(stats),
      "batch_stats_dtypes": sorted({str(np.asarray(x).dtype)
                                    for x in jax.tree.leaves(stats)}),
      "loss_curve": [float(x) for x in losses],
      "device": f"{device.platform}:{device.device_kind}",
  }


COLUMNS = (
    ("config", "config", "{}"),
    ("final train loss", "final_train_loss", "{:.4f}"),
    ("eval acc", "eval_accuracy", "{:.2%}"),
    ("vs float32", "eval_gap_points", "{:+.2f} pt"),
    ("eval loss", "eval_loss", "{:.4f}"),
    ("skipped", "skipped_steps", "{}"),
    ("final scale", "final_loss_scale", "{:g}"),
    ("train s", "train_s", "{:.1f}"),
    ("ms/step", "ms_per_step", "{:.1f}"),
    ("compile s", "compile_s", "{:.1f}"),
)


# The flags live in cli.py, which answers --help without importing jax.
parse_args = cli.parse_resnet_args


def gap_failures(rows: List[dict], max_gap_points: float) -> List[str]:
  """Configs whose eval accuracy is more than `max_gap_points` from float32."""
  return [r["config"] for r in rows
          if r.get("eval_gap_points") is not None and
          abs(r["eval_gap_points"]) > max_gap_points]


def main(argv: List[str], api: Api) -> Dict[str, Any]:
  """Runs the configurations, prints the table, writes JSON; returns it.

  Raises:
    SystemExit: a mixed run ended more than ``--max-gap-points`` from
      float32's eval accuracy.
  """
  args = parse_args(argv[1:], api.name)
  config = ResNetConfig(widths=tuple(args.widths),
                        blocks_per_stage=args.blocks_per_stage)
  data = resnet_data.make(args.num_train, args.num_eval, config.num_classes,
                          seed=args.seed, noise=args.noise)
  env = report.environment(argv)
  env.update({k: v for k, v in vars(args).items() if k != "json"})
  env.update(api=api.name, model_config=dataclasses.asdict(config),
             **data.describe())
  runs = [r for r in CONFIGS if r.name in args.configs]
  rows = training.run_configs(
      lambda r, log: run_config(r, api, config, data, args, log), runs, args)
  reference = next((r for r in rows if r["config"] == "float32"), None)
  for row in rows:
    row["eval_gap_points"] = (
        None if reference is None else
        100 * (row["eval_accuracy"] - reference["eval_accuracy"]))
  print(f"{api.name} ResNet (widths {list(config.widths)}, "
        f"{config.blocks_per_stage} block(s) per stage, BatchNorm, "
        f"{rows[0]['param_count']:,} params, "
        f"{rows[0]['batch_stats_count']:,} batch statistics) on "
        f"{len(data.y_train):,} synthetic 32x32x3 images, {args.steps} steps "
        f"x {args.batch_size}; eval on {len(data.y_eval):,} with the running "
        "averages")
  print(f"{env['device']}  python {env['python']}  jax {env['jax']}  flax "
        f"{env['flax']}  optax {env['optax']}  {env['date']}")
  print(report.markdown_table(rows, COLUMNS))
  failed = gap_failures(rows, args.max_gap_points)
  result = {"environment": env, "rows": rows,
            "within_gap": not failed, "max_gap_points": args.max_gap_points}
  training.finish(result, rows, args, argv, title=f"{api.name} ResNet")
  if failed:
    raise SystemExit(f"{', '.join(failed)}: eval accuracy more than "
                     f"{args.max_gap_points} points away from float32's.")
  return result
