"""Test helpers: a tiny MLP train state, a loss whose gradients go inf at will.

Shared by tests/test_attribution.py and tests/test_skip_guard.py.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax

import models
import mpjax
import seed_mlp


def tiny_batch(n=8, features=6, classes=3, seed=0):
  rng = np.random.default_rng(seed)
  return {"x": jnp.asarray(rng.random((n, features)), jnp.float32),
          "y": jnp.asarray(rng.integers(0, classes, n), jnp.int32)}


def make_state(policy="float32", tx=None):
  model = models.MLP(hidden=(8,), num_classes=3)
  params = model.init(jax.random.key(0), tiny_batch()["x"])["params"]
  tx = tx or mpjax.loss_scaled(optax.sgd(0.1), mpjax.NoScaling())
  return mpjax.TrainState.create(apply_fn=model.apply, params=params, tx=tx,
                                 policy=policy)


@jax.custom_vjp
def inf_cotangent(x, poison):
  """Identity whose backward pass returns inf cotangents where `poison`."""
  del poison
  return x


def _inf_fwd(x, poison):
  return x, poison


def _inf_bwd(poison, g):
  bad = jax.tree.map(lambda t: jnp.where(poison, jnp.inf, t), g)
  return bad, jnp.zeros_like(poison)


inf_cotangent.defvjp(_inf_fwd, _inf_bwd)


def poisoned_loss_fn(layer):
  """seed_mlp.loss_fn whose `layer` gets inf gradients when batch['poison']."""
  def loss_fn(params, batch, apply_fn, rng):
    params = dict(params)
    params[layer] = inf_cotangent(params[layer], batch["poison"])
    return seed_mlp.loss_fn(params, batch, apply_fn, rng)
  return loss_fn
