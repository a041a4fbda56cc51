"""Adam with bias corrections accurate to float32, step for step like torch.

`optax.adam` (0.2.8) computes the bias corrections ``1 - beta**t`` in float32
from ``float32(beta)``: ``float32(0.999) = 0.99900001287``, and the
subtraction cancels, so ``1 - beta2`` comes out 1.29e-5 (relative) too small
and the first update 6.7e-6 too small. torch computes them in float64. The
difference is tiny but it flips a ReLU now and then, after which runs that
should match drift apart (tests/conformance/test_adam_numerics.py). Here the
corrections are ``-expm1(t * log(beta))`` with ``log(beta)`` taken in float64
on the host, accurate to an ulp or two in float32. Everything else is optax's
Adam: the same moment expressions, the same state (`optax.ScaleByAdamState`),
eps in the same place; one more difference with a 16-bit ``mu_dtype`` and
float32 gradients (what `loss_scaled` passes): the moment is updated in
float32 (``b1 * mu`` with b1 exact, where optax rounds b1 to the moment's
dtype: 0.9 is 0.8984375 in bfloat16) and stored back in its dtype.
`loss_scaled`'s skip decision is applied inside the moments' own update
(`mpjax._src.fused_skip`).
"""

import math
from typing import Any, Optional

import jax
import jax.numpy as jnp
import optax

from mpjax._src import fused_skip


def one_minus_power(beta: float, count: jax.Array) -> jax.Array:
  """``1 - beta**count`` in float32 without cancellation (count int32 >= 1).

  The bias correction of `adam` and of `mpjax.adamw`.
  """
  if beta == 0.0:  # log(0) is undefined; 0**count is 0 for every count >= 1
    return jnp.ones(jnp.shape(count), jnp.float32)
  return -jnp.expm1(count.astype(jnp.float32) * jnp.float32(math.log(beta)))


def check_beta(name: str, beta: Any, owner: str = "adam") -> float:
  """`beta` as a float in [0, 1), or a TypeError/ValueError naming it."""
  if isinstance(beta, bool) or not isinstance(beta, (int, float)):
    raise TypeError(f"{owner}: {name} must be a float, got {beta!r}.")
  if not 0.0 <= beta < 1.0:
    raise ValueError(f"{owner}: {name} must be in [0, 1), got {beta!r}.")
  return float(beta)


def scale_by_adam(b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8,
                  eps_root: float = 0.0,
                  mu_dtype: Optional[Any] = None
                  ) -> optax.GradientTransformation:
  """`optax.scale_by_adam` with float32-accurate bias corrections.

  Args:
    b1, b2: decay rates of the first and second moments, in [0, 1).
    eps: added to ``sqrt(nu_hat)`` (outside the root, as optax and torch do).
    eps_root: added to ``nu_hat`` inside the root.
    mu_dtype: storage dtype of the first moment (None: the params' dtype);
      with float32 gradients a 16-bit one is updated in float32 and rounded
      to it once per step.

  Returns:
    A transformation whose state is an `optax.ScaleByAdamState` (int32 count,
    mu, nu shaped like the params).
  """
  b1, b2 = check_beta("b1", b1), check_beta("b2", b2)
  mu_dtype = None if mu_dtype is None else jnp.dtype(mu_dtype)

  def init_fn(params):
    return optax.ScaleByAdamState(
        count=jnp.zeros([], jnp.int32),
        mu=optax.tree.zeros_like(params, dtype=mu_dtype),
        nu=optax.tree.zeros_like(params))

  def update_fn(updates, state, params=None, **extra_args):
    del params
    # loss_scaled's skip decision, applied inside the moments' own update
    # (mpjax._src.fused_skip): a skipped step keeps count, mu and nu bit for
    # bit without a select over the donated state; an applied one computes
    # what it computes without a decision, bit for bit.
    decision = fused_skip.FiniteDecision.from_extra_args(extra_args)
    finite = None if decision is None else decision.finite
    mu = jax.tree.map(
        lambda g, m: fused_skip.moving_average(g, m, b1, finite),
        updates, state.mu)
    nu = jax.tree.map(
        lambda g, v: fused_skip.moving_average(_abs_sq(g), v, b2, finite),
        updates, state.nu)
    count = optax.safe_increment(state.count)
    c1, c2 = one_minus_power(b1, count), one_minus_power(b2, count)
    updates = jax.tree.map(
        lambda m, v: (m / c1.astype(m.dtype))
        / (jnp.sqrt(v / c2.astype(v.dtype) + eps_root) + eps), mu, nu)
    if finite is not None:
      updates = jax.tree.map(
          lambda u: jnp.where(finite, u, jnp.zeros_like(u)), updates)
      count = jnp.where(finite, count, state.count)
    new_state = optax.ScaleByAdamState(
        count=count, mu=optax.tree.cast(mu, mu_dtype),
        nu=optax.tree.cast_like(nu, state.nu))
    if decision is not None:
      decision.take(new_state)
    return updates, new_state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _abs_sq(g: jax.Array) -> jax.Array:
  """``g**2``, or ``|g|**2`` for a complex `g` (optax's second moment)."""
  return g**2 if jnp.isrealobj(g) else jnp.real(jnp.conj(g) * g)


def adam(learning_rate: optax.ScalarOrSchedule, b1: float = 0.9,
         b2: float = 0.999, eps: float = 1e-8, eps_root: float = 0.0,
         mu_dtype: Optional[Any] = None) -> optax.GradientTransformation:
  """`optax.adam` whose updates match `torch.optim.Adam`'s to float32 rounding.

  The only change from `optax.adam` is the bias correction (see the module
  docstring): on the seed MLP, 200 float32 steps from the same weights and
  batches give losses within 1e-5 (relative) of torch's at every step, where
  `optax.adam` drifts to ~2.5e-4.

  Args:
    learning_rate: a float or an optax schedule.
    b1, b2, eps, eps_root, mu_dtype: as for `scale_by_adam`.

  Returns:
    ``optax.chain(scale_by_adam(...), optax.scale_by_learning_rate(lr))``.

  Examples:
    >>> import jax.numpy as jnp, mpjax
    >>> tx = mpjax.adam(1.0)
    >>> updates, _ = tx.update(jnp.full(2, 0.5), tx.init(jnp.zeros(2)))
    >>> updates.tolist()  # torch's first step: exactly -lr
    [-1.0, -1.0]
  """
  return optax.chain(
      scale_by_adam(b1=b1, b2=b2, eps=eps, eps_root=eps_root,
                    mu_dtype=mu_dtype),
      optax.scale_by_learning_rate(learning_rate))
