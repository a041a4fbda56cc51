"""`loss_scaled`: loss scaling and non-finite step skipping as an optax wrapper."""

import inspect
from typing import Any, NamedTuple, Optional, Tuple

import chex
import jax
import jax.numpy as jnp
import optax

from mpjax._src import attribution
from mpjax._src import fused_skip
from mpjax._src import scaling as scaling_lib


class LossScaledState(NamedTuple):
  """State of `loss_scaled`. Every field is an array (or the inner state).

  Attributes:
    scale: float32 [], the scale the *next* loss must be multiplied by.
    growth_count: int32 [], consecutive finite optimizer steps since the
      scale last changed (see `DynamicScaling`; under ``optax.MultiSteps`` a
      window counts once, when it completes).
    applied_steps: int32 [], updates whose gradients were finite and went to
      the inner transformation (micro-batches under ``optax.MultiSteps``;
      saturates at the int32 maximum).
    skipped_steps: int32 [], updates dropped for non-finite gradients
      (saturates).
    consecutive_skips: int32 [], skipped updates since the last applied one
      (saturates).
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


def _inverse_scale(scale: chex.Array, dtype: Any) -> Tuple[jax.Array,
                                                            jax.Array]:
  """``(a, b)`` with ``a * b == 1 / scale`` and both normal in `dtype`.

  ``x * a * b`` is ``x * (1 / scale)`` rounded once (``b`` is 1 or a power
  of two). ``1 / scale`` alone is subnormal in float32 for scales above
  2**126, which XLA flushes to zero on CPU (and the gradients with it);
  there ``b = 2**-64`` carries the rest of the exponent.
  """
  scale = jnp.asarray(scale).astype(dtype)
  if jnp.finfo(dtype).maxexp > 128:  # float64: every float32 scale is fine
    return 1 / scale, jnp.ones([], dtype)
  large = scale > jnp.asarray(2.0**126, dtype)
  tail = jnp.where(large, jnp.asarray(2.0**-64, dtype), jnp.ones([], dtype))
  return 1 / jnp.where(large, scale * jnp.asarray(2.0**-64, dtype),
                       scale), tail


def unscale_gradients(grads: chex.ArrayTree, scale: chex.Array) -> chex.ArrayTree:
  """Multiplies every floating or complex leaf by ``1 / scale``, in at least
  float32.

  Multiplying by the reciprocal is what torch's GradScaler does (its
  ``inv_scale``); Keras's LossScaleOptimizer divides. For a scale that is a
  power of two (every `DynamicScaling` scale from a power-of-two start, the
  usual static ones) the two are the same bits; for another scale the
  product is within an ulp of the quotient. The product is also what XLA
  fuses into every reader of the unscaled gradients (the finiteness check,
  the norm, each optimizer update), where a division, which XLA counts as
  expensive, is written out once more first (measurably slower on the seed
  MLP's CPU step).

  Args:
    grads: gradients of a scaled loss, any floating or complex dtypes
      (float16 leaves are upcast first so that the product itself cannot
      overflow or underflow in float16). Other leaves (e.g. float0) pass
      through.
    scale: float32 scalar, in (0, float32 max].

  Returns:
    The unscaled gradients, float32 (float64 leaves stay float64, complex64
    leaves complex64, complex128 leaves complex128).
  """
  def unscale(g):
    if not jnp.issubdtype(g.dtype, jnp.inexact):
      return g
    dtype = jnp.promote_types(g.dtype, jnp.float32)
    # A real factor: a complex leaf's real and imaginary parts both scale.
    head, tail = _inverse_scale(scale, jnp.finfo(dtype).dtype)
    return g.astype(dtype) * head * tail

  return jax.tree.map(unscale, grads)


def finite_flags(tree: chex.ArrayTree,
                 scale: Optional[chex.Array] = None) -> chex.Array:
  """Returns bool [num_leaves]: whether each leaf of `tree` is all finite.

  With `scale`, whether each leaf of ``unscale_gradients(tree, scale)`` is
  all finite (a scale below 1 can overflow a finite gradient).

  The flags are in `jax.tree.leaves(tree)` order (non-floating leaves count
  as finite). ``jnp.all(finite_flags(grads))`` is the global skip decision,
  so the flags come from the same per-leaf reductions, with no second pass
  over the gradients; they are packed into one vector so that a jitted step
  returns one small buffer rather than one per parameter.
  `mpjax.nonfinite_leaf_paths(flags, like=params)` names the false ones.

  A leaf is checked as ``isfinite(sum(x - x))``: ``x - x`` is 0 where x is
  finite and NaN where it is inf or NaN, and a sum of zeros cannot
  overflow, so the test is exact, and it is one float sum, which XLA
  vectorizes and fuses with x's producer (a boolean mask and an
  and-reduction over it cost three passes). XLA keeps ``x - x`` for floats
  (checked on CPU and in the H100-compiled program); ``x * 0`` would do the
  same, but XLA shares the broadcast zero with other zeros of that shape
  and writes it out. A max reduction would not do: XLA:CPU's vectorized max
  drops NaN (jax 0.10.2).

  Args:
    tree: any pytree of arrays.
    scale: float32 scalar, or None.
  """
  def finite(x):
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.inexact):
      return jnp.array(True)
    if scale is not None:
      x = unscale_gradients(x, scale)
    return jnp.isfinite(jnp.sum(x - x))

  leaves = [finite(x) for x in jax.tree.leaves(tree)]
  return jnp.stack(leaves) if leaves else jnp.ones([0], jnp.bool_)


def _scale_is_at_least_one(scaling: scaling_lib.LossScaling) -> bool:
  """Whether every scale `scaling` produces is >= 1 (its reciprocal <= 1)."""
  if isinstance(scaling, scaling_lib.NoScaling):
    return True
  if isinstance(scaling, scaling_lib.StaticScaling):
    return scaling.scale >= 1.0
  return scaling.min_scale >= 1.0


def loss_scaled(inner: optax.GradientTransformation,
                scaling: scaling_lib.LossScaling
                ) -> optax.GradientTransformationExtraArgs:
  """Wraps `inner` so that it takes gradients of a scaled loss.

  `update(grads, state, params)` expects the gradients of ``loss * scale``
  where ``scale`` is `current_loss_scale(state)` (use `scale_loss`). It

  1. unscales the gradients in float32 with that same scale;
  2. decides once, over all leaves, whether they are all finite (with a
     scaling whose scale never falls below 1, the default, this is read
     off the gradients as given, since unscaling them then cannot
     overflow; so the state's scale is taken to be one `scaling`
     produced: a state edited to a scale below its ``min_scale`` is not
     supported);
  3. finite: runs `inner` on the unscaled float32 gradients (so a
     `clip_by_global_norm` inside `inner` sees the true gradients);
     non-finite: returns zero updates and the inner state bit-identical (an
     Adam count, mu and nu do not move);
  4. adjusts the scale with `scaling` (see `DynamicScaling`).

  Dtypes: every leaf of the inner state keeps the dtype it had, so 16-bit
  optimizer state stays 16-bit (the inner optimizer computes from the float32
  gradients; only what it stores is rounded). The updates are what the inner
  optimizer returns, float32 for 16-bit params: `optax.apply_updates` (and
  `TrainState.apply_gradients`) adds them in float32 and stores the params
  back in their own dtype, rounding once.

  Everything is `jnp`: no host sync, one compilation. The decision in step 3 is
  a select, not a `lax.cond`: on GPU a conditional reads its predicate on the
  host, a select fuses into the update kernels. The argument checks (tree
  structure, shapes, dtypes) are static: they run once, at trace time.

  **Fused skip.** When `inner` takes extra arguments, the decision is also
  handed to it as ``finite_decision=mpjax.FiniteDecision(finite)``
  (`mpjax._src.fused_skip`): an inner state that applied it inside its own
  update (`mpjax.adamw`, `mpjax.sgd`, or any transformation implementing the
  protocol) is kept as returned, and only the rest is selected, which saves
  XLA's copy of each donated moment. Opaque optax optimizers never see it and
  are selected as before; the bits are the same either way.

  `optax.apply_if_finite` is not reused: it applies non-finite updates after
  `max_consecutive_errors` skips, and it does not hand back the finiteness
  decision, which the loss scale needs.

  **Placement.** `loss_scaled` must be the outermost transformation: a
  transformation chained before it would see scaled gradients, one after it
  would move the params on skipped steps, and a schedule outside it
  (``optax.inject_hyperparams``, ``optax.MultiSteps``) would count skipped
  steps. Put everything inside: ``loss_scaled(optax.chain(clip, adam),
  scaling)``. `loss_scale_state` (and so `scale_loss`, `current_loss_scale`,
  `mpjax.TrainState.create` and `mpjax.make_train_step`) raises a
  `ValueError` naming the enclosing transformation otherwise.

  **Gradient accumulation** goes inside as well:
  ``loss_scaled(optax.MultiSteps(inner, k), scaling)``. Each micro-batch is
  unscaled with the scale its loss was multiplied by and checked on its own.
  The scale follows optimizer steps, as torch's does (``scaler.update()`` once
  per optimizer step): while a window's micro-batches are finite the scale
  stays constant, and the growth counter advances once, when the window
  completes (MultiSteps emits its update). A non-finite micro-batch backs the
  scale off at once and is dropped alone: MultiSteps' state does not move,
  so the window still averages k finite micro-batches (it completes one call
  later). torch instead skips the whole window, because the inf sits in the
  gradients it accumulated; here each micro-batch is checked before it is
  accumulated, so the k - 1 good ones need not be thrown away, and the
  backoff is as prompt as torch's. `applied_steps` and `skipped_steps` count
  micro-batches.

  Args:
    inner: the optimizer to wrap (any `optax.GradientTransformation`; extra
      arguments of `update` are forwarded).
    scaling: `NoScaling()`, `StaticScaling(scale)` or `DynamicScaling(...)`.

  Returns:
    An `optax.GradientTransformationExtraArgs` whose state is a
    `LossScaledState`.

  Raises (from `update`, at trace time):
    TypeError: `state` is not a `LossScaledState`, or a gradient leaf is not
      floating or complex (float0 passes).
    ValueError: the gradients' tree or a leaf's shape differs from the
      params'.

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
  hands_decision = _takes_extra_args(inner)
  scale_at_least_one = _scale_is_at_least_one(scaling)
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
    _check_state(state)
    _check_gradients(grads, params, state.leaf_grads_finite.shape[0])
    # With a scale >= 1, unscaling cannot overflow a finite gradient (the
    # product's magnitude is at most the gradient's), so the scaled
    # gradients' flags are the unscaled ones' and the check reads the
    # gradients as the backward pass wrote them.
    leaf_finite = finite_flags(grads, None if scale_at_least_one
                               else state.scale)
    grads = unscale_gradients(grads, state.scale)
    finite = jnp.all(leaf_finite)
    decision = fused_skip.FiniteDecision(finite)
    if fused_skip.KEYWORD in extra_args:
      raise TypeError(
          f"loss_scaled: {fused_skip.KEYWORD!r} is loss_scaled's own argument "
          "to its inner transformation; do not pass it to update.")
    if hands_decision:
      extra_args = dict(extra_args, **{fused_skip.KEYWORD: decision})
    updates, new_inner_state = inner.update(grads, state.inner_state, params,
                                            **extra_args)
    updates = jax.tree.map(lambda u: jnp.where(finite, u, jnp.zeros_like(u)),
                           updates)
    inner_state = decision.select(new_inner_state, state.inner_state)
    # The inner optimizer computes from float32 gradients, which widens any
    # 16-bit state it stores; storing it back in its own dtype keeps one dtype
    # per leaf across steps (donation and the compiled signature need it) and
    # leaves the storage dtype the optimizer's choice (mu_dtype). The updates
    # are not cast: apply_updates rounds p + u once, and the exact float32
    # write-back deltas of mpjax's 16-bit master-weight optimizers
    # (master_update) would not survive a 16-bit cast.
    inner_state = _cast_like(inner_state, state.inner_state)
    stepped = _completes_optimizer_step(state.inner_state, inner_state)
    scale, growth_count = scaling.adjust(state.scale, state.growth_count,
                                         finite, stepped)
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


def _takes_extra_args(tx: Any) -> bool:
  """Whether `tx.update` accepts ``finite_decision`` (optax's extra-args
  convention is ``**extra_args``; a narrower signature is not handed it)."""
  if not isinstance(tx, optax.GradientTransformationExtraArgs):
    return False  # optax.with_extra_args_support drops every extra argument
  try:
    parameters = inspect.signature(tx.update).parameters.values()
  except (TypeError, ValueError):
    return False
  return any(p.kind is inspect.Parameter.VAR_KEYWORD
             or p.name == fused_skip.KEYWORD for p in parameters)


def _cast_like(tree: chex.ArrayTree, like: chex.ArrayTree) -> chex.ArrayTree:
  """Casts each floating/complex leaf of `tree` to the dtype of `like`'s."""
  def cast(x, ref):
    have, want = getattr(x, "dtype", None), getattr(ref, "dtype", None)
    if (have is None or want is None or have == want
        or not jnp.issubdtype(have, jnp.inexact)
        or not jnp.issubdtype(want, jnp.inexact)):
      return x
    return x.astype(want)

  return jax.tree.map(cast, tree, like)


def _is_multi_steps(x: Any) -> bool:
  return isinstance(x, optax.MultiStepsState)


def _completes_optimizer_step(old_inner: Any, new_inner: Any) -> jax.Array:
  """bool []: whether this update completed an optimizer step.

  True unless the inner state holds an ``optax.MultiStepsState`` (the
  outermost ones, wherever they sit) whose window did not complete: its
  ``mini_step`` is back at 0 after a move (k > 1) or its ``gradient_step``
  advanced (k = 1).
  """
  olds = [x for x in jax.tree.leaves(old_inner, is_leaf=_is_multi_steps)
          if _is_multi_steps(x)]
  news = [x for x in jax.tree.leaves(new_inner, is_leaf=_is_multi_steps)
          if _is_multi_steps(x)]
  stepped = jnp.array(True)
  for old, new in zip(olds, news):
    moved = jnp.logical_or(old.mini_step != new.mini_step,
                           old.gradient_step != new.gradient_step)
    stepped = stepped & (new.mini_step == 0) & moved
  return stepped


def _path_str(path: Any) -> str:
  """A jax key path as ``dense/kernel`` (``<root>`` for the empty path)."""
  return attribution.path_str(path) or "<root>"


def _check_state(state: Any) -> None:
  if isinstance(state, LossScaledState):
    return
  hint = ""
  if find_loss_scaled_states(state):
    hint = (" It contains one: pass the state of the mpjax.loss_scaled "
            "transformation itself (which must be the outermost one).")
  raise TypeError(
      "loss_scaled: update expects the mpjax.LossScaledState returned by this "
      f"transformation's init, got {type(state).__name__}: "
      f"{_short_repr(state)}.{hint}")


def _short_repr(x: Any, limit: int = 120) -> str:
  text = repr(x)
  return text if len(text) <= limit else text[:limit] + "..."


def _check_gradients(grads: Any, params: Any, num_leaves: int) -> None:
  """Static checks of the gradients against the params (at trace time)."""
  grad_leaves, grad_def = jax.tree_util.tree_flatten_with_path(grads)
  if params is not None:
    param_leaves, param_def = jax.tree_util.tree_flatten_with_path(params)
    if grad_def != param_def:
      grad_paths = {_path_str(p) for p, _ in grad_leaves}
      param_paths = {_path_str(p) for p, _ in param_leaves}
      missing = sorted(param_paths - grad_paths)
      extra = sorted(grad_paths - param_paths)
      detail = (f"missing in the gradients: {missing[:5]}; not in the "
                f"params: {extra[:5]}" if missing or extra else
                f"same leaf paths, different containers: gradients "
                f"{grad_def}, params {param_def}")
      raise ValueError(
          "loss_scaled: the gradients' tree must have the params' structure "
          f"({detail}). Differentiate with respect to the params passed to "
          "update.")
    for (path, g), (_, p) in zip(grad_leaves, param_leaves):
      if jnp.shape(g) != jnp.shape(p):
        raise ValueError(
            f"loss_scaled: the gradient of {_path_str(path)!r} has shape "
            f"{jnp.shape(g)}, its param has shape {jnp.shape(p)}; they must "
            "be equal.")
  if len(grad_leaves) != num_leaves:
    raise ValueError(
        f"loss_scaled: got gradients with {len(grad_leaves)} leaves, but the "
        f"state was initialised for params with {num_leaves}.")
  for path, g in grad_leaves:
    dtype = jnp.result_type(g) if not hasattr(g, "dtype") else g.dtype
    if dtype != jax.dtypes.float0 and not jnp.issubdtype(dtype, jnp.inexact):
      raise TypeError(
          f"loss_scaled: the gradient of {_path_str(path)!r} has dtype "
          f"{dtype}; gradients must be floating or complex (integer params "
          "get float0 gradients from jax.grad(..., allow_int=True)).")


def find_loss_scaled_states(tree: Any) -> list:
  """Returns every `LossScaledState` inside `tree` (an optax state, a chain,
  MultiSteps, inject_hyperparams or a TrainState), in tree order.

  Matched by type rather than by field name (as `optax.tree_utils.tree_get`
  would): a field called ``scale`` may belong to any other transformation.
  """
  is_state = lambda x: isinstance(x, LossScaledState)
  return [x for x in jax.tree.leaves(tree, is_leaf=is_state) if is_state(x)]


_MISPLACED_FIX = {
    "optax.MultiSteps": (
        "the micro-batches would be accumulated still scaled, and one "
        "non-finite micro-batch would poison every later window (MultiSteps "
        "resets its accumulator as acc * 0, and inf * 0 is NaN); accumulate "
        "inside it: "
        "tx = mpjax.loss_scaled(optax.MultiSteps(inner, k), scaling)"),
    "optax.inject_hyperparams": (
        "its schedules would count skipped steps; inject inside it: "
        "tx = mpjax.loss_scaled(optax.inject_hyperparams(optax.adam)("
        "learning_rate=...), scaling)"),
}
_CHAIN_FIX = (
    "a transformation before it sees scaled gradients, one after it moves the "
    "params on skipped steps and a schedule after it counts skipped steps; "
    "chain inside it: tx = mpjax.loss_scaled(optax.chain(...), scaling)")


def _enclosing_name(node: Any) -> str:
  """What optax transformation a state node belongs to, in words."""
  if _is_multi_steps(node):
    return "optax.MultiSteps"
  if isinstance(node, (optax.InjectHyperparamsState,
                       optax.InjectStatefulHyperparamsState)):
    return "optax.inject_hyperparams"
  if type(node) in (tuple, list):
    return f"optax.chain of {len(node)} transformations"
  if isinstance(node, dict):
    return "a dict of states (optax.named_chain or partition)"
  return type(node).__name__


def _child(node: Any, key: Any) -> Any:
  if hasattr(key, "idx"):
    return node[key.idx]
  if hasattr(key, "key"):
    return node[key.key]
  return getattr(node, key.name)


def _enclosing(root: Any, path: Any) -> list:
  """Names of the transformations around the state at `path` below `root`.

  A chain of one transformation encloses nothing that matters.
  """
  names, node = [], root
  for key in path:
    if not (type(node) in (tuple, list) and len(node) == 1):
      names.append(_enclosing_name(node))
    try:
      node = _child(node, key)
    except (AttributeError, IndexError, KeyError, TypeError):
      break  # a custom pytree: what was named so far is enough
  return names


def loss_scale_state(tree: Any) -> LossScaledState:
  """Returns the `LossScaledState` at the root of `tree`.

  Args:
    tree: an optimizer state, or an object whose ``opt_state`` is one (an
      `mpjax.TrainState`). The `LossScaledState` must be the state itself,
      or inside an ``optax.chain`` of that one transformation.

  Raises:
    ValueError: if there is none, more than one, or it is not at the root
      (`loss_scaled` inside ``optax.chain``, ``optax.MultiSteps``,
      ``optax.inject_hyperparams``...): the message names what encloses it
      and how to wrap instead.
  """
  root = tree
  if not isinstance(root, (tuple, list, dict)) and hasattr(root,
                                                           "opt_state"):
    root = root.opt_state
  is_state = lambda x: isinstance(x, LossScaledState)
  found = [(path, x) for path, x in jax.tree_util.tree_flatten_with_path(
      root, is_leaf=is_state)[0] if is_state(x)]
  if len(found) != 1:
    what = "no" if not found else f"{len(found)}"
    raise ValueError(
        f"Expected exactly one mpjax.loss_scaled state in the optimizer state, "
        f"found {what}. Wrap the optimizer once: "
        "tx = mpjax.loss_scaled(optax.adam(...), mpjax.DynamicScaling.like_torch()).")
  path, state = found[0]
  enclosing = _enclosing(root, path)
  if enclosing:
    outer = enclosing[0]
    fix = _MISPLACED_FIX.get(outer, _CHAIN_FIX)
    raise ValueError(
        "mpjax.loss_scaled must be the outermost transformation, but its "
        f"state is inside {' inside '.join(reversed(enclosing))} (at "
        f"opt_state path {_path_str(path)!r}): {fix}.")
  return state


def current_loss_scale(opt_state: Any) -> chex.Array:
  """Returns the scale the next loss must be multiplied by (float32 scalar).

  Args:
    opt_state: the state of a `loss_scaled` transformation, or an
      `mpjax.TrainState` holding one (see `loss_scale_state`).
  """
  return jnp.asarray(loss_scale_state(opt_state).scale, jnp.float32)


def scale_loss(loss: chex.Array, opt_state: Any) -> chex.Array:
  """Returns ``loss * current_loss_scale(opt_state)`` in float32.

  The loss is upcast first, so a float16 loss cannot overflow in the product.
  """
  return jnp.asarray(loss).astype(jnp.float32) * current_loss_scale(opt_state)
