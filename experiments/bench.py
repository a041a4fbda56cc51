"""mpjax benchmarks: what mixed precision costs and saves, against the peers.

One entry point for every suite. Per model x precision policy it records:

- the precision audit of the *lowered* step (matmul FLOPs per operand dtype,
  share in the compute dtype, converts, host round trips, float32 islands);
- activation memory: bytes of the residuals the backward pass keeps (found
  abstractly), params and optimizer-state bytes;
- the median step time (compile excluded, reported apart) and the number of
  compilations over the run;
- a projected H100/H200 step time from the program's FLOPs and bytes
  (a projection, not a measurement);

and per model: the cost of loss scaling (interleaved float32 steps with
``loss_scaled(adam, DynamicScaling)``, ``loss_scaled(adam, NoScaling())``
and plain ``optax.adam``), the cost of ``attribution=True`` (seed MLP), and
the same model in PyTorch (eager and ``torch.compile``) and Keras 3 on JAX.
Policies: float32 under ``jax.default_matmul_precision("highest")``,
float32 at JAX's default precision (TF32 on Hopper), mixed_bfloat16,
mixed_float16 with ``DynamicScaling.like_torch()``, and float16 compute with
``StaticScaling`` (``p=f32,c=f16,o=f32``).

Writes ``results.json`` (one record per model x policy x measurement, with
device, versions, date and this command), ``results.md`` and PNG charts to
``--out``. Commands (from the repository root):

  python experiments/bench.py --suite cpu --out benchmarks/cpu   # ~6.5 min, 2 cores
  python experiments/bench.py --suite cpu --quick --out /tmp/b   # tiny shapes
  python experiments/bench.py --suite gpu --out benchmarks/gpu   # + GPT-2 124M
  python experiments/bench.py --render benchmarks/cpu            # redraw only

The suites differ in models (``gpu`` times GPT-2 124M at sequence 1024,
which ``cpu`` audits, traces and projects from shapes alone) and in where
the peers run; the measuring code is the same. A peer that is not installed
is skipped with a line saying so.
"""

import argparse
import dataclasses
import datetime
import importlib.metadata
import json
import os
import platform
import shlex
import sys
import time
from typing import Any, Dict, List

# Keras reads its backend at its first import, which may come from any module.
os.environ.setdefault("KERAS_BACKEND", "jax")
# On a GPU, JAX would otherwise take 75% of the memory up front: torch, in
# the same process, needs room, and peak_bytes_in_use should mean something.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

# bench_peers imports no jax (its peers are imported when they run).
import bench_peers  # pylint: disable=g-import-not-at-top,wrong-import-position

SUITE_MODELS = {"cpu": ("mlp", "cnn", "gpt"),
                "gpu": ("gpt2-124m", "mlp", "cnn", "gpt"),
                "gpu-compiled": ("gpt2-124m", "flax-lm", "mlp", "cnn", "gpt")}
SUITE_PEER_MODELS = {"cpu": ("mlp", "cnn", "gpt"), "gpu": ("gpt2-124m",),
                     "gpu-compiled": ()}
# Audited, traced and projected from shapes alone, never run.
SUITE_AUDIT_ONLY = {"cpu": ("gpt2-124m",), "gpu": (), "gpu-compiled": ()}
# Models the peers have a version of; "resnet" (BatchNorm statistics in the
# model state) is mpjax-only and runs when named with --models.
PEER_MODELS = ("mlp", "cnn", "gpt", "gpt2-124m", "flax-lm")
MODELS = PEER_MODELS + ("resnet",)
# bench_compiled.TARGETS and the names of bench_models.POLICIES, for the
# flags (parsed before jax is imported).
TARGETS = ("h100_sxm", "b200")
POLICIES = ("float32_highest", "float32", "mixed_bfloat16", "mixed_float16",
            "float16_static", "fp8_delayed", "fp8_current")
# The last two are bench_models.FP8_POLICIES: the gpu-compiled suite runs
# them on the GPT language models only; the other suites ignore them.


def parse_args(argv: List[str]) -> argparse.Namespace:
  parser = argparse.ArgumentParser(
      description="mpjax benchmarks (see the module docstring).")
  parser.add_argument("--suite", choices=("cpu", "gpu", "gpu-compiled"),
                      default="cpu",
                      help="gpu-compiled: every step compiled for GPU targets "
                           "on this machine (no GPU; bench_compiled.py)")
  parser.add_argument("--targets", nargs="+",
                      default=list(TARGETS),
                      help="gpu-compiled: GPU targets (mpjax.gpu_target "
                           "names)")
  parser.add_argument("--no-batch-search", dest="batch_search",
                      action="store_false",
                      help="gpu-compiled: skip the largest-batch search")
  parser.add_argument("--batch-search-only", action="store_true",
                      help="gpu-compiled: only the largest-batch search")
  parser.add_argument("--batch-known", type=json.loads, default={},
                      help='gpu-compiled: JSON {"POLICY/VARIANT": {"BATCH": '
                           'PEAK_BYTES}}: peaks compiled in an earlier run, '
                           'to start the search from')
  parser.add_argument("--variants", nargs="+",
                      choices=("island", "fused-attention",
                               "xla-excess-precision"),
                      help="gpu-compiled: only these step variants")
  parser.add_argument("--batch-searches", nargs="+",
                      help="gpu-compiled: POLICY/VARIANT searches (default: "
                           "float32/island mixed_bfloat16/island "
                           "mixed_float16/island mixed_bfloat16/fused-attention "
                           "mixed_float16/fused-attention)")
  parser.add_argument("--out", help="output directory (default "
                      "benchmarks/<suite>)")
  parser.add_argument("--models", nargs="+", choices=MODELS,
                      help="default: the suite's models")
  parser.add_argument("--audit-only", nargs="*", choices=MODELS,
                      help="models audited, traced for memory and projected "
                           "from shapes alone, never run (default: cpu "
                           "gpt2-124m, gpu none)")
  parser.add_argument("--policies", nargs="+",
                      choices=POLICIES, default=list(POLICIES))
  parser.add_argument("--peers", nargs="*", choices=bench_peers.PEERS,
                      default=list(bench_peers.PEERS),
                      help="peer frameworks (none: --peers with no value)")
  parser.add_argument("--peer-models", nargs="*", choices=PEER_MODELS,
                      help="models the peers run (default: the suite's)")
  parser.add_argument("--peer-policies", nargs="+",
                      choices=bench_peers.PEER_POLICIES,
                      default=list(bench_peers.PEER_POLICIES))
  parser.add_argument("--no-costs", dest="costs", action="store_false",
                      help="skip the loss-scaling and attribution cost "
                           "comparisons")
  parser.add_argument("--quick", action="store_true",
                      help="tiny shapes and few steps (tests)")
  parser.add_argument("--warmup", type=int, help="untimed steps (10; quick 2)")
  parser.add_argument("--steps", type=int,
                      help="timed steps per policy (90; quick 4)")
  parser.add_argument("--peer-steps", type=int,
                      help="timed peer steps (30; quick 3)")
  parser.add_argument("--min-rounds", type=int,
                      help="interleaved rounds at least (30; quick 3)")
  parser.add_argument("--min-seconds", type=float,
                      help="interleaved comparisons run at least this long "
                           "(6; quick 0)")
  parser.add_argument("--max-rounds", type=int, default=3000)
  parser.add_argument("--gpt2-batch", type=int, default=8)
  parser.add_argument("--gpt2-seq", type=int, default=1024)
  parser.add_argument("--max-minutes", type=float,
                      help="start no new measurement after this many minutes "
                           "(the rest is listed as skipped); default none")
  parser.add_argument("--merge", nargs="+", metavar="DIR",
                      help="merge the records of several runs' "
                           "DIR/results.json (one suite, e.g. gpu-compiled "
                           "parts run in parallel) into --out and render")
  parser.add_argument("--render", metavar="DIR",
                      help="only redraw DIR/results.md and plots from "
                           "DIR/results.json")
  args = parser.parse_args(argv)
  quick = args.quick
  defaults = {"warmup": (10, 2), "steps": (90, 4), "peer_steps": (30, 3),
              "min_rounds": (30, 3), "min_seconds": (6.0, 0.0)}
  for name, (full, small) in defaults.items():
    if getattr(args, name) is None:
      setattr(args, name, small if quick else full)
  args.models = args.models or list(SUITE_MODELS[args.suite])
  if args.audit_only is None:
    args.audit_only = list(SUITE_AUDIT_ONLY[args.suite])
  args.models = [m for m in args.models if m not in args.audit_only]
  if args.peer_models is None:
    args.peer_models = list(SUITE_PEER_MODELS[args.suite])
  args.out = args.out or os.path.join("benchmarks", args.suite)
  for name in ("steps", "peer_steps", "min_rounds", "gpt2_batch", "gpt2_seq"):
    if getattr(args, name) < 1:
      parser.error(f"--{name.replace('_', '-')} must be >= 1")
  if args.warmup < 0:
    parser.error("--warmup must be >= 0")
  return args


if __name__ == "__main__":
  # --help and flag errors are answered before jax is imported.
  parse_args(sys.argv[1:])

import mpjax  # pylint: disable=g-import-not-at-top,wrong-import-position

import bench_compiled  # pylint: disable=g-import-not-at-top,wrong-import-position
import bench_core  # pylint: disable=g-import-not-at-top,wrong-import-position
import bench_models  # pylint: disable=g-import-not-at-top,wrong-import-position
import bench_report  # pylint: disable=g-import-not-at-top,wrong-import-position


def specs(args: argparse.Namespace) -> Dict[str, bench_models.ModelSpec]:
  out = dict(bench_models.cpu_models())
  out["gpt2-124m"] = bench_models.gpt2_124m(args.gpt2_batch, args.gpt2_seq)
  out["flax-lm"] = bench_models.flax_lm(args.gpt2_batch, args.gpt2_seq)
  if args.quick:
    out = {k: bench_models.quick(v) for k, v in out.items()}
  return {k: out[k] for k in list(args.models) + list(args.audit_only)}


def environment(argv: List[str], args: argparse.Namespace) -> Dict[str, Any]:
  versions = {"python": platform.python_version()}
  for name in ("jax", "jaxlib", "flax", "optax", "numpy", "jmp"):
    try:
      versions[name] = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
      versions[name] = "?"
  versions["mpjax"] = mpjax.__version__  # also when run from a source tree
  if args.suite == "gpu-compiled":
    for name in ("jax-cuda12-plugin", "jax-cuda12-pjrt", "nvidia-cudnn-cu12"):
      try:
        versions[name] = importlib.metadata.version(name)
      except importlib.metadata.PackageNotFoundError:
        versions[name] = None
  versions.update(bench_peers.versions())
  return {
      "suite": args.suite,
      "quick": args.quick,
      "device": bench_core.device_info(),
      "versions": versions,
      "date": datetime.datetime.now(datetime.timezone.utc).isoformat(
          timespec="seconds"),
      "command": "python " + shlex.join(argv),
      "settings": {k: v for k, v in vars(args).items() if k != "render"},
  }


class Bench:
  """Runs the measurements, keeps the records, writes them as it goes."""

  def __init__(self, args: argparse.Namespace, env: Dict[str, Any]):
    self.args, self.env = args, env
    self.records: List[dict] = []
    self.skipped: List[str] = []
    self.start = time.perf_counter()

  def out_of_time(self, what: str) -> bool:
    limit = self.args.max_minutes
    if limit is not None and time.perf_counter() - self.start > 60 * limit:
      self.skipped.append(f"{what}: not run (--max-minutes {limit} reached)")
      print(f"skipped {what}: --max-minutes {limit} reached", flush=True)
      return True
    return False

  def add(self, spec, policy: str, framework: str, measurement: str,
          values: Dict[str, Any]) -> None:
    self.records.append({
        "model": spec.name, "policy": policy, "framework": framework,
        "measurement": measurement, "shape": spec.describe(),
        "values": values, "device": self.env["device"],
        # Other work on the machine shows here; absolute times depend on it.
        "load_avg_1m": os.getloadavg()[0],
        "versions": self.env["versions"], "date": self.env["date"],
        "command": self.env["command"]})

  def run_model(self, spec) -> None:
    a = self.args
    policies = [p for p in bench_models.POLICIES if p.name in a.policies]
    if spec.kind == "mlp":
      policies.append(bench_models.CONTROL)
    audit_only = spec.name in a.audit_only
    for pol in policies:
      if self.out_of_time(f"{spec.name}/{pol.name}"):
        continue
      result = bench_core.measure(spec, pol, a.warmup, a.steps,
                                  time_it=not (pol.control or audit_only))
      result["audit"]["policy_note"] = pol.note
      for measurement, values in result.items():
        self.add(spec, pol.name, "mpjax", measurement, values)
      audit, timing = result["audit"], result.get("step_time")
      print(f"{spec.name:10s} {pol.name:22s} share "
            f"{100 * audit['matmul_share']:5.1f}% converts "
            f"{audit['converts']:4d} residual "
            f"{result['memory']['residual_bytes'] / 1e6:8.2f} MB"
            + (f"  step {1e3 * timing['median_s']:9.3f} ms  compile "
               f"{timing['compile_s']:5.1f} s" if timing else "  (audit only)"),
            flush=True)
    if audit_only:
      return
    # Peers before the cost comparisons: on a GPU, with --max-minutes, the
    # comparison with torch.compile matters more.
    if spec.name in a.peer_models:
      self.run_peers(spec)
    interleaved = (a.warmup, a.min_rounds, a.min_seconds, a.max_rounds)
    if a.costs and "float32" in a.policies and not self.out_of_time(
        f"{spec.name} loss-scaling cost"):
      values = bench_core.loss_scaling_cost(spec, *interleaved)
      self.add(spec, "float32", "mpjax", "loss_scaling_cost", values)
      print(f"{spec.name:10s} loss scaling: dynamic/adam "
            f"{values['ratio_vs_adam']['dynamic']:.3f}, no-scaling/adam "
            f"{values['ratio_vs_adam']['no_scaling']:.3f} "
            f"({values['rounds']} rounds)", flush=True)
    if a.costs and spec.kind == "mlp" and not self.out_of_time(
        "attribution cost"):
      values = bench_core.attribution_cost(spec, *interleaved)
      self.add(spec, "float32", "mpjax", "attribution_cost", values)
      print(f"{spec.name:10s} attribution: on/off "
            f"{values['ratio_vs_plain']['attribution']:.3f} "
            f"({values['rounds']} rounds)", flush=True)

  def run_peers(self, spec) -> None:
    a = self.args
    for policy in a.peer_policies:  # in the order given: most wanted first
      for peer in a.peers:
        missing = bench_peers.available(peer)
        if missing is None and self.out_of_time(
            f"{peer} {spec.name}/{policy}"):
          continue
        values = ({"skipped": missing} if missing else
                  bench_peers.run_peer(peer, spec, policy,
                                       max(a.warmup // 3, 1), a.peer_steps))
        self.add(spec, policy, peer, "peer_step_time", dict(values))
        if "skipped" in values:
          print(f"{spec.name:10s} {peer} {policy}: skipped: "
                f"{values['skipped']}", flush=True)
        else:
          print(f"{spec.name:10s} {peer:13s} {policy:15s} step "
                f"{1e3 * values['median_s']:9.3f} ms  first "
                f"{values['first_step_s']:5.1f} s", flush=True)

  def write_partial(self) -> None:
    """results.json so far, in case of a timeout."""
    os.makedirs(self.args.out, exist_ok=True)
    with open(os.path.join(self.args.out, "results.json"), "w") as f:
      json.dump(self.result(), f, indent=1)

  def result(self) -> Dict[str, Any]:
    return {"environment": self.env, "records": self.records,
            "skipped": self.skipped}


def run_compiled(bench: "Bench") -> None:
  """The gpu-compiled suite: compile, audit and project every model x
  policy x variant for each target, then the GPT-2 124M batch search."""
  a = bench.args
  cudnn = bench_compiled.has_cudnn()
  for spec in (specs(a).values() if not a.batch_search_only else ()):
    policies = [p for p in bench_models.POLICIES if p.name in a.policies]
    if spec.kind == "mlp":
      policies.append(bench_models.CONTROL)
    if spec.kind == "lm" and spec.arch == "gpt":
      policies += [p for p in bench_models.FP8_POLICIES
                   if p.name in a.policies]
    for target in a.targets:
      for pol in policies:
        for variant in bench_compiled.variants(spec, pol, target):
          if a.variants and variant not in a.variants:
            continue
          what = f"{spec.name}/{pol.name}/{variant}/{target}"
          if variant == "fused-attention" and not cudnn:
            bench.skipped.append(f"{what}: cuDNN is not installed (pip "
                                 "install nvidia-cudnn-cu12)")
            continue
          if bench.out_of_time(what):
            continue
          values = bench_compiled.measure(spec, pol, target, variant)
          bench.add(spec, pol.name, "mpjax", "compiled", values)
          print(f"{spec.name:10s} {pol.name:20s} {variant:21s} {target:9s} "
                f"peak {values['memory']['peak_bytes'] / 2**30:8.3f} GiB  "
                f"16-bit {100 * values['matmul_share']:5.1f}%  lost "
                f"{values['lost_rounding_bytes'] / 2**20:7.0f} MiB  "
                f"projected {1e3 * values['projection']['projected_step_s']:8.3f}"
                f" ms  compile {values['compile_s']:5.1f} s", flush=True)
          bench.write_partial()
  if not a.batch_search or "gpt2-124m" not in a.models:
    return
  make = ((lambda b: dataclasses.replace(bench_models.quick(
      bench_models.gpt2_124m(b, a.gpt2_seq)), batch=b)) if a.quick else
          (lambda b: bench_models.gpt2_124m(b, a.gpt2_seq)))
  searches = [("float32", "island"), ("mixed_bfloat16", "island"),
              ("mixed_float16", "island"), ("mixed_bfloat16", "fused-attention"),
              ("mixed_float16", "fused-attention")]
  if a.quick:
    searches = searches[:2]
  if a.batch_searches:
    searches = [tuple(s.split("/")) for s in a.batch_searches]
  for name, variant in searches:
    pol = next(p for p in bench_models.POLICIES if p.name == name)
    what = f"largest batch {name}/{variant}"
    if name not in a.policies or (variant == "fused-attention" and not cudnn):
      continue
    if bench.out_of_time(what):
      continue
    print(what, flush=True)
    values = bench_compiled.largest_batch(
        make, pol, variant, budget=(64 * 2**20 if a.quick else None),
        max_compiles=3 if a.quick else 8,
        known={int(b): p for b, p in
               a.batch_known.get(f"{name}/{variant}", {}).items()})
    spec = make(values["largest_batch"] or 1)
    bench.add(spec, name, "mpjax", "largest_batch", dict(values,
                                                         variant=variant))
    print(f"  largest batch {values['largest_batch']} "
          f"({values['compiles']} compiles)", flush=True)
    bench.write_partial()


def finish(result: Dict[str, Any], out: str) -> None:
  """Derives ratios and targets, writes results.json, results.md, PNGs."""
  compiled = result["environment"]["suite"] == "gpu-compiled"
  if compiled:
    result["targets"] = bench_compiled.targets(result["records"])
  else:
    bench_report.derive(result["records"])
    result["targets"] = bench_report.targets(
        result["records"], result["environment"]["device"]["platform"])
  os.makedirs(out, exist_ok=True)
  with open(os.path.join(out, "results.json"), "w") as f:
    json.dump(result, f, indent=1)
  if compiled:
    text = bench_compiled.markdown(result)
  else:
    text = bench_report.markdown(result)
    if result.get("skipped"):
      text += "\n## Not run\n\n" + "\n".join(
          f"- {s}" for s in result["skipped"]) + "\n"
  with open(os.path.join(out, "results.md"), "w") as f:
    f.write(text)
  written = (bench_compiled.plots if compiled else bench_report.plots)(
      result, out)
  print(text)
  print("wrote", ", ".join([os.path.join(out, "results.json"),
                            os.path.join(out, "results.md")] + written))


def merge(dirs: List[str]) -> Dict[str, Any]:
  """One result from several runs of one suite: records in order (a later
  run's record replaces an earlier one of the same model, policy,
  measurement, variant and target), every command kept."""
  runs = []
  for d in dirs:
    with open(os.path.join(d, "results.json")) as f:
      runs.append(json.load(f))
  keyed: Dict[tuple, dict] = {}
  for run in runs:
    for r in run["records"]:
      v = r["values"]
      keyed[(r["model"], r["policy"], r["framework"], r["measurement"],
             v.get("variant"), v.get("target_name", v.get("target")))] = r
  env = dict(runs[0]["environment"])
  # A merged result lists its parts' commands: keep them one a line.
  env["commands"] = [c for run in runs for c in run["environment"].get(
      "commands", [run["environment"]["command"]])]
  env["command"] = " ; ".join(env["commands"])
  return {"environment": env, "records": list(keyed.values()),
          "skipped": sorted({s for run in runs for s in run.get("skipped", [])}),
          "elapsed_s": sum(run.get("elapsed_s", 0) for run in runs)}


def main(argv: List[str]) -> Dict[str, Any]:
  args = parse_args(argv[1:])
  if args.merge:
    result = merge(args.merge)
    finish(result, args.out)
    return result
  if args.render:
    with open(os.path.join(args.render, "results.json")) as f:
      result = json.load(f)
    finish(result, args.render)
    return result
  env = environment(argv, args)
  print(f"suite {args.suite}{' (quick)' if args.quick else ''} on "
        f"{env['device']['name']}; jax {env['versions']['jax']}", flush=True)
  bench = Bench(args, env)
  if args.suite == "gpu-compiled":
    run_compiled(bench)
  for spec in (specs(args).values() if args.suite != "gpu-compiled" else ()):
    bench.run_model(spec)
    bench.write_partial()
  result = bench.result()
  result["elapsed_s"] = time.perf_counter() - bench.start
  finish(result, args.out)
  return result


if __name__ == "__main__":
  main(sys.argv)
