"""FP8 proof on the GPU compiler: every fp8 layer's matmuls are fp8 GEMMs.

Compiles a tiny fp8 train step (linen: Dense -> LayerNorm -> Dense, and an
attention block whose four projections are fp8; bfloat16 around them) for
the H100 and B200 targets with `mpjax.compile_for_target` (no GPU needed)
and audits the compiled program (`mpjax.audit_compiled`): the kernel of
every matmul, its operand dtypes, and whether any matmul of the fp8 layers
runs on dequantized 16-bit operands instead.

Command (about a minute on 2 cores)::

  python experiments/fp8_gpu_compile.py --json benchmarks/fp8/gpu_compiled.json

Expected: for each target and each compiler setting, the fp8 FLOPs of the
compiled program equal those of the lowered one (3 fp8 matmuls per fp8
layer: forward, input gradient, kernel gradient; XLA may merge the q/k/v
GEMMs that share an fp8 input), all on ``__cublas$lt$matmul$f8`` with
``--xla_gpu_enable_triton_gemm=false`` (Triton gemm fusions with f8 operands
otherwise), and no matmul with 16-bit operands except the attention core
(QK^T, PV: bfloat16, not an fp8 layer).
"""

import argparse
import json
import sys


def parse_args(argv=None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--json", default=None)
  parser.add_argument("--targets", default="h100_sxm,b200")
  return parser.parse_args(argv)


if __name__ == "__main__":
  # --help and flag errors are answered before jax is imported.
  parse_args()

# pylint: disable=g-import-not-at-top,wrong-import-position
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

import mpjax


class Block(nn.Module):
  """Attention (4 fp8 projections) and an MLP (2 fp8 Dense), pre-norm."""

  @nn.compact
  def __call__(self, x):
    h = nn.LayerNorm()(x)
    x = x + nn.MultiHeadDotProductAttention(num_heads=4)(h, h)
    h = nn.LayerNorm()(x)
    h = nn.Dense(4 * x.shape[-1])(h)
    x = x + nn.Dense(x.shape[-1])(nn.gelu(h))
    return x


FP8_LAYERS = 6  # query, key, value, out, and the two MLP Dense


def build(recipe, batch=16, seq=128, width=256):
  model = Block()
  pm = mpjax.PolicyMap("mixed_bfloat16", {nn.Dense: recipe,
                                          nn.DenseGeneral: recipe})
  x = jnp.ones((batch, seq, width))
  variables = mpjax.with_policy(model.init, pm)(jax.random.key(0), x)
  model_state = {k: v for k, v in variables.items() if k != "params"}
  state = mpjax.TrainState.create(
      apply_fn=model.apply, params=variables["params"],
      tx=mpjax.loss_scaled(optax.adam(1e-3), mpjax.NoScaling()), policy=pm,
      model_state=model_state or None)

  def loss_fn(params, b, apply_fn, rng):
    del rng
    return jnp.mean((apply_fn({"params": params}, b["x"]) - b["y"]) ** 2)

  return mpjax.make_train_step(loss_fn), state, {"x": x, "y": x}


def audit(target, recipe, options):
  step, state, batch = build(recipe)
  compiled = mpjax.compile_for_target(step, state, batch, target=target,
                                      compiler_options=options)
  report = mpjax.audit_compiled(compiled)
  lowered = mpjax.audit_program(step, state, batch)
  matmuls = [m._asdict() for m in report.matmuls]
  fp8 = [m for m in matmuls if m["lhs_dtype"].startswith("float8")]
  sixteen = [m for m in matmuls if not m["lhs_dtype"].startswith("float8")]
  return {
      "target": target, "device_kind": report.target,
      "recipe": repr(recipe), "compiler_options": options,
      "fp8_gemms": len(fp8), "expected_fp8_gemms": 3 * FP8_LAYERS,
      # XLA may merge the q/k/v GEMMs that share their fp8 input (fewer,
      # wider GEMMs): the FLOPs are what must match.
      "fp8_flops_compiled": sum(m["flops"] for m in fp8),
      "fp8_flops_lowered": sum(v for k, v in
                               lowered.matmul_flops_by_dtype().items()
                               if "float8" in k),
      "lowered_flops_by_dtype": lowered.matmul_flops_by_dtype(),
      "fp8_implementations": sorted({m["implementation"] for m in fp8}),
      "fp8_operand_pairs": sorted({f"{m['lhs_dtype']} x {m['rhs_dtype']}"
                                   for m in fp8}),
      "other_matmuls": [f"{m['implementation']}: {m['lhs_dtype']} x "
                        f"{m['rhs_dtype']} ({m['flops']} FLOP)"
                        for m in sixteen],
      "table": report.table(buffers=0),
  }


def main(argv=None):
  args = parse_args(argv)
  results = []
  recipes = [mpjax.DelayedScaling(), mpjax.CurrentScaling()]
  # make_train_step's default (faithful rounding), the same with cuBLASLt
  # instead of Triton gemm fusions, and XLA's own defaults (excess
  # precision allowed), where an in-jit quantize-dequantize would lose its
  # rounding: fp8 operands of the dot itself cannot.
  settings = [dict(mpjax.FAITHFUL_ROUNDING),
              dict(mpjax.FAITHFUL_ROUNDING,
                   xla_gpu_enable_triton_gemm=False),
              {"xla_allow_excess_precision": True}]
  for target in args.targets.split(","):
    for recipe in recipes:
      for options in settings:
        r = audit(target, recipe, options)
        results.append(r)
        print(f"{target} {r['recipe']} {options}: {r['fp8_gemms']}/"
              f"{r['expected_fp8_gemms']} fp8 GEMMs, fp8 GFLOP compiled "
              f"{r['fp8_flops_compiled'] / 1e9:.3f} lowered "
              f"{r['fp8_flops_lowered'] / 1e9:.3f} "
              f"{r['fp8_implementations']} {r['fp8_operand_pairs']}; other "
              f"matmuls: {r['other_matmuls']}", flush=True)
  out = {"label": "GPU-compiled (deviceless, no autotuning), not measured",
         "jax": jax.__version__, "command": " ".join(sys.argv),
         "results": results}
  if args.json:
    with open(args.json, "w") as f:
      json.dump(out, f, indent=1)
  return out


if __name__ == "__main__":
  main()
