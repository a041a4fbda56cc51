"""Tests for mpjax/_src/metrics_log.py: JSONL records and the progress bar."""

import io
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import mpjax
import models
import seed_mlp
from mpjax._src import grad_stats as gs
from mpjax._src import metrics_log


def strict_json(line):
  """json.loads that refuses the NaN/Infinity tokens strict JSON forbids."""
  def refuse(token):
    raise ValueError(f"non-standard JSON token {token}")
  return json.loads(line, parse_constant=refuse)


def assert_same(a, b):
  """Equality that treats NaN as equal to NaN, recursively."""
  if isinstance(a, float) and isinstance(b, float) and math.isnan(a):
    assert math.isnan(b)
  elif isinstance(a, dict):
    assert isinstance(b, dict) and a.keys() == b.keys(), (a, b)
    for key in a:
      assert_same(a[key], b[key])
  elif isinstance(a, list):
    assert isinstance(b, list) and len(a) == len(b), (a, b)
    for x, y in zip(a, b):
      assert_same(x, y)
  else:
    assert a == b and type(a) is type(b), (a, b)


def test_records_round_trip_with_nonfinite_values_as_strict_json(tmp_path):
  path = tmp_path / "runs" / "metrics.jsonl"
  records = [
      {"step": np.int32(0), "loss": jnp.float32(jnp.nan),
       "loss_scale": np.float32(65536.0), "skipped": np.bool_(True),
       "grad_norm": jnp.array(jnp.inf), "neg": -np.inf,
       "hist": jnp.array([1.0, jnp.nan, -jnp.inf], jnp.bfloat16),
       "ids": np.arange(3), "run": "mixed_float16", "nested": {"a": (1, 2.5)}},
      {"step": 1, "loss": np.float16(0.5), "skipped": False,
       "note": "NaN-free"},
  ]
  with metrics_log.MetricsWriter(str(path)) as log:
    written = [log.write_record(r) for r in records]
  lines = path.read_text().splitlines()
  assert len(lines) == 2
  expected = [
      {"step": 0, "loss": math.nan, "loss_scale": 65536.0, "skipped": True,
       "grad_norm": math.inf, "neg": -math.inf,
       "hist": [1.0, math.nan, -math.inf], "ids": [0, 1, 2],
       "run": "mixed_float16", "nested": {"a": [1, 2.5]}},
      {"step": 1, "loss": 0.5, "skipped": False, "note": "NaN-free"},
  ]
  # Every line is strict JSON; the writer hands back the decoded record.
  assert_same([metrics_log.from_jsonable(strict_json(line)) for line in lines],
              expected)
  assert_same(written, expected)
  assert_same(metrics_log.read_metrics(str(path)), expected)


def test_writer_appends_and_restarts(tmp_path):
  path = str(tmp_path / "m.jsonl")
  with metrics_log.MetricsWriter(path) as log:
    log.write(0, {"loss": 1.0})
  with metrics_log.MetricsWriter(path, append=True) as log:
    log.write(1, {"loss": 0.5})
  assert [r["step"] for r in metrics_log.read_metrics(path)] == [0, 1]
  with metrics_log.MetricsWriter(path) as log:
    log.write(7, {"loss": 0.1})
  assert [r["step"] for r in metrics_log.read_metrics(path)] == [7]
  with pytest.raises(ValueError, match="closed"):
    log.write(8, {"loss": 0.1})


def poisoned_train_metrics():
  """Two steps of the seed MLP: the second poisons Dense_1's bias gradient."""
  def loss_fn(params, batch, apply_fn, rng):
    loss = seed_mlp.loss_fn(params, batch, apply_fn, rng)
    return loss + jnp.sum(params["Dense_1"]["bias"] * batch["poison"])

  model = models.MLP(hidden=(8,), num_classes=3)
  rng = np.random.default_rng(0)
  batch = {"x": jnp.asarray(rng.random((8, 6)), jnp.float32),
           "y": jnp.asarray(rng.integers(0, 3, 8), jnp.int32)}
  params = model.init(jax.random.key(0), batch["x"])["params"]
  tx = mpjax.loss_scaled(optax.sgd(0.1), mpjax.StaticScaling(4.0))
  state = mpjax.TrainState.create(apply_fn=model.apply, params=params, tx=tx)
  step = mpjax.make_train_step(loss_fn, attribution=True)
  out = []
  for poison in (0.0, jnp.inf):
    state, metrics = step(state, dict(batch, poison=jnp.float32(poison)))
    out.append(metrics)
  return out


def test_record_from_train_step_metrics_names_nonfinite_leaves():
  clean, poisoned = poisoned_train_metrics()
  record = metrics_log.record_from_metrics(3, clean, step_time_s=0.25,
                                           run="float32")
  assert record == {
      "step": 3, "skipped": False, "step_time_s": 0.25,
      "loss": pytest.approx(float(clean["loss"])), "loss_scale": 4.0,
      "grad_norm": pytest.approx(float(clean["grad_norm"])),
      "skipped_steps": 0, "consecutive_skips": 0, "run": "float32"}
  assert metrics_log.record_from_metrics(4, poisoned)["nonfinite_leaves"] == [
      "leaf[2]"]  # packed flags without the params: named by index
  like = {"Dense_0": {"bias": 0, "kernel": 0},
          "Dense_1": {"bias": 0, "kernel": 0}}
  record = metrics_log.record_from_metrics(4, poisoned, like=like)
  assert record["skipped"] is True
  assert record["nonfinite_leaves"] == ["Dense_1/bias"]
  assert record["skipped_steps"] == 1
  strict_json(json.dumps(metrics_log.to_jsonable(record), allow_nan=False))


def test_record_keeps_grad_stats_only_on_steps_they_were_computed():
  grads = {"Dense_0": {"kernel": jnp.array([1e-9, 1.0])}}
  on = gs.periodic_grad_stats(grads, 1024.0, 0, 2)
  off = gs.periodic_grad_stats(grads, 1024.0, 1, 2)
  record = metrics_log.record_from_metrics(0, {"loss": 1.0, "grad_stats": on})
  layer = record["grad_stats"]["layers"]["Dense_0"]
  assert layer["underflow_fraction"] == 0.5 and layer["nonzero"] == 2
  record = metrics_log.record_from_metrics(1, {"loss": 1.0, "grad_stats": off})
  assert "grad_stats" not in record


def test_to_jsonable_names_what_it_cannot_log():
  with pytest.raises(TypeError, match=r"record\['bad'\]"):
    metrics_log.to_jsonable({"ok": 1, "bad": object()}, where="record")
  with pytest.raises(TypeError, match="complex64"):
    metrics_log.to_jsonable(np.ones(2, np.complex64))


def test_reader_drops_a_truncated_last_line_and_rejects_corrupt_ones(tmp_path):
  path = tmp_path / "m.jsonl"
  path.write_text('{"step": 0, "loss": 1.0}\n\n{"step": 1, "lo')
  with pytest.warns(UserWarning, match="truncated"):
    assert metrics_log.read_metrics(str(path)) == [{"step": 0, "loss": 1.0}]
  path.write_text('{"step": 0}\nnot json\n{"step": 2}\n')
  with pytest.raises(ValueError, match=":2:"):
    metrics_log.read_metrics(str(path))
  path.write_text('[1, 2]\n')
  with pytest.raises(ValueError, match="JSON object"):
    metrics_log.read_metrics(str(path))


class FakeTerminal(io.StringIO):

  def isatty(self):
    return True


def test_progress_bar_shows_loss_and_scale_on_a_terminal():
  pytest.importorskip("tqdm")
  stream = FakeTerminal()
  with metrics_log.ProgressBar(10, desc="mixed_float16", file=stream) as bar:
    assert bar.enabled
    bar.update(5, loss=jnp.float32(0.123456), loss_scale=np.float32(32768.0),
               skipped_steps=jnp.int32(2))
  text = stream.getvalue()
  assert "mixed_float16" in text and "5/10" in text
  assert "loss=0.1235" in text and "scale=32768" in text
  assert "skipped_steps=2" in text


@pytest.mark.parametrize("stream, quiet", [
    (io.StringIO(), False), (FakeTerminal(), True)], ids=["not-a-tty", "quiet"])
def test_progress_bar_is_silent_off_a_terminal_or_when_quiet(stream, quiet):
  with metrics_log.ProgressBar(10, file=stream, quiet=quiet) as bar:
    bar.update(3, loss=1.0, loss_scale=2.0)
  assert not bar.enabled
  assert stream.getvalue() == ""
