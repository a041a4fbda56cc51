"""Compiling for a GPU target on a CPU-only machine (mpjax.gpu_target).

Needs the gpu-compile extra, which the test extra includes; CI runs these.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mpjax
from mpjax._src import gpu_target as gpu_target_lib

import bench_models


def _seed_mlp(policy="mixed_bfloat16"):
  spec = bench_models.cpu_models()["mlp"]
  pol = next(p for p in bench_models.POLICIES if p.name == policy)
  state, batch, _, _ = bench_models.build(spec, pol, abstract=True)
  return spec, state, batch


@pytest.mark.parametrize("name", mpjax._src.gpu_target.target_names())
def test_every_shipped_spec_gives_devices_of_its_kind(name):
  target = mpjax.gpu_target(name)
  devices = mpjax.target_devices(name)
  assert len(devices) == 1
  assert devices[0].device_kind == target.device_kind
  assert devices[0].platform == "gpu"
  assert jax.devices()[0].platform == "cpu"  # the default backend stays


def test_aliases_and_n_devices():
  assert mpjax.gpu_target("H100").name == "h100_sxm"
  assert mpjax.gpu_target("a100").name == "a100_sxm_80"
  assert len(mpjax.target_devices("b200", 4)) == 4
  mesh = mpjax.target_mesh("h100", (2,), ("data",))
  assert mesh.devices.shape == (2,)


def test_unknown_target_names_the_known_ones():
  with pytest.raises(ValueError, match="h100_sxm"):
    mpjax.gpu_target("v100")
  with pytest.raises(ValueError, match="num_devices"):
    mpjax.target_devices("h100", 0)


def test_peaks_come_from_the_spec():
  h100, b200 = mpjax.gpu_target("h100"), mpjax.gpu_target("b200")
  np.testing.assert_allclose(h100.matmul_flops_per_s["bfloat16"], 989e12,
                             rtol=0.01)
  np.testing.assert_allclose(h100.matmul_flops_per_s["float32"], 495e12,
                             rtol=0.01)  # TF32
  np.testing.assert_allclose(h100.vector_flops_per_s["float32"], 67e12,
                             rtol=0.01)
  np.testing.assert_allclose(h100.hbm_bytes_per_s, 3.35e12, rtol=0.01)
  np.testing.assert_allclose(b200.matmul_flops_per_s["bfloat16"], 2.25e15,
                             rtol=0.02)
  assert h100.compute_capability == "9.0"
  assert b200.compute_capability == "10.0"
  assert h100.memory_bytes > 79e9


def test_missing_plugin_says_what_to_pip_install(monkeypatch):
  monkeypatch.setattr(gpu_target_lib, "_installed_version",
                      lambda package: None)
  gpu_target_lib._devices.cache_clear()
  try:
    with pytest.raises(mpjax.GpuCompileUnavailableError) as info:
      mpjax.target_devices("h100")
  finally:
    gpu_target_lib._devices.cache_clear()
  message = str(info.value)
  assert "pip install 'mpjax[gpu-compile]'" in message
  assert f"jax-cuda12-plugin=={jax.__version__}" in message
  assert f"jax-cuda12-pjrt=={jax.__version__}" in message


def test_plugin_of_another_version_says_both_versions(monkeypatch):
  monkeypatch.setattr(gpu_target_lib, "_installed_version",
                      lambda package: "0.9.1")
  with pytest.raises(mpjax.GpuCompileUnavailableError) as info:
    gpu_target_lib.check_plugin()
  message = str(info.value)
  assert "jax-cuda12-plugin 0.9.1" in message
  assert f"jax's version {jax.__version__}" in message
  assert f"jax-cuda12-plugin=={jax.__version__}" in message


def test_abstract_for_target_places_every_leaf_on_the_target():
  tree = {"w": jnp.ones((4, 8)), "n": 3,
          "s": jax.ShapeDtypeStruct((2,), jnp.bfloat16)}
  out = mpjax.abstract_for_target(tree, "h100")
  device = mpjax.target_devices("h100")[0]
  for leaf in jax.tree.leaves(out):
    assert isinstance(leaf, jax.ShapeDtypeStruct)
    assert leaf.sharding.device_set == {device}
  assert out["s"].dtype == jnp.bfloat16 and out["w"].shape == (4, 8)


def test_seed_mlp_step_compiles_for_h100_from_shapes():
  spec, state, batch = _seed_mlp()
  compiled = mpjax.compile_for_target(mpjax.make_train_step(spec.loss_fn),
                                      state, batch, target="h100")
  text = compiled.as_text()
  assert "__triton" in text or "__cublas" in text  # GPU kernels
  assert compiled.memory_analysis().peak_memory_in_bytes > 0


def test_data_parallel_step_compiles_for_two_h100s():
  spec, state, batch = _seed_mlp()
  plan = mpjax.data_parallel(mpjax.target_mesh("h100", (2,), ("data",)))
  step = mpjax.make_train_step(spec.loss_fn, sharding=plan)
  compiled = mpjax.compile_for_target(step, state, batch, target="h100",
                                      num_devices=2)
  assert "all-reduce" in compiled.as_text()
