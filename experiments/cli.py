"""The experiments' command lines, answered before jax is imported.

Importing jax, flax and mpjax takes 5-25 s on a loaded 2-core machine, so
every experiment builds its parser from this module and the standard library
alone, parses ``sys.argv`` first (``--help`` and argument errors return at
once), and only then imports the rest. Nothing here may import jax, flax,
optax, orbax, numpy or mpjax: `tests/test_cli.py` checks it.
"""

import argparse
import dataclasses
import importlib.util
import os
import shlex
from typing import Any, Iterable, List, Mapping


@dataclasses.dataclass(frozen=True)
class OptimizerPrecision:
  """One storage configuration of the params and the Adam moments."""
  name: str
  param_dtype: str
  mu_dtype: str
  nu_dtype: str
  rounding: str
  note: str


# What --optimizer-precision names (experiments/optimizer_precision.py builds
# the optimizers); plain strings, so that the flag needs no jax.
OPTIMIZER_PRECISIONS = {p.name: p for p in (
    OptimizerPrecision("f32", "float32", "float32", "float32", "nearest",
                       "float32 masters + float32 moments"),
    OptimizerPrecision("bf16-moments", "float32", "bfloat16", "bfloat16",
                       "nearest", "float32 masters + bfloat16 moments"),
    OptimizerPrecision("bf16-sr", "bfloat16", "bfloat16", "bfloat16",
                       "stochastic", "bfloat16 masters, stochastic rounding, "
                       "bfloat16 moments"),
    OptimizerPrecision("bf16-kahan", "bfloat16", "bfloat16", "bfloat16",
                       "kahan", "bfloat16 masters + bfloat16 Kahan buffer, "
                       "bfloat16 moments"),
    OptimizerPrecision("bf16-nearest", "bfloat16", "bfloat16", "bfloat16",
                       "nearest", "bfloat16 masters, round to nearest, "
                       "bfloat16 moments"),
)}


# The configurations of the LM and ResNet experiments (lm_common.CONFIGS,
# resnet_common.CONFIGS), by name.
PRECISION_CONFIGS = ("float32", "mixed_bfloat16", "mixed_float16")
# The LM examples also train in fp8 (the mixed_bfloat16 map plus an fp8
# recipe on every matmul layer): lm_common.CONFIGS. Not in the default run.
FP8_CONFIGS = ("fp8_delayed", "fp8_current")
LM_CONFIGS = PRECISION_CONFIGS + FP8_CONFIGS


def add_optimizer_precision_argument(parser: argparse.ArgumentParser) -> None:
  """The ``--optimizer-precision`` flag of the experiments."""
  parser.add_argument(
      "--optimizer-precision", choices=sorted(OPTIMIZER_PRECISIONS),
      default=None,
      help="train with mpjax.adamw in this storage configuration (params "
           "stored in its param dtype): " + "; ".join(
               f"{p.name}: {p.note}" for p in OPTIMIZER_PRECISIONS.values()) +
           ". Default: optax.adam, params in the policy's param dtype")


def add_run_arguments(parser: argparse.ArgumentParser, name: str) -> None:
  """The flags every experiment has: metrics, guard, progress, checkpoints."""
  parser.add_argument("--metrics", default=os.path.join(
      "runs", f"{name}_metrics.jsonl"),
                      help="one JSON object per logged step for every "
                           "configuration (metrics.jsonl); '' turns it off")
  parser.add_argument("--log-every", type=int, default=1,
                      help="log (and fetch) the metrics every N steps")
  parser.add_argument("--stats-every", type=int, default=10,
                      help="gradient underflow statistics every N steps "
                           "(0: never)")
  parser.add_argument("--plot", nargs="?", const=os.path.join(
      "runs", f"{name}.png"), default=None,
                      help="draw the configurations' loss, scale and "
                           "underflow on one figure (PNG path; needs "
                           "matplotlib)")
  parser.add_argument("--max-consecutive-skips", type=int, default=100,
                      help="stop a configuration after this many skipped "
                           "steps in a row, naming the non-finite leaves")
  parser.add_argument("--no-attribution", dest="attribution",
                      action="store_false",
                      help="do not record which gradient leaves were "
                           "non-finite")
  parser.add_argument("--quiet", action="store_true", help="no progress bar")
  parser.add_argument("--checkpoint-dir", default=None,
                      help="save each configuration's train state under "
                           "DIR/<config> (atomic, step-numbered, newest 2 kept)")
  parser.add_argument("--checkpoint-every", type=int, default=50,
                      help="steps between checkpoints; the last step is "
                           "always saved")
  parser.add_argument("--resume", action="store_true",
                      help="continue each configuration from its latest "
                           "checkpoint in --checkpoint-dir")
  parser.add_argument("--doctor", action="store_true",
                      help="before training each mixed configuration, "
                           "compare it with float32 on its first batches "
                           "(mpjax.precision_doctor) and print the diagnosis")
  parser.add_argument("--doctor-batches", type=int, default=2,
                      help="batches the --doctor diagnosis compares")
  parser.add_argument("--stop-after", type=int, default=None,
                      help="stop each configuration after this many steps in "
                           "this invocation, checkpointed (a job with a time "
                           "limit; continue it with --resume)")


def check_run_arguments(parser: argparse.ArgumentParser,
                        args: argparse.Namespace) -> None:
  """parser.error for flag values `add_run_arguments`'s flags cannot take."""
  for flag, least in (("log_every", 1), ("stats_every", 0),
                      ("max_consecutive_skips", 1), ("checkpoint_every", 1),
                      ("doctor_batches", 1)):
    if getattr(args, flag) < least:
      parser.error(f"--{flag.replace('_', '-')} must be >= {least}, got "
                   f"{getattr(args, flag)}")
  if args.plot and not args.metrics:
    parser.error("--plot draws from the metrics file: give --metrics FILE")
  if args.plot:
    require_module(parser, "matplotlib", "--plot", "experiments")
  if args.resume and not args.checkpoint_dir:
    parser.error("--resume needs --checkpoint-dir")
  if args.stop_after is not None and args.stop_after < 1:
    parser.error(f"--stop-after must be >= 1, got {args.stop_after}")


# Import name -> pip name, where they differ.
_PIP_NAMES = {"sklearn": "scikit-learn"}


def require_module(parser: argparse.ArgumentParser, module: str, flag: str,
                   extra: str) -> None:
  """parser.error, with the install line, when `flag` needs a missing module.

  Checked when the flags are parsed, so a run never trains for minutes and
  then fails at its last line.
  """
  if importlib.util.find_spec(module) is None:
    package = _PIP_NAMES.get(module, module)
    parser.error(f"{flag} needs {package}, which is not installed: "
                 f"pip install -e '.[{extra}]' (or pip install {package})")


def stopped_lines(rows: Iterable[Mapping[str, Any]],
                  args: argparse.Namespace, argv: List[str]) -> List[str]:
  """The end-of-run lines for configurations that --stop-after cut short.

  Args:
    rows: the result rows; a row cut short has ``stopped_at_step`` (the step
      its state reached) and ``steps`` (the run's length).
    args: the parsed flags (``--stop-after``, ``--checkpoint-dir``).
    argv: ``sys.argv`` of this invocation, for the resume command.
  """
  stopped = [r for r in rows if r.get("stopped_at_step") is not None]
  if not stopped:
    return []
  lines = [f"{r['config']}: stopped at step {r['stopped_at_step']} of "
           f"{r['steps']} (--stop-after {args.stop_after}): not a finished "
           "run, the figures above are for the steps run so far."
           for r in stopped]
  if args.checkpoint_dir:
    command = list(argv)
    if "--resume" not in command:
      command.append("--resume")
    lines.append(f"Checkpointed in {args.checkpoint_dir}; resume with: "
                 f"python {shlex.join(command)}  (without --stop-after it "
                 "runs to the end)")
  else:
    lines.append("Nothing was checkpointed (no --checkpoint-dir): run again "
                 "with --checkpoint-dir DIR to be able to resume.")
  return lines


def parse_lm_args(argv: List[str], api: str) -> argparse.Namespace:
  """The flags of experiments/lm_linen.py and lm_nnx.py (`api`)."""
  parser = argparse.ArgumentParser(
      description=f"Train the {api} transformer LM in float32, mixed_bfloat16 "
                  "and mixed_float16 + dynamic loss scaling (and, with "
                  "--configs, in fp8: fp8_delayed, fp8_current).")
  parser.add_argument("--model", choices=("small", "gpt2-124m"),
                      default="small",
                      help="small: the flags below; gpt2-124m: GPT-2 small's "
                           "shape (12 x 768, 12 heads, vocabulary 256 here)")
  parser.add_argument("--layers", type=int, default=2)
  parser.add_argument("--d-model", type=int, default=64)
  parser.add_argument("--heads", type=int, default=4)
  parser.add_argument("--seq-len", type=int, default=64)
  parser.add_argument("--batch-size", type=int, default=16)
  parser.add_argument("--steps", type=int, default=600)
  parser.add_argument("--lr", type=float, default=3e-3)
  parser.add_argument("--warmup-steps", type=int, default=30)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--max-bytes", type=int, default=2_000_000)
  parser.add_argument("--eval-batches", type=int, default=16)
  parser.add_argument("--report-window", type=int, default=50,
                      help="final train loss = mean of the last N steps")
  parser.add_argument("--timing-warmup", type=int, default=10,
                      help="steps left out of tokens/s")
  parser.add_argument("--configs", nargs="+", default=list(PRECISION_CONFIGS),
                      choices=LM_CONFIGS,
                      help="fp8_delayed / fp8_current: mixed_bfloat16 with "
                           "fp8 matmuls (DelayedScaling() / CurrentScaling() "
                           "on every Dense/DenseGeneral, NNX Linear/"
                           "LinearGeneral); default: "
                           + " ".join(PRECISION_CONFIGS))
  parser.add_argument("--max-gap-pct", type=float, default=2.0,
                      help="exit with an error if a mixed run's val loss is "
                           "more than this far from float32's")
  parser.add_argument("--max-fp8-gap-pct", type=float, default=1.5,
                      help="exit with an error if an fp8 run's val loss is "
                           "more than this far (percent) from "
                           "mixed_bfloat16's")
  parser.add_argument("--json", default=os.path.join("runs", f"lm_{api}.json"))
  add_optimizer_precision_argument(parser)
  add_run_arguments(parser, f"lm_{api}")
  args = parser.parse_args(argv)
  for name in ("layers", "d_model", "heads", "seq_len", "batch_size", "steps",
               "eval_batches", "report_window"):
    if getattr(args, name) < 1:
      parser.error(f"--{name.replace('_', '-')} must be >= 1")
  if args.timing_warmup >= args.steps:
    args.timing_warmup = 0
  check_run_arguments(parser, args)
  return args


def parse_resnet_args(argv: List[str], api: str) -> argparse.Namespace:
  """The flags of experiments/resnet_linen.py and resnet_nnx.py (`api`)."""
  parser = argparse.ArgumentParser(
      description=f"Train the {api} ResNet (BatchNorm) in float32, "
                  "mixed_bfloat16 and mixed_float16 + dynamic loss scaling.")
  parser.add_argument("--widths", type=int, nargs="+", default=[16, 32, 64],
                      help="channels per stage")
  parser.add_argument("--blocks-per-stage", type=int, default=1)
  parser.add_argument("--batch-size", type=int, default=64)
  parser.add_argument("--steps", type=int, default=300)
  parser.add_argument("--lr", type=float, default=0.1)
  parser.add_argument("--weight-decay", type=float, default=5e-4)
  parser.add_argument("--warmup-steps", type=int, default=20)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--num-train", type=int, default=5000)
  parser.add_argument("--num-eval", type=int, default=1000)
  parser.add_argument("--noise", type=float, default=3.0,
                      help="pixel noise of the synthetic images")
  parser.add_argument("--eval-batch-size", type=int, default=500)
  parser.add_argument("--report-window", type=int, default=30,
                      help="final train loss = mean of the last N steps")
  parser.add_argument("--timing-warmup", type=int, default=5,
                      help="steps left out of train s and ms/step")
  parser.add_argument("--configs", nargs="+", default=list(PRECISION_CONFIGS),
                      choices=PRECISION_CONFIGS)
  parser.add_argument("--max-gap-points", type=float, default=3.0,
                      help="exit with an error if a mixed run's eval accuracy "
                           "is more than this many points from float32's")
  parser.add_argument("--json", default=os.path.join("runs",
                                                     f"resnet_{api}.json"))
  add_run_arguments(parser, f"resnet_{api}")
  args = parser.parse_args(argv)
  for name in ("blocks_per_stage", "batch_size", "steps", "num_train",
               "num_eval", "eval_batch_size", "report_window"):
    if getattr(args, name) < 1:
      parser.error(f"--{name.replace('_', '-')} must be >= 1")
  if min(args.widths) < 1:
    parser.error("--widths must be >= 1")
  if args.batch_size > args.num_train:
    parser.error(f"--batch-size {args.batch_size} exceeds --num-train "
                 f"{args.num_train}")
  if args.timing_warmup >= args.steps:
    args.timing_warmup = 0
  check_run_arguments(parser, args)
  return args
