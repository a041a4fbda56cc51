"""Subprocess half of tests/test_checkpoint.py (needs its own process).

  python tests/checkpoint_worker.py kill {save,manager} DIR
      Trains a state, saves it (the "good" checkpoint) and writes its arrays to
      DIR/good.npz; trains one more step and starts saving that, but blocks in
      orbax's commit (all arrays written into the temporary directory, the
      rename not yet done) after writing DIR/ready. The parent then SIGKILLs it.

  XLA_FLAGS=--xla_force_host_platform_device_count=8 \
  python tests/checkpoint_worker.py reshard DIR
      Saves a state sharded on an (8,) mesh and restores it onto a (2, 4) mesh
      and onto one device; asserts values and shardings, prints "reshard ok".
"""

import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "experiments"))
import mpjax  # pylint: disable=g-import-not-at-top,wrong-import-position
from mpjax._src import checkpoint  # pylint: disable=g-import-not-at-top,wrong-import-position
import models  # pylint: disable=g-import-not-at-top,wrong-import-position
import seed_mlp  # pylint: disable=g-import-not-at-top,wrong-import-position

# ~1.3M params: Adam's mu and nu make the saved state about 16 MB.
BIG = dict(features=256, hidden=(1024, 1024), classes=4)
SMALL = dict(features=8, hidden=(16,), classes=8)


def batch(features, classes, n=16, seed=0):
  rng = np.random.default_rng(seed)
  return {"x": jnp.asarray(rng.random((n, features)), jnp.float32),
          "y": jnp.asarray(rng.integers(0, classes, n), jnp.int32)}


def build_state(features, hidden, classes, seed=0, rng_seed=0):
  """A mixed_float16 state with dynamic loss scaling and a key."""
  model = models.MLP(hidden=hidden, num_classes=classes)
  params = model.init(jax.random.key(seed),
                      jnp.zeros((1, features), jnp.float32))["params"]
  tx = mpjax.loss_scaled(optax.adam(1e-3), mpjax.DynamicScaling(
      initial_scale=2.0**10, growth_interval=2))
  return mpjax.TrainState.create(apply_fn=model.apply, params=params, tx=tx,
                                 policy="mixed_float16",
                                 rng=jax.random.key(rng_seed))


def host_arrays(state):
  """Every leaf as numpy (key data for keys), in flattening order."""
  out = []
  for x in jax.tree.leaves(state):
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
      x = jax.random.key_data(x)
    out.append(np.asarray(x))
  return out


def kill(api, directory):
  state = build_state(**BIG)
  step = mpjax.make_train_step(seed_mlp.loss_fn)
  data = batch(BIG["features"], BIG["classes"])
  for _ in range(2):
    state, _ = step(state, data)
  manager = checkpoint.CheckpointManager(os.path.join(directory, "managed"),
                                         max_to_keep=1)
  if api == "save":
    checkpoint.save(os.path.join(directory, "good"), state)
  else:
    manager.save(state)
  np.savez(os.path.join(directory, "good.npz"), *host_arrays(state))
  state, _ = step(state, data)

  def block_before_commit(self):
    del self
    with open(os.path.join(directory, "ready"), "w") as f:
      f.write(str(os.getpid()))
    time.sleep(600)
    raise AssertionError("the parent should have killed this process")

  # Runs when every array and metadata file is in the temporary directory.
  ocp.path.atomicity.AtomicRenameTemporaryPath.finalize = block_before_commit
  if api == "save":
    checkpoint.save(os.path.join(directory, "next"), state)
  else:
    manager.save(state)
  raise AssertionError("the save should have blocked")


def shard_state(state, mesh, spec_for):
  def put(x):
    return jax.device_put(x, NamedSharding(mesh, spec_for(x)))
  return jax.tree.map(put, state)


def reshard(directory):
  assert jax.device_count() == 8, jax.devices()
  devices = np.array(jax.devices())
  mesh8 = Mesh(devices.reshape(8), ("data",))
  mesh24 = Mesh(devices.reshape(2, 4), ("data", "model"))

  state = build_state(**SMALL)
  step = mpjax.make_train_step(seed_mlp.loss_fn)
  for i in range(3):
    state, _ = step(state, batch(SMALL["features"], SMALL["classes"], seed=i))
  # FSDP-like on 8 devices: shard dim 0 where it divides by 8.
  saved = shard_state(state, mesh8, lambda x: P("data") if (
      x.ndim >= 1 and x.shape[0] % 8 == 0) else P())
  kernel = saved.params["Dense_0"]["kernel"]
  assert kernel.sharding.spec == P("data") and len(
      kernel.addressable_shards) == 8, kernel.sharding
  expected = host_arrays(saved)
  path = os.path.join(directory, "ckpt")
  checkpoint.save(path, saved)

  # Another mesh shape and another partitioning: 2-D leaves (data, model),
  # 1-D leaves over "model" where they divide by 4, the rest replicated.
  def spec24(x):
    if x.ndim == 2:
      return P("data", "model")
    if x.ndim == 1 and x.shape[0] % 4 == 0:
      return P("model")
    return P()

  fresh = build_state(**SMALL, seed=1, rng_seed=5)
  on_mesh24 = shard_state(fresh, mesh24, spec24)
  targets = {
      "mesh (2, 4)": on_mesh24,
      "one device": jax.device_put(fresh, jax.devices()[3]),
      "abstract, mesh (2, 4)": jax.tree.map(
          lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
          on_mesh24),
  }
  for what, like in targets.items():
    restored = checkpoint.restore(path, like)
    got = host_arrays(restored)
    assert len(got) == len(expected), what
    for a, b in zip(got, expected):
      np.testing.assert_array_equal(a, b, err_msg=what)
      assert a.dtype == b.dtype, (what, a.dtype, b.dtype)
    for r, l in zip(jax.tree.leaves(restored), jax.tree.leaves(like)):
      assert r.sharding.is_equivalent_to(l.sharding, r.ndim), (
          what, r.sharding, l.sharding)
    assert restored.policy == like.policy and restored.tx is like.tx, what
  restored = checkpoint.restore(path, targets["mesh (2, 4)"])
  kernel = restored.params["Dense_0"]["kernel"]
  assert kernel.sharding.spec == P("data", "model") and len(
      kernel.addressable_shards) == 8, kernel.sharding
  # The restored state trains on the new mesh.
  restored, metrics = step(restored, batch(SMALL["features"], SMALL["classes"]))
  assert bool(metrics["grads_finite"]) and int(restored.step) == 4
  print("reshard ok")


if __name__ == "__main__":
  mode = sys.argv[1]
  if mode == "kill":
    kill(sys.argv[2], sys.argv[3])
  elif mode == "reshard":
    reshard(sys.argv[2])
  else:
    raise SystemExit(f"unknown mode {mode!r}")
