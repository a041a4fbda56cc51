"""A `PolicyMap` applied to linen models, as a `hooks_linen` hook.

What Haiku's ``hk.mixed_precision.set_policy`` does with a method interceptor
and a custom parameter getter, for linen. Linen has no getter hook, so the
params are cast before the call instead, each to the compute dtype of the
module that owns it (its path in the ``"params"`` collection is the module's
path); a shape-only trace (``jax.eval_shape``, with the hooks around the call
suspended) first finds which module class sits at which path. During the
real call `policy_hook` casts the inputs and outputs of every boundary module
and, in attention layers that use flax's default attention function, swaps
in `islands.ATTENTION_ISLAND_FN` (the float32 island, cuDNN-fused on CUDA)
for the duration of the call
(flax reads ``self.attention_fn`` inside ``__call__``; the hook is the only
seam that reaches it without rebuilding the module). The same hook runs
float32-island LayerNorms and RMSNorms as `mpjax.numerics.layer_norm`/
`rms_norm` on their uncast input (`islands.float32_norm`: flax's values, less
residual memory).

Collections other than ``"params"`` (``batch_stats``, caches) are never cast,
so BatchNorm's running statistics keep their float32 dtype.

A module that sets its own ``dtype=`` (``nn.Dense(..., dtype=jnp.float32)``)
computes in it regardless of the map: flax casts inside the module, after the
hook. `mpjax.policy_table` shows such modules.
"""

import functools
from typing import Any, Callable, Dict, Mapping, Optional, Tuple

import flax.linen as nn
import jax
from flax import nnx

from mpjax._src import applied_maps
from mpjax._src import casting
from mpjax._src import fp8_layers
from mpjax._src import hooks
from mpjax._src import hooks_linen
from mpjax._src import islands
from mpjax._src import policy_map as policy_map_lib

Records = Dict[Tuple[str, ...], policy_map_lib.ModulePolicy]


def _norm_params(module: nn.Module) -> Optional[Tuple[Any, Any]]:
  """A linen LayerNorm's or RMSNorm's ``(scale, bias)`` (None where unused).

  None if a param it uses does not exist yet (initialisation, or an apply
  that creates params): flax's layer then runs and creates it.
  """
  used = (("scale", module.use_scale),
          ("bias", getattr(module, "use_bias", False)))
  if any(on and not module.has_variable("params", name) for name, on in used):
    return None
  return tuple(nn.meta.unbox(module.get_variable("params", name)) if on
               else None for name, on in used)


def policy_hook(pm: policy_map_lib.PolicyMap,
                visited: Optional[Records] = None) -> hooks.Hook:
  """The hook that applies `pm` to boundary modules.

  Register it with ``hooks_linen.intercept(hook, policy_map=pm)``, so that
  each call carries the module's policy under `pm`.

  Args:
    pm: the map.
    visited: if given, filled with module path -> `ModulePolicy` for every
      module a policy method of which ran.

  Returns:
    A `hooks.Hook`.
  """
  def hook(next_fun, args, kwargs, call: hooks.CallContext):
    module, resolved = call.module, call.policy
    applied_maps.note_applied(pm)
    if visited is not None:
      visited[tuple(module.path)] = resolved
    policy = resolved.policy
    norm = (islands.float32_norm(module, call.cls, policy, args, kwargs)
            if resolved.boundary and call.method == "__call__" else None)
    norm_params = None if norm is None else _norm_params(module)
    if norm_params is not None:
      # Instead of flax's layer, and with the input left uncast: see
      # float32_norm (residual memory).
      return casting.cast_floating(norm(*norm_params), policy.output_dtype)
    if resolved.boundary:
      args, kwargs = casting.cast_floating((args, kwargs),
                                           policy.compute_dtype)
    if (resolved.fp8 is not None and call.method == "__call__" and
        issubclass(call.cls, islands.FP8_LAYERS)):
      next_fun = fp8_layers.linen_call(module, resolved.fp8, next_fun)
    # flax reads self.attention_fn inside __call__: swapping it for the
    # call is the only seam that reaches it without rebuilding the module.
    original = getattr(module, "attention_fn", None)
    swap = (resolved.attention_island and
            islands.is_flax_attention_fn(original))
    if swap:
      object.__setattr__(module, "attention_fn", islands.ATTENTION_ISLAND_FN)
    try:
      out = next_fun(*args, **kwargs)
    finally:
      if swap:
        object.__setattr__(module, "attention_fn", original)
    if resolved.boundary:
      out = casting.cast_floating(out, policy.output_dtype)
    return out

  return hook


def discover(pm: policy_map_lib.PolicyMap, fn: Callable, args: tuple,
             kwargs: dict) -> Records:
  """The policy of every linen module `fn` calls, from a shape-only trace.

  The hooks around the call are suspended for the trace: observers see the
  real call only.
  """
  records: Records = {}

  def record(next_fun, a, k, call: hooks.CallContext):
    records[tuple(call.module.path)] = call.policy
    return next_fun(*a, **k)

  with hooks_linen.suspended(), hooks_linen.intercept(record, policy_map=pm):
    jax.eval_shape(lambda: fn(*args, **kwargs))
  return records


def owner(records: Mapping[Tuple[str, ...], Any],
          names: Tuple[str, ...]) -> Optional[Tuple[str, ...]]:
  """The longest recorded module path that is a prefix of `names`."""
  for end in range(len(names), -1, -1):
    if names[:end] in records:
      return names[:end]
  return None


def dict_names(path) -> Tuple[str, ...]:
  """The dict keys of a jax key path (a linen param's module path and name)."""
  return tuple(str(k.key) for k in path
               if isinstance(k, jax.tree_util.DictKey))


def cast_params(params: Any, records: Records, default_dtype: Any) -> Any:
  """Casts each floating param to the compute dtype of the module owning it.

  Args:
    params: the ``"params"`` collection (nested dicts, possibly boxed).
    records: module path -> `ModulePolicy`, from `discover`.
    default_dtype: for params of modules `fn` never called.

  Returns:
    `params` with the same structure, floating leaves cast.
  """
  def cast(path, leaf):
    names = dict_names(path)
    module_path = owner(records, names[:-1])
    dtype = (default_dtype if module_path is None
             else records[module_path].policy.compute_dtype)
    return casting.cast_floating(leaf, dtype)

  return jax.tree_util.tree_map_with_path(cast, params)


def _linen_variables(args: tuple) -> bool:
  """Whether the first argument is a linen variables dict with params."""
  if not args or not isinstance(args[0], Mapping) or "params" not in args[0]:
    return False
  return not isinstance(args[0]["params"], nnx.State)


def with_policy_map(apply_fn: Callable,
                    pm: policy_map_lib.PolicyMap) -> Callable:
  """Wraps an apply function to run under the per-module map `pm`.

  For linen, `apply_fn` is ``model.apply`` (or any function whose first
  argument is the variables dict and that applies one linen model): its
  ``"params"`` are cast per owning module and the model runs under
  `policy_hook` (a `hooks_linen` hook). For NNX, `apply_fn` calls a model
  prepared with `mpjax.with_nnx_policy(model, pm)`; the modules cast
  themselves (their attached `hooks_nnx` hook).

  The root module's output is cast to ``pm.output_dtype`` by the root
  boundary; other results of `apply_fn` (mutated collections) are returned
  as they are.

  Raises (when called):
    ValueError: no module ran under `pm` (an NNX model not prepared with
      `with_nnx_policy`, or a function that calls no model), an NNX model
      prepared with a different map, or (``strict=True``) an entry that
      matched no module.
  """
  if not callable(apply_fn):
    raise TypeError(f"with_policy: apply_fn must be callable, got {apply_fn!r}.")

  @functools.wraps(apply_fn)
  def apply(*args, **kwargs):
    if _linen_variables(args):
      records = discover(pm, apply_fn, args, kwargs)
      variables = dict(args[0])
      variables["params"] = cast_params(variables["params"], records,
                                        pm.default.compute_dtype)
      args = (variables,) + tuple(args[1:])
    visited: Records = {}
    with applied_maps.tracking_applied() as seen, \
        hooks_linen.intercept(policy_hook(pm, visited), policy_map=pm):
      out = apply_fn(*args, **kwargs)
    others = seen - {pm}
    if others:
      raise ValueError(
          f"with_policy: the model was prepared with {others.pop()!r} but "
          f"is applied under {pm!r}; call mpjax.with_nnx_policy(model, "
          "policy_map) with the map the state holds.")
    if not seen:
      raise ValueError(
          f"with_policy: no module ran under {pm!r}. For linen, pass "
          "model.apply (or a function of (variables, ...) that calls it); "
          "for NNX, prepare the model with mpjax.with_nnx_policy(model, "
          "policy_map) before nnx.split.")
    if visited:
      pm.check_matched(
          {key for r in visited.values() for key in r.matched},
          ["/".join(p) for p in visited])
    return out

  return apply
