"""`loss_scaled`: loss scaling and non-finite step skipping as an optax wrapper."""

from typing import Any, NamedTuple

import chex
import jax
import jax.numpy as jnp
import jmp
import optax

from mpjax._src import scaling as scaling_lib


class LossScaledState(NamedTuple):
  """State of `loss_scaled`. Every field is an array (or the inner state).

  Attributes:
    scale: float32 [], the scale the *next* loss must be multiplied by.
    growth_count: int32 [], consecutive finite steps since the scale last
      changed (see `DynamicScaling`).
    applied_steps: int32 [], steps whose update was applied (saturates).
    skipped_steps: int32 [], steps skipped for non-finite gradients (saturates).
    consecutive_skips: int32 [], skipped steps since the last applied one.
    last_grads_finite: bool [], whether the last step's gradients were finite.
    leaf_grads_finite: bool [num_leaves], `finite_flags` of the last step's
      gradients, in `jax.tree.leaves(params)` order: the per-leaf stage of
      the reduction behind `last_grads_finite` (no second pass). Name the
      leaves that made a step skip with
      ``mpjax.nonfinite_leaf_paths(flags, like=params)``.
    inner_state: the wrapped transformation's state; it only moves on applied
      steps, so schedules inside it count applied steps only.
  """

  scale: chex.Array
  growth_count: chex.Array
  applied_steps: chex.Array
  skipped_steps: chex.Array
  consecutive_skips: chex.Array
  last_grads_finite: chex.Array
  leaf_grads_finite: chex.ArrayTree
  inner_state: optax.OptState


def unscale_gradients(grads: chex.ArrayTree, scale: chex.Array) -> chex.ArrayTree:
  """Divides every floating leaf by `scale`, computing in at least float32.

  Args:
    grads: gradients of a scaled loss, any floating dtypes (float16 leaves are
      upcast first so that the division itself cannot overflow or underflow
      in float16). Non-floating leaves (e.g. float0) pass through.
    scale: float32 scalar.

  Returns:
    The unscaled gradients, float32 (float64 leaves stay float64).
  """
  def unscale(g):
    if not jnp.issubdtype(g.dtype, jnp.floating):
      return g
    dtype = jnp.promote_types(g.dtype, jnp.float32)
    return g.astype(dtype) / scale.astype(dtype)

  return jax.tree.map(unscale, grads)


def finite_flags(tree: chex.ArrayTree) -> chex.Array:
  """Returns bool [num_leaves]: whether each leaf of `tree` is all finite.

  The flags are in `jax.tree.leaves(tree)` order (non-floating leaves count
  as finite). ``jnp.all(finite_flags(grads))`` is the global skip decision,
  so the flags come from the same per-leaf reductions, with no second pass
  over the gradients; they are packed into one vector so that a jitted step
  returns one small buffer rather than one per parameter.
  `mpjax.nonfinite_leaf_paths(flags, like=params)` names the false ones.
  """
  def finite(x):
    if not jnp.issubdtype(jnp.asarray(x).dtype, jnp.inexact):
      return jnp.array(True)
    return jnp.all(jnp.isfinite(x))

  leaves = [finite(x) for x in jax.tree.leaves(tree)]
  return jnp.stack(leaves) if leaves else jnp.ones([0], jnp.bool_)


def loss_scaled(inner: optax.GradientTransformation,
                scaling: scaling_lib.LossScaling
                ) -> optax.GradientTransformationExtraArgs:
  """Wraps `inner` so that it takes gradients of a scaled loss.

  `update(grads, state, params)` expects the gradients of ``loss * scale``
  where ``scale`` is `current_loss_scale(state)` (use `scale_loss`). It

  1. unscales the gradients in float32 with that same scale;
  2. decides once, over all leaves, whether they are all finite;
  3. finite: runs `inner` on the unscaled gradients (so a
     `clip_by_global_norm` inside `inner` sees the true gradients);
     non-finite: returns zero updates and the inner state bit-identical (an
     Adam count, mu and nu do not move);
  4. adjusts the scale with `scaling` (see `DynamicScaling`).

  Everything is `jnp`: no host sync, one compilation. The decision in step 3 is
  a select, not a `lax.cond`: on GPU a conditional reads its predicate on the
  host, a select fuses into the update kernels.

  `optax.apply_if_finite` is not reused: it applies non-finite updates after
  `max_consecutive_errors` skips, and it does not hand back the finiteness
  decision, which the loss scale needs.

  Args:
    inner: the optimizer to wrap (any `optax.GradientTransformation`; extra
      arguments of `update` are forwarded).
    scaling: `NoScaling()`, `StaticScaling(scale)` or `DynamicScaling(...)`.

  Returns:
    An `optax.GradientTransformationExtraArgs` whose state is a
    `LossScaledState`. It composes with `optax.chain`, `optax.MultiSteps` and
    `optax.inject_hyperparams`. With gradient accumulation put it *outside*:
    ``loss_scaled(optax.MultiSteps(adam, k), scaling)`` unscales each
    micro-batch and drops only the non-finite ones. Inside
    ``optax.MultiSteps`` one non-finite micro-batch skips its window and then
    poisons every later one: MultiSteps resets its accumulator by multiplying
    it by 0, and ``inf * 0`` is NaN.

  Examples:
    >>> import jax.numpy as jnp, optax, mpjax
    >>> tx = mpjax.loss_scaled(optax.adam(1e-3), mpjax.StaticScaling(8.0))
    >>> params = {"w": jnp.ones(2)}
    >>> state = tx.init(params)
    >>> grads = {"w": jnp.array([8.0, jnp.inf])}
    >>> updates, state = tx.update(grads, state, params)
    >>> int(state.skipped_steps), updates["w"].tolist()
    (1, [0.0, 0.0])
  """
  if not (hasattr(inner, "init") and hasattr(inner, "update")):
    raise TypeError(
        "loss_scaled: inner must be an optax.GradientTransformation, got "
        f"{inner!r} of type {type(inner).__name__}.")
  if not isinstance(scaling, (scaling_lib.NoScaling,
                              scaling_lib.StaticScaling,
                              scaling_lib.DynamicScaling)):
    raise TypeError(
        "loss_scaled: scaling must be mpjax.NoScaling(), "
        "mpjax.StaticScaling(...) or mpjax.DynamicScaling(...), got "
        f"{scaling!r} of type {type(scaling).__name__}.")
  inner = optax.with_extra_args_support(inner)

  def init_fn(params):
    scale, growth_count = scaling.init()
    # Distinct buffers: a donated train state must not alias one array twice.
    zero = lambda: jnp.zeros([], jnp.int32)
    return LossScaledState(
        scale=scale,
        growth_count=growth_count,
        applied_steps=zero(),
        skipped_steps=zero(),
        consecutive_skips=zero(),
        last_grads_finite=jnp.array(True),
        leaf_grads_finite=jnp.ones([len(jax.tree.leaves(params))],
                                   jnp.bool_),
        inner_state=inner.init(params))

  def update_fn(grads, state, params=None, **extra_args):
    grads = unscale_gradients(grads, state.scale)
    leaf_finite = finite_flags(grads)
    finite = jnp.all(leaf_finite)
    updates, new_inner_state = inner.update(grads, state.inner_state, params,
                                            **extra_args)
    updates = jmp.select_tree(finite, updates,
                              jax.tree.map(jnp.zeros_like, updates))
    inner_state = jmp.select_tree(finite, new_inner_state, state.inner_state)
    scale, growth_count = scaling.adjust(state.scale, state.growth_count,
                                         finite)
    applied = optax.safe_int32_increment(state.applied_steps)
    skipped = optax.safe_int32_increment(state.skipped_steps)
    consecutive = optax.safe_int32_increment(state.consecutive_skips)
    return updates, LossScaledState(
        scale=scale,
        growth_count=growth_count,
        applied_steps=jnp.where(finite, applied, state.applied_steps),
        skipped_steps=jnp.where(finite, state.skipped_steps, skipped),
        consecutive_skips=jnp.where(finite, 0, consecutive).astype(jnp.int32),
        last_grads_finite=finite,
        leaf_grads_finite=leaf_finite,
        inner_state=inner_state)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def find_loss_scaled_states(tree: Any) -> list:
  """Returns every `LossScaledState` inside `tree` (an optax state, a chain,
  MultiSteps, inject_hyperparams or a TrainState), in tree order.

  Matched by type rather than by field name (as `optax.tree_utils.tree_get`
  would): a field called ``scale`` may belong to any other transformation.
  """
  is_state = lambda x: isinstance(x, LossScaledState)
  return [x for x in jax.tree.leaves(tree, is_leaf=is_state) if is_state(x)]


def loss_scaled_inside_multisteps(tree: Any) -> bool:
  """Whether `tree` has a `LossScaledState` inside an `optax.MultiStepsState`."""
  is_multi = lambda x: isinstance(x, optax.MultiStepsState)
  return any(
      find_loss_scaled_states(x.inner_opt_state)
      for x in jax.tree.leaves(tree, is_leaf=is_multi) if is_multi(x))


def loss_scale_state(tree: Any) -> LossScaledState:
  """Returns the one `LossScaledState` inside `tree`.

  Raises:
    ValueError: if there is none, or more than one.
  """
  found = find_loss_scaled_states(tree)
  if len(found) != 1:
    what = "no" if not found else f"{len(found)}"
    raise ValueError(
        f"Expected exactly one mpjax.loss_scaled state in the optimizer state, "
        f"found {what}. Wrap the optimizer once: "
        "tx = mpjax.loss_scaled(optax.adam(...), mpjax.DynamicScaling.like_torch()).")
  return found[0]


def current_loss_scale(opt_state: Any) -> chex.Array:
  """Returns the scale the next loss must be multiplied by (float32 scalar).

  Args:
    opt_state: any state containing one `LossScaledState` (nested in
      `optax.chain`, `optax.MultiSteps`, `optax.inject_hyperparams` or an
      `mpjax.TrainState`).
  """
  return jnp.asarray(loss_scale_state(opt_state).scale, jnp.float32)


def scale_loss(loss: chex.Array, opt_state: Any) -> chex.Array:
  """Returns ``loss * current_loss_scale(opt_state)`` in float32.

  The loss is upcast first, so a float16 loss cannot overflow in the product.
  """
  return jnp.asarray(loss).astype(jnp.float32) * current_loss_scale(opt_state)
