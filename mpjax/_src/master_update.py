"""How a float32 update reaches 16-bit master params through `optax.apply_updates`.

optax *adds* updates to params: ``optax.apply_updates`` computes
``(p + u).astype(p.dtype)``, which rounds to nearest. An optimizer that must
choose the rounding of ``p + u`` (stochastic, or Kahan-compensated) computes
the new 16-bit param itself and returns

    updates = float32(new_p) - float32(p)          (float32)

so that ``p + updates``, a float32 sum of two exactly representable values,
is ``new_p`` again and its cast to the param dtype is exact. The contract:

- ``optax.apply_updates(params, updates)`` (and flax's
  ``TrainState.apply_gradients``) gives exactly the rounded params;
- the transformation is the *last* one of its chain: anything that rescales
  its updates afterwards (``optax.scale``, a second optimizer) breaks it;
- exact whenever a step changes a param's magnitude by less than 2**15 times
  (the difference of two bfloat16 values then fits float32's 24 bits); a step
  that shrinks it more lands within one float32 ulp of the old value.

Params of float32 or wider get the plain float32 update ``u``: nothing to
round, bit for bit what a chain of optax transformations would return.
"""

from typing import Optional, Tuple

import chex
import jax
import jax.numpy as jnp

from mpjax._src import stochastic_rounding


def is_low_precision(dtype) -> bool:
  """Whether params of `dtype` are rounded on write-back (16-bit floats)."""
  dtype = jnp.dtype(dtype)
  return jnp.issubdtype(dtype, jnp.floating) and dtype.itemsize < 4


def round_to(x: chex.Array, dtype, rounding: str,
             seed: Optional[jax.Array]) -> chex.Array:
  """Rounds float32 `x` to `dtype`: to nearest, or stochastically (bfloat16)
  with the noise of `seed` (uint32 [2], `stochastic_rounding.random_bits16`)."""
  if rounding == "stochastic" and jnp.dtype(dtype) != jnp.float32:
    return stochastic_rounding.round_with_seed(x, seed, dtype)
  return x.astype(dtype)


def write_back(param: chex.Array, update: chex.Array, *, rounding: str,
               seed: Optional[jax.Array] = None,
               compensation: Optional[chex.Array] = None,
               finite: Optional[chex.Array] = None
               ) -> Tuple[chex.Array, Optional[chex.Array]]:
  """The updates that turn `param` into its rounded ``param + update``.

  Args:
    param: one leaf of the params, any floating dtype.
    update: float32, shaped like `param`: the exact update to add.
    rounding: ``"nearest"``, ``"stochastic"`` (needs `seed`) or ``"kahan"``
      (needs `compensation`). Only 16-bit params are rounded.
    seed: uint32 [2], the rounding seed of this leaf and step
      (`stochastic_rounding.stream_seed`).
    compensation: the Kahan buffer, `param`'s dtype and shape: what earlier
      steps added in float32 but rounding dropped.
    finite: bool [] or None: False leaves the param and the buffer as they
      were (the update is zero), see `mpjax._src.fused_skip`.

  Returns:
    ``(updates, compensation)``: float32 updates for `optax.apply_updates`
    (see the module docstring) and the new buffer (None when none was given).
  """
  skip = ((lambda new, old: new) if finite is None else
          (lambda new, old: jnp.where(finite, new, old)))
  if not is_low_precision(param.dtype):
    return skip(update, jnp.zeros_like(update)), compensation
  p32 = param.astype(jnp.float32)
  if rounding == "kahan":
    target = p32 + (update + compensation.astype(jnp.float32))
    new = target.astype(param.dtype)
    compensation = skip(
        (target - new.astype(jnp.float32)).astype(compensation.dtype),
        compensation)
  else:
    new = round_to(p32 + update, param.dtype, rounding, seed)
  # Selecting the update, not the param: the donated param is read once.
  delta = new.astype(jnp.float32) - p32
  return skip(delta, jnp.zeros_like(delta)), compensation
