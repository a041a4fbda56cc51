"""A `PolicyMap` applied to linen models through `flax.linen.intercept_methods`.

What Haiku's ``hk.mixed_precision.set_policy`` does with a method interceptor
and a custom parameter getter, for linen. Linen has no getter hook, so the
params are cast before the call instead, each to the compute dtype of the
module that owns it (its path in the ``"params"`` collection is the module's
path); a shape-only trace (``jax.eval_shape``) first finds which module class
sits at which path. During the real call an interceptor casts the inputs and
outputs of every boundary module and, in attention layers that use flax's
default attention function, swaps in `mpjax.numerics.dot_product_attention`
for the duration of the call (flax reads ``self.attention_fn`` inside
``__call__``; the interceptor is the only seam that reaches it without
rebuilding the module). The same seam runs float32-island LayerNorms and
RMSNorms as `mpjax.numerics.layer_norm`/`rms_norm` on their uncast input
(`module_policy.float32_norm`: flax's values, less residual memory).

Collections other than ``"params"`` (``batch_stats``, caches) are never cast,
so BatchNorm's running statistics keep their float32 dtype.

A module that sets its own ``dtype=`` (``nn.Dense(..., dtype=jnp.float32)``)
computes in it regardless of the map: flax casts inside the module, after the
interceptor. `mpjax.policy_table` shows such modules.
"""

import functools
import threading
from typing import Any, Callable, Dict, Mapping, Optional, Tuple

import flax.linen as nn
import jax
from flax import nnx

from mpjax._src import policy_map as module_policy
from mpjax._src import numerics

Records = Dict[Tuple[str, ...], module_policy.ModulePolicy]


class _Discovering(threading.local):
  """Whether `discover`'s shape-only trace is running (observers skip it)."""

  def __init__(self):
    super().__init__()
    self.depth = 0


_DISCOVERING = _Discovering()


def discovering() -> bool:
  """Whether the current call is `discover`'s trace, not the real call."""
  return _DISCOVERING.depth > 0


def is_policy_method(name: str) -> bool:
  """Methods the policy casts at: ``__call__`` and public methods."""
  # Lifted transforms (nn.remat) call internal lambdas through the module.
  return name == "__call__" or (name.isidentifier() and
                                not name.startswith("_") and name != "setup")


class ChainTracker:
  """Builds ``((path, class), ...)`` chains from the root to a bound module.

  The chain follows ``module.parent``; inside lifted transforms (``nn.scan``,
  ``nn.remat``) a module's parent is a scope, not its parent module, so the
  missing ancestors are taken from the modules seen earlier in the same call
  (by path: the lifted module and its wrapper share their path).
  """

  def __init__(self):
    self.seen = {}

  def chain(self, module: nn.Module) -> module_policy.Chain:
    modules = []
    while isinstance(module, nn.Module):
      modules.append(module)
      module = module.parent
    chain = [(tuple(m.path), type(m)) for m in reversed(modules)]
    top = chain[0][0]
    missing = [(top[:end], self.seen.get(top[:end], nn.Module))
               for end in range(len(top))]
    chain = missing + chain
    for path, cls in chain:
      self.seen.setdefault(path, cls)
    return tuple(("/".join(path), cls) for path, cls in chain)


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


def policy_interceptor(pm: module_policy.PolicyMap,
                       visited: Optional[Records] = None) -> Callable:
  """The method interceptor that applies `pm` to boundary modules.

  Args:
    pm: the map.
    visited: if given, filled with module path -> `ModulePolicy` for every
      module a policy method of which ran.

  Returns:
    An interceptor for `flax.linen.intercept_methods`.
  """
  tracker = ChainTracker()

  def interceptor(next_fun, args, kwargs, context):
    if not is_policy_method(context.method_name):
      return next_fun(*args, **kwargs)
    module = context.module
    resolved = pm.resolve(tracker.chain(module))
    module_policy.note_applied(pm)
    if visited is not None:
      visited[tuple(module.path)] = resolved
    policy = resolved.policy
    norm = (module_policy.float32_norm(module, type(module), policy, args,
                                       kwargs)
            if resolved.boundary and context.method_name == "__call__"
            else None)
    norm_params = None if norm is None else _norm_params(module)
    if norm_params is not None:
      # Instead of flax's layer, and with the input left uncast: see
      # float32_norm (residual memory).
      return module_policy.cast_floating(norm(*norm_params),
                                         policy.output_dtype)
    if resolved.boundary:
      args, kwargs = module_policy.cast_floating((args, kwargs),
                                                 policy.compute_dtype)
    original = getattr(module, "attention_fn", None)
    swap = (resolved.attention_island and
            module_policy.is_flax_attention_fn(original))
    if swap:
      object.__setattr__(module, "attention_fn",
                         numerics.dot_product_attention)
    try:
      out = next_fun(*args, **kwargs)
    finally:
      if swap:
        object.__setattr__(module, "attention_fn", original)
    if resolved.boundary:
      out = module_policy.cast_floating(out, policy.output_dtype)
    return out

  return interceptor


def discover(pm: module_policy.PolicyMap, fn: Callable, args: tuple,
             kwargs: dict) -> Records:
  """The policy of every linen module `fn` calls, from a shape-only trace."""
  records: Records = {}
  tracker = ChainTracker()

  def record(next_fun, a, k, context):
    if is_policy_method(context.method_name):
      module = context.module
      records[tuple(module.path)] = pm.resolve(tracker.chain(module))
    return next_fun(*a, **k)

  _DISCOVERING.depth += 1
  try:
    with nn.intercept_methods(record):
      jax.eval_shape(lambda: fn(*args, **kwargs))
  finally:
    _DISCOVERING.depth -= 1
  return records


def owner(records: Mapping[Tuple[str, ...], Any],
          names: Tuple[str, ...]) -> Optional[Tuple[str, ...]]:
  """The longest recorded module path that is a prefix of `names`."""
  for end in range(len(names), -1, -1):
    if names[:end] in records:
      return names[:end]
  return None


def _dict_names(path) -> Tuple[str, ...]:
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
    names = _dict_names(path)
    module_path = owner(records, names[:-1])
    dtype = (default_dtype if module_path is None
             else records[module_path].policy.compute_dtype)
    return module_policy.cast_floating(leaf, dtype)

  return jax.tree_util.tree_map_with_path(cast, params)


def _linen_variables(args: tuple) -> bool:
  """Whether the first argument is a linen variables dict with params."""
  if not args or not isinstance(args[0], Mapping) or "params" not in args[0]:
    return False
  return not isinstance(args[0]["params"], nnx.State)


def with_policy_map(apply_fn: Callable,
                    pm: module_policy.PolicyMap) -> Callable:
  """Wraps an apply function to run under the per-module map `pm`.

  For linen, `apply_fn` is ``model.apply`` (or any function whose first
  argument is the variables dict and that applies one linen model): its
  ``"params"`` are cast per owning module and the model runs under
  `policy_interceptor`. For NNX, `apply_fn` calls a model prepared with
  `mpjax.with_nnx_policy(model, pm)`; the modules cast themselves.

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
    with module_policy.tracking_applied() as seen, \
        nn.intercept_methods(policy_interceptor(pm, visited)):
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
