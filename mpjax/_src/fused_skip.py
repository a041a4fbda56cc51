"""The fused skip: how `loss_scaled` hands its finiteness decision inward.

`mpjax.loss_scaled` must leave the inner optimizer state bit-identical on a
step with non-finite gradients. Around an opaque optimizer it can only select
after the fact, ``where(finite, new_state, old_state)`` over every leaf; XLA
then fuses the new moments into both that select and the params update, two
fusions read each donated moment while one overwrites it, and it copies every
moment buffer first (+23% on the seed MLP's CPU step). A transformation that
applies the decision inside its own elementwise update has no such copies.

The protocol, in full:

1. `loss_scaled` passes ``finite_decision=FiniteDecision(finite)`` as an
   extra argument to its inner ``update`` (optax's extra-args mechanism:
   `optax.chain`, `optax.inject_hyperparams` and `optax.MultiSteps` forward
   it; a plain `optax.GradientTransformation` never sees it).
2. A transformation that can take the decision reads it with
   ``decision = FiniteDecision.from_extra_args(extra_args)`` and, when it is
   not None, returns on a non-finite step zero updates and a state equal to
   its input state bit for bit, computing both inside its own update; then it
   calls ``decision.take(new_state)`` on the state object it returns.
3. `loss_scaled` keeps every state so taken as it is and selects the rest
   (``decision.select(new_inner_state, old_inner_state)``), and it still
   zeroes the updates, a select that fuses into ``params + updates``.

Taken states are matched by identity, so a wrapper that rebuilds its inner
state (MultiSteps selects it with its own ``where``) simply falls back to the
select: correct either way, only the copies differ. A transformation that
ignores the argument is selected as before.

Example of a third-party transformation implementing it (`mpjax.moving_average`
applies the decision inside the moment's own expression; a
``where(finite, new, old)`` over the finished state would bring the copies
back)::

    def update(updates, state, params=None, **extra_args):
      decision = mpjax.FiniteDecision.from_extra_args(extra_args)
      finite = None if decision is None else decision.finite
      mu = jax.tree.map(
          lambda g, m: mpjax.moving_average(g, m, 0.9, finite),
          updates, state.mu)
      updates, state = mu, State(mu=mu)
      if decision is not None:
        updates = jax.tree.map(lambda u: jnp.where(finite, u, 0), updates)
        decision.take(state)
      return updates, state
"""

from typing import Any, Dict, List, Optional

import chex
import jax
import jax.numpy as jnp

KEYWORD = "finite_decision"


class FiniteDecision:
  """The skip decision of one `loss_scaled` step (see the module docstring).

  Attributes:
    finite: bool [], True when the unscaled gradients are all finite (the
      step is applied), False when it must be skipped.
  """

  def __init__(self, finite: chex.Array):
    finite = jnp.asarray(finite)
    if finite.shape != () or finite.dtype != jnp.bool_:
      raise TypeError("FiniteDecision: finite must be a bool scalar, got "
                      f"{finite.dtype}{list(finite.shape)}.")
    self.finite = finite
    self._taken: List[Any] = []  # strong references: ids stay unique

  @staticmethod
  def from_extra_args(extra_args: Dict[str, Any]
                      ) -> Optional["FiniteDecision"]:
    """The decision among an ``update``'s extra arguments, or None."""
    decision = extra_args.get(KEYWORD)
    if decision is not None and not isinstance(decision, FiniteDecision):
      raise TypeError(f"{KEYWORD} must be an mpjax.FiniteDecision, got "
                      f"{decision!r} of type {type(decision).__name__}.")
    return decision

  def take(self, state: Any) -> Any:
    """Records that `state` (the object returned) already applied the
    decision; returns it."""
    self._taken.append(state)
    return state

  def taken(self, node: Any) -> bool:
    return any(node is state for state in self._taken)

  def select(self, new_state: Any, old_state: Any) -> Any:
    """``where(finite, new, old)`` over `new_state`, except taken subtrees."""
    def pick(new, old):
      if self.taken(new):
        return new
      return jax.tree.map(lambda n, o: jnp.where(self.finite, n, o), new, old)

    return jax.tree.map(pick, new_state, old_state, is_leaf=self.taken)


def moving_average(term: chex.Array, average: chex.Array, decay: float,
                   finite: Optional[chex.Array] = None) -> chex.Array:
  """``(1 - decay) * term + decay * average``, or `average` on a skipped step.

  optax's moment update (`optax.tree.update_moment` with ``term = g**order``)
  with the skip decision applied inside the same elementwise expression:
  a skipped step computes ``0 * (-0.0) + average``, which is `average` bit
  for bit (``-0.0 + x`` is ``x`` for every x, -0.0 included), whatever
  non-finite value `term` holds. Selecting the new average against the old
  one instead makes two fusions read each donated moment while one
  overwrites it, and XLA copies the buffer first. The average's term stays a
  select, not a product, on purpose: XLA contracts ``a * b + c`` into one
  FMA and so contracts the term's product, as without a decision, which
  keeps an applied step bit-identical to the expression without one.

  `average` is first converted to the result dtype (float32 for a 16-bit
  moment and float32 gradients), so ``decay * average`` is computed there in
  both cases; optax instead multiplies a 16-bit moment by the decay rounded
  to its dtype (0.9 is 0.8984375 in bfloat16), and how XLA rounds that
  product depends on its excess-precision option, which would make the two
  paths differ. Complex terms are selected after the fact (the product with
  a zero weight would lose the sign of a -0.0 part).

  Args:
    term: the new term (``g``, ``g**2`` or ``|g|**2``), any floating or
      complex dtype.
    average: the running average, any floating or complex dtype.
    decay: a Python float in [0, 1).
    finite: bool [] or None (no decision: the plain moving average).

  Returns:
    The new average, in ``result_type(term, average)``.
  """
  dtype = jnp.result_type(term, average)
  average = average.astype(dtype)
  if finite is None:
    return (1 - decay) * term + decay * average
  if jnp.issubdtype(dtype, jnp.complexfloating):
    return jnp.where(finite, (1 - decay) * term + decay * average, average)
  term = jnp.where(finite, term, jnp.asarray(-0.0, term.dtype))
  weight = jnp.where(finite, jnp.asarray(1 - decay, term.dtype),
                     jnp.zeros([], term.dtype))
  return weight * term + jnp.where(finite, decay * average, average)
