"""A `PolicyMap` applied to an NNX module graph: `with_nnx_policy`.

One call prepares a model in place (NNX's own style, like ``model.eval()``):

- every module records what the map decided for it (a `hooks_nnx.Site`, a
  static attribute, so it travels in the `GraphDef` through
  ``nnx.split``/``nnx.merge``, ``nnx.jit`` and ``nnx.grad``);
- every boundary module (see `mpjax.PolicyMap`) gets the policy's hook
  (`hooks_nnx.attach`: it becomes an instance of a generated subclass of its
  own class) whose ``__call__`` and public methods cast floating inputs to
  the compute dtype and outputs to the output dtype (``isinstance`` and the
  module's state and paths are unchanged: the state is what gets
  checkpointed, and it does not change); a float32-island LayerNorm or
  RMSNorm instead runs as `mpjax.numerics.layer_norm`/`rms_norm` on its
  uncast input (`islands.float32_norm`: flax's values, less residual
  memory);
- every module that has a ``dtype`` attribute (flax's compute-dtype knob)
  gets the compute dtype the map gives it, boundary or not. Without this a
  layer would promote: ``nnx.Embed``'s ``dtype`` defaults to its param dtype
  (float32), and ``nnx.Linear`` with ``dtype=None`` computes in float32 when
  its input is float32. Unlike linen (whose fields are frozen, so an
  explicit ``dtype=`` wins there), an explicit ``dtype=`` is overridden; the
  original comes back when another map is applied;
- attention layers that use flax's default attention function get
  `islands.ATTENTION_ISLAND_FN` (float32 logits and softmax; cuDNN-fused on CUDA).

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
import threading
from typing import Any, Dict, Optional, Tuple

from flax import nnx

from mpjax._src import applied_maps
from mpjax._src import casting
from mpjax._src import fp8_layers
from mpjax._src import hooks
from mpjax._src import hooks_nnx
from mpjax._src import islands
from mpjax._src import policy_map as policy_map_lib

_ATTR = "_mpjax_policy"
_UNSET = "unset"


@dataclasses.dataclass(frozen=True)
class _Record:
  """What `with_nnx_policy` set on one module, and what to restore."""
  policy_map: policy_map_lib.PolicyMap
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


def owned_params(root: nnx.Module):
  """Yields ``(param, owner_module)`` for every Param reachable from `root`.

  The owner is the nearest module above the Param in the graph.
  """
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
    for param, module in owned_params(self.root):
      resolved = policy_of(module)
      if resolved is None or id(param) in _CASTING.active:
        continue
      master = param.get_value()
      cast = casting.cast_floating(master, resolved.policy.compute_dtype)
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


@dataclasses.dataclass(frozen=True)
class _PolicyHook:
  """The `hooks_nnx` hook of a boundary module: casts around its methods.

  A value (compared by its map), so the prepared model's GraphDef is stable
  and a jitted call compiles once.
  """
  policy_map: policy_map_lib.PolicyMap

  def __call__(self, next_fun, args, kwargs, call: hooks.CallContext):
    module, policy = call.module, call.policy.policy
    applied_maps.note_applied(self.policy_map)
    norm = (islands.float32_norm(module, call.cls, policy, args, kwargs)
            if call.method == "__call__" else None)
    if norm is None:
      args, kwargs = casting.cast_floating((args, kwargs),
                                           policy.compute_dtype)
    with _params_in_compute_dtype(module):
      if norm is None:
        out = next_fun(*args, **kwargs)
      else:
        # Instead of flax's layer, and with the input left uncast: see
        # float32_norm (residual memory).
        out = norm(*(None if p is None else p[...]
                     for p in (module.scale, getattr(module, "bias", None))))
    return casting.cast_floating(out, policy.output_dtype)


def policy_of(module: nnx.Module) -> Optional[policy_map_lib.ModulePolicy]:
  """What the map applied by `with_nnx_policy` decided for `module`, or None."""
  if getattr(module, _ATTR, None) is None:
    return None
  return hooks_nnx.site_of(module).policy


def policy_map_of(model: nnx.Module) -> Optional[policy_map_lib.PolicyMap]:
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
    hooks_nnx.detach(module)
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
  pm = policy_map_lib.as_policy_map(policy)
  _undo(model)
  modules = _modules(model)
  sites = hooks_nnx.sites(model)
  resolved = {path: pm.resolve(sites[path][1])
              for path in sorted(modules, key=len)}
  pm.check_matched({k for r in resolved.values() for k in r.matched},
                   [_path_str(p) for p in modules])
  hook = _PolicyHook(pm)
  for path, module in modules.items():
    decision = resolved[path]
    original_dtype = original_attention_fn = _UNSET
    if hasattr(module, "dtype"):
      original_dtype = module.dtype
      module.dtype = decision.policy.compute_dtype
    attention_fn = getattr(module, "attention_fn", None)
    if (decision.attention_island and
        islands.is_flax_attention_fn(attention_fn)):
      original_attention_fn = attention_fn
      module.attention_fn = islands.ATTENTION_ISLAND_FN
    # Only a boundary runs the policy's hook (and changes class); an fp8
    # layer runs its fp8 hook inside it.
    site_hooks = (hook,) if decision.boundary else ()
    if (decision.fp8 is not None and
        issubclass(sites[path][1][-1][1], islands.FP8_LAYERS)):
      # Kept when the new map gives the layer the same state shapes.
      fp8_layers.attach_state(module, decision.fp8)
      site_hooks += (fp8_layers.Fp8Hook(decision.fp8),)
    else:
      fp8_layers.detach_state(module)
    hooks_nnx.attach(module, hooks_nnx.Site(
        sites[path][0], sites[path][1], decision, site_hooks))
    setattr(module, _ATTR, _Record(pm, original_dtype, original_attention_fn))
  return model
