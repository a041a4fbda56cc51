"""Tests for the ResNet examples (BatchNorm through TrainState, linen and NNX)."""

import json

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mpjax
import resnet_common
import resnet_data
import resnet_linen
import resnet_models_linen
import resnet_models_nnx
import resnet_nnx
from flax import nnx

APIS = {"linen": resnet_linen.API, "nnx": resnet_nnx.API}
POLICIES = {c.name: c for c in resnet_common.CONFIGS}
TINY_CONFIG = resnet_common.ResNetConfig(widths=(4, 8))
STEPS = 3


@pytest.fixture(scope="module")
def data():
  return resnet_data.make(num_train=16, num_eval=8, seed=1)


def args_for(*flags):
  return resnet_common.parse_args(["--steps", str(STEPS), "--warmup-steps",
                                   "1", *flags], "test")


def stats_leaves(state):
  return jax.tree.leaves(state.model_state)


def test_data_is_cifar_shaped_standardised_and_deterministic():
  a = resnet_data.make(num_train=20, num_eval=10, seed=3)
  b = resnet_data.make(num_train=20, num_eval=10, seed=3)
  assert a.sha256 == b.sha256
  assert a.sha256 != resnet_data.make(num_train=20, num_eval=10,
                                      seed=4).sha256
  chex.assert_shape(a.x_train, (20, 32, 32, 3))
  chex.assert_shape(a.x_eval, (10, 32, 32, 3))
  assert a.x_train.dtype == np.float32 and a.y_train.dtype == np.int32
  np.testing.assert_allclose(a.x_train.mean(axis=(0, 1, 2)), 0, atol=1e-5)
  np.testing.assert_allclose(a.x_train.std(axis=(0, 1, 2)), 1, atol=1e-5)
  assert 0 <= a.y_train.min() and a.y_train.max() < 10
  batches = resnet_data.train_batches(a.x_train, a.y_train, 8, seed=0)
  first = [next(batches)["y"] for _ in range(3)]  # crosses an epoch
  again = resnet_data.train_batches(a.x_train, a.y_train, 8, seed=0)
  for y in first:
    np.testing.assert_array_equal(y, next(again)["y"])
  assert [len(b["y"]) for b in
          resnet_data.eval_batches(a.x_eval, a.y_eval, 4)] == [4, 4, 2]


def test_images_of_a_class_share_their_gratings():
  # The label is in the images: a nearest-class-mean rule on the
  # translation-free amplitude spectra is far above chance (10%).
  d = resnet_data.make(num_train=400, num_eval=200, seed=0, noise=0.0)
  power = lambda x: np.abs(np.fft.fft2(x, axes=(1, 2))).reshape(len(x), -1)
  train, test = power(d.x_train), power(d.x_eval)
  means = np.stack([train[d.y_train == k].mean(0) for k in range(10)])
  distance = ((test[:, None] - means[None]) ** 2).sum(-1)
  assert np.mean(distance.argmin(-1) == d.y_eval) > 0.5


@pytest.mark.parametrize("kwargs", [{"widths": ()}, {"widths": [16]},
                                    {"blocks_per_stage": 0},
                                    {"bn_momentum": 1.0}])
def test_bad_configs_raise(kwargs):
  with pytest.raises(ValueError, match="ResNetConfig"):
    resnet_common.ResNetConfig(**kwargs)


def test_the_two_apis_build_the_same_model():
  config = resnet_common.ResNetConfig(widths=(4, 8, 16), blocks_per_stage=2)
  variables = jax.eval_shape(lambda: resnet_models_linen.ResNet(config).init(
      jax.random.key(0), jnp.zeros((1, 32, 32, 3)), train=False))
  model = nnx.eval_shape(
      lambda: resnet_models_nnx.ResNet(config, rngs=nnx.Rngs(0)))
  size = lambda tree: sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))
  assert size(variables["params"]) == size(nnx.state(model, nnx.Param))
  assert size(variables["batch_stats"]) == size(
      nnx.state(model, nnx.BatchStat))
  assert size(variables["batch_stats"]) > 0


@pytest.mark.parametrize("policy", list(POLICIES))
@pytest.mark.parametrize("api", list(APIS))
def test_trains_in_every_policy_with_float32_batch_stats_used_in_eval(
    api, policy, data):
  api, run = APIS[api], POLICIES[policy]
  state = api.init_state(TINY_CONFIG, run.policy,
                         resnet_common.make_optimizer(args_for(), run.scaling),
                         seed=0)
  initial = jax.device_get(state.model_state)
  assert stats_leaves(state), "the BatchNorm statistics are in model_state"
  step = mpjax.make_train_step(api.loss_fn)
  batches = resnet_data.train_batches(data.x_train, data.y_train, 8, seed=0)
  losses = []
  for _ in range(STEPS):
    state, metrics = step(state, next(batches))
    losses.append(float(metrics["loss"]))
  assert np.all(np.isfinite(losses))
  assert int(mpjax.loss_scale_state(state.opt_state).skipped_steps) == 0
  # The forward pass moved every running average, and no policy cast them.
  for before, after in zip(jax.tree.leaves(initial), stats_leaves(state)):
    assert after.dtype == jnp.float32
    assert not np.array_equal(before, np.asarray(after))
  # Eval mode normalises with the running averages: an example's logits do
  # not depend on its batch, and change when the statistics are reset.
  logits = jax.jit(api.logits)
  out = np.asarray(logits(state, data.x_eval))
  assert out.dtype == np.float32 and np.all(np.isfinite(out))
  others = data.x_eval.copy()
  others[1:] = data.x_eval[1:][::-1] * 3.0  # same shape: no recompile
  np.testing.assert_allclose(np.asarray(logits(state, others))[0], out[0],
                             rtol=1e-2, atol=1e-2)
  reset = state.replace(model_state=jax.tree.map(jnp.asarray, initial))
  assert not np.allclose(np.asarray(logits(reset, data.x_eval)), out)
  # A NaN image makes this batch's statistics NaN: the skipped step must keep
  # the running averages as they were, bit for bit, with the params.
  before = jax.device_get((state.params, state.model_state))
  batch = next(batches)
  batch["x"] = batch["x"].copy()
  batch["x"][0, 0, 0, 0] = np.nan
  state, metrics = step(state, batch)
  assert not bool(metrics["grads_finite"])
  assert int(mpjax.loss_scale_state(state.opt_state).skipped_steps) == 1
  chex.assert_trees_all_equal(
      jax.device_get((state.params, state.model_state)), before)


TINY = ["--steps", "4", "--widths", "4", "8", "--batch-size", "8",
        "--num-train", "32", "--num-eval", "16", "--eval-batch-size", "8",
        "--report-window", "2", "--timing-warmup", "1", "--warmup-steps", "1",
        "--max-gap-points", "100", "--quiet", "--checkpoint-every", "2",
        "--stats-every", "0"]


@pytest.fixture(scope="module")
def linen_run(tmp_path_factory):
  """float32 and mixed_float16 in linen, checkpointed."""
  tmp = tmp_path_factory.mktemp("linen")
  result = resnet_linen.main(
      ["resnet.py", *TINY, "--configs", "float32", "mixed_float16",
       "--json", str(tmp / "resnet.json"), "--metrics",
       str(tmp / "metrics.jsonl"), "--checkpoint-dir", str(tmp / "ckpt")])
  return result, tmp


def check_written(result, directory, api, configs):
  with open(directory / "resnet.json") as f:
    written = json.load(f)
  assert written == json.loads(json.dumps(result))
  env = written["environment"]
  assert env["api"] == api and env["command"].startswith("python")
  for key in ("device", "date", "jax", "flax", "optax", "data_sha256"):
    assert env[key], key
  assert [r["config"] for r in written["rows"]] == configs
  for row in written["rows"]:
    for key in ("final_train_loss", "eval_accuracy", "skipped_steps",
                "final_loss_scale", "train_s"):
      assert row[key] is not None, key
    assert 0.0 <= row["eval_accuracy"] <= 1.0
    assert row["batch_stats_dtypes"] == ["float32"]
    assert len(row["loss_curve"]) == 4
  records = mpjax.read_metrics(str(directory / "metrics.jsonl"))
  assert [r["run"] for r in records] == [c for c in configs for _ in range(4)]


def test_linen_script_trains_and_writes_its_table(linen_run, capsys):
  result, directory = linen_run
  check_written(result, directory, "linen", ["float32", "mixed_float16"])
  assert result["rows"][0]["eval_gap_points"] == 0.0


def test_nnx_script_trains_and_writes_its_table(tmp_path, capsys):
  result = resnet_nnx.main(
      ["resnet.py", *TINY, "--configs", "mixed_bfloat16",
       "--json", str(tmp_path / "resnet.json"), "--metrics",
       str(tmp_path / "metrics.jsonl")])
  check_written(result, tmp_path, "nnx", ["mixed_bfloat16"])
  out = capsys.readouterr().out
  assert "| mixed_bfloat16 |" in out and "eval acc" in out


def test_interrupted_run_resumes_bit_identically_with_its_batch_stats(
    linen_run, tmp_path):
  full = linen_run[0]["rows"][1]
  common = [*TINY, "--configs", "mixed_float16", "--metrics", "",
            "--checkpoint-dir", str(tmp_path)]
  resnet_linen.main(["resnet.py", *common, "--stop-after", "2",  # preempted
                     "--json", str(tmp_path / "b.json")])
  resumed = resnet_linen.main(
      ["resnet.py", *common, "--json", str(tmp_path / "c.json"),
       "--resume"])["rows"][0]
  assert resumed["resumed_at_step"] == 2
  assert resumed["loss_curve"] == full["loss_curve"][2:]
  # Eval uses the running averages: equal only if they were restored too.
  assert resumed["eval_loss"] == full["eval_loss"]
  assert resumed["eval_accuracy"] == full["eval_accuracy"]


def test_gap_check_names_the_runs_more_than_the_limit_from_float32():
  rows = [{"config": "float32", "eval_gap_points": 0.0},
          {"config": "mixed_bfloat16", "eval_gap_points": -3.5},
          {"config": "mixed_float16", "eval_gap_points": 1.0}]
  assert resnet_common.gap_failures(rows, 3.0) == ["mixed_bfloat16"]
  assert resnet_common.gap_failures(rows, 0.5) == ["mixed_bfloat16",
                                                    "mixed_float16"]
