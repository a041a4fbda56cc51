"""Tests for mpjax/_src/casting.py: floating leaves cast, NNX objects kept."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mpjax._src.casting import cast_floating

BF16 = jnp.bfloat16


def test_cast_floating_leaves_ints_keys_and_nnx_objects_alone():
  rngs = nnx.Rngs(0)
  key = jax.random.key(0)
  tree = {"x": jnp.ones(2), "n": np.ones(2, np.float32), "i": jnp.ones(2, int),
          "k": key, "r": rngs, "s": "text"}
  out = cast_floating(tree, BF16)
  assert out["x"].dtype == BF16 and out["n"].dtype == BF16
  assert out["i"] is tree["i"]
  assert out["k"] is key and out["r"] is rngs and out["s"] == "text"
