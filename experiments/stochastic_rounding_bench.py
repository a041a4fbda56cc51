"""What stochastic rounding costs to compile and to run, measured.

1. ``update-h100``: GPT-2 124M's optimizer update alone (bfloat16 params,
   ``optax.chain(clip_by_global_norm(1.0), mpjax.adamw(bfloat16 moments))``,
   196 leaves, 124M elements) compiled by XLA:GPU for an H100 target (no
   GPU): compile seconds with ``rounding="nearest"`` and ``"stochastic"``,
   fusions and opt-state copies of the compiled program. A fraction of the
   full step's compile, so the rounding's share stands out.
2. ``cpu``: the small LM's whole train step (``lm_common.LMConfig()``, batch
   16 x 64, mixed_bfloat16 compute, bfloat16 masters and moments) on this
   CPU: compile seconds and interleaved step times, nearest against
   stochastic.

  python experiments/stochastic_rounding_bench.py --out /tmp/sr.json
  python experiments/stochastic_rounding_bench.py --parts cpu --min-seconds 5

The full GPT-2 step's H100 compile is `fused_skip_bench.py --skip-seed
--gpt2-configs bf16-sr`.
"""

import argparse
import json
import os
import sys
import time
from typing import Any, Dict, List

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

PARTS = ("update-h100", "cpu")
CONFIGS = ("bf16-nearest", "bf16-sr")


def parse_args(argv: List[str]) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--parts", nargs="+", default=list(PARTS),
                      choices=PARTS)
  parser.add_argument("--min-seconds", type=float, default=20.0,
                      help="CPU step timing: at least this long")
  parser.add_argument("--out", default=None, help="write the JSON here")
  return parser.parse_args(argv)


if __name__ == "__main__":
  # --help and flag errors are answered before jax is imported.
  parse_args(sys.argv[1:])

from mpjax._src import gpu_target  # pylint: disable=g-import-not-at-top,wrong-import-position

gpu_target.skip_cuda_check_without_driver()

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
import jax.numpy as jnp
import numpy as np
import optax

import mpjax

import bench_core  # pylint: disable=g-import-not-at-top,wrong-import-position
import lm_common  # pylint: disable=g-import-not-at-top,wrong-import-position
import lm_models_linen  # pylint: disable=g-import-not-at-top,wrong-import-position
import optimizer_precision  # pylint: disable=g-import-not-at-top,wrong-import-position
import report  # pylint: disable=g-import-not-at-top,wrong-import-position


def _optimizer(name: str) -> optax.GradientTransformation:
  return optax.chain(optax.clip_by_global_norm(1.0),
                     optimizer_precision.optimizer(name, 3e-4, 0, b2=0.95))


def update_h100() -> List[Dict[str, Any]]:
  """GPT-2 124M's optimizer update compiled for an H100, per config."""
  config = lm_common.LMConfig.gpt2_124m()
  model = lm_models_linen.TransformerLM(config)
  params = jax.eval_shape(lambda: model.init(
      jax.random.key(0), jnp.zeros((1, config.seq_len), jnp.int32))["params"])
  params = jax.tree.map(
      lambda p: jax.ShapeDtypeStruct(p.shape, jnp.bfloat16), params)
  rows = []
  for name in CONFIGS:
    tx = _optimizer(name)
    state = jax.eval_shape(tx.init, params)

    def update(grads, opt_state, params, tx=tx):
      updates, opt_state = tx.update(grads, opt_state, params)
      return optax.apply_updates(params, updates), opt_state

    start = time.perf_counter()
    compiled = mpjax.compile_for_target(
        jax.jit(update, donate_argnums=(1, 2)), params, state, params,
        target="h100_sxm")
    seconds = time.perf_counter() - start
    text = compiled.as_text()
    audit = mpjax.audit_compiled(compiled)
    rows.append({
        "config": name,
        "leaves": len(jax.tree.leaves(params)),
        "elements": int(sum(np.prod(p.shape)
                            for p in jax.tree.leaves(params))),
        "compile_s": seconds,
        "fusions": text.count(" fusion("),
        "hlo_lines": len(text.splitlines()),
        "copied_parameters": len(audit.copied_parameters()),
        "temp_bytes": compiled.memory_analysis().temp_size_in_bytes})
    print(rows[-1], flush=True)
  return rows


def cpu_steps(min_seconds: float) -> Dict[str, Any]:
  """The small LM's train step on this CPU: compile and step times."""
  config = lm_common.LMConfig()
  model = lm_models_linen.TransformerLM(config)
  tokens = jax.random.randint(jax.random.key(1), (16, config.seq_len), 0,
                              config.vocab_size, jnp.int32)
  batch = {"x": tokens, "y": jnp.roll(tokens, -1, axis=1)}
  runners, compile_s = {}, {}
  for name in CONFIGS:
    policy = mpjax.PolicyMap(optimizer_precision.with_param_dtype(
        lm_common.lm_policy("mixed_bfloat16").default, name))
    params = model.init(jax.random.key(0), tokens[:1])["params"]
    state = mpjax.TrainState.create(apply_fn=model.apply, params=params,
                                    tx=_optimizer(name), policy=policy)
    step = mpjax.make_train_step(lm_common.loss_fn)
    start = time.perf_counter()
    compiled = step.lower(state, batch).compile()
    compile_s[name] = time.perf_counter() - start
    runners[name] = bench_core._runner(compiled, state, batch)  # pylint: disable=protected-access
  times = bench_core.interleave(runners, warmup=10, min_rounds=100,
                                min_seconds=min_seconds, max_rounds=100_000)
  out = bench_core._summary(times, CONFIGS[0])  # pylint: disable=protected-access
  out.update(compile_s=compile_s,
             leaves=len(jax.tree.leaves(params)),
             load_average=os.getloadavg())
  return out


def main(argv: List[str]) -> Dict[str, Any]:
  args = parse_args(argv[1:])
  result = {"environment": report.environment(argv),
            "load_average_start": os.getloadavg()}
  if "update-h100" in args.parts:
    result["gpt2_124m_update_h100"] = update_h100()
  if "cpu" in args.parts:
    result["small_lm_cpu"] = cpu_steps(args.min_seconds)
    print(json.dumps(result["small_lm_cpu"], indent=1), flush=True)
  if args.out:
    with open(args.out, "w") as f:
      json.dump(result, f, indent=2)
  return result


if __name__ == "__main__":
  main(sys.argv)
