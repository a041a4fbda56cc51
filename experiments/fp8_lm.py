"""The LM example in fp8: delayed and current scaling against bfloat16, on CPU.

The transformer LM of `lm_linen.py` / `lm_nnx.py` (same model, data,
optimizer and schedule, from `lm_common`) trained with the
``mixed_bfloat16`` map of the LM examples and with that map plus an fp8
entry for every matmul layer (linen ``Dense``/``DenseGeneral``: the MLP and
the attention projections; NNX ``Linear``/``LinearGeneral``): e4m3 inputs
and kernels, e5m2 output gradients, float32 accumulation; embeddings, the
tied output projection, the attention core and the norms stay as the
bfloat16 map says. The fp8 state trains through `mpjax.make_train_step`
(``model_state["_overwrite_with_gradient"]``).

Command (about 4 minutes on 2 cores)::

  python experiments/fp8_lm.py --json benchmarks/fp8/lm_cpu.json \
      --metrics benchmarks/fp8/lm_metrics.jsonl

Expected: every fp8 run's final validation loss within 1.5% of the
bfloat16 run's of the same API (the script exits with an error otherwise).
"""

import argparse
import json
import os
import sys
import time

# The keys of RECIPES below, for the flags (parsed before jax loads).
RECIPE_NAMES = ("bfloat16", "fp8_delayed", "fp8_current")


def parse_args(argv=None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--apis", default="linen,nnx")
  parser.add_argument("--configs", default=",".join(RECIPE_NAMES))
  parser.add_argument("--steps", type=int, default=600)
  parser.add_argument("--batch-size", type=int, default=16)
  parser.add_argument("--lr", type=float, default=3e-3)
  parser.add_argument("--warmup-steps", type=int, default=30)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--eval-batches", type=int, default=16)
  parser.add_argument("--max-gap-pct", type=float, default=1.5)
  parser.add_argument("--json", default=None)
  parser.add_argument("--metrics", default=None)
  args = parser.parse_args(argv)
  for flag, value, allowed in (("--configs", args.configs, RECIPE_NAMES),
                               ("--apis", args.apis, ("linen", "nnx"))):
    unknown = sorted(set(value.split(",")) - set(allowed))
    if unknown:
      parser.error(f"{flag}: unknown {', '.join(unknown)}; choose from "
                   f"{', '.join(allowed)}")
  return args


if __name__ == "__main__":
  # --help and flag errors are answered before jax is imported.
  parse_args()

# pylint: disable=g-import-not-at-top,wrong-import-position
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import lm_common  # pylint: disable=g-import-not-at-top,wrong-import-position
import lm_data  # pylint: disable=g-import-not-at-top,wrong-import-position
import lm_models_linen  # pylint: disable=g-import-not-at-top,wrong-import-position
import lm_models_nnx  # pylint: disable=g-import-not-at-top,wrong-import-position
import mpjax  # pylint: disable=g-import-not-at-top,wrong-import-position

OWG = mpjax.OVERWRITE_WITH_GRADIENT
RECIPES = {"bfloat16": None, "fp8_delayed": mpjax.DelayedScaling(),
           "fp8_current": mpjax.CurrentScaling()}


def policy_map(api: str, recipe) -> mpjax.PolicyMap:
  base = lm_common.lm_policy("mixed_bfloat16")
  if recipe is None:
    return base
  layers = ((nn.Dense, nn.DenseGeneral) if api == "linen"
            else (nnx.Linear, nnx.LinearGeneral))
  return mpjax.PolicyMap(base.default, {cls: recipe for cls in layers})


def make_state(api, config, pm, tx, seed):
  if api == "linen":
    model = lm_models_linen.TransformerLM(config)
    tokens = jnp.zeros((1, config.seq_len), jnp.int32)
    variables = jax.jit(mpjax.with_policy(model.init, pm))(
        jax.random.key(seed), tokens)
    model_state = {k: v for k, v in variables.items() if k != "params"}
    return mpjax.TrainState.create(apply_fn=model.apply,
                                   params=variables["params"], tx=tx,
                                   policy=pm, model_state=model_state or None)
  model = lm_models_nnx.TransformerLM(config, rngs=nnx.Rngs(seed))
  return mpjax.TrainState.from_nnx(model, tx=tx, policy=pm)


def run(api, name, args, config, corpus, log):
  pm = policy_map(api, RECIPES[name])
  tx = lm_common.make_optimizer(args, mpjax.NoScaling())
  state = make_state(api, config, pm, tx, args.seed)
  step = mpjax.make_train_step(lm_common.loss_fn)
  batches = lm_data.train_batches(corpus.train, args.batch_size,
                                  config.seq_len, seed=args.seed)
  flops = mpjax.audit_program(step, state, next(iter(lm_data.train_batches(
      corpus.train, args.batch_size, config.seq_len, seed=args.seed)))
                              ).matmul_flops_by_dtype()
  losses, start = [], time.perf_counter()
  for i, batch in zip(range(args.steps), batches):
    state, metrics = step(state, batch)
    losses.append(metrics["loss"])
    if log is not None and (i % 10 == 0 or i == args.steps - 1):
      fp8_state = (state.model_state or {}).get(OWG)
      record = {"api": api, "config": name, "step": i,
                "loss": float(metrics["loss"]),
                "grads_finite": bool(metrics["grads_finite"]),
                "skipped_steps": int(metrics["skipped_steps"])}
      if fp8_state is not None:
        scales = [float(np.asarray(x).reshape(-1)[0]) for p, x in
                  jax.tree_util.tree_leaves_with_path(fp8_state)
                  if "output_grad_scale" in jax.tree_util.keystr(p)]
        record["output_grad_scale_min"] = min(scales)
      log.write(json.dumps(record) + "\n")
  elapsed = time.perf_counter() - start
  losses = np.asarray(jax.device_get(losses), np.float64)
  if not np.all(np.isfinite(losses)):
    raise FloatingPointError(f"{api} {name}: non-finite loss.")

  def evaluate(params, model_state, batch):
    def apply_fn(variables, x):
      return mpjax.with_policy(state.apply_fn, pm)(
          {**variables, **(model_state or {})}, x)
    return lm_common.loss_fn(params, batch, apply_fn, None)

  evaluate = jax.jit(evaluate)
  val = [float(evaluate(state.params, state.model_state, b))
         for b in lm_data.eval_batches(corpus.val, args.batch_size,
                                       config.seq_len, args.eval_batches)]
  return {"api": api, "config": name, "recipe": repr(RECIPES[name]),
          "val_loss": float(np.mean(val)),
          "final_train_loss": float(losses[-50:].mean()),
          "steps": args.steps, "seconds": elapsed,
          "lowered_matmul_flops_by_dtype": flops,
          "loss_curve": [float(x) for x in losses]}


def main(argv=None):
  args = parse_args(argv)
  args.optimizer_precision = None  # lm_common.make_optimizer reads it
  config = lm_common.LMConfig()
  corpus = lm_data.load(2_000_000)
  log = open(args.metrics, "w") if args.metrics else None
  rows = []
  for api in args.apis.split(","):
    for name in args.configs.split(","):
      row = run(api, name, args, config, corpus, log)
      base = next((r for r in rows if r["api"] == api and
                   r["config"] == "bfloat16"), None)
      row["vs_bfloat16_pct"] = (None if base is None else 100 * (
          row["val_loss"] / base["val_loss"] - 1))
      rows.append(row)
      print(f"{api:6s} {name:12s} val {row['val_loss']:.4f} "
            + ("" if row["vs_bfloat16_pct"] is None else
               f"({row['vs_bfloat16_pct']:+.2f}% vs bfloat16) ")
            + f"{row['seconds']:.0f} s; matmul FLOPs "
            f"{row['lowered_matmul_flops_by_dtype']}", flush=True)
  if log is not None:
    log.close()
  if args.json:
    with open(args.json, "w") as f:
      json.dump({"label": "CPU-measured", "jax": jax.__version__,
                 "device": str(jax.devices()[0]), "command": " ".join(
                     ["python"] + sys.argv), "model_config":
                 config.__dict__, "rows": rows}, f, indent=1)
  bad = [f"{r['api']} {r['config']}" for r in rows
         if r["vs_bfloat16_pct"] is not None and
         abs(r["vs_bfloat16_pct"]) > args.max_gap_pct]
  if bad:
    raise SystemExit(f"{', '.join(bad)}: validation loss more than "
                     f"{args.max_gap_pct}% from bfloat16's.")
  return rows


if __name__ == "__main__":
  main()
