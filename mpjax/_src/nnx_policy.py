"""A `PolicyMap` applied to an NNX module graph: `with_nnx_policy`.

One call prepares a model in place (NNX's own style, like ``model.eval()``):

- every module records what the map decided for it (a static attribute, so
  it travels in the `GraphDef` through ``nnx.split``/``nnx.merge``,
  ``nnx.jit`` and ``nnx.grad``);
- every boundary module (see `mpjax.PolicyMap`) becomes an instance of a
  subclass of its own class whose ``__call__`` and public methods cast
  floating inputs to the compute dtype and outputs to the output dtype
  (``isinstance`` and the module's state and paths are unchanged: the state
  is what gets checkpointed, and it does not change); a float32-island
  LayerNorm or RMSNorm instead runs as `mpjax.numerics.layer_norm`/`rms_norm`
  on its uncast input (`module_policy.float32_norm`: flax's values, less
  residual memory);
- every module that has a ``dtype`` attribute (flax's compute-dtype knob)
  gets the compute dtype the map gives it, boundary or not. Without this a
  layer would promote: ``nnx.Embed``'s ``dtype`` defaults to its param dtype
  (float32), and ``nnx.Linear`` with ``dtype=None`` computes in float32 when
  its input is float32. Unlike linen (whose fields are frozen, so an
  explicit ``dtype=`` wins there), an explicit ``dtype=`` is overridden; the
  original comes back when another map is applied;
- attention layers that use flax's default attention function get
  `mpjax.numerics.dot_product_attention` (float32 logits and softmax).

During the outermost boundary call, each `nnx.Param` reads as a cast copy in
the compute dtype of the module that owns it; the float32 masters are put
back when the call returns, so gradients (through the casts) and the stored
state stay float32. Other variables (``BatchStat``, caches, RNG state) are
never cast: BatchNorm's running statistics stay float32. Writes to a Param
inside a wrapped method are overwritten when the masters are put back.

Applying another map replaces the previous one. Checkpoint ``nnx.state(model)``
rather than pickling the module object (its class is generated).
"""

import dataclasses
import functools
import threading
import types
from typing import Any, Dict, Optional, Tuple

from flax import nnx

from mpjax._src import policy_map as module_policy
from mpjax._src import numerics

_ATTR = "_mpjax_policy"
_UNSET = "unset"


@dataclasses.dataclass(frozen=True)
class _Record:
  """What `with_nnx_policy` set on one module, and what to restore."""
  policy_map: module_policy.PolicyMap
  resolved: module_policy.ModulePolicy
  original_dtype: Any = _UNSET
  original_attention_fn: Any = _UNSET


class _Casting(threading.local):
  """ids of the Params currently read as cast copies (outermost call casts)."""

  def __init__(self):
    super().__init__()
    self.active = set()


_CASTING = _Casting()


def _path_str(path: Tuple[Any, ...]) -> str:
  return "/".join(str(p) for p in path)


def _modules(model: nnx.Module) -> Dict[Tuple[Any, ...], nnx.Module]:
  return {tuple(path): node for path, node in nnx.iter_graph(model)
          if isinstance(node, nnx.Module)}


def _owned_params(root: nnx.Module):
  """Yields ``(param, owner_module)`` for every Param reachable from root."""
  nodes = list(nnx.iter_graph(root))
  modules = {tuple(path): node for path, node in nodes
             if isinstance(node, nnx.Module)}
  for path, node in nodes:
    if isinstance(node, nnx.Param):
      path = tuple(path)
      for end in range(len(path) - 1, -1, -1):
        if path[:end] in modules:
          yield node, modules[path[:end]]
          break


class _params_in_compute_dtype:  # pylint: disable=invalid-name
  """Reads every not-yet-cast Param under `root` in its owner's compute dtype."""

  def __init__(self, root: nnx.Module):
    self.root = root
    self.saved = []

  def __enter__(self):
    for param, module in _owned_params(self.root):
      record = getattr(module, _ATTR, None)
      if record is None or id(param) in _CASTING.active:
        continue
      master = param.get_value()
      cast = module_policy.cast_floating(
          master, record.resolved.policy.compute_dtype)
      if cast is master:
        continue
      _CASTING.active.add(id(param))
      self.saved.append((param, master))
      param.set_value(cast)
    return self

  def __exit__(self, *exc):
    for param, master in reversed(self.saved):
      param.set_value(master)
      _CASTING.active.discard(id(param))
    self.saved = []


def _wrap(method):
  @functools.wraps(method)
  def wrapped(self, *args, **kwargs):
    record = getattr(self, _ATTR)
    policy = record.resolved.policy
    module_policy.note_applied(record.policy_map)
    norm = (module_policy.float32_norm(self, original_class(self), policy,
                                       args, kwargs)
            if method.__name__ == "__call__" else None)
    if norm is None:
      args, kwargs = module_policy.cast_floating((args, kwargs),
                                                 policy.compute_dtype)
    with _params_in_compute_dtype(self):
      if norm is None:
        out = method(self, *args, **kwargs)
      else:
        # Instead of flax's layer, and with the input left uncast: see
        # float32_norm (residual memory).
        out = norm(*(None if p is None else p[...]
                     for p in (self.scale, getattr(self, "bias", None))))
    return module_policy.cast_floating(out, policy.output_dtype)
  return wrapped


def _policy_methods(base: type) -> Dict[str, Any]:
  """``__call__`` and the public methods a Module subclass defines."""
  methods = {}
  for klass in reversed(base.__mro__):
    if not (isinstance(klass, type) and issubclass(klass, nnx.Module)) or \
        klass in (nnx.Module,):
      continue
    for name, attr in vars(klass).items():
      if isinstance(attr, types.FunctionType) and (
          name == "__call__" or not name.startswith("_")):
        methods[name] = attr
  return methods


@functools.lru_cache(maxsize=None)
def _boundary_class(base: type) -> type:
  """A subclass of `base` whose policy methods cast (one per class)."""
  namespace = {name: _wrap(fn) for name, fn in _policy_methods(base).items()}
  namespace.update(__module__=base.__module__, __qualname__=base.__qualname__,
                   __doc__=base.__doc__, __mpjax_base__=base)
  return types.new_class(
      base.__name__, (base,),
      {"pytree": getattr(base, "_pytree__is_pytree", False)},
      lambda ns: ns.update(namespace))


def original_class(module: nnx.Module) -> type:
  """The module's class before `with_nnx_policy`."""
  return getattr(type(module), "__mpjax_base__", type(module))


def policy_of(module: nnx.Module) -> Optional[module_policy.ModulePolicy]:
  """What the map applied by `with_nnx_policy` decided for `module`, or None."""
  record = getattr(module, _ATTR, None)
  return None if record is None else record.resolved


def policy_map_of(model: nnx.Module) -> Optional[module_policy.PolicyMap]:
  """The `PolicyMap` `with_nnx_policy` prepared `model` with, or None.

  Args:
    model: an NNX module (the root that was passed to `with_nnx_policy`, or
      any module under it).

  Returns:
    The `PolicyMap` last applied to `model` (a plain policy given to
    `with_nnx_policy` is returned as the ``PolicyMap`` it became), or None
    if `model` was never prepared.

  Examples:
    >>> from flax import nnx
    >>> from mpjax._src.nnx_policy import policy_map_of, with_nnx_policy
    >>> layer = nnx.Linear(4, 2, rngs=nnx.Rngs(0))
    >>> policy_map_of(layer) is None
    True
    >>> policy_map_of(with_nnx_policy(layer, "mixed_bfloat16"))
    PolicyMap('p=f32,c=bf16,o=f32', {}, islands=True, strict=False)
  """
  record = getattr(model, _ATTR, None)
  return None if record is None else record.policy_map


def _undo(model: nnx.Module) -> None:
  for module in _modules(model).values():
    record = getattr(module, _ATTR, None)
    if record is None:
      continue
    if record.original_attention_fn is not _UNSET:
      module.attention_fn = record.original_attention_fn
    if record.original_dtype is not _UNSET:
      module.dtype = record.original_dtype
    module.__class__ = original_class(module)
    delattr(module, _ATTR)


def with_nnx_policy(model: nnx.Module, policy: Any) -> nnx.Module:
  """Applies a `PolicyMap` (or a plain policy) to an NNX model, in place.

  Args:
    model: the root module. Its path is ``""``; submodules are matched by
      their graph paths (``"blocks/0/attn"``) and classes.
    policy: a `PolicyMap`, or a preset / jmp string / `jmp.Policy`, which
      means ``PolicyMap(policy)`` (float32 islands on).

  Returns:
    `model`, prepared (the same object).

  Raises:
    TypeError: `model` is not an ``nnx.Module``.
    ValueError: an ambiguous pair of path patterns, or (``strict=True``) an
      entry that matches no module.

  Examples:
    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> from mpjax._src.nnx_policy import with_nnx_policy
    >>> layer = nnx.Linear(4, 2, rngs=nnx.Rngs(0))
    >>> layer = with_nnx_policy(layer, "mixed_bfloat16")
    >>> layer(jnp.ones((1, 4))).dtype, layer.kernel[...].dtype
    (dtype('float32'), dtype('float32'))
  """
  if not isinstance(model, nnx.Module):
    raise TypeError(
        f"with_nnx_policy: expected an nnx.Module, got {type(model).__name__}; "
        "for linen use mpjax.with_policy(model.apply, policy_map).")
  pm = module_policy.as_policy_map(policy)
  _undo(model)
  modules = _modules(model)
  resolved = {}
  for path in sorted(modules, key=len):
    prefixes = [path[:end] for end in range(len(path) + 1)
                if path[:end] in modules]
    chain = tuple((_path_str(p), type(modules[p])) for p in prefixes)
    resolved[path] = pm.resolve(chain)
  pm.check_matched({k for r in resolved.values() for k in r.matched},
                   [_path_str(p) for p in modules])
  for path, module in modules.items():
    decision = resolved[path]
    original_dtype = original_attention_fn = _UNSET
    if hasattr(module, "dtype"):
      original_dtype = module.dtype
      module.dtype = decision.policy.compute_dtype
    if decision.boundary:
      module.__class__ = _boundary_class(type(module))
    attention_fn = getattr(module, "attention_fn", None)
    if (decision.attention_island and
        module_policy.is_flax_attention_fn(attention_fn)):
      original_attention_fn = attention_fn
      module.attention_fn = numerics.dot_product_attention
    setattr(module, _ATTR, _Record(pm, decision, original_dtype,
                                   original_attention_fn))
  return model

