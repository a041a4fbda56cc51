"""Tests for mpjax/_src/precision_doctor.py: diagnosis and prescription."""

import json
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import models
import mpjax
from mpjax._src import precision_doctor as doctor_lib


class HandNorm(nn.Module):
  """x * rsqrt(mean(x * x)): the squares overflow float16 for |x| > 256."""

  @nn.compact
  def __call__(self, x):
    return x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + 1e-6)


class Fragile(nn.Module):
  @nn.compact
  def __call__(self, x):
    h = HandNorm()(nn.Dense(16)(x))
    return nn.Dense(4)(nn.relu(h))


class NNXHandNorm(nnx.Module):

  def __call__(self, x):
    return x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + 1e-6)


class NNXFragile(nnx.Module):

  def __init__(self, rngs):
    self.fc0 = nnx.Linear(8, 16, rngs=rngs)
    self.norm = NNXHandNorm()
    self.bn = nnx.BatchNorm(16, rngs=rngs)
    self.fc1 = nnx.Linear(16, 4, rngs=rngs)

  def __call__(self, x):
    return self.fc1(nnx.relu(self.bn(self.norm(self.fc0(x)))))


def loss_fn(params, batch, apply_fn, rng):
  del rng
  logits = apply_fn({"params": params}, batch["x"])
  return mpjax.numerics.softmax_cross_entropy_with_integer_labels(
      logits, batch["y"]).mean()


def batches(n=2, scale=255.0, features=8, rows=16):
  key = jax.random.key(0)
  out = []
  for i in range(n):
    kx, ky = jax.random.split(jax.random.fold_in(key, i))
    out.append({"x": jax.random.uniform(kx, (rows, features)) * scale,
                "y": jax.random.randint(ky, (rows,), 0, 4)})
  return out


@pytest.fixture(scope="module")
def fragile():
  data = batches()
  params = Fragile().init(jax.random.key(1), data[0]["x"])["params"]
  diagnosis = mpjax.precision_doctor(Fragile().apply, data, loss_fn,
                                     "mixed_float16", params=params)
  return params, data, diagnosis


def test_doctor_names_the_fragile_module_and_only_it(fragile):
  _, _, d = fragile
  assert [k for k, _ in d.prescription.keep_float32] == ["HandNorm_0"]
  rows = {m.name: m for m in d.modules}
  assert rows["HandNorm_0"].added_error > 0.5
  assert rows["HandNorm_0"].zero_share > 0.5  # rows whose squares overflow
  assert rows["Dense_0"].added_error < 1e-2
  assert d.first_jump.name == "HandNorm_0"
  assert not d.prescription.use_bfloat16
  assert [m.name for m in d.modules] == ["Dense_0", "HandNorm_0", "Dense_1",
                                         "(root)"]  # finishing order


def test_suggested_policy_map_goes_into_a_train_state_and_fixes_it(fragile):
  params, data, d = fragile
  suggested = d.prescription.policy_map
  assert isinstance(suggested, mpjax.PolicyMap)
  assert mpjax.policy_name(dict(suggested.overrides)["HandNorm_0"]) == \
      "p=f32,c=f32,o=f32"
  tx = mpjax.loss_scaled(optax.adam(1e-3), mpjax.StaticScaling(2.0 ** 10))
  state = mpjax.TrainState.create(apply_fn=Fragile().apply, params=params,
                                  tx=tx, policy=suggested)
  fixed = mpjax.precision_doctor(state, data, loss_fn)
  assert fixed.policy is suggested and fixed.loss_scale == 2.0 ** 10
  assert fixed.prescription.keep_float32 == ()
  assert abs(fixed.loss_difference) < 1e-3 * fixed.loss_float32
  assert abs(d.loss_difference) > 1e-2 * d.loss_float32
  assert max(m.output_error for m in fixed.modules) < 1e-2


def test_doctor_diagnoses_nnx_through_a_train_state():
  data = batches(n=1)
  tx = mpjax.loss_scaled(optax.adam(1e-3), mpjax.StaticScaling(2.0 ** 12))
  state = mpjax.TrainState.from_nnx(NNXFragile(nnx.Rngs(0)), tx=tx,
                                    policy="mixed_float16")
  d = mpjax.precision_doctor(state, data, loss_fn)
  assert [k for k, _ in d.prescription.keep_float32] == ["norm"]
  rows = {m.name: m for m in d.modules}
  assert rows["bn"].compute_dtype == "float32"  # the island
  assert rows["fc0"].added_error < 1e-2
  assert {l.path.split("/")[0] for l in d.leaves} == {"fc0", "fc1", "bn"}
  assert d.loss_scale == 2.0 ** 12
  # The model handed in is left as it was (the doctor prepares copies).
  assert mpjax.policy_name(state.policy) == "p=f32,c=f16,o=f32"


def test_no_false_alarm_on_the_seed_mlp():
  data = batches(scale=1.0, features=16, rows=32)
  model = models.MLP(hidden=(32,), num_classes=4)
  params = model.init(jax.random.key(0), data[0]["x"])["params"]
  d = mpjax.precision_doctor(model.apply, data, loss_fn, "mixed_float16",
                             params=params)
  assert d.prescription.keep_float32 == ()
  assert not d.prescription.use_bfloat16 and d.first_jump is None
  low, high = d.prescription.loss_scale_range
  assert 1 <= low <= d.loss_scale <= high
  assert all(l.cosine > 0.999 and l.error < 0.05 for l in d.leaves)
  assert abs(d.loss_difference) < 1e-2


class Block(nn.Module):
  """A pre-norm attention block and a BatchNorm head: islands, no alarm."""

  @nn.compact
  def __call__(self, x, train: bool = True):
    h = nn.MultiHeadDotProductAttention(num_heads=2)(nn.LayerNorm()(x))
    x = x + nn.Dense(x.shape[-1])(nn.gelu(h))
    x = nn.BatchNorm(use_running_average=not train)(x.mean(axis=1))
    return nn.Dense(4)(x)


def test_no_false_alarm_with_islands_and_model_state_in_bfloat16():
  x = jax.random.normal(jax.random.key(0), (4, 8, 16))
  data = [{"x": x, "y": jnp.arange(4) % 4}]
  variables = Block().init(jax.random.key(1), x)

  def block_loss(params, batch, apply_fn, rng):
    del rng
    logits = apply_fn({"params": params}, batch["x"], train=True)
    return mpjax.numerics.softmax_cross_entropy_with_integer_labels(
        logits, batch["y"]).mean()

  d = mpjax.precision_doctor(
      Block().apply, data, block_loss, mpjax.PolicyMap("mixed_bfloat16"),
      params=variables["params"],
      model_state={"batch_stats": variables["batch_stats"]})
  assert d.prescription.keep_float32 == ()
  assert d.prescription.loss_scale_range[0] == 1.0  # no scale needed
  assert not d.prescription.use_bfloat16
  assert {m.cls for m in d.modules} >= {nn.LayerNorm, nn.BatchNorm,
                                        nn.MultiHeadDotProductAttention}


class Huge(nn.Module):
  """Outputs beyond float16's range; the loss brings them back."""

  @nn.compact
  def __call__(self, x):
    return nn.Dense(2)(x) * 1e5


def test_a_module_beyond_float16_range_is_kept_and_bfloat16_suggested():
  data = batches(n=1, scale=1.0)
  params = Huge().init(jax.random.key(0), data[0]["x"])["params"]

  def huge_loss(params, batch, apply_fn, rng):
    del rng
    return jnp.mean(apply_fn({"params": params}, batch["x"]) * 1e-5)

  d = mpjax.precision_doctor(Huge().apply, data, huge_loss, "mixed_float16",
                             params=params)
  assert d.modules[-1].headroom_log2 < 0 and d.modules[-1].nonfinite > 0
  # The root is the module: a class entry (a path entry cannot be empty).
  assert [k for k, _ in d.prescription.keep_float32] == [Huge]
  assert "headroom" in d.prescription.keep_float32[0][1]
  assert d.prescription.use_bfloat16
  assert "Use bfloat16" in d.summary()


def row(path, added=1e-4, headroom=10.0, cls=nn.Dense, input_error=0.0,
        compute="float16", float32_already=False, island=False):
  return doctor_lib.ModuleDiagnosis(
      path=path, cls=cls, method="__call__", compute_dtype=compute,
      output_error=input_error + added, input_error=input_error,
      headroom_log2=headroom, max_abs=1.0, zero_share=0.0, nonfinite=0,
      float32_already=float32_already, island=island)


def keys(rows, policy="mixed_float16", thresholds=None, shares=(0.0,) * 25):
  p = doctor_lib.prescribe(rows, policy, 1.0, list(shares), jnp.float16,
                           thresholds or mpjax.DoctorThresholds())
  return [k for k, _ in p.keep_float32], p


def test_error_threshold_is_strict_at_its_boundary():
  t = mpjax.DoctorThresholds(max_added_error=0.25)  # exact in binary
  assert keys([row("a", added=0.25)], thresholds=t)[0] == []
  assert keys([row("a", added=0.25 + 1e-9)], thresholds=t)[0] == ["a"]


def test_headroom_threshold_is_strict_at_its_boundary():
  t = mpjax.DoctorThresholds(min_headroom_log2=2.0)
  assert keys([row("a", headroom=2.0)], thresholds=t)[0] == []
  flagged, p = keys([row("a", headroom=1.999)], thresholds=t)
  assert flagged == ["a"] and p.use_bfloat16


def test_modules_with_inputs_already_off_are_not_judged_on_error():
  t = mpjax.DoctorThresholds(max_added_error=0.25)
  rows = [row("a", added=0.5), row("b", input_error=0.25, added=0.5),
          row("c", input_error=0.26, added=0.5)]
  flagged, p = keys(rows, thresholds=t)
  assert flagged == ["a", "b"]
  assert any("Not judged" in n and "c" in n for n in p.notes)


def test_a_container_is_blamed_only_through_its_flagged_child():
  rows = [row("blk/inner", added=1.0), row("blk", added=1.0, cls=nn.Module),
          row("", added=1.0, cls=nn.Sequential)]
  assert keys(rows)[0] == ["blk/inner"]


def test_every_module_of_a_class_flagged_gives_a_class_entry():
  rows = [row("a", added=1.0, cls=HandNorm), row("b", added=1.0, cls=HandNorm),
          row("c")]
  flagged, p = keys(rows)
  assert flagged == [HandNorm]
  assert dict(p.policy_map.overrides)[HandNorm].compute_dtype == jnp.float32
  flagged, _ = keys(rows + [row("d", cls=HandNorm)])
  assert flagged == ["a", "b"]


def test_islands_and_float32_modules_are_notes_not_entries():
  rows = [row("ln", added=1.0, cls=nn.LayerNorm, island=True),
          row("f", added=1.0, compute="float32", float32_already=True)]
  flagged, p = keys(rows, policy="mixed_float16")  # plain: map adds islands
  assert flagged == []
  assert any("islands cover" in n for n in p.notes)
  assert any("float32 cannot fix" in n for n in p.notes)
  flagged, _ = keys(rows[:1], policy=mpjax.PolicyMap("mixed_float16"))
  assert flagged == ["ln"]  # a map's island that still errs is named


def test_path_entries_are_literal_patterns():
  flagged, p = keys([row("blocks/[0]*", added=1.0)])
  assert flagged == ["blocks/[[]0][*]"]
  chain = (("", nn.Module), ("blocks", nn.Module), ("blocks/[0]*", nn.Dense))
  assert p.policy_map.resolve(chain).rule.startswith("path")


def test_loss_scale_range_boundaries():
  t = mpjax.DoctorThresholds(max_flush_share=0.01)
  shares = [0.5, 0.02, 0.01, 0.0] + [0.0] * 21
  # 65504 / 2**10 = 63.97: the largest gradient 63 fits 2**10, not 2**11.
  p = doctor_lib.prescribe([], "mixed_float16", 63.0, shares, jnp.float16, t)
  assert p.loss_scale_range == (4.0, 1024.0)
  p = doctor_lib.prescribe([], "mixed_float16", 64.0, shares, jnp.float16, t)
  assert p.loss_scale_range == (4.0, 512.0)
  p = doctor_lib.prescribe([], "mixed_float16", 1e4, [0.5] * 25, jnp.float16,
                           t)
  assert p.loss_scale_range is None and p.use_bfloat16


def test_first_jump_boundary():
  t = mpjax.DoctorThresholds(jump_factor=4.0)
  eps = float(jnp.finfo(jnp.float16).eps)  # 2**-10: the products are exact
  rows = [row("a", added=4 * eps), row("b", added=16 * eps),
          row("c", added=64 * eps)]
  assert doctor_lib.first_jump(rows, t) is None  # each exactly 4x: no jump
  rows[2] = row("c", added=64.5 * eps)
  assert doctor_lib.first_jump(rows, t) is rows[2]
  assert doctor_lib.first_jump([row("a", added=4.5 * eps)], t).path == "a"


def test_table_json_and_plot(fragile, tmp_path):
  _, _, d = fragile
  text = str(d)
  assert "HandNorm_0" in text and "keep f32" in text and "Dense_0/kernel" in text
  data = json.loads(d.to_json())
  assert data["prescription"]["keep_float32"][0][0] == "'HandNorm_0'"
  assert data["first_jump"] == "HandNorm_0"
  assert [m["path"] for m in data["modules"]][:2] == ["Dense_0", "HandNorm_0"]
  pytest.importorskip("matplotlib")
  d.plot(str(tmp_path / "depth.png"))
  assert (tmp_path / "depth.png").stat().st_size > 1000


@pytest.mark.parametrize("policy, error, match", [
    (42, TypeError, "42"),
    ("mixed_float17", ValueError, "mixed_float17"),
    (None, TypeError, "candidate policy"),
])
def test_a_policy_that_is_not_a_policy_is_named(fragile, policy, error, match):
  params, data, _ = fragile
  with pytest.raises(error, match=match):
    mpjax.precision_doctor(Fragile().apply, data, loss_fn, policy,
                           params=params)


def test_batches_of_the_wrong_shape_are_named(fragile):
  params, data, _ = fragile
  wrong = {"x": jnp.ones((16, 5)), "y": data[0]["y"]}
  with pytest.raises(ValueError, match=r"batch 0 .*float32\[16, 5\]"):
    mpjax.precision_doctor(Fragile().apply, [wrong], loss_fn, "mixed_float16",
                           params=params)
  # A batch the model could run, but not like batch 0.
  fewer = {"x": data[0]["x"][:8], "y": data[0]["y"][:8]}
  with pytest.raises(ValueError, match=r"batch 1 .*float32\[8, 8\]"):
    mpjax.precision_doctor(Fragile().apply, [data[0], fewer], loss_fn,
                           "mixed_float16", params=params)
  with pytest.raises(TypeError, match="list of batches"):
    mpjax.precision_doctor(Fragile().apply, data[0], loss_fn,
                           "mixed_float16", params=params)
  with pytest.raises(ValueError, match="empty"):
    mpjax.precision_doctor(Fragile().apply, [], loss_fn, "mixed_float16",
                           params=params)


def test_other_bad_arguments_are_named(fragile):
  params, data, _ = fragile
  with pytest.raises(TypeError, match="model must be"):
    mpjax.precision_doctor(3, data, loss_fn, "float32", params=params)
  with pytest.raises(ValueError, match="needs params"):
    mpjax.precision_doctor(Fragile().apply, data, loss_fn, "float32")
  with pytest.raises(ValueError, match="loss_scale"):
    mpjax.precision_doctor(Fragile().apply, data, loss_fn, "float32",
                           params=params, loss_scale=0.0)
  with pytest.raises(TypeError, match="max_added_error"):
    mpjax.DoctorThresholds(max_added_error="big")
  with pytest.raises(ValueError, match="max_flush_share"):
    mpjax.DoctorThresholds(max_flush_share=1.0)
  with pytest.raises(ValueError, match="floating scalar"):
    mpjax.precision_doctor(
        Fragile().apply, data, lambda p, b, a, r: a({"params": p}, b["x"]),
        "float32", params=params)


def test_experiments_doctor_flag_prints_the_diagnosis(fragile, capsys):
  import argparse  # pylint: disable=g-import-not-at-top
  import training  # pylint: disable=g-import-not-at-top
  params, data, _ = fragile
  off = argparse.Namespace(doctor=False, doctor_batches=1)
  assert training.doctor(off, "f16", Fragile().apply, iter(data), loss_fn,
                         "mixed_float16", params=params) is None
  on = argparse.Namespace(doctor=True, doctor_batches=1)
  assert training.doctor(on, "f32", Fragile().apply, iter(data), loss_fn,
                         "float32", params=params) is None  # the reference
  d = training.doctor(on, "f16", Fragile().apply, iter(data), loss_fn,
                      "mixed_float16", params=params)
  assert d.batches == 1
  assert [k for k, _ in d.prescription.keep_float32] == ["HandNorm_0"]
  assert "== precision doctor: f16" in capsys.readouterr().out
