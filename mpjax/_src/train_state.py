"""`TrainState`: flax's TrainState that also carries a precision policy and a key."""

from typing import Any, Callable, Optional

import flax.struct
import jax
import jax.numpy as jnp
import jmp
import optax
from flax.training import train_state

from mpjax._src import policy as policy_lib


class TrainState(train_state.TrainState):
  """A `flax.training.train_state.TrainState` with a policy and an RNG key.

  Attributes:
    step: int32 [], number of `apply_gradients` calls (skipped steps included;
      the loss-scale state counts applied and skipped steps separately).
    apply_fn: the model's apply function (static).
    params: the master parameters, in ``policy.param_dtype``.
    tx: the optax transformation (static); wrap it with `mpjax.loss_scaled` for
      loss scaling and non-finite step skipping.
    opt_state: the state of `tx`.
    policy: the `jmp.Policy` the train step casts with (static), or a
      `mpjax.PolicyMap` (per-module policies; a `jmp.Policy` whose dtypes are
      its default's, so the master params are stored in its param dtype).
    rng: a PRNG key or None. `make_train_step` hands
      ``jax.random.fold_in(rng, step)`` to the loss function, so the key itself
      never changes and a resumed run draws the same numbers.
  """

  policy: jmp.Policy = flax.struct.field(pytree_node=False, default=None)
  rng: Optional[jax.Array] = None

  @classmethod
  def create(cls, *, apply_fn: Callable, params: Any,
             tx: optax.GradientTransformation,
             policy: policy_lib.PolicyLike = "float32",
             rng: Optional[jax.Array] = None, **kwargs) -> "TrainState":
    """Creates a state with ``step = 0`` and params cast to the param dtype.

    The state owns its buffers: arrays passed in are copied rather than
    aliased, so donating the state to the train step never deletes the
    caller's `params`.

    Args:
      apply_fn: the model's apply function, e.g. ``model.apply``.
      params: the initial parameters; floating leaves are cast to
        ``policy.param_dtype`` (the master copy), other leaves are kept.
      tx: the optax transformation.
      policy: a preset name, a jmp policy string, a `jmp.Policy` or a
        `mpjax.PolicyMap` (params are stored in its param dtype, float32 for
        the mixed presets; the train step applies it per module).
      rng: an optional PRNG key for dropout and other randomness.
      **kwargs: further fields of a subclass.
    """
    policy = policy_lib.get_policy(policy)
    given = {id(x) for x in jax.tree.leaves((params, rng))}
    params = policy.cast_to_param(params)
    state = cls(step=jnp.zeros([], jnp.int32), apply_fn=apply_fn,
                params=params, tx=tx, opt_state=tx.init(params),
                policy=policy, rng=rng, **kwargs)
    return _own_buffers(state, given)


def _own_buffers(state: TrainState, given: set) -> TrainState:
  """Copies every array leaf that is the caller's or appears twice.

  The train step donates the state: an array the caller still holds (params
  passed in unchanged by a no-op cast) would be deleted under them, and an
  array reachable twice (an optimizer whose init keeps a reference to the
  params, such as lookahead) cannot be donated at all.
  """
  seen = set(given)

  def own(x):
    if not isinstance(x, jax.Array):
      return x
    if id(x) in seen:
      return jnp.copy(x)
    seen.add(id(x))
    return x

  return jax.tree.map(own, state)
