"""Which gradient leaves were non-finite, by parameter path.

`nonfinite_leaf_paths` turns the per-leaf finiteness flags that the loss-scale
state (``LossScaledState.leaf_grads_finite``) and
``make_train_step(..., attribution=True)`` produce into parameter paths such
as ``"Dense_1/kernel"``; `leaf_paths` and `path_str` name the leaves of any
tree the same way.
"""

from typing import Any, List, Sequence

import jax
import numpy as np


def _key_name(key: Any) -> str:
  """One path component as plain text: ``Dense_1``, ``kernel``, ``0``."""
  for attr in ("key", "name", "idx"):  # DictKey/FlattenedIndexKey, GetAttrKey, SequenceKey
    if hasattr(key, attr):
      return str(getattr(key, attr))
  return str(key)


def path_str(path: Sequence[Any]) -> str:
  """Joins a jax key path (or an NNX graph path) with ``/``.

  ``jax.tree_util.keystr(path, simple=True, separator="/")`` does the same but
  older jax releases that pyproject still allows lack those arguments.

  Examples:
    >>> import jax
    >>> paths = [p for p, _ in jax.tree_util.tree_leaves_with_path(
    ...     {"Dense_1": {"kernel": 0}, "blocks": [1]})]
    >>> [path_str(p) for p in paths]
    ['Dense_1/kernel', 'blocks/0']
  """
  return "/".join(_key_name(k) for k in path)


def leaf_paths(tree: Any) -> List[str]:
  """The ``/``-joined path of every leaf of `tree`, in `jax.tree.leaves` order.

  Index `i` names flag `i` of `mpjax.finite_flags(tree)`.

  Examples:
    >>> leaf_paths({"Dense_0": {"bias": 0, "kernel": 0}, "scale": 0})
    ['Dense_0/bias', 'Dense_0/kernel', 'scale']
  """
  return [path_str(path) for path, _ in
          jax.tree_util.tree_leaves_with_path(tree)]


def nonfinite_leaf_paths(leaf_finite: Any, like: Any = None) -> List[str]:
  """Returns the paths of the leaves flagged non-finite, in tree order.

  Args:
    leaf_finite: one bool vector with a flag per leaf of `like`, in
      `jax.tree.leaves` order, as `mpjax.finite_flags` packs them
      (``metrics["leaf_grads_finite"]`` from ``make_train_step(...,
      attribution=True)``, ``mpjax.loss_scale_state(opt_state)
      .leaf_grads_finite``); or a tree of bool arrays, one per gradient leaf.
      Tree leaves may be scalars or stacked (e.g. one flag per step of a
      scan); a leaf counts as non-finite if any of its flags is False. Device
      arrays are fetched (one host transfer).
    like: a tree with the gradients' structure (e.g. the params), to name
      packed flags; without it they are named by index, ``"leaf[3]"``.

  Returns:
    Paths such as ``"Dense_1/kernel"``: dict keys, NamedTuple/dataclass
    attribute names and sequence indices joined with ``/``. Empty when every
    leaf was finite.

  Examples:
    >>> import jax.numpy as jnp
    >>> flags = {"Dense_0": {"bias": jnp.array(True), "kernel": jnp.array(True)},
    ...          "Dense_1": {"bias": jnp.array(False), "kernel": jnp.array(False)}}
    >>> nonfinite_leaf_paths(flags)
    ['Dense_1/bias', 'Dense_1/kernel']
    >>> params = {"a": jnp.zeros(2), "b": {"c": jnp.zeros(3)}}
    >>> nonfinite_leaf_paths(jnp.array([True, False]), like=params)
    ['b/c']
  """
  if like is not None:
    leaf_finite = _unpack_flags(leaf_finite, like)
  elif isinstance(leaf_finite, (jax.Array, np.ndarray)) and np.ndim(
      leaf_finite) == 1:
    # Packed flags without the params: name them by index, never fail a loop.
    flags = np.asarray(jax.device_get(leaf_finite))
    return [f"leaf[{i}]" for i in np.flatnonzero(~flags)]
  leaves_with_path = jax.tree_util.tree_leaves_with_path(leaf_finite)
  values = jax.device_get([leaf for _, leaf in leaves_with_path])
  return [path_str(path) for (path, _), value in zip(leaves_with_path, values)
          if not np.all(value)]


def _unpack_flags(flags: Any, like: Any) -> Any:
  """A packed bool vector (one flag per leaf of `like`) as a tree like `like`."""
  treedef = jax.tree.structure(like)
  if jax.tree.structure(flags) == treedef:
    return flags
  vector = np.asarray(jax.device_get(flags))
  if vector.shape != (treedef.num_leaves,):
    raise ValueError(
        f"nonfinite_leaf_paths: expected a tree like `like` or a vector of "
        f"{treedef.num_leaves} flags (one per leaf), got shape {vector.shape}.")
  return jax.tree.unflatten(treedef, list(vector))
