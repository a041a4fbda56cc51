"""Tests for experiments/bench.py: both suites run (tiny) and tell the truth.

The suites run as a user runs them, in a subprocess, with ``--quick`` (tiny
shapes, few steps); the checks read what they wrote. No test looks at a time:
only at the schema, at which policies and peers ran, and at the audit.
"""

import json
import os
import subprocess
import sys

import pytest

import bench
import bench_core
import bench_models
import bench_peers

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(ROOT, "experiments", "bench.py")
POLICY_NAMES = {p.name for p in bench_models.POLICIES}
RECORD_KEYS = {"model", "policy", "framework", "measurement", "shape",
               "values", "device", "versions", "date", "command"}


def run_bench(out_dir, *flags, timeout=300):
  env = dict(os.environ, KERAS_BACKEND="jax", JAX_PLATFORMS="cpu")
  proc = subprocess.run(
      [sys.executable, BENCH, *flags, "--out", str(out_dir)], cwd=ROOT,
      env=env, capture_output=True, text=True, timeout=timeout, check=False)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  with open(os.path.join(out_dir, "results.json")) as f:
    return json.load(f), proc.stdout


@pytest.fixture(scope="module")
def cpu_quick(tmp_path_factory):
  out = tmp_path_factory.mktemp("cpu")
  result, stdout = run_bench(out, "--suite", "cpu", "--quick", "--models",
                             "mlp", "--peers", "torch-eager", "keras")
  return result, stdout, out


@pytest.fixture(scope="module")
def gpu_quick(tmp_path_factory):
  out = tmp_path_factory.mktemp("gpu")
  result, stdout = run_bench(
      out, "--suite", "gpu", "--quick", "--models", "gpt2-124m",
      "--policies", "float32_highest",
      "float32", "mixed_bfloat16", "--no-costs", "--peers", "torch-compile",
      "--peer-policies", "mixed_bfloat16")
  return result, stdout, out


def test_every_record_carries_model_policy_shape_device_versions_command(
    cpu_quick):
  result, _, _ = cpu_quick
  assert result["records"]
  for record in result["records"]:
    assert RECORD_KEYS <= set(record), record.keys()
    assert record["shape"]["batch"] >= 1
    assert {"platform", "kind", "name"} <= set(record["device"])
    assert {"jax", "jaxlib", "flax", "optax"} <= set(record["versions"])
    assert "--suite cpu" in record["command"] and record["date"]


def test_cpu_suite_runs_every_policy_with_audit_memory_time_projection(
    cpu_quick):
  result, _, _ = cpu_quick
  records = result["records"]
  for measurement in ("audit", "memory", "step_time", "projection"):
    ran = {r["policy"] for r in records if r["framework"] == "mpjax"
           and r["measurement"] == measurement}
    assert POLICY_NAMES <= ran, (measurement, ran)
  for r in records:
    if r["measurement"] == "step_time":
      v = r["values"]
      assert v["median_s"] > 0 and v["compilations"] == 1
      assert v["timed_steps"] >= 1 and v["compile_s"] > 0
    if r["measurement"] == "audit" and not r["values"]["control"]:
      assert r["values"]["matmul_share"] == 1.0, r["policy"]
      assert r["values"]["host_ops"] == []
    if r["measurement"] == "projection":
      assert r["values"]["label"] == "projection, not a measurement"
      assert set(r["values"]["devices"]) == {"H100 SXM", "H200 SXM"}


def test_audit_only_models_are_traced_and_projected_but_not_run(cpu_quick):
  result, _, _ = cpu_quick
  records = [r for r in result["records"] if r["model"] == "gpt2-124m"]
  assert {r["measurement"] for r in records} == {"audit", "memory",
                                                 "projection"}
  assert {r["policy"] for r in records} == POLICY_NAMES
  memory = [r["values"] for r in records if r["measurement"] == "memory"]
  assert all(m["residual_bytes"] > 0 and m["param_bytes"] > 0
             for m in memory)


def test_the_audit_catches_a_float32_matmul_inside_a_mixed_step(cpu_quick):
  result, _, _ = cpu_quick
  (control,) = [r for r in result["records"] if r["measurement"] == "audit"
                and r["values"]["control"]]
  assert control["policy"] == bench_models.CONTROL.name
  assert 0 < control["values"]["matmul_share"] < 1
  assert control["values"]["matmul_flops_by_dtype"]["float32"] > 0
  assert not control["values"]["target_met"]
  (target,) = [t for t in result["targets"] if "(control)" in t["target"]]
  assert target["met"] is True


def test_highest_precision_reaches_the_lowered_program(cpu_quick):
  result, _, _ = cpu_quick
  audits = {r["policy"]: r["values"] for r in result["records"]
            if r["measurement"] == "audit"}
  assert set(audits["float32_highest"]["matmul_precisions"]) == {"HIGHEST"}
  assert "HIGHEST" not in audits["float32"]["matmul_precisions"]


def test_costs_and_peers_are_recorded_with_ratios(cpu_quick):
  result, _, _ = cpu_quick
  records = result["records"]
  (scaling,) = [r for r in records if r["measurement"] == "loss_scaling_cost"]
  assert set(scaling["values"]["median_s"]) == {"dynamic", "no_scaling",
                                                "adam"}
  assert scaling["values"]["ratio_vs_adam"]["adam"] == 1.0
  assert [r for r in records if r["measurement"] == "attribution_cost"]
  peers = [r for r in records if r["measurement"] == "peer_step_time"]
  assert {(r["framework"], r["policy"]) for r in peers} == {
      (p, q) for p in ("torch-eager", "keras")
      for q in bench_peers.PEER_POLICIES}
  for r in peers:
    v = r["values"]
    assert "skipped" in v or v["ratio_mpjax_over_peer"] > 0


def test_tables_and_charts_are_written(cpu_quick):
  _, stdout, out = cpu_quick
  text = (out / "results.md").read_text()
  assert "projection, not a measurement" in text
  assert "## Targets" in text and "CPU, measured" in text
  for name in ("step_time.png", "peers.png", "memory.png", "projection.png"):
    with open(out / name, "rb") as f:
      assert f.read(8) == b"\x89PNG\r\n\x1a\n", name
  assert "mixed_bfloat16_wrong" in stdout


def test_gpu_suite_runs_on_cpu_with_tiny_shapes(gpu_quick):
  result, _, _ = gpu_quick
  records = result["records"]
  assert {r["model"] for r in records} == {"gpt2-124m"}
  times = {r["policy"]: r["values"] for r in records
           if r["model"] == "gpt2-124m" and r["measurement"] == "step_time"}
  assert set(times) == {"float32_highest", "float32", "mixed_bfloat16"}
  for v in times.values():
    assert v["tokens_per_s"] > 0
    assert v["mfu"] is None and v["device_peak_bytes"] is None  # CPU
    assert v["speedup_vs_float32_highest"] > 0 and v["speedup_vs_float32"] > 0
  (peer,) = [r for r in records if r["measurement"] == "peer_step_time"]
  assert (peer["model"], peer["framework"]) == ("gpt2-124m", "torch-compile")
  assert "skipped" in peer["values"] or peer["values"]["median_s"] > 0
  gpu_targets = [t for t in result["targets"] if "GPT-2 124M" in t["target"]]
  assert len(gpu_targets) == 5
  assert all(t["met"] is None for t in gpu_targets)  # not measured on a CPU


def test_a_missing_peer_is_skipped_with_a_reason(monkeypatch, capsys):
  monkeypatch.setattr(bench_peers.importlib.util, "find_spec",
                      lambda name: None)
  args = bench.parse_args(["--quick", "--models", "mlp", "--peers", "keras",
                           "torch-eager"])
  runner = bench.Bench(args, {"device": {}, "versions": {}, "date": "d",
                              "command": "c"})
  spec = bench.specs(args)["mlp"]
  runner.run_peers(spec)
  assert len(runner.records) == 2 * len(bench_peers.PEER_POLICIES)
  for record in runner.records:
    assert "is not installed" in record["values"]["skipped"]
  assert "skipped: keras is not installed" in capsys.readouterr().out


def test_projection_divides_flops_by_the_dtype_peak_and_bytes_by_bandwidth():
  h100 = bench_core.GPU_PEAKS["H100 SXM"]
  p = bench_core.project({"bfloat16": int(h100["bfloat16"])}, None,
                         int(h100["hbm_bytes_per_s"] / 2))
  d = p["devices"]["H100 SXM"]
  assert (d["compute_s"], d["memory_s"], d["bound"]) == (1.0, 0.5, "compute")
  tf32 = bench_core.project({"float32": int(h100["tf32"])}, None, 0)
  full = bench_core.project({"float32": int(h100["float32"])}, "highest", 0)
  assert tf32["devices"]["H100 SXM"]["projected_step_s"] == 1.0
  assert full["devices"]["H100 SXM"]["projected_step_s"] == 1.0
  assert p["label"] == "projection, not a measurement"


@pytest.fixture(scope="module")
def compiled_quick(tmp_path_factory):
  out = tmp_path_factory.mktemp("gpu_compiled")
  result, stdout = run_bench(
      out, "--suite", "gpu-compiled", "--quick", "--models", "gpt2-124m",
      "--policies", "float32", "mixed_bfloat16", "fp8_delayed", "--targets",
      "h100_sxm", "--variants", "island", "fused-attention", timeout=900)
  return result, stdout, out


def test_gpu_compiled_suite_compiles_audits_and_searches_on_a_cpu(
    compiled_quick):
  result, _, out = compiled_quick
  compiled = [r for r in result["records"] if r["measurement"] == "compiled"]
  assert {(r["policy"], r["values"]["variant"]) for r in compiled} == {
      ("float32", "island"), ("mixed_bfloat16", "island"),
      ("mixed_bfloat16", "fused-attention"), ("fp8_delayed", "island"),
      ("fp8_delayed", "fused-attention")}
  for r in compiled:
    v = r["values"]
    assert v["target_name"] == "h100_sxm" and v["memory"]["peak_bytes"] > 0
    assert v["projection"]["label"] == "projection, not a measurement"
    assert v["adam_moment_copies"] == 0
  fused = next(r for r in compiled if r["values"]["variant"] ==
               "fused-attention")
  assert fused["values"]["matmul_implementations"].get(
      "cuDNN fused attention") == 2
  searches = [r for r in result["records"]
              if r["measurement"] == "largest_batch"]
  assert {r["policy"] for r in searches} == {"float32", "mixed_bfloat16"}
  for r in searches:
    v = r["values"]
    assert v["largest_batch"] >= 1
    assert v["peak_bytes_by_batch"][str(v["largest_batch"])] <= v[
        "budget_bytes"]
  names = {t["target"] for t in result["targets"]}
  assert any("0.55x" in n for n in names)
  for name in ("results.md", "peak_memory.png", "batch_fit.png"):
    assert os.path.exists(os.path.join(out, name)), name


def test_gpu_compiled_fp8_rows_prove_every_fp8_layer_runs_fp8_gemms(
    compiled_quick):
  result, _, out = compiled_quick
  fp8 = [r for r in result["records"] if r["policy"] == "fp8_delayed"]
  assert fp8
  for r in fp8:
    f = r["values"]["fp8"]
    # quick GPT: 1 block = 6 fp8 layers (q, k, v, out, fc, proj) x 3 GEMMs
    assert (f["fp8_layers"], f["lowered_fp8_dots"]) == (6, 18)
    assert f["every_fp8_layer_fp8"] and f["fp8_with_16bit_operand"] == 0
    assert f["fp8_flops_compiled"] == f["fp8_flops_lowered"] > 0
    assert set(f["fp8_flops_by_format_compiled"]) == {"float8_e4m3fn",
                                                      "float8_e5m2"}
    # the tied output projection and the attention core stay 16-bit
    assert f["sixteen_bit_flops_compiled"] == f["sixteen_bit_flops_lowered"]
  target = next(t for t in result["targets"] if "fp8 layer" in t["target"])
  assert target["met"] is True
  with open(os.path.join(out, "results.md")) as fh:
    assert "## fp8 rows" in fh.read()
