"""The fused skip and the optimizer precisions, measured on compiled steps.

1. CPU time of the seed MLP's float32 step (batch 128, 784 -> 128 -> 10, as
   `bench.py` times it), interleaved against plain `mpjax.adam`:
   `optax.adam`, ``loss_scaled(optax.adam, DynamicScaling)`` (the select
   path: optax's Adam is opaque to the protocol) and
   ``loss_scaled(mpjax.adam, ...)`` / ``loss_scaled(mpjax.adamw(weight_decay
   =0.0), ...)`` (the fused path, `mpjax._src.fused_skip`).
2. Copies of the donated optimizer state (moment-shaped entry parameters) in
   the CPU-compiled step and in the H100-compiled step
   (`mpjax.audit_for_target`, no GPU needed).
3. GPT-2 124M (batch 8 x 1024, mixed_bfloat16 compute) compiled for an H100:
   peak memory per optimizer-precision configuration.

  python experiments/fused_skip_bench.py            # ~10 min on 2 busy cores
  python experiments/fused_skip_bench.py --skip-gpt2 --min-seconds 10
"""

import argparse
import json
import os
import re
import sys
import time
from typing import Any, Dict, List

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import cli  # pylint: disable=g-import-not-at-top,wrong-import-position


def parse_args(argv: List[str]) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--out", default=os.path.join("benchmarks",
                                                    "optimizer_precision"))
  parser.add_argument("--min-seconds", type=float, default=30.0)
  parser.add_argument("--skip-gpt2", action="store_true")
  parser.add_argument("--skip-seed", action="store_true")
  parser.add_argument("--gpt2-configs", nargs="+",
                      default=list(cli.OPTIMIZER_PRECISIONS),
                      choices=list(cli.OPTIMIZER_PRECISIONS))
  args = parser.parse_args(argv)
  return args


if __name__ == "__main__":
  # --help and flag errors are answered before jax is imported.
  parse_args(sys.argv[1:])

import jax
import jax.numpy as jnp
import numpy as np
import optax

import mpjax

import bench_core  # pylint: disable=g-import-not-at-top,wrong-import-position
import bench_models  # pylint: disable=g-import-not-at-top,wrong-import-position
import lm_common  # pylint: disable=g-import-not-at-top,wrong-import-position
import lm_models_linen  # pylint: disable=g-import-not-at-top,wrong-import-position
import optimizer_precision  # pylint: disable=g-import-not-at-top,wrong-import-position
import report  # pylint: disable=g-import-not-at-top,wrong-import-position

def moment_copies(text: str) -> List[str]:
  """``copy`` instructions of moment-shaped optimizer-state parameters."""
  return [line.strip()[:160] for line in text.splitlines()
          if re.search(r"= \S+ copy\(%?state_opt_state\S*(mu|nu)", line)]


def seed_mlp_steps(min_seconds: float) -> Dict[str, Any]:
  spec = bench_models.cpu_models()["mlp"]
  x, y = spec.numpy_batch()
  batch = {"x": jnp.asarray(x), "y": jnp.asarray(y)}
  model = spec.flax_model()
  params = model.init(jax.random.key(0), batch["x"][:1])["params"]
  dynamic = mpjax.DynamicScaling.like_torch()
  variants = {
      "mpjax.adam": mpjax.adam(1e-3),
      "optax.adam": optax.adam(1e-3),
      # optax.adam is opaque to the protocol: loss_scaled selects its state.
      "loss_scaled(optax.adam) select": mpjax.loss_scaled(optax.adam(1e-3),
                                                          dynamic),
      "loss_scaled(mpjax.adam) fused": mpjax.loss_scaled(mpjax.adam(1e-3),
                                                         dynamic),
      "loss_scaled(mpjax.adamw) fused": mpjax.loss_scaled(
          mpjax.adamw(1e-3, weight_decay=0.0), dynamic),
  }
  runners, copies, h100 = {}, {}, {}
  for name, tx in variants.items():
    state = mpjax.TrainState.create(apply_fn=model.apply, params=params,
                                    tx=tx, policy="float32")
    step = mpjax.make_train_step(spec.loss_fn)
    text = step.lower(state, batch).compile().as_text()
    copies[name] = moment_copies(text)
    try:
      audit = mpjax.audit_for_target(step, state, batch, target="h100_sxm")
      h100[name] = [f"{c.source} {c.dtype}{list(c.shape)}"
                    for c in audit.copied_parameters("opt_state")]
    except Exception as e:  # pylint: disable=broad-except
      h100[name] = f"not compiled: {e}"
    runners[name] = bench_core._runner(step, state, batch)  # pylint: disable=protected-access
  times = bench_core.interleave(runners, warmup=20, min_rounds=200,
                                min_seconds=min_seconds, max_rounds=100_000)
  out = bench_core._summary(times, "mpjax.adam")  # pylint: disable=protected-access
  out.update(cpu_moment_copies=copies,
             h100_opt_state_copies=h100,
             target="loss_scaled(mpjax adam, DynamicScaling) within 3% of "
                    "plain adam; no copy of the donated moments")
  return out


def gpt2_h100_peaks(names: List[str]) -> List[Dict[str, Any]]:
  """GPT-2 124M's step compiled for an H100, per configuration."""
  config = lm_common.LMConfig.gpt2_124m()
  model = lm_models_linen.TransformerLM(config)
  tokens = jax.ShapeDtypeStruct((8, config.seq_len), jnp.int32)
  batch = {"x": tokens, "y": tokens}
  rows = []
  for name in names:
    policy = mpjax.PolicyMap(optimizer_precision.with_param_dtype(
        lm_common.lm_policy("mixed_bfloat16").default, name))
    tx = mpjax.loss_scaled(optax.chain(
        optax.clip_by_global_norm(1.0),
        optimizer_precision.optimizer(name, 3e-4, 0, b2=0.95)),
                           mpjax.NoScaling())

    def make():
      params = model.init(jax.random.key(0),
                          jnp.zeros((1, config.seq_len), jnp.int32))["params"]
      return mpjax.TrainState.create(apply_fn=model.apply, params=params,
                                     tx=tx, policy=policy)

    state = jax.eval_shape(make)
    step = mpjax.make_train_step(lm_common.loss_fn)
    start = time.perf_counter()
    audit = mpjax.audit_for_target(step, state, batch, target="h100_sxm")
    mem = audit.memory
    rows.append({
        "config": name, "note": optimizer_precision.PRESETS[name].note,
        "peak_bytes": mem.get("peak_bytes"),
        "argument_bytes": mem.get("argument_bytes"),
        "temp_bytes": mem.get("temp_bytes"),
        "opt_state_copies": len(audit.copied_parameters("opt_state")),
        "compile_s": time.perf_counter() - start})
    print(rows[-1], flush=True)
  return rows


def main(argv: List[str]) -> Dict[str, Any]:
  args = parse_args(argv[1:])
  result = {"environment": report.environment(argv)}
  if not args.skip_seed:
    result["seed_mlp"] = seed_mlp_steps(args.min_seconds)
    print(json.dumps(result["seed_mlp"], indent=1), flush=True)
  if not args.skip_gpt2:
    result["gpt2_124m_h100"] = gpt2_h100_peaks(args.gpt2_configs)
  os.makedirs(args.out, exist_ok=True)
  path = os.path.join(args.out, "fused_skip.json" if not args.skip_seed
                      else "gpt2_h100_" + "_".join(args.gpt2_configs) + ".json")
  with open(path, "w") as f:
    json.dump(result, f, indent=2)
  print(f"wrote {path}")
  return result


if __name__ == "__main__":
  main(sys.argv)
