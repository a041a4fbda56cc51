"""`make_train_step`: a jit-compiled mixed-precision Flax train step."""

import warnings
from typing import Any, Callable, Dict, Mapping, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from mpjax._src import gpu_target as gpu_target_lib
from mpjax._src import grad_stats as grad_stats_lib
from mpjax._src import model_state as model_state_lib
from mpjax._src import policy as policy_lib
from mpjax._src import sharding as sharding_lib
from mpjax._src import train_state as train_state_lib
from mpjax._src import loss_scaled as loss_scaled_lib

LossFn = Callable[..., Any]


def make_train_step(loss_fn: LossFn, *, has_aux: bool = False,
                    donate: bool = True, attribution: bool = False,
                    grad_stats_every: int = 0, grad_stats_dtype: Any = None,
                    sharding: Optional[sharding_lib.ShardingPlan] = None,
                    compiler_options: Optional[Mapping[str, Any]] = None
                    ) -> Callable:
  """Returns a jit-compiled ``step(state, batch) -> (state, metrics)``.

  `loss_fn` is called as ``loss_fn(params, batch, apply_fn, rng)``:

  - ``params`` are the float32 master params (differentiate-able; use them for
    weight decay or anything else that should stay in float32);
  - ``apply_fn`` is ``with_policy(state.apply_fn, state.policy)``: it casts the
    params and inputs to the compute dtype and the model's output to the
    output dtype. Call it with ``{"params": params}``: when the state has a
    ``model_state`` (BatchNorm's ``batch_stats``, NNX RNG counts), each call
    adds its collections to the variables and marks them mutable, and what
    the forward pass writes becomes the new state's ``model_state`` (see
    `mpjax.TrainState`); the call returns the model's output alone, as
    without state. The ``"_overwrite_with_gradient"`` collection
    (`mpjax.OVERWRITE_WITH_GRADIENT`: fp8 scales and amax histories) is
    differentiated too, and its gradient becomes its new value; it is never
    unscaled nor seen by the optimizer. A skipped step keeps the old model
    state;
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
    compiler_options: XLA options for this step's compilation, passed to
      ``jax.jit(..., compiler_options=...)``. None (the default) means
      `mpjax.FAITHFUL_ROUNDING`, ``{"xla_allow_excess_precision": False}``:
      every 16-bit rounding the policy asks for stays in the compiled
      program (XLA's own default lets a GPU fusion read float32 values in
      their place and keep them alive: GPT-2's mixed step then needs as
      much memory as float32); ``{}`` gives XLA's defaults.

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
      # Raises when loss_scaled is not the outermost transformation.
      scale = loss_scaled_lib.loss_scale_state(state.opt_state).scale
    else:
      scale = jnp.ones([], jnp.float32)
      if jnp.dtype(policy.compute_dtype) == jnp.float16:
        warnings.warn(
            f"Training with float16 compute ({policy_lib.policy_name(policy)}) "
            "without loss scaling: small gradients underflow to zero in "
            "float16. Wrap the optimizer: mpjax.loss_scaled(tx, "
            "mpjax.DynamicScaling.like_torch()).", stacklevel=2)
    apply_fn = policy_lib.with_policy(state.apply_fn, policy)
    rng = None if state.rng is None else jax.random.fold_in(state.rng,
                                                            state.step)

    gradient_state = model_state_lib.gradient_collection(state.model_state)

    def scaled_loss_fn(params, gradient_state):
      thread = None
      model_apply = apply_fn
      if state.model_state is not None:
        thread = model_state_lib.ModelStateThread(
            apply_fn, model_state_lib.with_gradient_collection(
                state.model_state, gradient_state))
        model_apply = thread
      out = loss_fn(params, batch, model_apply, rng)
      loss, aux = out if has_aux else (out, None)
      loss = jnp.asarray(loss)
      if loss.shape != () or not jnp.issubdtype(loss.dtype, jnp.floating):
        raise ValueError(
            "make_train_step: loss_fn must return a floating scalar loss, got "
            f"shape {loss.shape} dtype {loss.dtype}.")
      loss = loss.astype(jnp.float32)
      written = None if thread is None else thread.updated
      return loss * scale, (loss, aux, written)

    (grads, gradient_written), (loss, aux, written) = jax.grad(
        scaled_loss_fn, argnums=(0, 1), has_aux=True)(state.params,
                                                      gradient_state)
    if written is not None:
      # The collection's gradient is its new value (flax's convention).
      written = model_state_lib.conform(
          model_state_lib.with_gradient_collection(
              written, model_state_lib.unless_unused(gradient_written,
                                                     gradient_state)),
          state.model_state)
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
    if written is not None:
      # Without loss_scaled no step is skipped, whatever the gradients.
      kept = grads_finite if scaled_states else jnp.array(True)
      new_state = new_state.replace(model_state=model_state_lib.keep_if(
          kept, written, state.model_state))
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
  if compiler_options is not None and not isinstance(compiler_options,
                                                     Mapping):
    raise TypeError("make_train_step: compiler_options must be a dict of XLA "
                    f"options, got {compiler_options!r}.")
  if compiler_options is None:
    compiler_options = gpu_target_lib.FAITHFUL_ROUNDING
  jit_options = dict(donate_argnums=donate_argnums,
                     compiler_options=dict(compiler_options) or None)
  if sharding is None:
    return jax.jit(step, **jit_options)
  if not isinstance(sharding, sharding_lib.ShardingPlan):
    raise TypeError("make_train_step: sharding must be an mpjax.ShardingPlan "
                    f"(mpjax.data_parallel / mpjax.fsdp), got {sharding!r}.")
  return _ShardedStep(step, sharding, jit_options)


class _ShardedStep:
  """`step` jitted with a plan's shardings, built per state/batch structure.

  The shardings depend on the state's tree and shapes, which are only known
  at the first call; one jitted function is kept per structure, so a run
  compiles once.
  """

  def __init__(self, step: Callable, plan: sharding_lib.ShardingPlan,
               jit_options: Dict[str, Any]):
    self._step, self._plan, self._jit_options = step, plan, jit_options
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
          **self._jit_options)
    return self._jitted[key]

  def __call__(self, state, batch):
    return self._for(state, batch)(state, batch)

  def lower(self, state, batch):
    return self._for(state, batch).lower(state, batch)
