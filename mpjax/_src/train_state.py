"""`TrainState`: flax's TrainState that also carries the model's state, a
precision policy and a key."""

from typing import Any, Callable, Mapping, Optional

import flax.struct
import jax
import jax.numpy as jnp
import jmp
import optax
from flax import nnx
from flax.training import train_state

from mpjax._src import loss_scaled as loss_scaled_lib
from mpjax._src import nnx_apply
from mpjax._src import nnx_policy
from mpjax._src import policy as policy_lib


class TrainState(train_state.TrainState):
  """A `flax.training.train_state.TrainState` with model state, policy and key.

  Attributes:
    step: int32 [], number of `apply_gradients` calls (skipped steps included;
      the loss-scale state counts applied and skipped steps separately).
    apply_fn: the model's apply function (static).
    params: the master parameters, in ``policy.param_dtype``.
    tx: the optax transformation (static); wrap it with `mpjax.loss_scaled` for
      loss scaling and non-finite step skipping.
    opt_state: the state of `tx`.
    model_state: a dict of the model's non-param collections, or None:
      linen's mutable collections (``{"batch_stats": ...}``) or, for NNX
      (`TrainState.from_nnx`), its non-Param variables grouped as
      ``"batch_stats"``, ``"rngs"`` and ``"state"``. `make_train_step`
      hands them to the model with every forward pass and keeps what the
      pass writes (BatchNorm's running statistics, NNX RNG counts); a
      skipped step leaves them bit-identical. No policy ever casts them:
      they keep the dtypes they were created in.
    policy: the `jmp.Policy` the train step casts with (static), or a
      `mpjax.PolicyMap` (per-module policies; a `jmp.Policy` whose dtypes are
      its default's, so the master params are stored in its param dtype).
    rng: a PRNG key or None. `make_train_step` hands
      ``jax.random.fold_in(rng, step)`` to the loss function, so the key itself
      never changes and a resumed run draws the same numbers.
  """

  policy: jmp.Policy = flax.struct.field(pytree_node=False, default=None)
  rng: Optional[jax.Array] = None
  model_state: Optional[Mapping[str, Any]] = None

  @property
  def variables(self) -> dict:
    """``{"params": params, **model_state}``: what ``apply_fn`` takes."""
    return {"params": self.params, **(self.model_state or {})}

  @classmethod
  def create(cls, *, apply_fn: Callable, params: Any,
             tx: optax.GradientTransformation,
             policy: policy_lib.PolicyLike = "float32",
             rng: Optional[jax.Array] = None,
             model_state: Optional[Mapping[str, Any]] = None,
             **kwargs) -> "TrainState":
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
      model_state: the model's other collections, e.g.
        ``{"batch_stats": variables["batch_stats"]}`` for a linen model with
        BatchNorm; never cast.
      **kwargs: further fields of a subclass.

    Raises:
      TypeError: `model_state` is not a dict of collections.
      ValueError: `model_state` has a ``"params"`` collection, or `tx` has a
        `mpjax.loss_scaled` that is not its outermost transformation.
    """
    policy = policy_lib.get_policy(policy)
    model_state = _check_model_state(model_state)
    given = {id(x) for x in jax.tree.leaves((params, rng, model_state))}
    params = policy.cast_to_param(params)
    opt_state = tx.init(params)
    if loss_scaled_lib.find_loss_scaled_states(opt_state):
      loss_scaled_lib.loss_scale_state(opt_state)  # raises if misplaced
    state = cls(step=jnp.zeros([], jnp.int32), apply_fn=apply_fn,
                params=params, tx=tx, opt_state=opt_state,
                policy=policy, rng=rng, model_state=model_state, **kwargs)
    return _own_buffers(state, given)

  @classmethod
  def from_nnx(cls, model: nnx.Module, *, tx: optax.GradientTransformation,
               policy: Optional[policy_lib.PolicyLike] = None,
               rng: Optional[jax.Array] = None, **kwargs) -> "TrainState":
    """Creates a state from an NNX model: params, model state and apply_fn.

    The model is split into its `nnx.Param` state (the master params) and
    its other variables (``model_state``: ``"batch_stats"``, ``"rngs"``,
    ``"state"``); ``apply_fn`` is an `NNXApply` that takes
    ``(variables, *args, **kwargs)`` like linen's ``model.apply`` and merges
    the module inside the step. Set the model's mode (``model.train()``)
    before: the mode is part of the graph definition. For evaluation,
    ``module = state.apply_fn.merge(state.variables); module.eval()``.

    Args:
      model: the NNX module. With `policy`, it is prepared in place with
        `mpjax.with_nnx_policy(model, policy)` first; without, the map it
        was prepared with is used (float32 if none).
      tx: the optax transformation.
      policy: a `PolicyMap`, a preset, a jmp string or a `jmp.Policy`.
      rng: an optional key, handed to ``loss_fn`` as in `create`. NNX layers
        such as `nnx.Dropout` draw from their own ``nnx.Rngs`` streams, which
        travel in ``model_state["rngs"]`` (so a resumed run draws the same
        numbers too).
      **kwargs: further fields of a subclass.
    """
    if not isinstance(model, nnx.Module):
      raise TypeError(
          "TrainState.from_nnx: model must be an nnx.Module, got "
          f"{type(model).__name__}; for linen use TrainState.create("
          "apply_fn=model.apply, params=..., model_state=...).")
    if policy is not None:
      nnx_policy.with_nnx_policy(model, policy)
    prepared = nnx_policy.policy_map_of(model)
    policy = "float32" if prepared is None else prepared
    graphdef, params, model_state = nnx_apply.split(model)
    return cls.create(
        apply_fn=nnx_apply.NNXApply(graphdef, tuple(model_state)),
        params=params, tx=tx, policy=policy, rng=rng,
        model_state=model_state or None, **kwargs)


def _check_model_state(model_state: Any) -> Optional[dict]:
  if model_state is None:
    return None
  if not isinstance(model_state, Mapping):
    raise TypeError(
        "TrainState.create: model_state must be a dict of collections such "
        "as {'batch_stats': variables['batch_stats']}, got "
        f"{type(model_state).__name__}.")
  for name in model_state:
    if not isinstance(name, str):
      raise TypeError(
          f"TrainState.create: model_state collection names must be str, got "
          f"{name!r}.")
  if "params" in model_state:
    raise ValueError(
        "TrainState.create: model_state must not hold 'params' (pass them as "
        "params=); it holds the other collections, e.g. 'batch_stats'.")
  return dict(model_state)


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
