"""The ``gpu-compiled`` suite: every step compiled for H100/B200 targets here.

No GPU: XLA:GPU compiles each model x policy step for a named target
(`mpjax.compile_for_target`, from abstract shapes) and `mpjax.audit_for_target`
reads what it made: matmul kernels and their dtypes, copies, fusions,
`memory_analysis()`, the buffers live at the peak, lost 16-bit roundings.
From the same program, a per-kernel roofline (`mpjax.project_compiled`): a
projection, not a measurement. For GPT-2 124M on the H100 target, the
largest batch whose step fits in memory, per policy (compile-only search).

Variants of a language-model step (``variant`` in the records):
``island`` (the unfused float32 attention island, faithful rounding: what
mpjax's default runs without cuDNN), ``xla-excess-precision`` (XLA's own
default options, for the before/after) and ``fused-attention`` (the
attention layers run `mpjax.fused_dot_product_attention`, cuDNN's flash
attention on CUDA for 16-bit steps: mpjax's default island on CUDA since
2026-12-02; needs cuDNN installed, else skipped with a line saying so).

fp8 rows (policies ``fp8_delayed``, ``fp8_current``; the GPT language models
only): the mixed_bfloat16 LM map with `mpjax.DelayedScaling()` /
`mpjax.CurrentScaling()` on every Dense/DenseGeneral, as the LM examples
train it; each record's ``fp8`` (`fp8_summary`) says whether every fp8
layer's three GEMMs stayed fp8 through XLA:GPU, with fp8 FLOPs per format,
and the report sets them against the mixed_bfloat16 row of the same
variant and target.
"""

import collections
import functools
import math
import os
import re
import time
from typing import Any, Callable, Dict, List, Optional, Tuple

import flax.linen as nn
import jax
import numpy as np

import mpjax
from mpjax._src.fused_attention import cudnn_available

import bench_models
from bench_models import ModelSpec, PolicySpec

TARGETS = ("h100_sxm", "b200")
BATCH_TARGET = "h100_sxm"
# A step "fits" when its compiled peak is at most this share of the device's
# memory: JAX's default on a GPU (XLA_PYTHON_CLIENT_MEM_FRACTION=.75), and
# just below the limit past which XLA:GPU starts rematerialising when it
# compiles for the target (60.19 GiB of the H100's 79.1, seen in its log).
FIT_FRACTION = 0.75
XLA_DEFAULTS: Dict[str, Any] = {"xla_allow_excess_precision": True}
MIXED = ("mixed_bfloat16", "mixed_float16", "float16_static")
SIXTEEN = ("bfloat16", "float16")
GIB = 2.0**30


def with_attention_fn(apply_fn: Callable, attention_fn: Callable) -> Callable:
  """`apply_fn` with every flax attention layer that uses flax's default
  attention function or one of mpjax's (the island, the fused island)
  running `attention_fn` instead."""
  swapped = (nn.dot_product_attention, mpjax.numerics.dot_product_attention,
             mpjax.fused_dot_product_attention)

  def interceptor(next_fun, args, kwargs, context):
    module = context.module
    if (context.method_name == "__call__"
        and isinstance(module, nn.MultiHeadDotProductAttention)
        and module.attention_fn in swapped):
      old = module.attention_fn
      object.__setattr__(module, "attention_fn", attention_fn)
      try:
        return next_fun(*args, **kwargs)
      finally:
        object.__setattr__(module, "attention_fn", old)
    return next_fun(*args, **kwargs)

  @functools.wraps(apply_fn)
  def apply(*args, **kwargs):
    with nn.intercept_methods(interceptor):
      return apply_fn(*args, **kwargs)

  return apply


# The variants' attention: ``island`` pins the unfused float32 island (what
# PolicyMap's island runs without cuDNN), ``fused-attention`` the cuDNN-fused
# one (PolicyMap's default on CUDA since the island became
# `mpjax.fused_dot_product_attention`).
VARIANT_ATTENTION = {
    "island": mpjax.numerics.dot_product_attention,
    "fused-attention": mpjax.fused_dot_product_attention,
}


def variants(spec: ModelSpec, pol: PolicySpec, target: str) -> List[str]:
  """The variants of `spec` x `pol` compiled on `target`."""
  out = ["island"]
  if spec.kind != "lm":
    return out
  if pol.name in MIXED or pol.fp8 is not None:
    out.append("fused-attention")
  if (spec.name == "gpt2-124m" and target == BATCH_TARGET
      and pol.name in ("float32", "mixed_bfloat16")):
    out.append("xla-excess-precision")
  return out


def _step_args(spec: ModelSpec, pol: PolicySpec, variant: str):
  state, batch, _, _ = bench_models.build(spec, pol, abstract=True)
  if variant in VARIANT_ATTENTION:
    state = state.replace(apply_fn=with_attention_fn(
        state.apply_fn, VARIANT_ATTENTION[variant]))
  batch = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype),
                       batch)
  options = XLA_DEFAULTS if variant == "xla-excess-precision" else None
  return mpjax.make_train_step(spec.loss_fn, compiler_options=options), \
      state, batch


def _mfu(flops: int, seconds: float, target: str, compute: str,
         precision: Optional[str]) -> float:
  t = mpjax.gpu_target(target)
  if compute in ("bfloat16", "float16"):
    peak = t.matmul_flops_per_s[compute]
  elif precision == "highest":
    peak = t.vector_flops_per_s["float32"]
  else:
    peak = t.matmul_flops_per_s["float32"]  # TF32
  return flops / seconds / peak


def _is_fp8(dtype: str) -> bool:
  return dtype.startswith("float8")


def fp8_summary(report: "mpjax.CompiledAudit", lowered: "mpjax.ProgramAudit",
                fp8_layers: int) -> Dict[str, Any]:
  """Whether every fp8 layer's matmuls stayed fp8 through XLA:GPU.

  `lowered` is the same step's lowered program (what mpjax asked for: 3 fp8
  dots per fp8 layer, forward, input gradient and kernel gradient); the
  compiled program keeps them fp8 when its fp8 FLOPs equal the lowered
  ones (XLA may merge GEMMs that share an fp8 operand, e.g. q/k/v: the
  FLOPs, not the kernel count, must match) and no matmul kernel pairs an
  fp8 operand with a 16-bit one (a dequantize-to-bf16 fallback would show
  as 16-bit FLOPs above the lowered program's instead).
  """
  fp8 = [m for m in report.matmuls if _is_fp8(m.lhs_dtype)
         and _is_fp8(m.rhs_dtype)]
  half = [m for m in report.matmuls if _is_fp8(m.lhs_dtype)
          != _is_fp8(m.rhs_dtype)]
  others: Dict[str, int] = collections.Counter()
  for m in report.matmuls:
    if m not in fp8:
      others[f"{m.implementation}: {m.lhs_dtype} x {m.rhs_dtype}"] += m.flops
  by_format: Dict[str, int] = collections.Counter()
  for m in fp8:
    for d in {m.lhs_dtype, m.rhs_dtype}:
      by_format[d] += m.flops
  low = lowered.fp8_flops()
  low_dots = [m for m in lowered.matmuls if _is_fp8(m.lhs_dtype)
              and _is_fp8(m.rhs_dtype)]
  sixteen = lambda ms: sum(m.flops for m in ms if m.lhs_dtype in SIXTEEN
                           and m.rhs_dtype in SIXTEEN)
  compiled_flops = sum(m.flops for m in fp8)
  return {
      "fp8_layers": fp8_layers,
      "lowered_fp8_dots": len(low_dots),
      "expected_fp8_dots": 3 * fp8_layers,
      "fp8_gemms": len(fp8),
      "fp8_flops_compiled": compiled_flops,
      "fp8_flops_lowered": low.get("fp8", 0),
      "fp8_flops_by_format_compiled": dict(by_format),
      "fp8_flops_by_format_lowered": {k: v for k, v in low.items()
                                      if k != "fp8"},
      "fp8_share_compiled": compiled_flops / max(report.matmul_flops, 1),
      "sixteen_bit_flops_compiled": sixteen(report.matmuls),
      "sixteen_bit_flops_lowered": sixteen(lowered.matmuls),
      "fp8_implementations": dict(collections.Counter(
          m.implementation for m in fp8)),
      "fp8_operand_pairs": sorted({f"{m.lhs_dtype} x {m.rhs_dtype}"
                                   for m in fp8}),
      "fp8_with_16bit_operand": len(half),
      "other_matmul_flops": dict(others),
      "every_fp8_layer_fp8": (len(low_dots) == 3 * fp8_layers
                              and compiled_flops == low.get("fp8", 0)
                              and not half),
  }


def measure(spec: ModelSpec, pol: PolicySpec, target: str,
            variant: str) -> Dict[str, Any]:
  """Compile, audit and project one step; a record's ``values``."""
  with pol.matmul_precision():
    step, state, batch = _step_args(spec, pol, variant)
    start = time.perf_counter()
    report = mpjax.audit_for_target(step, state, batch, target=target)
    compile_s = time.perf_counter() - start
    lowered = (mpjax.audit_program(step, state, batch)
               if pol.fp8 is not None else None)
  projection = mpjax.project_compiled(report, target)
  seconds = projection["projected_step_s"]
  record = report.to_json()
  del record["matmuls"]  # hundreds of kernels: summarised below
  record["peak_buffers"] = record["peak_buffers"][:12]
  compute = pol.compute_dtype
  by_dtype: Dict[str, int] = {}
  for m in report.matmuls:
    key = (m.lhs_dtype if m.lhs_dtype == m.rhs_dtype
           else f"{m.lhs_dtype}*{m.rhs_dtype}")
    by_dtype[key] = by_dtype.get(key, 0) + m.flops
  opt_copies = report.copied_parameters("opt_state")
  record.update(
      variant=variant, target_name=target, compile_s=compile_s,
      compute_dtype=compute,
      matmul_flops_by_dtype=by_dtype,
      matmul_share=report.matmul_share(compute),
      matmul_result_dtypes=sorted({m.out_dtype for m in report.matmuls}),
      matmul_highest=sum(m.highest for m in report.matmuls),
      opt_state_copies=len(opt_copies),
      opt_state_copied_bytes=sum(c.bytes for c in opt_copies),
      adam_moment_copies=sum("__mu__" in c.source or "__nu__" in c.source
                             for c in opt_copies),
      lost_rounding_bytes=sum(b["bytes"] for b in record["lost_roundings"]),
      projection=projection,
      projected_examples_per_s=spec.batch / seconds,
      projected_tokens_per_s=(spec.tokens_per_step / seconds
                              if spec.tokens_per_step else None),
      projected_mfu=_mfu(report.matmul_flops, seconds, target, compute,
                         pol.precision))
  if lowered is not None:
    # Matmul layers of the linen LM are the params' "kernel" leaves.
    layers = sum(jax.tree_util.keystr(p).endswith("['kernel']")
                 for p, _ in jax.tree_util.tree_leaves_with_path(
                     state.params))
    record.update(fp8=fp8_summary(report, lowered, layers),
                  fp8_recipe=repr(pol.fp8))
  return record


def peak_bytes(spec: ModelSpec, pol: PolicySpec, target: str,
               variant: str) -> Tuple[int, int]:
  """The compiled step's peak and how many instructions XLA rematerialised
  (recomputed to stay under its memory limit: ``*.remat*`` names)."""
  with pol.matmul_precision():
    step, state, batch = _step_args(spec, pol, variant)
    compiled = mpjax.compile_for_target(step, state, batch, target=target)
  remat = len(re.findall(r"^\s*(?:ROOT )?%[\w.\-]*\.remat[\w.\-]* = ",
                         compiled.as_text(), re.M))
  return compiled.memory_analysis().peak_memory_in_bytes, remat


def largest_batch(make_spec: Callable[[int], ModelSpec], pol: PolicySpec,
                  variant: str, target: str = BATCH_TARGET,
                  start: Tuple[int, int] = (8, 16),
                  budget: Optional[float] = None,
                  max_compiles: int = 8,
                  known: Optional[Dict[int, int]] = None,
                  log: Callable[[str], None] = print) -> Dict[str, Any]:
  """The largest batch whose compiled peak fits (`FIT_FRACTION`).

  The peak is close to affine in the batch (the state is fixed, the
  activations grow with it): two compiles fit the line, a third checks the
  predicted largest batch, then each next guess steps from the last compile
  along that slope, inside the bracket (largest batch that fits, smallest
  that does not), until the two are neighbours, at most `max_compiles`
  compiles. A batch XLA could only fit by rematerialising does not fit.
  """
  if budget is None:
    budget = FIT_FRACTION * mpjax.gpu_target(target).memory_bytes
  # Peaks of this very step compiled before (an earlier run's log): the
  # search starts from them; they are recorded as seeded.
  # A known value is the peak, or [peak, instructions rematerialised].
  known = {b: (v if isinstance(v, (list, tuple)) else (v, 0))
           for b, v in (known or {}).items()}
  peaks: Dict[int, int] = {b: int(v[0]) for b, v in known.items()}
  remats: Dict[int, int] = {b: int(v[1]) for b, v in known.items()}
  seeded = sorted(peaks)

  def peak(b):
    """The peak, or infinity when XLA had to recompute to reach it: past
    its memory limit XLA:GPU rematerialises (the step would fit, but
    slower, and the peak stops growing with the batch)."""
    if b not in peaks:
      t = time.perf_counter()
      peaks[b], remats[b] = peak_bytes(make_spec(b), pol, target, variant)
      log(f"  batch {b:4d}: peak {peaks[b] / GIB:7.2f} GiB, "
          f"{remats[b]} rematerialised ({time.perf_counter() - t:5.1f} s)")
    return peaks[b] if not remats[b] else float("inf")

  b0, b1 = start
  slope = (peak(b1) - peak(b0)) / (b1 - b0)
  intercept = peak(b0) - slope * b0
  guess = max(1, int((budget - intercept) // slope))
  fits = [b for b in peaks if peak(b) <= budget]
  misses = [b for b in peaks if peak(b) > budget]
  if guess in peaks:  # seeded past the first guess: bisect the bracket
    lo, hi = max(fits, default=0), min(misses, default=None)
    guess = (lo + hi) // 2 if hi is not None else lo + 1
  b, last = guess, b1
  while len(peaks) - len(seeded) < max_compiles:
    (fits if peak(b) <= budget else misses).append(b)
    lo, hi = max(fits, default=0), min(misses, default=None)
    if hi is not None and hi - lo <= 1:
      break
    # Next: from the last compile along the slope of the first two (no
    # rematerialisation there), kept inside the bracket.
    if peak(b) == float("inf") or hi is not None:
      nxt = (lo + hi) // 2
    else:
      nxt = b + max(1, int((budget - peak(b)) // slope))
    nxt = min(max(nxt, lo + 1), (hi - 1) if hi is not None else nxt)
    if nxt in peaks:
      nxt = (lo + hi) // 2 if hi is not None else lo + 1
      if nxt in peaks:
        break
    last, b = b, nxt
  best = max(fits, default=None)
  return {"target": target, "budget_bytes": budget,
          "fit_fraction": FIT_FRACTION,
          "device_memory_bytes": mpjax.gpu_target(target).memory_bytes,
          "largest_batch": best,
          "smallest_batch_not_fitting": min(misses, default=None),
          "slope_bytes_per_example": slope,
          "intercept_bytes": intercept, "predicted_largest_batch": guess,
          "peak_bytes_by_batch": {str(k): v for k, v in sorted(peaks.items())},
          "rematerialised_by_batch": {str(k): v for k, v in
                                      sorted(remats.items())},
          "compiles": len(peaks) - len(seeded), "seeded_batches": seeded}


def mixed_ratio(records: List[dict], model: str, policy: str, target: str,
                variant: str, base_variant: str = "island") -> Optional[float]:
  """Peak of `policy`/`variant` over float32's (same target)."""
  def peak(pol, var):
    for r in records:
      v = r["values"]
      if (r["measurement"] == "compiled" and r["model"] == model
          and r["policy"] == pol and v["target_name"] == target
          and v["variant"] == var):
        return v["memory"]["peak_bytes"]
    return None
  num, den = peak(policy, variant), peak("float32", base_variant)
  return num / den if num and den else None


# --- report -----------------------------------------------------------------


def _compiled(records: List[dict]) -> List[dict]:
  return [r for r in records if r["measurement"] == "compiled"]


def _table(header, rows) -> str:
  lines = ["| " + " | ".join(header) + " |",
           "|" + "---|" * len(header)]
  lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
  return "\n".join(lines) + "\n"


def targets(records: List[dict]) -> List[Dict[str, Any]]:
  """The issue's targets on the compiled programs (met: True/False/None)."""
  out = []
  comp = _compiled(records)
  mixed = [r for r in comp if r["policy"] in MIXED
           and r["values"]["variant"] != "xla-excess-precision"
           and r["policy"] != "mixed_bfloat16_wrong"]
  bad = [f"{r['model']}/{r['policy']}/{r['values']['target_name']}"
         for r in mixed if r["values"]["matmul_share"] != 1.0]
  out.append({"target": "every matmul kernel of a mixed step takes 16-bit "
                        "operands (GPU-compiled)", "met": not bad,
              "detail": f"{len(mixed)} mixed steps" if not bad else
              ", ".join(bad)})
  lost = [f"{r['model']}/{r['policy']}/{r['values']['target_name']}"
          for r in mixed if r["values"]["lost_roundings"]]
  out.append({"target": "no float32 activation alive at the peak of a mixed "
                        "step", "met": not lost,
              "detail": "none" if not lost else ", ".join(lost)})
  copied = [f"{r['model']}/{r['policy']}: {r['values']['adam_moment_copies']}"
            for r in comp if r["values"]["adam_moment_copies"]]
  out.append({"target": "the optimizer state (Adam moments) is not copied",
              "met": not copied, "detail": "no copy of mu/nu in any step"
              if not copied else ", ".join(copied)})
  for model in ("gpt2-124m", "flax-lm"):
    for variant in ("island", "fused-attention"):
      ratio = mixed_ratio(records, model, "mixed_bfloat16", BATCH_TARGET,
                          variant)
      if ratio is not None:
        out.append({"target": f"{model} mixed_bfloat16 peak <= 0.55x "
                              f"float32 (H100, {variant})",
                    "met": ratio <= 0.55, "detail": f"{ratio:.3f}x"})
  fp8 = [r for r in comp if "fp8" in r["values"]]
  if fp8:
    bad = [f"{r['model']}/{r['policy']}/{r['values']['variant']}/"
           f"{r['values']['target_name']}" for r in fp8
           if not r["values"]["fp8"]["every_fp8_layer_fp8"]]
    out.append({"target": "every fp8 layer's forward and backward matmuls "
                          "are fp8 GEMM kernels, no 16-bit fallback "
                          "(GPU-compiled)", "met": not bad,
                "detail": f"{len(fp8)} fp8 steps" if not bad else
                ", ".join(bad)})
  search = {r["policy"] + "/" + r["values"]["variant"]: r["values"]
            for r in records if r["measurement"] == "largest_batch"}
  f32 = search.get("float32/island", {}).get("largest_batch")
  for key, v in search.items():
    if key.startswith("mixed_bfloat16") and f32:
      out.append({"target": f"GPT-2 124M on an 80 GB H100: mixed fits >= "
                            f"1.8x the float32 batch ({key})",
                  "met": v["largest_batch"] >= 1.8 * f32,
                  "detail": f"{v['largest_batch']} vs {f32} "
                            f"({v['largest_batch'] / f32:.2f}x)"})
  return out


def markdown(result: Dict[str, Any]) -> str:
  env = result["environment"]
  records = result["records"]
  v = env["versions"]
  text = [f"# gpu-compiled suite\n",
          f"GPU-compiled on a CPU-only machine ({env['device']['name']}); "
          "real XLA:GPU compiler, no device; times and throughput are "
          "**projections, not measurements**. jax "
          f"{v.get('jax')}, jaxlib {v.get('jaxlib')}, jax-cuda12-plugin "
          f"{v.get('jax-cuda12-plugin')}, flax {v.get('flax')}, optax "
          f"{v.get('optax')}, cuDNN "
          f"{v.get('nvidia-cudnn-cu12') or 'not installed'}; {env['date']}; "
          f"`{env['command']}`.\n"]
  text.append("## Targets\n")
  text.append(_table(("target", "met", "detail"), [
      (t["target"], {True: "**met**", False: "**missed**", None: "-"}[
          t["met"]], t["detail"]) for t in result.get("targets", [])]))
  text.append("\n## Compiled steps\n\nPeak = `memory_analysis()` peak; "
              "kernels = top-level kernels (fusions, custom calls, copies); "
              "projected = per-kernel roofline (sum over kernels of max("
              "matmul FLOPs / dense peak of the operand dtype, bytes / HBM "
              "bandwidth)).\n")
  rows = []
  for r in _compiled(records):
    x = r["values"]
    ratio = mixed_ratio(records, r["model"], r["policy"], x["target_name"],
                        x["variant"])
    impl = ", ".join(f"{n} {k}" for k, n in sorted(
        x["matmul_implementations"].items()))
    rows.append((
        r["model"], r["policy"], x["variant"], x["target_name"],
        f"{x['memory']['peak_bytes'] / GIB:.3f}",
        f"{ratio:.3f}x" if ratio else "",
        impl, f"{100 * x['matmul_share']:.1f}%", x["fusions"],
        x["kernels"], len(x["copies"]), x["adam_moment_copies"],
        f"{x['lost_rounding_bytes'] / 2**20:,.0f}",
        f"{1e3 * x['projection']['projected_step_s']:.3f}",
        (f"{x['projected_tokens_per_s'] / 1e3:,.0f}K"
         if x["projected_tokens_per_s"] else
         f"{x['projected_examples_per_s'] / 1e3:,.0f}K ex"),
        f"{100 * x['projected_mfu']:.1f}%", f"{x['compile_s']:.0f}"))
  text.append(_table(
      ("model", "policy", "variant", "target", "peak GiB", "vs float32",
       "matmul kernels", "16-bit share", "fusions", "kernels", "copies",
       "Adam copies", "lost-rounding MiB", "projected ms", "projected /s",
       "projected MFU", "compile s"), rows))
  speed = []
  for r in _compiled(records):
    x = r["values"]
    if r["model"] != "gpt2-124m" or r["policy"] not in MIXED:
      continue
    base = {p: next((q["values"] for q in _compiled(records)
                     if q["model"] == r["model"] and q["policy"] == p
                     and q["values"]["target_name"] == x["target_name"]
                     and q["values"]["variant"] == "island"), None)
            for p in ("float32_highest", "float32")}
    t = x["projection"]["projected_step_s"]
    speed.append((r["policy"], x["variant"], x["target_name"],
                  f"{x['projected_tokens_per_s'] / 1e3:,.0f}K",
                  f"{100 * x['projected_mfu']:.1f}%",
                  f"{base['float32_highest']['projection']['projected_step_s'] / t:.2f}x"
                  if base["float32_highest"] else "",
                  f"{base['float32']['projection']['projected_step_s'] / t:.2f}x"
                  if base["float32"] else ""))
  if speed:
    text.append("\n## GPT-2 124M projection (per-kernel roofline; projection, "
                "not a measurement)\n")
    text.append(_table(("policy", "variant", "target", "tokens/s", "MFU",
                        "vs float32_highest", "vs TF32"), speed))
  text.extend(fp8_markdown(records))
  searches = [r for r in records if r["measurement"] == "largest_batch"]
  if searches:
    text.append("\n## Largest GPT-2 124M batch that fits an 80 GB H100 "
                f"(compiled peak <= {FIT_FRACTION:.0%} of "
                f"{searches[0]['values']['device_memory_bytes'] / GIB:.1f} "
                "GiB; compile-only search)\n")
    rows = []
    for r in searches:
      x = r["values"]
      rows.append((r["policy"], x["variant"], x["largest_batch"],
                   f"{x['slope_bytes_per_example'] / GIB:.3f}",
                   f"{x['intercept_bytes'] / GIB:.2f}",
                   ", ".join(f"{b}: {p / GIB:.2f}" for b, p in
                             x["peak_bytes_by_batch"].items()),
                   x["compiles"]))
    text.append(_table(("policy", "variant", "largest batch",
                        "GiB per sequence", "GiB at batch 0 (fit)",
                        "compiled peak GiB by batch", "compiles"), rows))
  if result.get("skipped"):
    text.append("\n## Not run\n\n" + "\n".join(
        f"- {s}" for s in result["skipped"]) + "\n")
  return "\n".join(text)


def _same(records: List[dict], r: dict, policy: str) -> Optional[dict]:
  """`policy`'s compiled record of `r`'s model, variant and target."""
  x = r["values"]
  return next((q["values"] for q in _compiled(records)
               if q["model"] == r["model"] and q["policy"] == policy
               and q["values"]["target_name"] == x["target_name"]
               and q["values"]["variant"] == x["variant"]), None)


def fp8_markdown(records: List[dict]) -> List[str]:
  """The fp8 rows against mixed_bfloat16 (same model, variant, target)."""
  rows = []
  for r in _compiled(records):
    x = r["values"]
    if "fp8" not in x:
      continue
    f, base = x["fp8"], _same(records, r, "mixed_bfloat16")
    gflop = lambda n: f"{n / 1e9:,.1f}"
    pairs = collections.Counter()
    for key, n in x["matmul_flops_by_dtype"].items():
      if "float8" in key:
        lhs, _, rhs = key.partition("*")
        pairs[" x ".join(d.replace("float8_", "") for d in
                         (lhs, rhs or lhs))] += n
    t = x["projection"]["projected_step_s"]
    rows.append((
        r["model"], r["policy"], x["variant"], x["target_name"],
        f"{x['memory']['peak_bytes'] / GIB:.3f}",
        (f"{x['memory']['peak_bytes'] / base['memory']['peak_bytes']:.3f}x"
         if base else "not run"),
        f"{f['fp8_gemms']} ({f['lowered_fp8_dots']} lowered, "
        f"{f['fp8_layers']} layers)",
        ", ".join(f"{n} {k}" for k, n in sorted(
            f["fp8_implementations"].items())),
        ", ".join(f"{k}: {gflop(n)}" for k, n in sorted(pairs.items())),
        f"{100 * f['fp8_share_compiled']:.1f}%",
        f"{gflop(f['sixteen_bit_flops_compiled'])} / "
        f"{gflop(f['sixteen_bit_flops_lowered'])}",
        f["fp8_with_16bit_operand"],
        "**yes**" if f["every_fp8_layer_fp8"] else "**no**",
        f"{1e3 * t:.3f}",
        (f"{base['projection']['projected_step_s'] / t:.2f}x" if base
         else "not run")))
  if not rows:
    return []
  return ["\n## fp8 rows (GPU-compiled; times are a projection, not a "
          "measurement)\n\nThe mixed_bfloat16 LM map with an fp8 recipe on "
          "every Dense/DenseGeneral (`lm_common.fp8_policy`); compared with the "
          "mixed_bfloat16 row of the same model, variant and target. fp8 "
          "GEMMs = compiled matmul kernels with two fp8 operands (XLA may "
          "merge GEMMs that share an operand); every layer fp8 = the "
          "lowered program has 3 fp8 dots per fp8 layer and the compiled "
          "program's fp8 FLOPs equal them, with no fp8 x 16-bit kernel. "
          "(The compiled-steps table's MFU for these rows is against the "
          "bfloat16 peak.)\n",
          _table(("model", "policy", "variant", "target", "peak GiB",
                  "vs mixed_bfloat16", "fp8 GEMMs", "fp8 kernels",
                  "fp8 GFLOP by operands", "fp8 share of matmul FLOPs",
                  "16-bit GFLOP compiled / lowered", "fp8 x 16-bit kernels",
                  "every layer fp8", "projected ms",
                  "projected vs mixed_bfloat16"), rows)]


def plots(result: Dict[str, Any], out_dir: str) -> List[str]:
  """peak_memory.png (compiled peak per model x policy, H100) and
  batch_fit.png (GPT-2 124M peak per batch, per policy, with the budget)."""
  try:
    import matplotlib  # pylint: disable=g-import-not-at-top
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  except ImportError:
    return []
  written = []
  records = result["records"]
  comp = [r for r in _compiled(records)
          if r["values"]["target_name"] == BATCH_TARGET]
  if comp:
    labels = [f"{r['model']}\n{r['policy']}\n{r['values']['variant']}"
              for r in comp]
    fig, ax = plt.subplots(figsize=(max(8, 0.45 * len(comp)), 4.5))
    ax.bar(range(len(comp)), [r["values"]["memory"]["peak_bytes"] / GIB
                              for r in comp])
    ax.set_xticks(range(len(comp)), labels, rotation=90, fontsize=6)
    ax.set_ylabel("compiled peak (GiB)")
    ax.set_yscale("log")
    ax.set_title("GPU-compiled peak memory, H100 SXM target (no device)")
    fig.tight_layout()
    path = os.path.join(out_dir, "peak_memory.png")
    fig.savefig(path, dpi=120)
    plt.close(fig)
    written.append(path)
  searches = [r for r in records if r["measurement"] == "largest_batch"]
  if searches:
    fig, ax = plt.subplots(figsize=(7, 4.5))
    top = 0
    for r in searches:
      x = r["values"]
      bs = [int(b) for b in x["peak_bytes_by_batch"]]
      ps = [p / GIB for p in x["peak_bytes_by_batch"].values()]
      remat = x.get("rematerialised_by_batch", {})
      fit = [(b, p) for b, p in zip(bs, ps) if not remat.get(str(b))]
      line = ax.plot(*zip(*fit), "o", label=f"{r['policy']} ({x['variant']}): "
                     f"batch {x['largest_batch']}")[0]
      over = [(b, p) for b, p in zip(bs, ps) if remat.get(str(b))]
      if over:
        ax.plot(*zip(*over), "x", color=line.get_color())
      grid = np.linspace(0, max(bs) * 1.1, 50)
      ax.plot(grid, (x["intercept_bytes"] + x["slope_bytes_per_example"] *
                     grid) / GIB, "-", color=line.get_color(), alpha=0.4)
      top = max(top, max(bs) * 1.1)
    budget = searches[0]["values"]["budget_bytes"] / GIB
    ax.axhline(budget, color="k", ls="--", label=f"{FIT_FRACTION:.0%} of "
               "80 GB")
    ax.set_xlim(0, top)
    ax.set_xlabel("batch (sequences of 1024 tokens)")
    ax.set_ylabel("compiled peak (GiB)")
    ax.set_title("GPT-2 124M train step on an H100 target (compiled, no "
                 "device); x: XLA rematerialised")
    ax.legend(fontsize=7)
    fig.tight_layout()
    path = os.path.join(out_dir, "batch_fit.png")
    fig.savefig(path, dpi=120)
    plt.close(fig)
    written.append(path)
  return written


def has_cudnn() -> bool:
  return cudnn_available()
