"""The benchmark's measurements of mpjax: audit, memory, time, projection.

Everything device-independent comes from the *lowered* StableHLO
(`mpjax.audit_program`'s parser) and from abstract traces
(`mpjax.residuals`, `jax.eval_shape`), so it says the same on a CPU as on a
GPU. Times are medians of steps each waited for with `jax.block_until_ready`,
compile time excluded and reported apart; ratios come from steps interleaved
(A, B, C, A, B, C, ...) so that load from other work on the machine falls on
every variant alike.
"""

import time
from typing import Any, Callable, Dict, List, Optional

import jax
import jax.monitoring
import numpy as np

import mpjax
from mpjax._src.program_audit import attention_residuals
from mpjax._src.program_audit import audit_lowered
from mpjax._src.program_audit import matmul_precisions
from mpjax._src.program_audit import tree_bytes

import bench_models
from bench_models import ModelSpec, PolicySpec

# Dense peaks (FLOP/s) and HBM bandwidth (B/s) of the projection's devices,
# from NVIDIA's H100 and H200 datasheets (SXM parts, dense, no sparsity).
GPU_PEAKS = {
    "H100 SXM": {"bfloat16": 989e12, "float16": 989e12, "tf32": 495e12,
                 "float32": 67e12, "hbm_bytes_per_s": 3.35e12},
    "H200 SXM": {"bfloat16": 989e12, "float16": 989e12, "tf32": 495e12,
                 "float32": 67e12, "hbm_bytes_per_s": 4.8e12},
}
PROJECTION_LABEL = "projection, not a measurement"
BYTE_MODEL = ("bytes = step inputs (state + batch) + step outputs (state + "
              "metrics) + 2 x residual bytes (written by the forward pass, "
              "read by the backward pass)")
COMPUTE_MODEL = ("time = max(sum over dtypes of matmul FLOPs / dense peak, "
                 "bytes / HBM bandwidth): a roofline lower bound that leaves "
                 "out non-matmul FLOPs, kernel launches and other traffic")


class _CompileCounter:
  """Counts XLA backend compilations (jax.monitoring events)."""

  def __init__(self):
    self.count = 0
    jax.monitoring.register_event_duration_secs_listener(self._on_event)

  def _on_event(self, event: str, duration: float, **kwargs) -> None:
    del duration, kwargs
    if event == "/jax/core/compile/backend_compile_duration":
      self.count += 1


COMPILES = _CompileCounter()


def device_info() -> Dict[str, Any]:
  device = jax.devices()[0]
  name = device.device_kind
  if device.platform == "cpu":
    try:
      with open("/proc/cpuinfo") as f:
        models_ = [l.split(":", 1)[1].strip() for l in f
                   if l.startswith("model name")]
      name = f"{models_[0]} ({len(models_)} logical cores)"
    except (OSError, IndexError):
      pass
  return {"platform": device.platform, "kind": device.device_kind,
          "name": name, "count": jax.device_count()}


def device_peaks() -> Optional[Dict[str, float]]:
  """This device's entry of `GPU_PEAKS`, matched by name, or None."""
  kind = jax.devices()[0].device_kind
  for key, peaks in GPU_PEAKS.items():
    if key.split()[0] in kind:
      return peaks
  return None


def _peak_key(dtype: str, precision: Optional[str]) -> str:
  if dtype in ("bfloat16", "float16"):
    return dtype
  # float32 and mixed-operand matmuls run at float32 rates: TF32 at JAX's
  # default precision, true float32 at "highest".
  return "float32" if precision == "highest" else "tf32"


def project(flops_by_dtype: Dict[str, int], precision: Optional[str],
            bytes_moved: int) -> Dict[str, Any]:
  """Projected step time per GPU of `GPU_PEAKS` (a lower bound)."""
  out = {"label": PROJECTION_LABEL, "byte_model": BYTE_MODEL,
         "compute_model": COMPUTE_MODEL, "bytes": bytes_moved, "devices": {}}
  for device, peaks in GPU_PEAKS.items():
    compute = sum(f / peaks[_peak_key(d, precision)]
                  for d, f in flops_by_dtype.items())
    memory = bytes_moved / peaks["hbm_bytes_per_s"]
    out["devices"][device] = {
        "projected_step_s": max(compute, memory), "compute_s": compute,
        "memory_s": memory, "bound": "compute" if compute >= memory
        else "memory", "peaks": peaks}
  return out


def _runner(step: Callable, state, batch) -> Callable[[], Dict[str, Any]]:
  """A closure that runs one step on its own state and waits for it."""
  holder = {"state": state, "metrics": None}

  def run():
    holder["state"], holder["metrics"] = step(holder["state"], batch)
    jax.block_until_ready((holder["state"], holder["metrics"]))
    return holder["metrics"]

  return run


def measure(spec: ModelSpec, pol: PolicySpec, warmup: int, timed: int,
            time_it: bool = True) -> Dict[str, Dict[str, Any]]:
  """Audit, memory, step time and projection of `spec` under `pol`.

  Returns ``{"audit": {...}, "memory": {...}, "step_time": {...},
  "projection": {...}}``. With ``time_it=False`` nothing is allocated or
  run (shapes only) and there is no ``step_time``.
  """
  with pol.matmul_precision():
    state, batch, params, apply_fn = bench_models.build(
        spec, pol, abstract=not time_it)
    step = mpjax.make_train_step(spec.loss_fn)
    start = time.perf_counter()
    lowered = step.lower(state, batch)
    lower_s = time.perf_counter() - start
    text = lowered.as_text()
    report = audit_lowered(text)
    loss = bench_models.loss_of_params(spec, pol, apply_fn, batch)
    islands = mpjax.audit_program(jax.grad(loss), params).float32_islands()
    res = mpjax.residuals(loss, params)
    attention = (attention_residuals(loss, params, seq_len=spec.lm.seq_len)
                 if spec.kind == "lm" else {})
    out_shapes = jax.eval_shape(step, state, batch)

    compute = pol.compute_dtype
    share = report.matmul_share(compute)
    audit = {
        "compute_dtype": compute,
        "matmul_flops": report.matmul_flops,
        "matmul_flops_by_dtype": report.matmul_flops_by_dtype(),
        "matmul_share": share,
        "matmuls": len(report.matmuls),
        "matmul_precisions": matmul_precisions(text),
        "converts": report.converts,
        "host_ops": list(report.host_ops),
        "float32_islands": islands,
        "declared_islands": (
            "PolicyMap islands: LayerNorm, attention logits and softmax "
            "(mpjax.numerics.dot_product_attention), loss in float32"
            if spec.kind == "lm" else "loss (softmax cross-entropy) in "
            "float32"),
        "control": pol.control,
        "target": "100% of matmul FLOPs in the compute dtype, no host "
                  "round trips",
        "target_met": share == 1.0 and not report.host_ops,
    }
    memory = {
        "residual_bytes": res.total_bytes,
        "residual_bytes_by_dtype": res.bytes_by_dtype,
        "residual_arrays": res.count,
        "attention_residual_bytes_by_dtype": attention,
        "param_bytes": tree_bytes(state.params),
        "opt_state_bytes": tree_bytes(state.opt_state),
    }
    bytes_moved = (tree_bytes((state, batch)) + tree_bytes(out_shapes) +
                   2 * res.total_bytes)
    projection = project(report.matmul_flops_by_dtype(), pol.precision,
                         bytes_moved)
    result = {"audit": audit, "memory": memory, "projection": projection}
    if not time_it:
      return result

    start = time.perf_counter()
    compiled = lowered.compile()
    compile_s = time.perf_counter() - start
    analysis = compiled.memory_analysis()
    for field in ("temp", "argument", "output", "alias"):
      memory[f"xla_{field}_bytes"] = getattr(analysis,
                                             f"{field}_size_in_bytes", None)
    # The jitted step reuses the executable just compiled; any compilation
    # counted from here on is a retrace.
    compiles_before = COMPILES.count
    run = _runner(step, state, batch)
    times = []
    for i in range(warmup + timed):
      start = time.perf_counter()
      metrics = run()
      if i >= warmup:
        times.append(time.perf_counter() - start)
    metrics = jax.device_get(metrics)
    median = float(np.median(times))
    stats = jax.devices()[0].memory_stats() or {}
    timing = {
        "median_s": median,
        "p10_s": float(np.percentile(times, 10)),
        "p90_s": float(np.percentile(times, 90)),
        "warmup_steps": warmup,
        "timed_steps": timed,
        "lower_s": lower_s,
        "compile_s": compile_s,
        "compilations": 1 + COMPILES.count - compiles_before,
        "calls": warmup + timed,
        "examples_per_s": spec.batch / median,
        "tokens_per_s": (spec.tokens_per_step / median
                         if spec.tokens_per_step else None),
        "final_loss": float(metrics["loss"]),
        "skipped_steps": int(metrics["skipped_steps"]),
        "device_peak_bytes": stats.get("peak_bytes_in_use"),
    }
    peaks = device_peaks()
    if peaks is not None:
      achieved = report.matmul_flops / median
      timing["mfu"] = achieved / peaks[_peak_key(compute, pol.precision)]
    else:
      timing["mfu"] = None
    result["step_time"] = timing
    return result


def interleave(runners: Dict[str, Callable[[], Any]], warmup: int,
               min_rounds: int, min_seconds: float,
               max_rounds: int) -> Dict[str, List[float]]:
  """Times runners in turn, one step each per round; per-runner step times.

  The order rotates every round (A, B, C, then B, C, A, ...) so that no
  runner always follows the same one (a step right after another
  variant's finds the caches holding that variant's buffers). Runs at least
  `min_rounds` rounds and until `min_seconds` have passed, at most
  `max_rounds`.
  """
  for _ in range(warmup):
    for run in runners.values():
      run()
  times: Dict[str, List[float]] = {name: [] for name in runners}
  start = time.perf_counter()
  rounds = 0
  while rounds < max_rounds and (
      rounds < min_rounds or time.perf_counter() - start < min_seconds):
    names = list(runners)
    shift = rounds % len(names)
    for name in names[shift:] + names[:shift]:
      t = time.perf_counter()
      runners[name]()
      times[name].append(time.perf_counter() - t)
    rounds += 1
  return times


def _summary(times: Dict[str, List[float]], baseline: str) -> Dict[str, Any]:
  medians = {k: float(np.median(v)) for k, v in times.items()}
  return {
      "median_s": medians,
      "ratio_vs_" + baseline: {k: m / medians[baseline]
                               for k, m in medians.items()},
      "paired_ratio_vs_" + baseline: {
          k: float(np.median(np.asarray(v) / np.asarray(times[baseline])))
          for k, v in times.items()},
      "rounds": len(times[baseline]),
  }


def loss_scaling_cost(spec: ModelSpec, warmup: int, min_rounds: int,
                      min_seconds: float, max_rounds: int) -> Dict[str, Any]:
  """float32 steps with loss_scaled(adam, DynamicScaling) vs
  loss_scaled(adam, NoScaling()) vs plain optax.adam, interleaved."""
  float32 = next(p for p in bench_models.POLICIES if p.name == "float32")
  variants = {
      "dynamic": mpjax.DynamicScaling.like_torch(),
      "no_scaling": mpjax.NoScaling(),
      "adam": None,
  }
  runners = {}
  for name, scaling in variants.items():
    pol = PolicySpec(float32.name, float32.policy, scaling)
    state, batch, _, _ = bench_models.build(spec, pol)
    runners[name] = _runner(mpjax.make_train_step(spec.loss_fn), state, batch)
  out = _summary(interleave(runners, warmup, min_rounds, min_seconds,
                            max_rounds), "adam")
  overhead = out["ratio_vs_adam"]["dynamic"] - 1
  out.update(target="loss_scaled(adam, DynamicScaling) within 3% of adam",
             overhead=overhead, target_met=overhead <= 0.03)
  return out


def attribution_cost(spec: ModelSpec, warmup: int, min_rounds: int,
                     min_seconds: float, max_rounds: int) -> Dict[str, Any]:
  """make_train_step(attribution=True) vs False, float32, loss_scaled."""
  pol = PolicySpec("float32", "float32", mpjax.DynamicScaling.like_torch())
  runners = {}
  for name, flag in (("attribution", True), ("plain", False)):
    state, batch, _, _ = bench_models.build(spec, pol)
    runners[name] = _runner(
        mpjax.make_train_step(spec.loss_fn, attribution=flag), state, batch)
  out = _summary(interleave(runners, warmup, min_rounds, min_seconds,
                            max_rounds), "plain")
  overhead = out["ratio_vs_plain"]["attribution"] - 1
  out.update(target="attribution=True within 1% of attribution=False",
             overhead=overhead, target_met=overhead <= 0.01)
  return out

