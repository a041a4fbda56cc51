"""Stochastic rounding of float32 values to bfloat16.

bfloat16 is float32 with the low 16 bits of the significand dropped. Adding
16 uniformly random bits to a float32's bit pattern and truncating to the
high 16 bits rounds its magnitude up with probability equal to the dropped
fraction of an ulp, and down otherwise: the rounding is unbiased,
``E[stochastic_round(x)] == x``, and the result is always one of the two
bfloat16 neighbours of ``x`` (never further than one ulp). A sum of many
updates each below half an ulp then still moves in expectation, where
round-to-nearest drops every one of them (``1.0 + 1e-3`` in bfloat16 is
``1.0``).
"""

from typing import Any

import chex
import jax
import jax.numpy as jnp

# Rounding modes of 16-bit storage (params and optimizer moments).
ROUNDING_MODES = ("nearest", "stochastic", "kahan")


def check_key(key: Any, owner: str) -> jax.Array:
  """Returns `key` as a typed PRNG key array, or raises naming the value.

  Args:
    key: a typed key (``jax.random.key(seed)``) or a legacy uint32 key
      (``jax.random.PRNGKey(seed)``), shape [].
    owner: the caller's name, for the message.
  """
  if isinstance(key, jax.Array) and jax.dtypes.issubdtype(
      key.dtype, jax.dtypes.prng_key):
    if key.shape:
      raise ValueError(f"{owner}: key must be a single PRNG key (shape []), "
                       f"got shape {key.shape}.")
    return key
  if (isinstance(key, jax.Array) and key.dtype == jnp.uint32
      and key.shape == (2,)):
    return jax.random.wrap_key_data(key)
  raise TypeError(
      f"{owner}: key must be a PRNG key, e.g. jax.random.key(0), got {key!r} "
      f"of type {type(key).__name__}.")


def stochastic_round(x: chex.Array, key: jax.Array,
                     dtype: Any = jnp.bfloat16) -> chex.Array:
  """Rounds `x` to bfloat16 up or down at random, unbiased.

  Args:
    x: float32 array (other floating dtypes are converted to float32 first).
    key: a PRNG key; the same key gives the same roundings.
    dtype: the result dtype; only bfloat16 (float32 returns `x` unchanged).

  Returns:
    bfloat16 array shaped like `x`: for finite `x`, one of the two bfloat16
    values around `x`, the upper one with probability equal to the distance
    from the lower one in units of their gap. Infinities and NaN round to
    nearest (they stay what they are).

  Examples:
    >>> import jax, jax.numpy as jnp, mpjax
    >>> x = jnp.full(10_000, 1.0 + 2.0**-10)  # 1/8 of a bfloat16 ulp above 1
    >>> y = mpjax.stochastic_round(x, jax.random.key(0)).astype(jnp.float32)
    >>> sorted(set(y.tolist()))  # only the two neighbours
    [1.0, 1.0078125]
    >>> round(float(y.mean()), 4)  # their mean is x's
    1.001
  """
  dtype = jnp.dtype(dtype)
  if dtype == jnp.float32:
    return jnp.asarray(x, jnp.float32)
  if dtype != jnp.bfloat16:
    raise ValueError(
        f"stochastic_round: dtype must be bfloat16 (or float32, a no-op), got "
        f"{dtype.name}.")
  x = jnp.asarray(x, jnp.float32)
  bits = jax.lax.bitcast_convert_type(x, jnp.uint32)
  noise = jax.random.bits(key, x.shape, jnp.uint32) >> 16
  # Carries into the exponent are right: the next bfloat16 up is 2**k.
  rounded = (bits + noise) & jnp.uint32(0xFFFF0000)
  y = jax.lax.bitcast_convert_type(rounded, jnp.float32).astype(dtype)
  return jnp.where(jnp.isfinite(x), y, x.astype(dtype))
