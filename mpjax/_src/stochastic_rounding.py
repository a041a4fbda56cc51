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

The random bits come from a counter hash, not from ``jax.random.bits``: each
element's row-major index ``i`` and a *seed* ``s`` (uint32 [2], from a PRNG
key) give ``mix((i ^ s[0]) * G + s[1])``, where ``G`` is an odd constant and
``mix`` a 32-bit xor-shift-multiply mixer; both steps are bijections of
uint32, and the high 16 bits of the result are the noise.

- Unbiased: for a fixed index, a uniformly random first seed word makes the
  mixer's input, hence its output, uniform over uint32, so the noise is
  exactly uniform over [0, 2**16) across keys.
- Deterministic for a seed and sharding-invariant: the noise of an element
  depends only on the seed and its index (an iota), so every sharding of the
  array computes the same bits with no communication.
- Cheap to compile: about 15 elementwise integer operations per element,
  where threefry2x32 unrolls to over a hundred. Measured on GPT-2 124M's
  optimizer update compiled for an H100 (``experiments/
  stochastic_rounding_bench.py``, docs/optimizer_precision.md): XLA:GPU's priority
  fusion pass and the kernels' code generation spent most of the compile on
  the per-leaf threefry chains and ``fold_in`` keys, growing faster than
  the operation count; a second round of the mixer more than doubled the
  update's compile time, so there is one.
- Why not one ``jax.random.bits`` for all leaves, sliced per leaf: compiled
  for an H100, XLA:GPU does not materialise the flat draw (which would cost
  4 bytes per parameter) but fuses it into every leaf's update, re-emitting
  the threefry chain per slice, so it still compiled about twice as slowly
  as the counter hash (GPT-2 124M's optimizer update, a scratch variant);
  and under a sharding plan a flat draw must be laid out to match each
  leaf's sharding, which the counter hash, computed from each leaf's own
  iota, avoids by construction.

Indices are taken modulo 2**32: a leaf of more than 2**32 elements repeats
its noise with that period (each element's rounding stays unbiased).
"""

from typing import Any

import chex
import jax
import jax.numpy as jnp
import numpy as np

# Rounding modes of 16-bit storage (params and optimizer moments).
ROUNDING_MODES = ("nearest", "stochastic", "kahan")

# The mixer's constants: the "lowbias32" xor-shift-multiply hash (shifts 16,
# 15, 16), a bijection of uint32 with low avalanche bias; and an odd
# multiplier (2**32 / golden ratio) spreading consecutive indices apart.
_MULTIPLIERS = (0x7FEB352D, 0x846CA68B)
_SPREAD = 0x9E3779B9


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


def _mix(x):
  """The uint32 mixer, on jnp or numpy uint32 arrays (wrapping products)."""
  x = x ^ (x >> 16)
  x = x * x.dtype.type(_MULTIPLIERS[0])
  x = x ^ (x >> 15)
  x = x * x.dtype.type(_MULTIPLIERS[1])
  return x ^ (x >> 16)


def key_seed(key: jax.Array) -> jax.Array:
  """The seed of `key`: uint32 [2], random bits drawn from the key."""
  return jax.random.bits(key, (2,), jnp.uint32)


def stream_seed(seed: jax.Array, index: int) -> jax.Array:
  """Seed of stream `index` (a Python int >= 0) of `seed` (uint32 [2]).

  Distinct indices give distinct seeds (their xor masks are images of
  distinct counters under the bijective mixer); the masks are constants, so
  a stream costs one xor, not a PRNG call.
  """
  counters = np.array([2 * index + 1, 2 * index + 2], np.uint64)
  masks = _mix((counters % 2**32).astype(np.uint32))
  return seed ^ jnp.asarray(masks, jnp.uint32)


def random_bits16(seed: jax.Array, shape: Any) -> jax.Array:
  """16 random bits per element: uint32 `shape`, values in [0, 2**16).

  Args:
    seed: uint32 [2].
    shape: the result's shape.

  Returns:
    ``mix((index ^ seed[0]) * G + seed[1]) >> 16`` for each element's
    row-major index (modulo 2**32), see the module docstring.
  """
  shape = tuple(shape)
  index = jnp.zeros(shape, jnp.uint32)
  stride = 1
  for axis in reversed(range(len(shape))):
    term = jax.lax.broadcasted_iota(jnp.uint32, shape, axis)
    if stride % 2**32 != 1:
      term = term * jnp.uint32(stride % 2**32)
    index = term if axis == len(shape) - 1 else index + term
    stride *= shape[axis]
  return _mix((index ^ seed[0]) * jnp.uint32(_SPREAD) + seed[1]) >> 16


def round_with_seed(x: chex.Array, seed: jax.Array,
                    dtype: Any = jnp.bfloat16) -> chex.Array:
  """`stochastic_round` from a seed (uint32 [2]) rather than a key."""
  dtype = jnp.dtype(dtype)
  if dtype == jnp.float32:
    return jnp.asarray(x, jnp.float32)
  if dtype != jnp.bfloat16:
    raise ValueError(
        f"stochastic_round: dtype must be bfloat16 (or float32, a no-op), got "
        f"{dtype.name}.")
  x = jnp.asarray(x, jnp.float32)
  bits = jax.lax.bitcast_convert_type(x, jnp.uint32)
  noise = random_bits16(seed, x.shape)
  # Carries into the exponent are right: the next bfloat16 up is 2**k.
  rounded = (bits + noise) & jnp.uint32(0xFFFF0000)
  y = jax.lax.bitcast_convert_type(rounded, jnp.float32).astype(dtype)
  return jnp.where(jnp.isfinite(x), y, x.astype(dtype))


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
    nearest (they stay what they are). The same for any sharding of `x`.

  Examples:
    >>> import jax, jax.numpy as jnp, mpjax
    >>> x = jnp.full(10_000, 1.0 + 2.0**-10)  # 1/8 of a bfloat16 ulp above 1
    >>> y = mpjax.stochastic_round(x, jax.random.key(0)).astype(jnp.float32)
    >>> sorted(set(y.tolist()))  # only the two neighbours
    [1.0, 1.0078125]
    >>> round(float(y.mean()), 4)  # their mean is x's
    1.001
  """
  return round_with_seed(x, key_seed(key), dtype)
