"""Optimizer precision: master-weight and moment dtypes, measured.

The configurations (``--optimizer-precision`` of `seed_mlp.py`, `lm_linen.py`
and `lm_nnx.py`; all `mpjax.adamw(weight_decay=0.0)`, i.e. `mpjax.adam`):

  f32            float32 master params, float32 moments (the reference)
  bf16-moments   float32 master params, bfloat16 mu and nu
  bf16-sr        bfloat16 master params (stochastic rounding), bfloat16 moments
  bf16-kahan     bfloat16 master params (Kahan compensation), bfloat16 moments
  bf16-nearest   bfloat16 master params (round to nearest), bfloat16 moments:
                 the contrast, small updates are lost

Compute is bfloat16 in every one (`mixed_bfloat16`; with bfloat16 masters
``p=bf16,c=bf16``), the seed, data and hyper-parameters are the same, so
only the optimizer's storage differs. This script runs the LM example
(`lm_linen.py`, small default config) and the seed MLP in each, measures
bytes per parameter of params + optimizer state with `jax.eval_shape`
(seed MLP, small LM, GPT-2 124M), and writes a table (JSON + Markdown) and a
plot:

  python experiments/optimizer_precision.py    # ~15 min on 2 busy CPU cores

Expected: bf16-sr and bf16-kahan within 1% of f32's final validation loss,
bf16-nearest visibly behind on the LM; params + optimizer state take 6 bytes
per parameter with bfloat16 masters and moments (0.5x of f32's 12; Kahan's
buffer makes it 8), 8 with float32 masters and bfloat16 moments.
"""

import argparse
import dataclasses
import json
import os
import sys
from typing import Any, Dict, List, Optional

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import cli  # pylint: disable=g-import-not-at-top,wrong-import-position


def parse_args(argv: List[str]) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--out", default=os.path.join("benchmarks",
                                                    "optimizer_precision"))
  parser.add_argument("--configs", nargs="+",
                      default=list(cli.OPTIMIZER_PRECISIONS),
                      choices=list(cli.OPTIMIZER_PRECISIONS))
  parser.add_argument("--experiments", nargs="+", default=["seed", "lm"],
                      choices=["seed", "lm"])
  parser.add_argument("--lm-steps", type=int, default=None)
  parser.add_argument("--seed-epochs", type=int, default=None)
  parser.add_argument("--replot", action="store_true",
                      help="only redraw the plot from OUT/results.json")
  args = parser.parse_args(argv)
  cli.require_module(parser, "matplotlib", "the plot", "experiments")
  return args


if __name__ == "__main__":
  parse_args(sys.argv[1:])  # --help and flag errors before jax is imported

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
import jax.numpy as jnp
import jmp
import numpy as np
import optax

import mpjax

import report  # pylint: disable=g-import-not-at-top,wrong-import-position


# The storage configurations, by name: plain strings in cli.py, so that the
# --optimizer-precision flag needs no jax.
PRESETS = cli.OPTIMIZER_PRECISIONS


def optimizer(name: str, learning_rate: optax.ScalarOrSchedule, seed: int,
              **adam_kwargs) -> optax.GradientTransformation:
  """`mpjax.adamw` (no weight decay) in the storage configuration `name`."""
  preset = PRESETS[name]
  key = jax.random.key(seed) if preset.rounding == "stochastic" else None
  return mpjax.adamw(learning_rate, weight_decay=0.0,
                     mu_dtype=preset.mu_dtype, nu_dtype=preset.nu_dtype,
                     rounding=preset.rounding, key=key, **adam_kwargs)


def with_param_dtype(policy: Any, name: Optional[str]) -> jmp.Policy:
  """`policy` (a preset, string or `jmp.Policy`) storing params as preset
  `name` says (unchanged for None)."""
  policy = mpjax.get_policy(policy)
  if name is None:
    return policy
  return dataclasses.replace(policy,
                             param_dtype=jnp.dtype(PRESETS[name].param_dtype))


def state_bytes(make_params, name: str) -> Dict[str, Any]:
  """Bytes of params + optimizer state of configuration `name`, from
  `jax.eval_shape` (nothing is allocated)."""
  preset = PRESETS[name]
  dtype = jnp.dtype(preset.param_dtype)
  tx = optimizer(name, 1e-3, 0)

  def init():
    params = jax.tree.map(lambda p: p.astype(dtype), make_params())
    return params, tx.init(params)

  params, opt_state = jax.eval_shape(init)
  size = lambda tree: sum(np.dtype(x.dtype).itemsize * int(np.prod(x.shape))
                          for x in jax.tree.leaves(tree))
  count = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
  return {"config": name, "note": preset.note, "param_count": count,
          "param_bytes": size(params), "opt_state_bytes": size(opt_state),
          "bytes_per_param": (size(params) + size(opt_state)) / count}


def memory_table() -> List[Dict[str, Any]]:
  """`state_bytes` of every configuration for the seed MLP, the small LM and
  GPT-2 124M (vocabulary 50257, seq 1024)."""
  import lm_common  # pylint: disable=g-import-not-at-top
  import lm_models_linen  # pylint: disable=g-import-not-at-top
  import models  # pylint: disable=g-import-not-at-top

  def lm_params(config):
    model = lm_models_linen.TransformerLM(config)
    tokens = jnp.zeros([1, config.seq_len], jnp.int32)
    return lambda: model.init(jax.random.key(0), tokens)["params"]

  mlp = models.MLP(hidden=(128,), num_classes=10)
  makers = {
      "seed MLP (64 -> 128 -> 10)": lambda: mlp.init(
          jax.random.key(0), jnp.zeros([1, 64]))["params"],
      "LM small (2 x 64)": lm_params(lm_common.LMConfig()),
      "GPT-2 124M": lm_params(lm_common.LMConfig.gpt2_124m()),
  }
  rows = []
  for model_name, make in makers.items():
    base = None
    for name in PRESETS:
      row = {"model": model_name, **state_bytes(make, name)}
      base = base or row
      row["vs_f32"] = ((row["param_bytes"] + row["opt_state_bytes"]) /
                       (base["param_bytes"] + base["opt_state_bytes"]))
      rows.append(row)
  return rows


MEMORY_COLUMNS = (
    ("model", "model", "{}"), ("config", "config", "{}"),
    ("params", "param_count", "{:,}"), ("param B", "param_bytes", "{:,}"),
    ("optimizer state B", "opt_state_bytes", "{:,}"),
    ("B / param", "bytes_per_param", "{:.2f}"), ("vs f32", "vs_f32", "{:.3f}x"),
)
ACCURACY_COLUMNS = (
    ("experiment", "experiment", "{}"), ("config", "config", "{}"),
    ("final train loss", "final_train_loss", "{:.4f}"),
    ("val loss", "val_loss", "{:.4f}"), ("vs f32", "val_gap_pct", "{:+.2f}%"),
    ("test acc", "test_accuracy", "{:.2%}"),
    ("param dtype", "param_dtype", "{}"), ("skipped", "skipped_steps", "{}"),
)


def run_lm(name: str, out: str, steps: Optional[int]) -> Dict[str, Any]:
  """The LM example (linen, small default config) in configuration `name`."""
  import lm_common  # pylint: disable=g-import-not-at-top
  import lm_linen  # pylint: disable=g-import-not-at-top
  argv = ["experiments/lm_linen.py", "--configs", "mixed_bfloat16",
          "--optimizer-precision", name, "--quiet", "--metrics", "",
          "--json", os.path.join(out, f"lm_linen_{name}.json")]
  if steps:
    argv += ["--steps", str(steps)]
  row = lm_common.main(argv, "linen", lm_linen.build)["rows"][0]
  return {"experiment": "LM (linen, small)", "config": name,
          "final_train_loss": row["final_train_loss"],
          "val_loss": row["val_loss"], "skipped_steps": row["skipped_steps"],
          "param_dtype": PRESETS[name].param_dtype,
          "curve": row["loss_curve"]}


def run_seed(name: str, out: str, epochs: Optional[int]) -> Dict[str, Any]:
  """The seed MLP (digits, mixed_bfloat16 compute) in configuration `name`."""
  import seed_mlp  # pylint: disable=g-import-not-at-top
  argv = ["experiments/seed_mlp.py", "--configs", "mixed_bfloat16",
          "--optimizer-precision", name, "--quiet", "--metrics", "",
          "--json", os.path.join(out, f"seed_mlp_{name}.json")]
  if epochs:
    argv += ["--epochs", str(epochs)]
  row = seed_mlp.main(argv)["rows"][0]
  return {"experiment": "seed MLP (digits)", "config": name,
          "final_train_loss": row["final_train_loss"],
          "val_loss": row["test_loss"], "test_accuracy": row["test_accuracy"],
          "skipped_steps": row["skipped_steps"],
          "param_dtype": PRESETS[name].param_dtype,
          "curve": row["epoch_losses"]}


def plot(rows: List[Dict[str, Any]], path: str) -> None:
  """Top: train loss per configuration; bottom: its gap to f32's."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  experiments = sorted({r["experiment"] for r in rows})
  fig, axes = plt.subplots(2, len(experiments), squeeze=False,
                           figsize=(6 * len(experiments), 7))
  for col, experiment in enumerate(experiments):
    mine = [r for r in rows if r["experiment"] == experiment]
    per_step = experiment.startswith("LM")
    smooth = lambda c: (np.convolve(c, np.ones(50) / 50, mode="valid")
                        if per_step else c)
    curves = {r["config"]: smooth(np.asarray(r["curve"], np.float64))
              for r in mine}
    for r in mine:
      label = f"{r['config']} (val {r['val_loss']:.4f})"
      axes[0, col].plot(curves[r["config"]], label=label)
      if "f32" in curves:
        axes[1, col].plot(100 * (curves[r["config"]] / curves["f32"] - 1),
                          label=r["config"])
    unit = "step (50-step mean)" if per_step else "epoch"
    axes[0, col].set(title=experiment, xlabel=unit, ylabel="train loss",
                     yscale="log")
    axes[1, col].set(xlabel=unit, ylabel="train loss vs f32 (%)")
    axes[1, col].axhline(0.0, color="gray", lw=0.5)
    for ax in axes[:, col]:
      ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=110)


def main(argv: List[str]) -> Dict[str, Any]:
  args = parse_args(argv[1:])
  os.makedirs(args.out, exist_ok=True)
  if args.replot:
    with open(os.path.join(args.out, "results.json")) as f:
      result = json.load(f)
    plot(result["accuracy"], os.path.join(args.out, "optimizer_precision.png"))
    return result
  env = report.environment(argv)
  memory = memory_table()
  print(report.markdown_table(memory, MEMORY_COLUMNS))
  rows = []
  for experiment in args.experiments:
    for name in args.configs:
      rows.append(run_seed(name, args.out, args.seed_epochs)
                  if experiment == "seed" else
                  run_lm(name, args.out, args.lm_steps))
  for r in rows:
    ref = next((x for x in rows if x["experiment"] == r["experiment"]
                and x["config"] == "f32"), None)
    r["val_gap_pct"] = (None if ref is None else
                        100 * (r["val_loss"] / ref["val_loss"] - 1))
  table = report.markdown_table(rows, ACCURACY_COLUMNS)
  print(table)
  result = {"environment": env, "memory": memory, "accuracy": rows}
  with open(os.path.join(args.out, "results.json"), "w") as f:
    json.dump(result, f, indent=2)
  with open(os.path.join(args.out, "results.md"), "w") as f:
    f.write(f"# Optimizer precision\n\n{env['device']}, jax {env['jax']}, "
            f"flax {env['flax']}, optax {env['optax']}, {env['date']}\n\n"
            f"`{env['command']}`\n\n## Bytes of params + optimizer state\n\n"
            f"{report.markdown_table(memory, MEMORY_COLUMNS)}\n\n"
            f"## Accuracy (same seed and data; val loss: the LM's validation "
            f"loss, the seed MLP's test loss)\n\n{table}\n")
  plot(rows, os.path.join(args.out, "optimizer_precision.png"))
  print(f"wrote {args.out}/results.json, results.md, optimizer_precision.png")
  return result


if __name__ == "__main__":
  main(sys.argv)
