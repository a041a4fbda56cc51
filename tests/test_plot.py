"""Tests for mpjax/plot.py: metrics.jsonl files in, a PNG out (Agg canvas)."""

import math

import numpy as np
import pytest

from mpjax import plot
from mpjax._src import metrics_log

matplotlib = pytest.importorskip("matplotlib")
pytest.importorskip("matplotlib.image")


def write_run(path, run=None, steps=12, skip_every=4, with_stats=True):
  """A synthetic run: halving scale on skipped steps, stats every 3 steps."""
  scale = 2.0**16
  records = []
  with metrics_log.MetricsWriter(str(path), append=True) as log:
    for step in range(steps):
      skipped = step % skip_every == 1
      metrics = {"loss": math.nan if skipped else 2.0 / (step + 1),
                 "loss_scale": scale, "grads_finite": not skipped,
                 "grad_norm": math.inf if skipped else 1.0}
      extra = {} if run is None else {"run": run}
      if with_stats and step % 3 == 0:
        extra["grad_stats"] = {"computed": True, "layers": {
            "Dense_0": {"underflow_fraction": 0.1 * step / steps},
            "Dense_1": {"underflow_fraction": 0.05}}}
      records.append(log.write(step, metrics, **extra))
      if skipped:
        scale /= 2
  return records


def test_metrics_jsonl_round_trips_and_the_command_writes_a_png(tmp_path):
  first = tmp_path / "metrics.jsonl"
  written = write_run(first, run="mixed_float16")
  written += write_run(first, run="float32", skip_every=100)
  second = tmp_path / "other.jsonl"
  write_run(second, with_stats=False)
  read = metrics_log.read_metrics(str(first))
  assert len(read) == len(written) == 24
  assert [r["step"] for r in read] == [r["step"] for r in written]
  assert all(math.isnan(r["loss"]) == r["skipped"] for r in read[:12])
  assert read[0]["grad_stats"] == written[0]["grad_stats"]

  out = tmp_path / "plots" / "run.png"
  assert plot.main([str(first), str(second), "--out", str(out),
                    "--title", "test"]) == str(out)
  data = out.read_bytes()
  assert data[:8] == b"\x89PNG\r\n\x1a\n"
  image = matplotlib.image.imread(str(out))
  assert image.shape[0] > 200 and image.shape[1] > 200
  assert np.unique(image.reshape(-1, image.shape[-1]), axis=0).shape[0] > 10


def test_load_runs_labels_by_run_key_then_file_name(tmp_path):
  write_run(tmp_path / "a.jsonl", run="f16", steps=2)
  write_run(tmp_path / "a.jsonl", run="f32", steps=3)
  write_run(tmp_path / "b.jsonl", steps=4)
  write_run(tmp_path / "c.jsonl", run="f16", steps=5)
  runs = plot.load_runs([str(tmp_path / n) for n in ("a.jsonl", "b.jsonl",
                                                     "c.jsonl")])
  assert {k: len(v) for k, v in runs.items()} == {
      "a:f16": 2, "f32": 3, "b": 4, "c:f16": 5}


def test_plot_marks_skipped_steps_on_a_log2_scale_axis(tmp_path):
  path = tmp_path / "m.jsonl"
  records = write_run(path)
  fig = plot.plot_runs({"run": records})
  loss_ax, scale_ax, underflow_ax = fig.axes[:3]
  assert scale_ax.get_yscale() == "log"
  assert scale_ax.yaxis.get_transform().base == 2
  (markers,) = scale_ax.collections
  skipped = [(r["step"], r["loss_scale"]) for r in records if r["skipped"]]
  np.testing.assert_array_equal(markers.get_offsets(), skipped)
  assert len(underflow_ax.get_lines()) == 2  # one per layer
  # NaN losses of skipped steps are left out of the loss curve.
  (loss_line,) = loss_ax.get_lines()
  assert np.isfinite(loss_line.get_ydata()).all()
  assert len(loss_line.get_ydata()) == len(records) - len(skipped)


def test_plot_without_grad_stats_has_two_panels():
  records = [{"step": i, "loss": 1.0 / (i + 1), "loss_scale": 1.0,
              "skipped": False} for i in range(5)]
  fig = plot.plot_runs({"float32": records})
  assert len(fig.axes) == 2


def test_plot_refuses_nothing_to_plot(tmp_path):
  with pytest.raises(ValueError, match="no records"):
    plot.plot_runs({"empty": []})
  with pytest.raises(SystemExit):
    plot.main([str(tmp_path / "missing.jsonl")])
  (tmp_path / "empty.jsonl").write_text("")
  with pytest.raises(SystemExit):
    plot.main([str(tmp_path / "empty.jsonl")])
