"""MXFP8 on the GPU compiler: which kernel XLA:GPU makes of `mxfp8_dot_general`.

Compiles a small MXFP8 matmul step (``x @ w`` through
`mpjax.mxfp8_dot_general`, bfloat16 operands, a squared-error loss, both
gradients: 3 block-scaled GEMMs, e4m3 x e4m3 forward, e5m2 x e4m3 backward)
for the B200 target (and the H100, which has no MX tensor cores) with
`mpjax.compile_for_target` (no GPU needed) and audits the compiled program
(`mpjax.audit_compiled`): the kernel of every matmul and its operand dtypes.
On CUDA the block-scaled matmul is `jax.nn.scaled_matmul` (the
``__op$block_scaled_dot`` custom call); XLA:GPU rewrites it into cuDNN's
block-scaled GEMM only when the target's cuDNN version is recent enough,
else into a dequantize + float32 GEMM. mpjax's B200 spec (XLA's
``b200.txtpb``) says ``dnn_version_info { major: 9 minor: 7 }`` (its runtime
section says ``dnn_version: "9.10.0"``), so the script also compiles for the
same spec with the cuDNN version raised (``--cudnn-minors``): labelled rows,
not mpjax's spec. For contrast, the two JAX ops alone on fp8 data:
`jax.nn.scaled_matmul` and `jax.lax.scaled_dot` (XLA's ``scaled-dot``).

Command (about a minute on 2 cores)::

  python experiments/mxfp8_gpu_compile.py --json benchmarks/fp8/mxfp8_gpu_compiled.json

Expected: on the B200 spec as shipped (cuDNN 9.7) and on the H100, each of
the step's 3 MXFP8 GEMMs is a float32 cuBLASLt GEMM of dequantized operands
(no block-scaled kernel); with cuDNN 9.10 in the B200 spec (9.8 and 9.9
still fall back), all 3 are ``__cudnn$blockScaledDot`` (e4m3 x e4m3
forward, e5m2 x e4m3 backward, same FLOPs); `jax.lax.scaled_dot` alone is
a Triton gemm fusion around XLA's ``scaled-dot`` on every spec.
"""

import argparse
import dataclasses
import json
import re
import sys


def parse_args(argv=None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--json", default=None)
  parser.add_argument("--cudnn-minors", default="8,9,10",
                      help="cuDNN 9.N versions to put in the B200 spec "
                           "besides its own")
  return parser.parse_args(argv)


if __name__ == "__main__":
  # --help and flag errors are answered before jax is imported.
  parse_args()

# pylint: disable=g-import-not-at-top,wrong-import-position
import jax
import jax.numpy as jnp
from jax.experimental import topologies

import mpjax

M, K, N = 512, 1024, 768
DENSE = (((1,), (0,)), ((), ()))


def step(x, w, y):
  def loss(x, w):
    out = mpjax.mxfp8_dot_general(x, w, DENSE).astype(jnp.float32)
    return jnp.mean((out - y) ** 2)
  return jax.value_and_grad(loss, argnums=(0, 1))(x, w)


def op_alone(kind):
  """`kind`'s op on fp8 data and e8m0 scales, [1, M, K] x [1, N, K]."""
  if kind == "jax.nn.scaled_matmul":
    return lambda a, b, sa, sb: jax.nn.scaled_matmul(
        a, b, sa, sb, preferred_element_type=jnp.float32)
  return lambda a, b, sa, sb: jax.lax.scaled_dot(
      a, b, lhs_scale=sa, rhs_scale=sb,
      dimension_numbers=(((2,), (2,)), ((0,), (0,))),
      preferred_element_type=jnp.float32)


def device(target, cudnn_minor=None):
  """A compile-only device of `target`, its spec's cuDNN 9.minor replaced."""
  spec = mpjax.gpu_target(target)
  if cudnn_minor is None:
    return spec.devices(1)[0], "as shipped"
  text, n = re.subn(r"dnn_version_info \{\s*major: (\d+)\s*minor: \d+\s*\}",
                    f"dnn_version_info {{\n  major: 9\n  minor: {cudnn_minor}"
                    "\n}", spec.config_text)
  if not n:
    raise ValueError(f"{target}: no dnn_version_info in the spec.")
  spec = dataclasses.replace(spec, config_text=text)
  topology = topologies.get_topology_desc("", "cuda", topology="1x1x1",
                                          target_config=spec.config_text)
  return topology.devices[0], f"dnn_version_info 9.{cudnn_minor} (patched)"


def compile_on(dev, fn, shapes):
  sharding = jax.sharding.SingleDeviceSharding(dev)
  args = [jax.ShapeDtypeStruct(s, d, sharding=sharding) for s, d in shapes]
  return jax.jit(fn).lower(*args).compile()


def summary(compiled):
  text = compiled.as_text()
  report = mpjax.audit_compiled(compiled)
  return {
      "matmuls": [f"{m.implementation}: {m.lhs_dtype} x {m.rhs_dtype} -> "
                  f"{m.out_dtype} ({m.flops} FLOP)" for m in report.matmuls],
      "custom_calls": sorted(set(re.findall(
          r'custom_call_target="([^"]+)"', text))),
      "fusion_kinds": sorted(set(re.findall(r'"kind":"([^"]+)"', text))),
      "scaled_dot_ops": len(re.findall(r"= \S+ scaled-dot\(", text)),
      "fp8_operand_matmul_flops": sum(
          m.flops for m in report.matmuls if m.lhs_dtype.startswith("float8")
          and m.rhs_dtype.startswith("float8")),
      "float32_operand_matmul_flops": sum(
          m.flops for m in report.matmuls if m.lhs_dtype == "float32"),
  }


def main(argv=None):
  args = parse_args(argv)
  bf16 = jnp.bfloat16
  step_shapes = [((M, K), bf16), ((K, N), bf16), ((M, N), jnp.float32)]
  op_shapes = [((1, M, K), jnp.float8_e4m3fn), ((1, N, K), jnp.float8_e4m3fn),
               ((1, M, K // 32), jnp.float8_e8m0fnu),
               ((1, N, K // 32), jnp.float8_e8m0fnu)]
  lowered = mpjax.audit_program(jax.jit(step), *[
      jax.ShapeDtypeStruct(s, d) for s, d in step_shapes])
  configs = [("b200", None), ("h100_sxm", None)] + [
      ("b200", int(m)) for m in args.cudnn_minors.split(",") if m]
  rows = []
  for target, minor in configs:
    dev, spec = device(target, minor)
    row = {"target": target, "spec": spec, "device_kind": dev.device_kind,
           "step": summary(compile_on(dev, step, step_shapes))}
    for kind in ("jax.nn.scaled_matmul", "jax.lax.scaled_dot"):
      row[kind] = summary(compile_on(dev, op_alone(kind), op_shapes))
    rows.append(row)
    print(f"{target} ({spec}): step {row['step']['matmuls']} custom calls "
          f"{row['step']['custom_calls']}; scaled_matmul alone "
          f"{row['jax.nn.scaled_matmul']['custom_calls']}; lax.scaled_dot "
          f"alone {row['jax.lax.scaled_dot']['fusion_kinds']} "
          f"({row['jax.lax.scaled_dot']['scaled_dot_ops']} scaled-dot)",
          flush=True)
  out = {"label": "GPU-compiled (deviceless, no autotuning), not measured",
         "jax": jax.__version__, "command": "python " + " ".join(sys.argv),
         "shapes": {"x": [M, K], "w": [K, N]},
         "lowered_matmuls": [f"{m.lhs_dtype} x {m.rhs_dtype} ({m.flops} "
                             "FLOP)" for m in lowered.matmuls],
         "rows": rows}
  if args.json:
    with open(args.json, "w") as f:
      json.dump(out, f, indent=1)
  return out


if __name__ == "__main__":
  main()
