"""Model state through the train step: BatchNorm statistics, NNX RNG counts.

A model's non-param collections (``model_state``, see `mpjax.TrainState`)
are read and written by the forward pass. `ModelStateThread` hands them to
every call of the model inside ``loss_fn`` and keeps what the call wrote, so
``loss_fn`` is written as for a model without state; `conform` checks that
the written state has the old one's structure and gives it the old dtypes
(a policy's casts never reach it, and a step that changed a dtype would
compile again); `keep_if` selects between the new and the old state, so a
skipped step leaves it bit-identical.

One collection is special, ``"_overwrite_with_gradient"``
(`OVERWRITE_WITH_GRADIENT`, flax's name for it in ``flax.linen.fp8_ops``):
the step differentiates the loss with respect to it as well as the params,
and its gradient becomes its new value. That is how a custom VJP's backward
pass hands out state it computed (fp8 amax histories and scales of the
output gradients): the optimizer never sees it, so gradient accumulation
neither sums nor averages it, and it is never unscaled. A leaf whose
gradient is all zeros keeps its value: jax gives a variable the forward pass
did not read (an fp8 layer that did not run this step) a zero gradient, and
an fp8 scale or amax history of zeros is never an update.
"""

from typing import Any, Callable, Mapping, Optional

import jax
import jax.extend
import jax.numpy as jnp

OVERWRITE_WITH_GRADIENT = "_overwrite_with_gradient"


def gradient_collection(model_state: Optional[Mapping[str, Any]]) -> Any:
  """The ``"_overwrite_with_gradient"`` collection of `model_state`, or None."""
  return (model_state or {}).get(OVERWRITE_WITH_GRADIENT)


def unless_unused(gradient: Any, old: Any) -> Any:
  """`gradient`, leaf by leaf, except where it is all zeros: `old` there."""
  if gradient is None:
    return None
  return jax.tree.map(lambda g, o: jnp.where(jnp.any(g != 0), g, o),
                      gradient, old)


def with_gradient_collection(model_state: Mapping[str, Any],
                             value: Any) -> dict:
  """`model_state` with its ``"_overwrite_with_gradient"`` collection set to
  `value` (left out when `value` is None)."""
  model_state = dict(model_state)
  if value is not None:
    model_state[OVERWRITE_WITH_GRADIENT] = value
  return model_state


class ModelStateThread:
  """``apply(variables, *args, **kwargs)`` with the model state threaded in.

  Each call adds the latest model state's collections to ``variables`` (they
  replace collections of the same name given there) and marks them mutable;
  the collections the call returns become the latest state, which the next
  call reads, and `updated` after the last. The call returns what the model
  returns, as if ``mutable`` had not been touched: the output alone, or
  ``(output, collections)`` for the collections the caller itself named in
  ``mutable=`` (all of them for ``mutable=True``).

  Args:
    apply_fn: ``apply(variables, *args, mutable=..., **kwargs)`` with linen's
      ``mutable`` semantics (``model.apply``, `mpjax.NNXApply`, either under
      `mpjax.with_policy`).
    model_state: the dict of collections.
  """

  def __init__(self, apply_fn: Callable, model_state: Mapping[str, Any]):
    self._apply_fn = apply_fn
    self.updated = dict(model_state)
    self._trace = jax.extend.core.get_opaque_trace_state(convention="nnx")

  def __call__(self, variables: Mapping[str, Any], *args,
               mutable: Any = False, **kwargs) -> Any:
    names = list(self.updated)
    if mutable is True:
      asked = True
    elif mutable is False:
      asked = []
    else:
      asked = [mutable] if isinstance(mutable, str) else list(mutable)
    variables = {**variables, **self.updated}
    out, written = self._apply_fn(
        variables, *args,
        mutable=True if asked is True else sorted(set(names) | set(asked)),
        **kwargs)
    written_state = {k: v for k, v in written.items() if k in names}
    self._check_not_escaping(written_state)
    self.updated.update(written_state)
    if asked is True:
      return out, written
    if asked:
      return out, {k: v for k, v in written.items() if k in asked}
    return out


  def _check_not_escaping(self, written: Mapping[str, Any]) -> None:
    """Raises if this call runs inside a jax transformation of ``loss_fn``
    (jax.checkpoint, lax.scan, vmap) and wrote state there: its values could
    not leave that transformation (jax would fail later, naming nothing)."""
    if jax.extend.core.get_opaque_trace_state(convention="nnx") == self._trace:
      return
    for name, tree in written.items():
      old = jax.tree.leaves(self.updated[name])
      new = jax.tree.leaves(tree)
      if len(old) != len(new) or any(
          a is not b and isinstance(a, jax.core.Tracer)
          for a, b in zip(new, old)):
        raise ValueError(
            "make_train_step: loss_fn called apply_fn inside a jax "
            "transformation (jax.checkpoint, lax.scan, jax.vmap, ...) and the "
            f"model wrote its {name!r} collection there; model state written "
            "inside a transformation cannot leave it. Transform the module "
            "instead (nn.remat / nn.scan / nnx.remat), or call apply_fn "
            "outside the transformation.")


def _describe(tree: Any) -> str:
  return str(jax.tree.map(lambda x: f"{jnp.dtype(x.dtype).name}{list(x.shape)}",
                          tree))


def conform(new: Mapping[str, Any], old: Mapping[str, Any]) -> dict:
  """`new` with `old`'s tree structure checked and its dtypes restored.

  Raises:
    ValueError: naming the collection whose structure or shapes changed.
  """
  new = dict(new)
  for name, old_tree in old.items():
    new_tree = new[name]
    if jax.tree.structure(new_tree) != jax.tree.structure(old_tree) or any(
        jnp.shape(a) != jnp.shape(b) for a, b in zip(
            jax.tree.leaves(new_tree), jax.tree.leaves(old_tree))):
      raise ValueError(
          f"make_train_step: the forward pass changed the structure or shapes "
          f"of the model state's {name!r} collection, from "
          f"{_describe(old_tree)} to {_describe(new_tree)}; create the state "
          "with the collections the model writes (model.init's).")
    new[name] = jax.tree.map(
        lambda a, b: a if a.dtype == b.dtype else a.astype(b.dtype),
        new_tree, old_tree)
  return new


def keep_if(apply: jax.Array, new: Optional[Mapping[str, Any]],
            old: Optional[Mapping[str, Any]]) -> Optional[dict]:
  """`new` where the bool scalar `apply` is true, else `old`, leaf by leaf.

  A select, not a ``lax.cond`` (whose predicate a GPU reads on the host);
  PRNG key leaves are selected too.
  """
  if old is None:
    return None
  return jax.tree.map(lambda a, b: jax.lax.select(apply, a, b), dict(new),
                      dict(old))
