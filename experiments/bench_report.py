"""The benchmark's outputs: derived ratios, targets, Markdown tables, PNG charts.

Works on the list of records `bench.py` writes to ``results.json`` (one per
model x policy x measurement), so a results file can be re-rendered alone:
``python experiments/bench.py --render benchmarks/cpu``.
"""

import os
from typing import Any, Dict, List, Optional, Tuple

import bench_core

MIXED = ("mixed_bfloat16", "mixed_float16", "float16_static")
MB = 1e6


def find(records: List[dict], **match) -> List[dict]:
  return [r for r in records if all(r.get(k) == v for k, v in match.items())]


def one(records: List[dict], **match) -> Optional[dict]:
  found = find(records, **match)
  return found[0] if found else None


def derive(records: List[dict]) -> None:
  """Adds cross-record ratios in place: speed-ups vs both float32 baselines,
  residual bytes vs float32, and mpjax/peer step-time ratios."""
  for r in find(records, framework="mpjax", measurement="step_time"):
    for base in ("float32_highest", "float32"):
      ref = one(records, framework="mpjax", measurement="step_time",
                model=r["model"], policy=base)
      r["values"][f"speedup_vs_{base}"] = (
          ref["values"]["median_s"] / r["values"]["median_s"] if ref else None)
  for r in find(records, framework="mpjax", measurement="memory"):
    ref = one(records, framework="mpjax", measurement="memory",
              model=r["model"], policy="float32")
    r["values"]["residual_ratio_vs_float32"] = (
        r["values"]["residual_bytes"] / ref["values"]["residual_bytes"]
        if ref else None)
  for r in find(records, measurement="peer_step_time"):
    mine = one(records, framework="mpjax", measurement="step_time",
               model=r["model"], policy=r["policy"])
    v = r["values"]
    v["mpjax_median_s"] = mine["values"]["median_s"] if mine else None
    v["ratio_mpjax_over_peer"] = (
        v["mpjax_median_s"] / v["median_s"]
        if mine and v.get("median_s") else None)


def _target(name: str, met: Optional[bool], detail: str) -> Dict[str, Any]:
  return {"target": name, "met": met, "detail": detail}


def targets(records: List[dict], platform: str) -> List[Dict[str, Any]]:
  """Each target of the issue with met (True/False, None: not measured)."""
  out = []
  audits = [r for r in find(records, measurement="audit")
            if not r["values"]["control"]]
  if audits:
    bad = [f"{r['model']}/{r['policy']} "
           f"{100 * r['values']['matmul_share']:.1f}%"
           for r in audits if r["values"]["matmul_share"] != 1.0]
    out.append(_target(
        "100% of matmul FLOPs in the compute dtype (lowered program)",
        not bad, "all " + str(len(audits)) + " model/policy steps" if not bad
        else "below 100%: " + ", ".join(bad)))
    hosts = [f"{r['model']}/{r['policy']}" for r in audits
             if r["values"]["host_ops"]]
    out.append(_target("zero host round trips in the step", not hosts,
                       "none found" if not hosts else ", ".join(hosts)))
  for r in find(records, measurement="audit"):
    if r["values"]["control"]:
      share = r["values"]["matmul_share"]
      out.append(_target(
          "the audit flags a float32 matmul in a mixed step (control)",
          share < 1.0, f"{r['model']}/{r['policy']}: share "
          f"{100 * share:.1f}%"))
  times = find(records, framework="mpjax", measurement="step_time")
  if times:
    many = [r for r in times if r["values"]["compilations"] != 1]
    calls = min(r["values"]["calls"] for r in times)
    out.append(_target(
        "one compilation per step function over 100 steps",
        not many and calls >= 100,
        f"{len(times)} step functions, >= {calls} calls each, "
        + ("1 compilation each" if not many else "recompiled: " + ", ".join(
            f"{r['model']}/{r['policy']}" for r in many))))
  for r in find(records, framework="mpjax", measurement="memory"):
    if r["shape"].get("num_layers") and r["policy"] in MIXED[:2]:
      ratio = r["values"].get("residual_ratio_vs_float32")
      if ratio is not None:
        out.append(_target(
            f"{r['model']} {r['policy']} residual bytes <= 0.55x float32",
            ratio <= 0.55, f"{ratio:.3f}x"))
  for r in find(records, measurement="loss_scaling_cost"):
    v = r["values"]
    out.append(_target(
        f"{r['model']}: DynamicScaling overhead <= 3%", v["target_met"],
        f"{100 * v['overhead']:+.1f}% (paired "
        f"{100 * (v['paired_ratio_vs_adam']['dynamic'] - 1):+.1f}%, "
        f"{v['rounds']} interleaved rounds)"))
  for r in find(records, measurement="attribution_cost"):
    v = r["values"]
    out.append(_target(
        f"{r['model']}: attribution overhead <= 1%", v["target_met"],
        f"{100 * v['overhead']:+.1f}% (paired "
        f"{100 * (v['paired_ratio_vs_plain']['attribution'] - 1):+.1f}%, "
        f"{v['rounds']} interleaved rounds)"))
  out += _gpu_targets(records, platform)
  return out


def _gpu_targets(records: List[dict], platform: str) -> List[Dict[str, Any]]:
  def step(policy):
    r = one(records, framework="mpjax", measurement="step_time",
            model="gpt2-124m", policy=policy)
    return r["values"] if r else None

  names = ("GPT-2 124M mixed_bfloat16 >= 400K tokens/s (H100)",
           "GPT-2 124M mixed_bfloat16 >= 3.0x float32_highest",
           "GPT-2 124M mixed_bfloat16 >= 2.2x float32 (TF32)",
           "GPT-2 124M mixed_float16 within 2% of mixed_bfloat16",
           "GPT-2 124M <= 0.9x PyTorch AMP + torch.compile step time")
  bf16 = step("mixed_bfloat16")
  if platform != "gpu" or bf16 is None:
    why = ("GPU only: not measured on this CPU run" if platform != "gpu"
           else "gpt2-124m not run")
    return [_target(n, None, why) for n in names]
  f16 = step("mixed_float16")
  peer = one(records, measurement="peer_step_time", model="gpt2-124m",
             policy="mixed_bfloat16", framework="torch-compile")
  peer_ratio = peer["values"].get("ratio_mpjax_over_peer") if peer else None
  out = [
      _target(names[0], bf16["tokens_per_s"] >= 4e5,
              f"{bf16['tokens_per_s']:,.0f} tokens/s"),
      _target(names[1], (bf16["speedup_vs_float32_highest"] or 0) >= 3.0,
              f"{bf16['speedup_vs_float32_highest'] or 0:.2f}x"),
      _target(names[2], (bf16["speedup_vs_float32"] or 0) >= 2.2,
              f"{bf16['speedup_vs_float32'] or 0:.2f}x"),
  ]
  if f16:
    gap = f16["median_s"] / bf16["median_s"] - 1
    out.append(_target(names[3], gap <= 0.02, f"{100 * gap:+.1f}%"))
  else:
    out.append(_target(names[3], None, "mixed_float16 not run"))
  out.append(_target(names[4], None if peer_ratio is None else
                     peer_ratio <= 0.9, "not run" if peer_ratio is None
                     else f"{peer_ratio:.2f}x"))
  return out


# ------------------------------------------------------------- Markdown


def _fmt(value, spec="{}") -> str:
  return "n/a" if value is None else spec.format(value)


def _si(flops: float) -> str:
  for scale, unit in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
    if flops >= scale:
      return f"{flops / scale:.3g}{unit}"
  return f"{flops:.0f}"


def _table(header: Tuple[str, ...], rows: List[Tuple]) -> str:
  lines = ["| " + " | ".join(header) + " |",
           "|" + "---|" * len(header)]
  lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
  return "\n".join(lines)


def markdown(result: Dict[str, Any]) -> str:
  """All tables of a results dict (``{"environment", "records", ...}``)."""
  env, records = result["environment"], result["records"]
  platform = env["device"]["platform"].upper()
  label = f"{platform}, measured" if platform != "GPU" else "GPU, measured"
  v = env["versions"]
  parts = [
      f"# mpjax benchmark: suite `{env['suite']}`"
      f"{' (quick: tiny shapes)' if env['quick'] else ''}",
      "",
      f"- device: {env['device']['name']} ({env['device']['platform']})",
      "- versions: " + ", ".join(f"{k} {v[k]}" for k in sorted(v)),
      f"- date: {env['date']}",
      "- 1-minute load average while measuring: " + (
          f"{min(r['load_avg_1m'] for r in records):.2f} to "
          f"{max(r['load_avg_1m'] for r in records):.2f} with "
          f"{os.cpu_count()} cores (other work on the machine slows "
          "absolute times; interleaved ratios much less)"
          if records and "load_avg_1m" in records[0] else "not recorded"),
      f"- command: `{env['command']}`",
      "",
      "## Targets",
      "",
      _table(("target", "met", "measured"), [
          (t["target"], {True: "met", False: "**missed**", None: "n/a"}[
              t["met"]], t["detail"]) for t in result["targets"]]),
  ]

  notes = {r["policy"]: r["values"].get("policy_note", "")
           for r in find(records, measurement="audit")}
  parts += ["", "## Policies", ""] + [f"- `{k}`: {v}" for k, v in
                                      notes.items()]

  rows = []
  for r in find(records, framework="mpjax", measurement="step_time"):
    x = r["values"]
    rate = (_fmt(x["tokens_per_s"], "{:,.0f} tok/s") if x["tokens_per_s"]
            else _fmt(x["examples_per_s"], "{:,.0f} ex/s"))
    rows.append((r["model"], r["policy"], _fmt(1e3 * x["median_s"], "{:.2f}"),
                 rate, _fmt(x["compile_s"], "{:.1f}"), x["compilations"],
                 _fmt(x.get("speedup_vs_float32_highest"), "{:.2f}x"),
                 _fmt(x.get("speedup_vs_float32"), "{:.2f}x"),
                 _fmt(x.get("mfu"), "{:.1%}"), x["skipped_steps"]))
  parts += ["", f"## Step time ({label}; median, compile excluded)", "",
            _table(("model", "policy", "step ms", "throughput", "compile s",
                    "compilations", "vs float32_highest", "vs float32", "MFU",
                    "skipped"), rows)]

  rows = []
  for r in find(records, measurement="audit"):
    x = r["values"]
    flops = ", ".join(f"{k} {_si(f)}" for k, f in
                      sorted(x["matmul_flops_by_dtype"].items()))
    rows.append((r["model"], r["policy"] + (" (control)" if x["control"]
                                            else ""),
                 x["compute_dtype"], f"{100 * x['matmul_share']:.1f}%", flops,
                 ", ".join(f"{k} {n}" for k, n in
                           sorted(x["matmul_precisions"].items())),
                 x["converts"], len(x["host_ops"]),
                 ", ".join(f"{k} {n}" for k, n in x["float32_islands"].items())
                 or "none"))
  parts += ["", "## Precision audit (lowered StableHLO: device-independent)",
            "", "float32 islands are counted in the loss-gradient function "
            "(the whole step also holds the optimizer's float32 math).", "",
            _table(("model", "policy", "compute", "matmul share",
                    "matmul FLOPs by operand dtype", "matmul precision",
                    "converts", "host ops", "float32 islands (loss grad)"),
                   rows)]

  rows = []
  for r in find(records, framework="mpjax", measurement="memory"):
    x = r["values"]
    att = x["attention_residual_bytes_by_dtype"]
    rows.append((r["model"], r["policy"],
                 f"{x['residual_bytes'] / MB:.2f}",
                 _fmt(x.get("residual_ratio_vs_float32"), "{:.3f}x"),
                 ", ".join(f"{k} {b / MB:.2f}" for k, b in
                           sorted(x["residual_bytes_by_dtype"].items())),
                 ", ".join(f"{k} {b / MB:.2f}" for k, b in sorted(att.items()))
                 or "-",
                 f"{x['param_bytes'] / MB:.2f}",
                 f"{x['opt_state_bytes'] / MB:.2f}"))
  parts += ["", "## Activation memory (abstract: jax.vjp residuals under "
            "eval_shape; device-independent)", "",
            _table(("model", "policy", "residual MB", "vs float32",
                    "residual MB by dtype", "attention [.., S, S] MB",
                    "params MB", "optimizer state MB"), rows)]

  rows = []
  for r in find(records, measurement="projection"):
    x = r["values"]
    cells = []
    for device in bench_core.GPU_PEAKS:
      d = x["devices"][device]
      cells += [f"{1e3 * d['projected_step_s']:.4g}", d["bound"]]
    rows.append((r["model"], r["policy"], f"{x['bytes'] / MB:.1f}", *cells))
  header = ("model", "policy", "bytes MB")
  for device in bench_core.GPU_PEAKS:
    header += (f"{device} ms", "bound")
  parts += ["", f"## Projected GPU step time ({bench_core.PROJECTION_LABEL})",
            "", f"{bench_core.COMPUTE_MODEL}; {bench_core.BYTE_MODEL}. Peaks: "
            + "; ".join(
                f"{d}: {p['bfloat16'] / 1e12:.0f} TFLOP/s bf16/fp16, "
                f"{p['tf32'] / 1e12:.0f} TF32, {p['float32'] / 1e12:.0f} "
                f"FP32, {p['hbm_bytes_per_s'] / 1e12:.2f} TB/s"
                for d, p in bench_core.GPU_PEAKS.items()) + ".", "",
            _table(header, rows)]

  rows = []
  for r in find(records, measurement="loss_scaling_cost"):
    x = r["values"]
    m = x["median_s"]
    rows.append((r["model"], f"{1e3 * m['adam']:.3f}",
                 f"{1e3 * m['no_scaling']:.3f}", f"{1e3 * m['dynamic']:.3f}",
                 f"{x['ratio_vs_adam']['no_scaling']:.3f}",
                 f"{x['ratio_vs_adam']['dynamic']:.3f}",
                 f"{x['paired_ratio_vs_adam']['dynamic']:.3f}", x["rounds"]))
  for r in find(records, measurement="attribution_cost"):
    x = r["values"]
    m = x["median_s"]
    rows.append((r["model"] + " (attribution)", f"{1e3 * m['plain']:.3f}",
                 "-", f"{1e3 * m['attribution']:.3f}", "-",
                 f"{x['ratio_vs_plain']['attribution']:.3f}",
                 f"{x['paired_ratio_vs_plain']['attribution']:.3f}",
                 x["rounds"]))
  parts += ["", f"## Cost of loss scaling and attribution ({label}; float32, "
            "interleaved steps, medians)", "",
            "Columns: plain `optax.adam` (attribution rows: "
            "`attribution=False`), `loss_scaled(adam, NoScaling())`, "
            "`loss_scaled(adam, DynamicScaling.like_torch())` (attribution "
            "rows: `attribution=True`); ratios over the first column.", "",
            _table(("model", "adam ms", "NoScaling ms", "Dynamic ms",
                    "NoScaling ratio", "Dynamic ratio", "paired ratio",
                    "rounds"), rows)]

  rows, skipped = [], []
  for r in find(records, measurement="peer_step_time"):
    x = r["values"]
    if "skipped" in x:
      skipped.append(f"- {r['framework']} {r['model']} {r['policy']}: "
                     f"skipped: {x['skipped']}")
      continue
    rows.append((r["model"], r["policy"], r["framework"],
                 f"{1e3 * x['median_s']:.2f}",
                 _fmt(x.get("mpjax_median_s") and 1e3 * x["mpjax_median_s"],
                      "{:.2f}"),
                 _fmt(x.get("ratio_mpjax_over_peer"), "{:.2f}"),
                 f"{x['first_step_s']:.1f}", x.get("note", "")))
  parts += ["", f"## Peers ({label}; same model, shapes, batch; median step "
            "time)", "", "ratio = mpjax step time / peer step time "
            "(below 1: mpjax is faster). first step s includes the peer's "
            "compilation.", "",
            _table(("model", "policy", "peer", "peer ms", "mpjax ms",
                    "mpjax/peer", "first step s", "note"), rows)]
  if skipped:
    parts += ["", *skipped]
  return "\n".join(parts) + "\n"


# ----------------------------------------------------------------- plots


def plots(result: Dict[str, Any], out_dir: str) -> List[str]:
  """Bar charts (PNG, Agg) of step times, peers, memory and projections."""
  try:
    import matplotlib  # pylint: disable=g-import-not-at-top
  except ImportError:
    print("matplotlib is not installed: no plots (pip install -e '.[plots]')")
    return []
  matplotlib.use("Agg")
  from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top

  records = result["records"]
  platform = result["environment"]["device"]["platform"].upper()
  written = []

  def figure(name, title, draw, measurement):
    models = list(dict.fromkeys(r["model"] for r in records
                                if r["measurement"] == measurement))
    if not models:
      return
    fig, axes = plt.subplots(1, len(models), figsize=(4.2 * len(models), 3.8),
                             squeeze=False)
    for ax, model in zip(axes[0], models):
      draw(ax, model)
      ax.set_title(model)
      ax.tick_params(axis="x", labelrotation=35, labelsize=8)
      for label in ax.get_xticklabels():
        label.set_horizontalalignment("right")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path = os.path.join(out_dir, name)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    written.append(path)

  def bars(ax, labels, values, ylabel, colors=None):
    ax.bar(range(len(values)), values, color=colors)
    ax.set_xticks(range(len(values)), labels)
    ax.set_ylabel(ylabel)

  def step_times(ax, model):
    rs = find(records, framework="mpjax", measurement="step_time", model=model)
    bars(ax, [r["policy"] for r in rs],
         [1e3 * r["values"]["median_s"] for r in rs], "median step ms")

  figure("step_time.png", f"mpjax step time, {platform} (measured, median)",
         step_times, "step_time")

  def peers(ax, model):
    rs = [r for r in find(records, measurement="peer_step_time", model=model)
          if r["values"].get("ratio_mpjax_over_peer")]
    policies = list(dict.fromkeys(r["policy"] for r in rs))
    frameworks = list(dict.fromkeys(r["framework"] for r in rs))
    width = 0.8 / max(len(frameworks), 1)
    for i, framework in enumerate(frameworks):
      xs, ys = [], []
      for j, policy in enumerate(policies):
        r = one(rs, framework=framework, policy=policy)
        if r:
          xs.append(j + (i - (len(frameworks) - 1) / 2) * width)
          ys.append(r["values"]["ratio_mpjax_over_peer"])
      ax.bar(xs, ys, width, label=framework)
    ax.set_xticks(range(len(policies)), policies)
    ax.set_yscale("log")
    ax.set_ylabel("mpjax / peer step time (log)")
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.legend(fontsize=7)

  figure("peers.png", f"mpjax / peer step time, {platform} (measured; "
         "below 1: mpjax faster)", peers, "peer_step_time")

  def memory(ax, model):
    rs = find(records, framework="mpjax", measurement="memory", model=model)
    bars(ax, [r["policy"] for r in rs],
         [r["values"]["residual_bytes"] / MB for r in rs], "residual MB")

  figure("memory.png", "residual bytes kept for the backward pass "
         "(abstract, device-independent)", memory, "memory")

  def projection(ax, model):
    rs = find(records, measurement="projection", model=model)
    width = 0.4
    for i, device in enumerate(bench_core.GPU_PEAKS):
      ax.bar([j + (i - 0.5) * width for j in range(len(rs))],
             [1e3 * r["values"]["devices"][device]["projected_step_s"]
              for r in rs], width, label=device)
    ax.set_xticks(range(len(rs)), [r["policy"] for r in rs])
    ax.set_ylabel("projected step ms")
    ax.legend(fontsize=7)

  figure("projection.png", "Projected GPU step time: "
         f"{bench_core.PROJECTION_LABEL}", projection, "projection")
  return written
