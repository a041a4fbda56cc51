"""What the two language-model examples share: the config, the run, the table.

`lm_linen.py` and `lm_nnx.py` each define the model once in their API
(`lm_models_linen`, `lm_models_nnx`) and a ``build`` function; this module
trains it with `mpjax.TrainState`, `mpjax.make_train_step` and
`mpjax.loss_scaled` under each precision configuration and prints one table.

The configurations (`CONFIGS`): float32, mixed_bfloat16, mixed_float16 +
dynamic loss scaling (the default run), and fp8_delayed / fp8_current: the
mixed_bfloat16 map plus an fp8 recipe on every matmul layer (`fp8_policy`),
checked against mixed_bfloat16 (within ``--max-fp8-gap-pct``, 1.5%) where
the mixed ones are checked against float32 (``--max-gap-pct``).
"""

import argparse
import dataclasses
import time
from typing import Any, Callable, Dict, List, Optional, Tuple

import flax.linen as nn
import jax
import numpy as np
import optax
from flax import nnx

import cli
import lm_data
import mpjax
import optimizer_precision
import report
import training
from mpjax import numerics


@dataclasses.dataclass(frozen=True)
class LMConfig:
  """Shape of the transformer language model.

  Attributes:
    vocab_size: number of token ids (256 for bytes).
    seq_len: the longest sequence (size of the position embedding).
    num_layers: transformer blocks.
    d_model: width of the residual stream.
    num_heads: attention heads (``d_model`` must be a multiple).
    mlp_ratio: MLP hidden width over ``d_model``.
  """
  vocab_size: int = lm_data.VOCAB_SIZE
  seq_len: int = 64
  num_layers: int = 2
  d_model: int = 64
  num_heads: int = 4
  mlp_ratio: int = 4

  def __post_init__(self):
    for field in dataclasses.fields(self):
      value = getattr(self, field.name)
      if not isinstance(value, int) or value < 1:
        raise ValueError(f"LMConfig.{field.name} must be a positive int, got "
                         f"{value!r}.")
    if self.d_model % self.num_heads:
      raise ValueError(f"LMConfig: d_model {self.d_model} is not a multiple "
                       f"of num_heads {self.num_heads}.")

  @property
  def residual_init_std(self) -> float:
    """GPT-2's init for layers that write to the residual stream."""
    return 0.02 / (2 * self.num_layers) ** 0.5

  @classmethod
  def gpt2_124m(cls, vocab_size: int = 50257,
                seq_len: int = 1024) -> "LMConfig":
    """GPT-2 small: 12 layers, d_model 768, 12 heads (124M params with the
    50257-token vocabulary, tied output embedding)."""
    return cls(vocab_size=vocab_size, seq_len=seq_len, num_layers=12,
               d_model=768, num_heads=12, mlp_ratio=4)


@dataclasses.dataclass(frozen=True)
class RunConfig:
  """One precision configuration of the LM examples.

  Attributes:
    name: its name (``--configs``; `cli.LM_CONFIGS`).
    policy: the `PolicyMap` the model trains under.
    scaling: the loss scaling.
    reference: the configuration whose validation loss this one's gap is
      checked against (float32 for the mixed ones, mixed_bfloat16 for fp8).
  """
  name: str
  policy: mpjax.PolicyMap
  scaling: mpjax.LossScaling
  reference: str = "float32"


def lm_policy(spec: str) -> mpjax.PolicyMap:
  """A language model's `PolicyMap`: float32 islands, logits in compute dtype.

  The model returns its logits in the compute dtype (``o=bf16``/``o=f16``,
  as autocast does) and the loss, `mpjax.numerics`' cross-entropy, upcasts
  them and keeps them in the compute dtype for its backward pass. With the
  presets' float32 output, the float32 ``[batch, seq, vocab]`` logits would
  be the largest array the backward pass keeps (1.6 GB for GPT-2 small at
  batch 8 x 1024). The loss values are the same either way: the float32
  logits are exact copies of the low-precision ones.
  """
  policy = mpjax.get_policy(spec)
  return mpjax.PolicyMap(policy.with_output_dtype(policy.compute_dtype))


# The matmul layers an fp8 entry covers: the MLP and the attention
# projections. Embeddings, the tied output projection (Embed.attend), the
# attention core (QK^T, PV) and the norms stay as the bfloat16 map says.
FP8_LAYERS = {"linen": (nn.Dense, nn.DenseGeneral),
              "nnx": (nnx.Linear, nnx.LinearGeneral)}


def fp8_policy(recipe: Any, api: Optional[str] = None) -> mpjax.PolicyMap:
  """The mixed_bfloat16 LM map plus `recipe` on every matmul layer.

  Args:
    recipe: `mpjax.DelayedScaling` or `mpjax.CurrentScaling`.
    api: ``"linen"`` or ``"nnx"`` for that API's layer classes only; None:
      both (an entry that matches no module is ignored).
  """
  if api is not None and api not in FP8_LAYERS:
    raise ValueError(f"fp8_policy: unknown api {api!r}; known: "
                     f"{sorted(FP8_LAYERS)}.")
  layers = [cls for name, classes in FP8_LAYERS.items()
            if api in (None, name) for cls in classes]
  return mpjax.PolicyMap(lm_policy("mixed_bfloat16").default,
                         {cls: recipe for cls in layers})


CONFIGS = (
    RunConfig("float32", lm_policy("float32"), mpjax.NoScaling()),
    RunConfig("mixed_bfloat16", lm_policy("mixed_bfloat16"),
              mpjax.NoScaling()),
    RunConfig("mixed_float16", lm_policy("mixed_float16"),
              mpjax.DynamicScaling.like_torch()),
    RunConfig("fp8_delayed", fp8_policy(mpjax.DelayedScaling()),
              mpjax.NoScaling(), reference="mixed_bfloat16"),
    RunConfig("fp8_current", fp8_policy(mpjax.CurrentScaling()),
              mpjax.NoScaling(), reference="mixed_bfloat16"),
)

# build(config, policy_map, seed, tx) -> the fresh mpjax.TrainState: its
# apply_fn is called as apply_fn(state.variables, tokens) and returns the
# logits; model_state holds what the policy needs (fp8 scales and amax
# histories in "_overwrite_with_gradient").
Build = Callable[[LMConfig, mpjax.PolicyMap, int,
                  optax.GradientTransformation], mpjax.TrainState]


def loss_fn(params, batch, apply_fn, rng):
  """Mean next-byte cross-entropy (nats), computed in float32."""
  del rng
  logits = apply_fn({"params": params}, batch["x"])
  return numerics.softmax_cross_entropy_with_integer_labels(
      logits, batch["y"]).mean()


def make_optimizer(args: argparse.Namespace,
                   scaling: mpjax.LossScaling) -> optax.GradientTransformation:
  """Clip (inside: it sees unscaled gradients) then Adam with warm-up/cosine."""
  warmup = min(args.warmup_steps, args.steps - 1)
  schedule = optax.warmup_cosine_decay_schedule(
      0.0, args.lr, warmup, max(args.steps, warmup + 1),
      end_value=0.1 * args.lr)
  adam = (optax.adam(schedule, b2=0.95) if args.optimizer_precision is None
          else optimizer_precision.optimizer(args.optimizer_precision,
                                             schedule, args.seed, b2=0.95))
  inner = optax.chain(optax.clip_by_global_norm(1.0), adam)
  return mpjax.loss_scaled(inner, scaling)


def run_config(run: RunConfig, build: Build, config: LMConfig,
               corpus: lm_data.Corpus, args: argparse.Namespace,
               log: Optional[mpjax.MetricsWriter] = None,
               doctor_model: Optional[Callable[[LMConfig, int], Any]] = None
               ) -> dict:
  """Trains one configuration; returns its row.

  `doctor_model(config, seed)`, for ``--doctor`` on NNX, builds the module
  (the doctor prepares it under each policy itself).
  """
  if args.optimizer_precision is not None:  # params in the preset's dtype
    run = dataclasses.replace(run, policy=mpjax.PolicyMap(
        optimizer_precision.with_param_dtype(run.policy.default,
                                             args.optimizer_precision)))
  state = build(config, run.policy, args.seed,
                make_optimizer(args, run.scaling))
  apply_fn, params = state.apply_fn, state.params
  # NNX: the doctor prepares its own copies of the module (doctor_model).
  training.doctor(
      args, run.name, state if doctor_model is None else
      doctor_model(config, args.seed), lm_data.train_batches(
          corpus.train, args.batch_size, config.seq_len, seed=args.seed),
      loss_fn, run.policy)
  step = mpjax.make_train_step(loss_fn, attribution=args.attribution,
                               grad_stats_every=args.stats_every)
  batch_at = training.sequential(lm_data.train_batches(
      corpus.train, args.batch_size, config.seq_len, seed=args.seed))
  start = time.perf_counter()
  lowered = step.lower(state, batch_at(0))
  compiled = lowered.compile()
  compile_s = time.perf_counter() - start
  flops = mpjax.audit_program(lowered).matmul_flops_by_dtype()

  checkpoints, state = training.open_checkpoints(args, run.name, state)
  apply = mpjax.with_policy(apply_fn, run.policy)
  model_state = state.model_state or {}  # for --debug's forward only
  loop = training.run(
      compiled, state, batch_at, name=run.name, last=args.steps, args=args,
      log=log, checkpoints=checkpoints,
      loss_scaled=not isinstance(run.scaling, mpjax.NoScaling),
      warmup=args.timing_warmup,
      debug=lambda params, batch: mpjax.debug_forward(
          apply, {"params": params, **model_state}, batch["x"]))
  state = loop.state
  losses = np.asarray(jax.device_get(loop.losses), np.float64)
  if not np.all(np.isfinite(losses[-args.report_window:])):
    raise FloatingPointError(f"{run.name}: non-finite loss at the end of "
                             "training.")

  def evaluate(params, model_state, batch):
    # The trained model state (fp8 scales and histories) rides along.
    def with_state(variables, tokens):
      return apply({**variables, **(model_state or {})}, tokens)
    return loss_fn(params, batch, with_state, None)

  evaluate = jax.jit(evaluate)
  val = [float(evaluate(state.params, state.model_state, b))
         for b in lm_data.eval_batches(corpus.val, args.batch_size,
                                       config.seq_len, args.eval_batches)]
  scale_state = mpjax.loss_scale_state(state.opt_state)
  device = jax.devices()[0]
  return {
      "config": run.name,
      "optimizer_precision": args.optimizer_precision,
      "policy": repr(run.policy),
      "scaling": repr(run.scaling),
      "gap_reference": run.reference,
      "final_train_loss": float(losses[-args.report_window:].mean()),
      "val_loss": float(np.mean(val)),
      "tokens_per_s": (loop.timed_steps * args.batch_size * config.seq_len
                       / loop.elapsed_s) if loop.timed_steps else None,
      "timed_steps": loop.timed_steps,
      "resumed_at_step": args.steps - len(loop.losses),
      "steps": args.steps,
      "stopped_at_step": loop.stopped_at,
      "skipped_steps": int(scale_state.skipped_steps),
      "final_loss_scale": float(scale_state.scale),
      "compile_s": compile_s,
      **report.xla_memory(compiled),
      "param_count": int(sum(np.size(p) for p in jax.tree.leaves(params))),
      "lowered_matmul_flops_by_dtype": flops,
      "fp8_matmul_share": sum(v for k, v in flops.items() if "float8" in k)
                          / max(sum(flops.values()), 1),
      "loss_curve": [float(x) for x in losses],
      "device": f"{device.platform}:{device.device_kind}",
  }


COLUMNS = (
    ("config", "config", "{}"),
    ("final train loss", "final_train_loss", "{:.4f}"),
    ("val loss", "val_loss", "{:.4f}"),
    ("vs float32", "val_gap_pct", "{:+.2f}%"),
    ("vs bfloat16", "bf16_gap_pct", "{:+.2f}%"),
    ("fp8 matmul FLOPs", "fp8_matmul_share", "{:.0%}"),
    ("tokens/s", "tokens_per_s", "{:,.0f}"),
    ("skipped", "skipped_steps", "{}"),
    ("final scale", "final_loss_scale", "{:g}"),
    ("compile s", "compile_s", "{:.1f}"),
    ("XLA temp B", "xla_temp_bytes", "{:,}"),
    ("XLA args B", "xla_argument_bytes", "{:,}"),
    ("XLA out B", "xla_output_bytes", "{:,}"),
)


# The flags live in cli.py, which answers --help without importing jax.
parse_args = cli.parse_lm_args


def model_config(args: argparse.Namespace) -> LMConfig:
  if args.model == "gpt2-124m":
    return LMConfig.gpt2_124m(vocab_size=lm_data.VOCAB_SIZE,
                              seq_len=args.seq_len)
  return LMConfig(seq_len=args.seq_len, num_layers=args.layers,
                  d_model=args.d_model, num_heads=args.heads)


def gap_failures(rows: List[dict], max_gap_pct: float,
                 max_fp8_gap_pct: Optional[float] = None) -> List[str]:
  """Configs whose validation loss is too far from their reference's.

  A row is checked against its ``gap_reference`` (default float32):
  float32 rows (``val_gap_pct``) against `max_gap_pct`, mixed_bfloat16 rows
  (``bf16_gap_pct``, the fp8 configurations) against `max_fp8_gap_pct`
  (None: not checked). A row whose reference did not run is not checked.
  """
  key_and_limit = {"float32": ("val_gap_pct", max_gap_pct),
                   "mixed_bfloat16": ("bf16_gap_pct", max_fp8_gap_pct)}
  failed = []
  for r in rows:
    key, limit = key_and_limit[r.get("gap_reference", "float32")]
    if (limit is not None and r.get(key) is not None and
        abs(r[key]) > limit):
      failed.append(r["config"])
  return failed


def main(argv: List[str], api: str, build: Build,
         doctor_model: Optional[Callable[[LMConfig, int], Any]] = None
         ) -> Dict[str, Any]:
  """Runs the configurations, prints the table, writes JSON; returns it.

  Raises:
    SystemExit: a mixed run ended more than ``--max-gap-pct`` from float32,
      or an fp8 run more than ``--max-fp8-gap-pct`` from mixed_bfloat16.
  """
  args = parse_args(argv[1:], api)
  config = model_config(args)
  corpus = lm_data.load(args.max_bytes)
  env = report.environment(argv)
  env.update(api=api, model_config=dataclasses.asdict(config),
             **corpus.describe(),
             **{k: v for k, v in vars(args).items() if k not in ("json",)})
  runs = [r for r in CONFIGS if r.name in args.configs]
  rows = training.run_configs(
      lambda r, log: run_config(r, build, config, corpus, args, log,
                                doctor_model), runs, args)
  by_name = {r["config"]: r for r in rows}
  for row in rows:
    for key, name in (("val_gap_pct", "float32"),
                      ("bf16_gap_pct", "mixed_bfloat16")):
      ref = by_name.get(name)
      row[key] = (None if ref is None else
                  100 * (row["val_loss"] / ref["val_loss"] - 1))
  print(f"{api} transformer LM ({config.num_layers} x {config.d_model}, "
        f"{config.num_heads} heads, seq {config.seq_len}, "
        f"{rows[0]['param_count']:,} params) on {corpus.files} stdlib files "
        f"({corpus.train.size:,} train bytes), {args.steps} steps x "
        f"{args.batch_size}")
  print(f"{env['device']}  python {env['python']}  jax {env['jax']}  flax "
        f"{env['flax']}  optax {env['optax']}  {env['date']}")
  print(report.markdown_table(rows, COLUMNS))
  failed = gap_failures(rows, args.max_gap_pct, args.max_fp8_gap_pct)
  result = {"environment": env, "rows": rows,
            "within_gap": not failed, "max_gap_pct": args.max_gap_pct,
            "max_fp8_gap_pct": args.max_fp8_gap_pct}
  training.finish(result, rows, args, argv, title=f"{api} transformer LM")
  if failed:
    raise SystemExit(
        f"{', '.join(failed)}: validation loss more than the limit away from "
        f"the reference's (mixed: {args.max_gap_pct}% from float32; fp8: "
        f"{args.max_fp8_gap_pct}% from mixed_bfloat16).")
  return result

