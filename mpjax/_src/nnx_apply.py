"""`NNXApply`: an NNX model as a linen-style ``apply(variables, *args)``.

`mpjax.TrainState` and `mpjax.make_train_step` speak one convention for both
flax APIs, linen's: the model is a function of a variables dict,
``{"params": ..., **model_state}``, whose non-param collections are updated
when they are named in ``mutable=``. `NNXApply` gives an NNX model that
convention: `split` separates an NNX module into its `nnx.Param` state and
its model state, grouped into collections by variable type,

- ``"batch_stats"``: `nnx.BatchStat` (BatchNorm's running statistics),
- ``"rngs"``: `nnx.RngState` (the keys and counts of ``nnx.Rngs`` streams,
  which `nnx.Dropout` draws from),
- ``"_overwrite_with_gradient"``: `OverwriteWithGradient` variables, whose
  gradient `mpjax.make_train_step` makes their new value (fp8 scales and
  amax histories; see `mpjax._src.model_state`),
- ``"state"``: every other non-Param variable (caches, custom Variables),

(empty collections are left out), and calling it merges the module back
inside the traced function, runs it and, with ``mutable=``, splits the
updated collections out again: NNX mutates variables in place, and that
mutation is the update. Policies live in the graph definition (see
`mpjax.with_nnx_policy`), so the module merged here casts as prepared.
"""

import dataclasses
from typing import Any, Dict, Mapping, Tuple

import jax
from flax import nnx

from mpjax._src import model_state as model_state_lib


class OverwriteWithGradient(nnx.Variable):
  """An NNX variable whose gradient becomes its new value in the train step.

  Grouped into ``model_state["_overwrite_with_gradient"]``; floating values
  only (the step differentiates them).
  """


#: The collections an NNX model's non-param state is grouped into, in order.
NNX_COLLECTIONS: Tuple[Tuple[str, Any], ...] = (
    ("batch_stats", nnx.BatchStat),
    ("rngs", nnx.RngState),
    (model_state_lib.OVERWRITE_WITH_GRADIENT, OverwriteWithGradient),
)
OTHER_COLLECTION = "state"


def _filters(names: Tuple[str, ...]) -> Tuple[Any, ...]:
  by_name = dict(NNX_COLLECTIONS)
  return tuple(by_name.get(name, ...) for name in names)


def split(module: nnx.Module) -> Tuple[nnx.GraphDef, nnx.State,
                                       Dict[str, nnx.State]]:
  """Splits `module` into ``(graphdef, params, model_state)``.

  Args:
    module: an NNX module (prepared with `mpjax.with_nnx_policy` or not).

  Returns:
    The graph definition, the `nnx.Param` state (the master params) and a
    dict of the non-empty collections among ``"batch_stats"``, ``"rngs"``
    and ``"state"`` (see the module docstring).
  """
  if not isinstance(module, nnx.Module):
    raise TypeError(
        f"expected an nnx.Module, got {module!r} of type "
        f"{type(module).__name__}.")
  names = tuple(name for name, _ in NNX_COLLECTIONS) + (OTHER_COLLECTION,)
  graphdef, params, *states = nnx.split(module, nnx.Param, *_filters(names))
  model_state = {name: state for name, state in zip(names, states)
                 if jax.tree.leaves(state)}
  return graphdef, params, model_state


def _fresh(state: Any) -> Any:
  # Variables rebuilt in the current trace: NNX refuses to mutate a Variable
  # created at another trace level (a jit or grad argument's unflattening).
  return jax.tree.map(lambda x: x, state)


@dataclasses.dataclass(frozen=True)
class NNXApply:
  """``apply(variables, *args, mutable=False, **kwargs)`` for an NNX graph.

  Hashable and static (it holds the graph definition only), so it can be a
  `TrainState`'s ``apply_fn``.

  Attributes:
    graphdef: the module's `nnx.GraphDef` (from `split`).
    collections: the names of the model-state collections, in split order.

  Examples:
    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> from mpjax._src import nnx_apply
    >>> bn = nnx.BatchNorm(3, rngs=nnx.Rngs(0))
    >>> graphdef, params, model_state = nnx_apply.split(bn)
    >>> apply = nnx_apply.NNXApply(graphdef, tuple(model_state))
    >>> y, updated = apply({"params": params, **model_state},
    ...                    jnp.ones((4, 3)), mutable=["batch_stats"])
    >>> sorted(updated), updated["batch_stats"]["var"].dtype
    (['batch_stats'], dtype('float32'))
  """

  graphdef: Any
  collections: Tuple[str, ...]

  def merge(self, variables: Mapping[str, Any]) -> nnx.Module:
    """The module with `variables` (``{"params": ..., **model_state}``)."""
    if not isinstance(variables, Mapping) or "params" not in variables:
      raise TypeError(
          "NNXApply: variables must be a dict with 'params' (and the model "
          f"state's collections {list(self.collections)}), got "
          f"{type(variables).__name__}"
          + (f" with keys {sorted(variables)}"
             if isinstance(variables, Mapping) else "") + ".")
    missing = [name for name in self.collections if name not in variables]
    if missing:
      raise ValueError(
          f"NNXApply: variables lack the collections {missing}; pass "
          "state.variables, or {'params': params, **state.model_state}.")
    unknown = sorted(set(variables) - {"params", *self.collections})
    if unknown:
      raise ValueError(
          f"NNXApply: unknown collections {unknown}; this model has 'params' "
          f"and {list(self.collections)}.")
    states = [variables["params"]] + [variables[n] for n in self.collections]
    return nnx.merge(self.graphdef, *(_fresh(s) for s in states))

  def __call__(self, variables: Mapping[str, Any], *args,
               mutable: Any = False, **kwargs) -> Any:
    """Runs the module on ``*args, **kwargs``.

    Args:
      variables: ``{"params": ..., **model_state}``.
      *args: the module's positional arguments.
      mutable: as linen's: False (return the output only), True (all
        collections), or a collection name or list of names to return
        updated.
      **kwargs: the module's keyword arguments.

    Returns:
      The output, or ``(output, {collection: updated state})`` when
      `mutable` names collections.
    """
    module = self.merge(variables)
    out = module(*args, **kwargs)
    if mutable is False:
      return out
    if mutable is True:
      names = self.collections
    else:
      names = (mutable,) if isinstance(mutable, str) else tuple(mutable)
      unknown = [n for n in names if n not in self.collections]
      if unknown:
        raise ValueError(
            f"NNXApply: mutable names {unknown}, which this model does not "
            f"have; its collections are {list(self.collections)}.")
    _, _, updated = split(module)
    return out, {name: updated[name] for name in names}
