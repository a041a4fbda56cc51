"""FP8 matmuls in flax layers, run by the module-call hooks.

A `PolicyMap` fp8 entry (see `mpjax.PolicyMap`) gives an fp8 layer
(`islands.FP8_LAYERS`) a recipe; during the layer's call its ``dot_general``
(NNX Einsum: ``einsum_op``) is `fp8_dot.fp8_dot_general` with the recipe
and the layer's fp8 state bound, and the original is put back afterwards:

- linen (`linen_call`, from `linen_policy.policy_hook`): the state is the
  layer's variables in the ``"_overwrite_with_gradient"`` collection
  (``input_scale``, ``input_amax_history``, ...), created when the model is
  initialised under the map, ``mpjax.with_policy(model.init, policy_map)``;
- NNX (`Fp8Hook`, attached by `mpjax.with_nnx_policy`): the state is the
  layer's `mpjax.OverwriteWithGradient` variables ``fp8_input_scale``, ...,
  which `with_nnx_policy` adds (`attach_state`) and `TrainState.from_nnx`
  groups into ``model_state["_overwrite_with_gradient"]``.

`mpjax.make_train_step` differentiates that state and makes its gradient
(the updated scales and histories) its new value.
"""

import dataclasses
from typing import Any, Callable, Dict

import flax.linen as nn
from flax import nnx

from mpjax._src import fp8 as fp8_lib
from mpjax._src import fp8_dot
from mpjax._src import hooks
from mpjax._src import model_state as model_state_lib
from mpjax._src import nnx_apply

OWG = model_state_lib.OVERWRITE_WITH_GRADIENT
_NNX_PREFIX = "fp8_"


def _linen_state(module: nn.Module, recipe: fp8_lib.Recipe
                 ) -> Dict[str, Any]:
  """The layer's fp8 state, created on initialisation (inside its call)."""
  init = recipe.init_state()
  if not init:
    return {}
  if (not module.is_mutable_collection(OWG) and
      not all(module.has_variable(OWG, name) for name in init)):
    raise ValueError(
        f"fp8 layer {'/'.join(module.path) or '(root)'!r} "
        f"({type(module).__name__}) has no fp8 state in the {OWG!r} "
        "collection: initialise the model under the policy map, variables = "
        "mpjax.with_policy(model.init, policy_map)(key, x), and pass "
        f"model_state={{{OWG!r}: variables[{OWG!r}]}} to "
        "mpjax.TrainState.create.")
  return {name: module.variable(OWG, name, lambda v=value: v).value
          for name, value in init.items()}


def linen_call(module: nn.Module, recipe: fp8_lib.Recipe,
               next_fun: Callable[..., Any]) -> Callable[..., Any]:
  """`next_fun` (the layer's ``__call__``) with an fp8 ``dot_general``."""

  def dot_general(lhs, rhs, dimension_numbers, precision=None,
                  preferred_element_type=None, **kwargs):
    # Inside the layer's compact __call__: variables may be created here.
    state = _linen_state(module, recipe)
    return fp8_dot.fp8_dot_general(
        lhs, rhs, dimension_numbers, precision, preferred_element_type,
        recipe=recipe, state=state or None, **kwargs)

  def call(*args, **kwargs):
    saved = module.dot_general, module.dot_general_cls
    # linen fields are frozen; flax reads them inside __call__.
    object.__setattr__(module, "dot_general", dot_general)
    object.__setattr__(module, "dot_general_cls", None)
    try:
      return next_fun(*args, **kwargs)
    finally:
      object.__setattr__(module, "dot_general", saved[0])
      object.__setattr__(module, "dot_general_cls", saved[1])

  return call


def attach_state(module: nnx.Module, recipe: fp8_lib.Recipe) -> None:
  """Adds the recipe's fp8 state to an NNX layer (``fp8_input_scale``, ...)."""
  init = recipe.init_state()
  for op in fp8_lib.OPERANDS:  # a recipe without state (current scaling)
    for suffix in ("_scale", "_amax_history"):
      if op + suffix not in init and _NNX_PREFIX + op + suffix in vars(module):
        delattr(module, _NNX_PREFIX + op + suffix)
  for name, value in init.items():
    current = getattr(module, _NNX_PREFIX + name, None)
    if (isinstance(current, nnx_apply.OverwriteWithGradient) and
        current[...].shape == value.shape):
      continue  # re-applying a map keeps the state
    setattr(module, _NNX_PREFIX + name,
            nnx_apply.OverwriteWithGradient(value))


def detach_state(module: nnx.Module) -> None:
  """Removes the fp8 state `attach_state` added."""
  for op in fp8_lib.OPERANDS:
    for suffix in ("_scale", "_amax_history"):
      name = _NNX_PREFIX + op + suffix
      if name in vars(module):
        delattr(module, name)


def _nnx_state(module: nnx.Module, recipe: fp8_lib.Recipe) -> Dict[str, Any]:
  return {name: getattr(module, _NNX_PREFIX + name)[...]
          for name in recipe.init_state()}


@dataclasses.dataclass(frozen=True)
class Fp8Hook:
  """The `hooks_nnx` hook of an NNX fp8 layer (a value: hashable)."""
  recipe: fp8_lib.Recipe

  def __call__(self, next_fun, args, kwargs, call: hooks.CallContext):
    if call.method != "__call__":
      return next_fun(*args, **kwargs)
    module, recipe = call.module, self.recipe
    attr = "einsum_op" if hasattr(module, "einsum_op") else "dot_general"
    state = _nnx_state(module, recipe)
    if attr == "einsum_op":
      def op(subscripts, lhs, rhs, precision=None, **kw):
        return fp8_dot.fp8_einsum(subscripts, lhs, rhs, recipe=recipe,
                                  state=state or None, precision=precision,
                                  **kw)
    else:
      def op(lhs, rhs, dimension_numbers, precision=None,
             preferred_element_type=None, **kw):
        return fp8_dot.fp8_dot_general(
            lhs, rhs, dimension_numbers, precision, preferred_element_type,
            recipe=recipe, state=state or None, **kw)
    saved = vars(module).get(attr)
    cls_saved = vars(module).get("dot_general_cls", None)
    object.__setattr__(module, attr, op)
    if cls_saved is not None:
      object.__setattr__(module, "dot_general_cls", None)
    try:
      return next_fun(*args, **kwargs)
    finally:
      object.__setattr__(module, attr, saved)
      if cls_saved is not None:
        object.__setattr__(module, "dot_general_cls", cls_saved)
