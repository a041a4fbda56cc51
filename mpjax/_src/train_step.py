"""`make_train_step`: a jit-compiled mixed-precision Flax train step."""

import functools
import warnings
from typing import Any, Callable, Dict, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from mpjax._src import grad_stats as grad_stats_lib
from mpjax._src import linen_policy
from mpjax._src import policy_map as module_policy
from mpjax._src import policy as policy_lib
from mpjax._src import sharding as sharding_lib
from mpjax._src import train_state as train_state_lib
from mpjax._src import loss_scaled as loss_scaled_lib

LossFn = Callable[..., Any]


def with_policy(apply_fn: Callable, policy: policy_lib.PolicyLike) -> Callable:
  """Wraps a model's apply function to run under a whole-model `policy`.

  The wrapper casts the floating leaves of every argument (the variables dict
  included) to ``policy.compute_dtype`` and the floating leaves of the result
  to ``policy.output_dtype``. Integer inputs (token ids), PRNG keys and
  non-array arguments pass untouched. Differentiating through it with respect
  to float32 params gives float32 gradients: the casts are part of the graph.

  With a `mpjax.PolicyMap` the policy is per module instead (float32
  islands, overrides by class and path): for linen, `apply_fn` is
  ``model.apply`` (or a function of ``(variables, ...)`` that calls it) and
  each module casts at its own boundary; for NNX, `apply_fn` calls a model
  prepared with ``mpjax.with_nnx_policy(model, policy_map)``. See
  `mpjax._src.linen_policy.with_policy_map`.

  Args:
    apply_fn: e.g. ``model.apply``.
    policy: a preset name, a jmp policy string, a `jmp.Policy` or a
      `PolicyMap`.

  Returns:
    A function with the signature of `apply_fn`.
  """
  if isinstance(policy, module_policy.PolicyMap):
    return linen_policy.with_policy_map(apply_fn, policy)
  policy = policy_lib.get_policy(policy)

  @functools.wraps(apply_fn)
  def apply(*args, **kwargs):
    args, kwargs = policy.cast_to_compute((args, kwargs))
    return policy.cast_to_output(apply_fn(*args, **kwargs))

  return apply


def make_train_step(loss_fn: LossFn, *, has_aux: bool = False,
                    donate: bool = True, attribution: bool = False,
                    grad_stats_every: int = 0, grad_stats_dtype: Any = None,
                    sharding: Optional[sharding_lib.ShardingPlan] = None
                    ) -> Callable:
  """Returns a jit-compiled ``step(state, batch) -> (state, metrics)``.

  `loss_fn` is called as ``loss_fn(params, batch, apply_fn, rng)``:

  - ``params`` are the float32 master params (differentiate-able; use them for
    weight decay or anything else that should stay in float32);
  - ``apply_fn`` is ``with_policy(state.apply_fn, state.policy)``: it casts the
    params and inputs to the compute dtype and the model's output to the
    output dtype;
  - ``rng`` is ``jax.random.fold_in(state.rng, state.step)``, or None when the
    state has no key.

  It returns a scalar loss (or ``(loss, aux)`` with ``has_aux=True``); the loss
  is upcast to float32 before it is scaled.

  The step multiplies the loss by the current loss scale (when ``state.tx``
  contains a `loss_scaled` transformation), differentiates with respect to
  the master params and applies ``state.tx``, which unscales, skips
  non-finite steps and adjusts the scale. The input state is donated.

  Metrics (all scalars): ``loss`` (float32, unscaled), ``loss_scale`` (the
  float32 scale this step's loss was multiplied by), ``grads_finite`` (bool,
  the decision of the last optimizer update), ``grad_norm`` (float32 global
  norm of the unscaled gradients; inf/NaN on a skipped step),
  ``skipped_steps`` (int32 total), ``consecutive_skips`` (int32, skipped
  steps in a row up to this one), ``aux`` with ``has_aux=True``,
  ``grad_stats`` (a `GradStats`) with ``grad_stats_every=N``, and with
  ``attribution=True`` ``leaf_grads_finite``: bool [num_param_leaves], whether
  each leaf's gradient was finite, in `jax.tree.leaves(params)` order (the
  same per-leaf reduction the skip decision used); name the false ones with
  ``mpjax.nonfinite_leaf_paths(flags, like=state.params)``.

  Args:
    loss_fn: see above.
    has_aux: whether `loss_fn` returns ``(loss, aux)``.
    donate: donate the input state's buffers to the output (saves memory;
      the state passed in must not be used again).
    attribution: add ``leaf_grads_finite`` to the metrics (one bool per
      parameter leaf, packed in one vector).
    grad_stats_every: when N > 0, add ``grad_stats`` (`mpjax.grad_stats` of
      the unscaled gradients at this step's scale) computed on steps where
      ``state.step % N == 0`` and zeros (``computed=False``) elsewhere.
    grad_stats_dtype: the dtype the statistics measure underflow against;
      default the policy's compute dtype when it is 16-bit, else float16
      (what float16 would lose).
    sharding: a `ShardingPlan` (`mpjax.data_parallel(mesh)`,
      `mpjax.fsdp(mesh)`): the step is jitted with the plan's shardings of
      the state and batch as input and output shardings, metrics replicated.
      Place the state with ``plan.shard_state`` first. The skip decision and
      the loss-scale update are global across devices and hosts.

  Returns:
    The jit-compiled step.
  """
  if not callable(loss_fn):
    raise TypeError(f"make_train_step: loss_fn must be callable, got {loss_fn!r}.")
  for name, flag in (("has_aux", has_aux), ("donate", donate),
                     ("attribution", attribution)):
    if not isinstance(flag, bool):
      raise TypeError(f"make_train_step: {name} must be a bool, got {flag!r}.")
  if (isinstance(grad_stats_every, bool) or not isinstance(grad_stats_every, int)
      or grad_stats_every < 0):
    raise ValueError("make_train_step: grad_stats_every must be an int >= 0, "
                     f"got {grad_stats_every!r}.")

  def step(state: train_state_lib.TrainState,
           batch: Any) -> Tuple[train_state_lib.TrainState, Dict[str, Any]]:
    if not isinstance(state, train_state_lib.TrainState):
      raise TypeError(
          "make_train_step: the state must be an mpjax.TrainState, got "
          f"{type(state).__name__}.")
    policy = state.policy
    if policy is None:
      raise ValueError(
          "make_train_step: the state has no policy; build it with "
          "mpjax.TrainState.create(..., policy='mixed_bfloat16').")
    scaled_states = loss_scaled_lib.find_loss_scaled_states(state.opt_state)
    if scaled_states:
      scale = loss_scaled_lib.loss_scale_state(state.opt_state).scale
      if loss_scaled_lib.loss_scaled_inside_multisteps(state.opt_state):
        warnings.warn(
            "mpjax.loss_scaled is inside optax.MultiSteps: one non-finite "
            "micro-batch will poison every later accumulation window (MultiSteps "
            "resets its accumulator as acc * 0 and inf * 0 is NaN). Use "
            "mpjax.loss_scaled(optax.MultiSteps(inner, k), scaling) instead.",
            stacklevel=2)
    else:
      scale = jnp.ones([], jnp.float32)
      if jnp.dtype(policy.compute_dtype) == jnp.float16:
        warnings.warn(
            f"Training with float16 compute ({policy_lib.policy_name(policy)}) "
            "without loss scaling: small gradients underflow to zero in "
            "float16. Wrap the optimizer: mpjax.loss_scaled(tx, "
            "mpjax.DynamicScaling.like_torch()).", stacklevel=2)
    apply_fn = with_policy(state.apply_fn, policy)
    rng = None if state.rng is None else jax.random.fold_in(state.rng,
                                                            state.step)

    def scaled_loss_fn(params):
      out = loss_fn(params, batch, apply_fn, rng)
      loss, aux = out if has_aux else (out, None)
      loss = jnp.asarray(loss)
      if loss.shape != () or not jnp.issubdtype(loss.dtype, jnp.floating):
        raise ValueError(
            "make_train_step: loss_fn must return a floating scalar loss, got "
            f"shape {loss.shape} dtype {loss.dtype}.")
      loss = loss.astype(jnp.float32)
      return loss * scale, (loss, aux)

    grads, (loss, aux) = jax.grad(scaled_loss_fn, has_aux=True)(state.params)
    new_state = state.apply_gradients(grads=grads)
    unscaled = loss_scaled_lib.unscale_gradients(grads, scale)
    if scaled_states:
      new_scaled = loss_scaled_lib.loss_scale_state(new_state.opt_state)
      grads_finite = new_scaled.last_grads_finite
      leaf_finite = new_scaled.leaf_grads_finite
      skipped = new_scaled.skipped_steps
      consecutive = new_scaled.consecutive_skips
    else:
      leaf_finite = loss_scaled_lib.finite_flags(unscaled)
      grads_finite = jnp.all(leaf_finite)
      skipped = jnp.zeros([], jnp.int32)
      consecutive = jnp.zeros([], jnp.int32)
    metrics = {
        "loss": loss,
        "loss_scale": scale,
        "grads_finite": grads_finite,
        "grad_norm": optax.tree.norm(unscaled).astype(jnp.float32),
        "skipped_steps": skipped,
        "consecutive_skips": consecutive,
    }
    if has_aux:
      metrics["aux"] = aux
    if attribution:
      metrics["leaf_grads_finite"] = leaf_finite
    if grad_stats_every:
      dtype = grad_stats_dtype
      if dtype is None:
        compute = jnp.dtype(policy.compute_dtype)
        dtype = compute if compute.itemsize == 2 else jnp.float16
      metrics["grad_stats"] = grad_stats_lib.periodic_grad_stats(
          unscaled, scale, state.step, grad_stats_every, dtype)
    return new_state, metrics

  donate_argnums = (0,) if donate else ()
  if sharding is None:
    return jax.jit(step, donate_argnums=donate_argnums)
  if not isinstance(sharding, sharding_lib.ShardingPlan):
    raise TypeError("make_train_step: sharding must be an mpjax.ShardingPlan "
                    f"(mpjax.data_parallel / mpjax.fsdp), got {sharding!r}.")
  return _ShardedStep(step, sharding, donate_argnums)


class _ShardedStep:
  """`step` jitted with a plan's shardings, built per state/batch structure.

  The shardings depend on the state's tree and shapes, which are only known
  at the first call; one jitted function is kept per structure, so a run
  compiles once.
  """

  def __init__(self, step: Callable, plan: sharding_lib.ShardingPlan,
               donate_argnums: Tuple[int, ...]):
    self._step, self._plan, self._donate = step, plan, donate_argnums
    self._jitted = {}

  def _for(self, state, batch):
    key = jax.tree.structure((state, batch)), tuple(
        (np.shape(x), str(getattr(x, "dtype", type(x))))
        for x in jax.tree.leaves((state, batch)))
    if key not in self._jitted:
      state_shardings = self._plan.state_shardings(state)
      self._jitted[key] = jax.jit(
          self._step,
          in_shardings=(state_shardings, self._plan.batch_shardings(batch)),
          out_shardings=(state_shardings, self._plan.replicated),
          donate_argnums=self._donate)
    return self._jitted[key]

  def __call__(self, state, batch):
    return self._for(state, batch)(state, batch)

  def lower(self, state, batch):
    return self._for(state, batch).lower(state, batch)
