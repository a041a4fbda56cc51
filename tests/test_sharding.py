"""Tests for mpjax/_src/sharding.py and sharded make_train_step (8 CPU devices).

The sharded runs happen in a subprocess (tests/sharding_worker.py) because the
number of host devices must be set before jax is first imported.
"""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

import mpjax

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)),
                      "sharding_worker.py")
RUNS = ("data_parallel_8", "fsdp_2x4", "fsdp_8")


@pytest.fixture(scope="module")
def results():
  env = dict(os.environ,
             XLA_FLAGS="--xla_force_host_platform_device_count=8",
             # Fake CPU devices on few cores: run one program at a time.
             JAX_CPU_ENABLE_ASYNC_DISPATCH="false",
             JAX_PLATFORMS="cpu")
  proc = subprocess.run([sys.executable, WORKER], env=env, check=False,
                        capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-4000:]
  return json.loads(proc.stdout.strip().splitlines()[-1])


def test_poisoned_shard_makes_every_device_skip(results):
  expected = [i not in results["poisoned_steps"]
              for i in range(results["steps"])]
  for policy in ("float32", "mixed_float16"):
    for name in ("single",) + RUNS:
      assert results[policy][name]["finite"] == expected, (policy, name)
      assert results[policy][name]["params_finite"], (policy, name)


@pytest.mark.parametrize("name", RUNS)
def test_sharded_float32_params_equal_single_device(results, name):
  run = results["float32"][name]
  assert run["devices"] == 8
  assert run["moved"] > 0.05  # training changed the params a lot...
  assert run["max_param_diff"] < 1e-5, run["max_param_diff"]  # ...alike


@pytest.mark.parametrize("name", RUNS)
def test_sharded_float16_scale_trajectory_equals_single_device(results, name):
  run, single = results["mixed_float16"][name], results["mixed_float16"]["single"]
  assert run["scales"] == single["scales"]
  assert len(set(run["scales"])) > 3  # it grew and backed off
  # float16 partial sums are rounded per device: equal to f16 tolerance.
  assert run["median_param_diff"] < 1e-3, run["median_param_diff"]


def test_loss_scale_state_is_replicated(results):
  for name in RUNS:
    assert "spec=P()" in results["float32"][name]["scale_sharding"], name


def test_layouts_follow_the_plan(results):
  dp = results["float32"]["data_parallel_8"]["layouts"]
  assert set(dp.values()) == {"P()"}
  fsdp = results["float32"]["fsdp_2x4"]["layouts"]
  assert fsdp["['Dense_0']['kernel']"] == "P(None, 'fsdp')"
  assert fsdp["['Dense_2']['kernel']"] == "P('fsdp', None)"
  assert fsdp["['Dense_0']['bias']"] == "P()"  # too small to shard


def test_fsdp_on_8_devices_holds_under_a_fifth_of_the_state(results):
  single = results["float32"]["single"]["argument_bytes_per_device"]
  fsdp8 = results["float32"]["fsdp_8"]["argument_bytes_per_device"]
  dp8 = results["float32"]["data_parallel_8"]["argument_bytes_per_device"]
  assert fsdp8 <= 0.2 * single, (fsdp8, single)
  assert dp8 > 0.9 * single  # replicated: no saving


@pytest.mark.parametrize("name", ["data_parallel_8", "fsdp_8"])
def test_sharded_batch_norm_statistics_equal_single_device(results, name):
  run = results["batch_norm"][name]
  assert run["stats_moved"] > 1e-3  # the statistics were updated...
  assert run["max_stats_diff"] < 1e-5, run  # ...over the global batch
  # 64 elements >= min_shard_elements=32: FSDP shards model state too.
  assert run["mean_spec"] == ("P('fsdp',)" if name == "fsdp_8" else "P()")


def test_plan_rejects_bad_axes_and_batches():
  mesh = jax.make_mesh((1,), ("data",))
  with pytest.raises(ValueError, match="'model'"):
    mpjax.ShardingPlan(mesh=mesh, batch_axes=("model",))
  with pytest.raises(TypeError, match="Mesh"):
    mpjax.ShardingPlan(mesh="mesh", batch_axes=("data",))
  with pytest.raises(ValueError, match="scalar"):
    mpjax.data_parallel(mesh).batch_shardings({"x": np.float32(1.0)})
  with pytest.raises(TypeError, match="ShardingPlan"):
    mpjax.make_train_step(lambda *a: 0.0, sharding=mesh)


def test_leaf_spec_picks_the_largest_divisible_dimension():
  mesh = jax.make_mesh((1,), ("fsdp",))
  plan = mpjax.fsdp(mesh, min_shard_elements=4)
  assert plan.leaf_spec((8, 32)) == jax.sharding.PartitionSpec(None, "fsdp")
  assert plan.leaf_spec((2,)) == jax.sharding.PartitionSpec()
  assert plan.leaf_spec(()) == jax.sharding.PartitionSpec()
  # The boundary: exactly min_shard_elements is sharded, one fewer is not.
  assert plan.leaf_spec((4,)) == jax.sharding.PartitionSpec("fsdp")
  assert plan.leaf_spec((2, 2)) == jax.sharding.PartitionSpec(None, "fsdp")
  assert plan.leaf_spec((3,)) == jax.sharding.PartitionSpec()
  assert mpjax.data_parallel(jax.make_mesh((1,), ("data",))).leaf_spec(
      (1024, 1024)) == jax.sharding.PartitionSpec()


@pytest.mark.parametrize("name", RUNS)
def test_sharded_stochastic_rounding_equals_single_device_bit_for_bit(
    results, name):
  # bfloat16 masters and moments, adamw(rounding="stochastic") under
  # loss_scaled; exact gradients, so only the update could differ.
  single = results["stochastic_rounding"]["single"]
  run = results["stochastic_rounding"][name]
  assert single["finite"] == [True, True, False, True]  # step 2 skipped
  assert run["finite"] == single["finite"]
  assert single["count"] == 3  # the skipped step does not count
  assert single["dtypes"] == ["bfloat16", "int32", "uint32"]
  assert 0.05 < single["changed_fraction"] < 0.95, single
  assert run["params_bit_equal"], name
  assert run["mu_nu_bit_equal"], name
  assert run["key_count_bit_equal"], name
  assert run["kernel_spec"] == ("P()" if name == "data_parallel_8"
                                else "P(None, 'fsdp')")
