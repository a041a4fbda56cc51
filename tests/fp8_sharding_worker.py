"""Runs the fp8 train step on 1 and on 4 CPU devices; prints the fp8 states.

Started by tests/test_fp8_train.py with XLA_FLAGS=
--xla_force_host_platform_device_count=4 (the device count is fixed when jax
starts, hence the subprocess). The last stdout line is JSON.
"""

import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import test_fp8_train as t  # pylint: disable=g-import-not-at-top,wrong-import-position

import mpjax  # pylint: disable=g-import-not-at-top,wrong-import-position


def batch(step):
  # Each device's shard has a different gradient amax; the largest is on
  # one shard only: a per-device max would miss it on the others.
  x = jax.random.normal(jax.random.key(step), (8, 6))
  c = jnp.full((8, 4), 0.25).at[5, 1].set(3.0 + step)
  return {"x": x, "c": c}


def run(plan):
  state = t.linen_state(mpjax.loss_scaled(optax.sgd(0.01), mpjax.NoScaling()))
  if plan is not None:
    state = plan.shard_state(state)
  step = mpjax.make_train_step(t.loss_fn, sharding=plan)
  for i in range(3):
    state, _ = step(state, batch(i))
  return jax.tree.map(lambda a: np.asarray(a).tolist(),
                      state.model_state[t.OWG])


def main():
  assert jax.device_count() == 4, jax.devices()
  out = {"single": run(None),
         "data_parallel_4": run(mpjax.data_parallel(
             jax.make_mesh((4,), ("data",))))}
  print(json.dumps(out))


if __name__ == "__main__":
  main()
