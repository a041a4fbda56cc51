"""Tests for the transformer language-model examples (linen and NNX)."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import lm_common
import lm_data
import lm_linen
import lm_models_linen
import lm_models_nnx
import lm_nnx
import mpjax


def linen_param_count(config):
  shapes = jax.eval_shape(
      lambda: lm_models_linen.TransformerLM(config).init(
          jax.random.key(0), jnp.zeros((1, config.seq_len), jnp.int32)))
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes))


def nnx_param_count(config):
  model = nnx.eval_shape(
      lambda: lm_models_nnx.TransformerLM(config, rngs=nnx.Rngs(0)))
  return sum(int(np.prod(x.shape))
             for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


def test_gpt2_124m_shape_has_gpt2_smalls_parameter_count_in_both_apis():
  config = lm_common.LMConfig.gpt2_124m()
  assert linen_param_count(config) == 124_439_808
  assert nnx_param_count(config) == 124_439_808


def test_the_two_apis_build_the_same_model():
  config = lm_common.LMConfig(seq_len=16, num_layers=3, d_model=24,
                              num_heads=3)
  assert linen_param_count(config) == nnx_param_count(config)


@pytest.mark.parametrize("kwargs", [{"d_model": 10, "num_heads": 4},
                                    {"num_layers": 0}, {"seq_len": 2.5}])
def test_bad_configs_raise(kwargs):
  with pytest.raises(ValueError, match="LMConfig"):
    lm_common.LMConfig(**kwargs)


def test_corpus_is_the_standard_library_split_deterministically():
  a, b = lm_data.load(max_bytes=50_000), lm_data.load(max_bytes=50_000)
  assert a.sha256 == b.sha256 and a.files >= 1
  assert a.train.size + a.val.size == 50_000
  assert a.train.dtype == np.uint8
  assert b"import" in a.train.tobytes()
  batch = next(lm_data.train_batches(a.train, 4, 32, seed=3))
  assert batch["x"].shape == batch["y"].shape == (4, 32)
  assert batch["x"].dtype == np.int32
  np.testing.assert_array_equal(batch["x"][:, 1:], batch["y"][:, :-1])
  again = next(lm_data.train_batches(a.train, 4, 32, seed=3))
  np.testing.assert_array_equal(batch["x"], again["x"])
  evals = lm_data.eval_batches(a.val, 4, 32, 2)
  assert len(evals) == 2 and evals[0]["x"].shape == (4, 32)


TINY = ["--steps", "6", "--layers", "1", "--d-model", "16", "--heads", "2",
        "--seq-len", "16", "--batch-size", "4", "--eval-batches", "2",
        "--report-window", "3", "--timing-warmup", "2", "--max-bytes",
        "40000", "--max-gap-pct", "100"]


# A few configurations per API keep this fast; every one runs in the
# experiments themselves.
@pytest.mark.parametrize("script,configs", [
    (lm_linen, ["float32", "fp8_delayed"]),  # mixed_float16: the resume test
    (lm_nnx, ["mixed_bfloat16", "fp8_delayed"])], ids=["linen", "nnx"])
def test_script_trains_and_writes_its_table(script, configs, tmp_path, capsys):
  path = tmp_path / "lm.json"
  metrics = tmp_path / "metrics.jsonl"
  result = script.main(["lm.py", *TINY, "--configs", *configs,
                        "--json", str(path), "--metrics", str(metrics),
                        "--quiet"])
  with open(path) as f:
    written = json.load(f)
  assert written["environment"]["api"] == result["environment"]["api"]
  assert [r["config"] for r in written["rows"]] == configs
  for row in written["rows"]:
    for key in ("final_train_loss", "val_loss", "tokens_per_s",
                "skipped_steps", "xla_temp_bytes", "val_gap_pct"):
      assert key in row, key
    assert np.isfinite(row["val_loss"]) and row["tokens_per_s"] > 0
    assert len(row["loss_curve"]) == 6
  if "float32" in configs:
    assert written["rows"][0]["val_gap_pct"] == 0.0
  by_name = {r["config"]: r for r in written["rows"]}
  fp8_row = by_name["fp8_delayed"]
  # fp8 matmuls ran: the MLP and attention projections, 40% of this tiny
  # model's matmul FLOPs (the tied output layer stays bfloat16).
  assert any("float8_e5m2" in k for k in fp8_row[
      "lowered_matmul_flops_by_dtype"])
  assert 0.3 < fp8_row["fp8_matmul_share"] < 0.5
  assert fp8_row["gap_reference"] == "mixed_bfloat16"
  for name, row in by_name.items():
    if name != "fp8_delayed":
      assert row["fp8_matmul_share"] == 0.0, name
  if "mixed_bfloat16" in by_name:
    assert by_name["mixed_bfloat16"]["bf16_gap_pct"] == 0.0
    assert fp8_row["bf16_gap_pct"] is not None
  assert written["environment"]["python"]
  assert f"| {configs[-1]} |" in capsys.readouterr().out
  records = mpjax.read_metrics(str(metrics))
  assert [r["run"] for r in records] == [c for c in configs for _ in range(6)]
  assert [r["step"] for r in records] == list(range(6)) * len(configs)


def test_interrupted_lm_run_resumes_bit_identically(tmp_path):
  # mixed_float16: the loss scale, its counter and the skips must resume too.
  config = "mixed_float16"
  common = [*TINY, "--configs", config, "--metrics", "", "--quiet",
            "--checkpoint-every", "2"]
  full = lm_linen.main(["lm.py", *common, "--json", str(tmp_path / "a.json"),
                        "--checkpoint-dir", str(tmp_path / "full")])["rows"][0]
  lm_linen.main(["lm.py", *common, "--stop-after", "3",  # "preempted"
                 "--json", str(tmp_path / "b.json"),
                 "--checkpoint-dir", str(tmp_path / "resumed")])
  resumed = lm_linen.main(
      ["lm.py", *common, "--json", str(tmp_path / "c.json"), "--resume",
       "--checkpoint-dir", str(tmp_path / "resumed")])["rows"][0]
  assert resumed["resumed_at_step"] == 3
  # Steps 3..5 and the final model are the same to the last bit.
  assert resumed["loss_curve"] == full["loss_curve"][3:]
  assert resumed["val_loss"] == full["val_loss"]
  assert resumed["final_loss_scale"] == full["final_loss_scale"]


def test_gap_check_names_the_runs_more_than_the_limit_from_float32():
  rows = [{"config": "float32", "val_gap_pct": 0.0},
          {"config": "mixed_bfloat16", "val_gap_pct": 2.5},
          {"config": "mixed_float16", "val_gap_pct": -1.0}]
  assert lm_common.gap_failures(rows, 2.0) == ["mixed_bfloat16"]
  assert lm_common.gap_failures(rows, 0.5) == ["mixed_bfloat16",
                                                "mixed_float16"]
  assert lm_common.gap_failures([{"config": "x", "val_gap_pct": None}],
                                0.0) == []


def test_fp8_gap_is_checked_against_bfloat16_not_float32():
  # fp8 rows: their gap to mixed_bfloat16 counts, float32 may be absent.
  rows = [{"config": "mixed_bfloat16", "val_gap_pct": None,
           "bf16_gap_pct": 0.0},
          {"config": "fp8_delayed", "gap_reference": "mixed_bfloat16",
           "val_gap_pct": 3.0, "bf16_gap_pct": 1.4},
          {"config": "fp8_current", "gap_reference": "mixed_bfloat16",
           "val_gap_pct": None, "bf16_gap_pct": -1.6}]
  assert lm_common.gap_failures(rows, 2.0, 1.5) == ["fp8_current"]
  assert lm_common.gap_failures(rows, 2.0, 1.0) == ["fp8_delayed",
                                                     "fp8_current"]
  assert lm_common.gap_failures(rows, 2.0) == []  # no fp8 limit given
  by_name = {c.name: c for c in lm_common.CONFIGS}
  assert by_name["fp8_delayed"].reference == "mixed_bfloat16"
  assert by_name["mixed_float16"].reference == "float32"


def test_fp8_configs_put_the_recipe_on_every_matmul_layer_of_each_api():
  recipe = mpjax.DelayedScaling()
  for api, classes in (("linen", ("Dense", "DenseGeneral")),
                       ("nnx", ("Linear", "LinearGeneral"))):
    pm = lm_common.fp8_policy(recipe, api)
    assert sorted(k.__name__ for k, _ in pm.overrides) == sorted(classes)
    assert all(v == recipe for _, v in pm.overrides)
  both = {c.name: c for c in lm_common.CONFIGS}["fp8_current"].policy
  assert len(both.overrides) == 4
  with pytest.raises(ValueError, match="unknown api 'jax'"):
    lm_common.fp8_policy(recipe, "jax")
