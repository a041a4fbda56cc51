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

linen's ``nn.Einsum`` has no ``dot_general`` field: its fp8 call
(`linen_einsum_call`) is the layer's computation itself, with the layer's own
params and attributes (``einsum_str``, ``shape``, ``use_bias``, ``dtype``,
``preferred_element_type``, ``promote_dtype``) and `fp8_dot.fp8_einsum`.

`mpjax.make_train_step` differentiates that state and makes its gradient
(the updated scales and histories) its new value. A layer called more than
once in one traced function (a shared layer) chains its calls
(`fp8_dot.fp8_dot_general_chained`): the state's new value is the max over
the calls (the history takes the largest amax), not their sum. Calls that
each run in their own lifted transform (``nn.remat(nn.Dense)`` called twice:
every call is a separate trace with its own copy of the state) are not
chained, and their updates still add.
"""

import dataclasses
import functools
import weakref
from typing import Any, Callable, Dict, Optional

import flax.linen as nn
import jax
import jax.extend
import jax.numpy as jnp
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


class _Chains:
  """The last fp8 call of each layer: ``(state leaf, token, trace)``.

  A call continues the chain of the previous one when it reads the very
  same state (the same array object: one layer, one trace) inside the same
  JAX trace; anything else starts a new chain. Keyed by the module's
  identity (linen: the bound clone of one apply; NNX: the module object),
  an entry dropped when its module is collected.
  """

  def __init__(self):
    self._last: Dict[int, Any] = {}

  def previous(self, module: Any, state: Dict[str, Any]) -> Optional[dict]:
    last = self._last.get(id(module))
    if last is None or not state:
      return None
    ref, leaf, token, trace = last
    if (ref() is not module or leaf is not next(iter(state.values())) or
        trace != _trace()):
      return None
    return token

  def record(self, module: Any, state: Dict[str, Any],
             token: Optional[dict]) -> None:
    if token is None:
      return
    key = id(module)
    ref = weakref.ref(module, lambda _, key=key: self._last.pop(key, None))
    self._last[key] = (ref, next(iter(state.values())), token, _trace())


def _trace() -> Any:
  return jax.extend.core.get_opaque_trace_state()


_CHAINS = _Chains()


def _chained_dot_general(module: Any, recipe: fp8_lib.Recipe,
                         state_of: Callable[[], Dict[str, Any]]):
  """A ``dot_general`` for `module`'s fp8 matmul, chaining repeated calls."""

  def dot_general(lhs, rhs, dimension_numbers, precision=None,
                  preferred_element_type=None, **kwargs):
    state = state_of()
    out, token = fp8_dot.fp8_dot_general_chained(
        lhs, rhs, dimension_numbers, precision, preferred_element_type,
        recipe=recipe, state=state or None,
        previous=_CHAINS.previous(module, state), **kwargs)
    _CHAINS.record(module, state, token)
    return out

  return dot_general


def _einsum_op(dot_general: Callable[..., Any]) -> Callable[..., Any]:
  """``einsum(subscripts, lhs, rhs)`` as one call of `dot_general`."""
  return functools.partial(fp8_dot.einsum_with, dot_general)


def linen_einsum_call(module: nn.Einsum, recipe: fp8_lib.Recipe
                      ) -> Callable[..., Any]:
  """A linen ``nn.Einsum``'s ``__call__`` with its einsum in fp8.

  The layer's computation with its own params and attributes: the kernel
  (and bias, shaped by flax's rule) created or read as flax names them, the
  operands promoted by ``module.promote_dtype`` to ``module.dtype``, the
  einsum one fp8 matmul, the bias added after.
  """
  einsum = _einsum_op(_chained_dot_general(
      module, recipe, lambda: _linen_state(module, recipe)))

  def call(inputs, einsum_str=None):
    subscripts = nn.merge_param("einsum_str", module.einsum_str,
                                einsum_str).replace(" ", "")
    if "->" not in subscripts or subscripts.count(",") != 1:
      raise ValueError(
          f"fp8 nn.Einsum {'/'.join(module.path) or '(root)'!r}: einsum_str "
          f"{subscripts!r} must be explicit ('->') with exactly two operands.")
    kernel = module.param("kernel", module.kernel_init, module.shape,
                          module.param_dtype)
    bias = broadcast = None
    if module.use_bias:
      # flax's own rule, so the bias param has flax's shape.
      bias_shape, broadcast = module._get_bias_shape(  # pylint: disable=protected-access
          subscripts, inputs, kernel)
      bias = module.param("bias", module.bias_init, bias_shape,
                          module.param_dtype)
    inputs, kernel, bias = module.promote_dtype(inputs, kernel, bias,
                                                dtype=module.dtype)
    y = einsum(subscripts, inputs, kernel,
               preferred_element_type=module.preferred_element_type)
    if bias is not None:
      y = y + jnp.reshape(bias, broadcast)
    return y

  return call


def linen_call(module: nn.Module, recipe: fp8_lib.Recipe,
               next_fun: Callable[..., Any]) -> Callable[..., Any]:
  """`next_fun` (the layer's ``__call__``) with an fp8 matmul.

  Dense and DenseGeneral: their ``dot_general`` swapped for the call;
  ``nn.Einsum``: `linen_einsum_call` instead of `next_fun`.
  """
  if isinstance(module, nn.Einsum):
    return linen_einsum_call(module, recipe)
  # Inside the layer's compact __call__: variables may be created there.
  dot_general = _chained_dot_general(module, recipe,
                                     lambda: _linen_state(module, recipe))

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
    op = _chained_dot_general(module, recipe,
                              lambda: _nnx_state(module, recipe))
    if attr == "einsum_op":
      op = _einsum_op(op)
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
