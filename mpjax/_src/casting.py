"""Casting the floating leaves of a pytree that may hold NNX objects.

Used wherever a policy casts a call's inputs, outputs or params: jmp's cast
maps into every pytree, and NNX modules, ``Rngs`` and Variables are pytrees
whose identity matters, so they pass through whole.
"""

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


def is_graph_leaf(x: Any) -> bool:
  """Whether `x` is an NNX object to keep whole (a Variable or a Pytree).

  Pass it as ``is_leaf=`` to `jax.tree` functions that must not look inside
  modules, ``Rngs`` or Variables.

  Examples:
    >>> from flax import nnx
    >>> is_graph_leaf(nnx.Rngs(0)), is_graph_leaf(1.0)
    (True, False)
  """
  return isinstance(x, (nnx.Variable, nnx.Pytree))


def cast_floating(tree: Any, dtype: Any) -> Any:
  """Casts the floating array leaves of `tree` to `dtype`.

  Integer arrays, PRNG keys, non-arrays and NNX objects pass untouched, and
  a leaf already in `dtype` is returned as is (the same object).

  Args:
    tree: any pytree.
    dtype: the floating dtype to cast to.

  Returns:
    `tree` with every floating ``jax.Array``/``np.ndarray`` leaf in `dtype`.

  Examples:
    >>> import jax.numpy as jnp
    >>> out = cast_floating({"x": jnp.ones(2), "i": jnp.ones(2, int)},
    ...                     jnp.bfloat16)
    >>> out["x"].dtype, out["i"].dtype
    (dtype(bfloat16), dtype('int32'))
  """
  def cast(x):
    if (isinstance(x, (jax.Array, np.ndarray)) and
        jnp.issubdtype(x.dtype, jnp.floating) and x.dtype != dtype):
      return x.astype(dtype)
    return x
  return jax.tree.map(cast, tree, is_leaf=is_graph_leaf)
