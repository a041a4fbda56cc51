"""`PolicyMap`: a precision policy per module, like Keras's `DTypePolicyMap`.

A `PolicyMap` holds a default policy and entries keyed by module class or by
module path pattern. `mpjax.with_policy` (linen) and `mpjax.with_nnx_policy`
(NNX) apply it without touching the model's code; this module only decides,
for one module, which policy it runs under and why (`PolicyMap.resolve`).

How a module's policy is decided (first rule that applies):

1. **Path entries.** Patterns are matched against the module's path
   (``"Block_0/attn/query"`` in linen, ``"blocks/0/attn/query"`` in NNX),
   segment by segment: ``*`` and ``?`` are wildcards inside one segment,
   ``**`` matches any number of segments (zero included), and a pattern must
   match the whole path. Of several matching patterns the most specific wins:
   more literal segments, then more segments that are not ``**``, then more
   literal characters. Two matching patterns equal on all three are
   ambiguous and raise `ValueError` naming both.
2. **Class entries.** The entry for the module's own class wins, then the
   entry for its nearest base class (the class's MRO order), so
   ``{nn.Module: a, MyBlock: b}`` gives ``MyBlock`` and its subclasses ``b``.
   Any path entry beats any class entry.
3. **float32 islands** (``islands=True``, the default), like autocast's two
   op lists: normalisation layers (`FLOAT32_LAYERS`: LayerNorm, RMSNorm,
   BatchNorm, GroupNorm, InstanceNorm) compute in float32 and return float32
   (flax's LayerNorm and RMSNorm, in their usual configurations, run as
   `mpjax.numerics.layer_norm`/`rms_norm`: the same values, but the backward
   pass keeps their input in its own dtype, not a float32 copy; see
   `float32_norm`);
   matmul-like layers (`LOW_PRECISION_LAYERS`: Dense/Linear, DenseGeneral/
   LinearGeneral, Conv, ConvTranspose, Einsum, Embed with its ``attend``)
   compute in the inherited compute dtype and return it, so a float32 island
   upstream never drags them to float32; attention layers (`ATTENTION_LAYERS`)
   that use flax's default attention function get
   `mpjax.numerics.dot_product_attention` (float32 logits and softmax).
   Entries of the user always beat the islands.
4. **Inheritance.** A module no rule names is not a boundary: it computes in
   the dtype of its nearest ancestor that has a policy (the root's is the
   default), its params are read in that compute dtype, and its inputs and
   outputs are not cast. So ``{"decoder": "float32"}`` runs the whole decoder
   subtree in float32, and inside it the islands' layers follow float32 too.

A module that gets a policy from rules 1-3 (and the root module always) is a
**boundary**: floating inputs are cast to the policy's compute dtype on the
way in, its params are read in that dtype, and floating outputs are cast to
its output dtype on the way out. The root's output dtype is the default's
unless an entry names the root.

Master params are stored in the map's param dtype (the default's), so every
entry must have the same param dtype: ``"float32"`` and ``"mixed_bfloat16"``
are fine entries of a ``"mixed_float16"`` map, ``"bfloat16"`` (params in
bfloat16) is not; write ``"p=f32,c=bf16,o=bf16"``. Running statistics
(BatchNorm's ``batch_stats``) are never cast: they stay float32.

A `PolicyMap` is a `jmp.Policy` whose three dtypes are the default's, so code
that knows only whole-model policies (``policy_name``, ``TrainState``) treats
it as its default.
"""

import dataclasses
import fnmatch
import functools
import threading
from typing import (Any, Callable, Iterable, Mapping, NamedTuple, Optional,
                    Sequence, Tuple, Union)

import flax.linen as nn
import jax
import jax.numpy as jnp
import jmp
import numpy as np
from flax import nnx
from flax.nnx.nn import dtypes as nnx_dtypes

from mpjax._src import numerics
from mpjax._src import policy as policy_lib

EntryKey = Union[str, type]
Chain = Tuple[Tuple[str, type], ...]

# autocast's float32 list, as layers.
FLOAT32_LAYERS: Tuple[type, ...] = (
    nn.LayerNorm, nn.RMSNorm, nn.BatchNorm, nn.GroupNorm, nn.InstanceNorm,
    nnx.LayerNorm, nnx.RMSNorm, nnx.BatchNorm, nnx.GroupNorm, nnx.InstanceNorm,
)
# autocast's lower-precision list (matmuls and convolutions), as layers.
LOW_PRECISION_LAYERS: Tuple[type, ...] = (
    nn.Dense, nn.DenseGeneral, nn.Conv, nn.ConvTranspose, nn.ConvLocal,
    nn.Einsum, nn.Embed,
    nnx.Linear, nnx.LinearGeneral, nnx.Conv, nnx.ConvTranspose, nnx.Einsum,
    nnx.Embed,
)
# Layers whose softmax runs inside flax's attention function.
ATTENTION_LAYERS: Tuple[type, ...] = (nn.MultiHeadDotProductAttention,
                                      nnx.MultiHeadAttention)
_FLAX_ATTENTION_FNS = (nn.dot_product_attention, nnx.dot_product_attention)

_WILDCARDS = frozenset("*?[")


class ModulePolicy(NamedTuple):
  """What a `PolicyMap` decides for one module.

  Attributes:
    policy: the effective policy: the module computes in
      ``policy.compute_dtype`` and reads its params in it; for a boundary,
      outputs are cast to ``policy.output_dtype``.
    boundary: whether the module's inputs and outputs are cast (rules 1-3
      and the root); False for inherited modules.
    rule: why, for the audit: ``"default"``, ``"path 'a/*'"``,
      ``"class LayerNorm"``, ``"float32 island"``, ``"low-precision layer"``
      or ``"inherited"``.
    attention_island: replace flax's default attention function with
      `mpjax.numerics.dot_product_attention` in this module.
    matched: the entry keys that matched this module (won or not), for
      ``strict=True``.
  """
  policy: jmp.Policy
  boundary: bool
  rule: str
  attention_island: bool
  matched: Tuple[EntryKey, ...]


def _key_repr(key: EntryKey) -> str:
  return repr(key) if isinstance(key, str) else key.__qualname__


def _validate_pattern(pattern: str) -> Tuple[str, ...]:
  segments = tuple(pattern.split("/"))
  if not pattern or any(not s for s in segments):
    raise ValueError(
        f"PolicyMap entry {pattern!r}: a path pattern needs non-empty "
        "segments separated by '/', e.g. 'decoder/*/attn' or '**/mlp'.")
  for s in segments:
    if "**" in s and s != "**":
      raise ValueError(
          f"PolicyMap entry {pattern!r}: '**' must be a whole segment "
          f"(got {s!r}).")
  return segments


def _matches(pattern: Tuple[str, ...], path: Tuple[str, ...]) -> bool:
  """Whether `pattern` (segments, ``**`` = any run) matches all of `path`."""
  if not pattern:
    return not path
  head, rest = pattern[0], pattern[1:]
  if head == "**":
    return any(_matches(rest, path[i:]) for i in range(len(path) + 1))
  return (bool(path) and fnmatch.fnmatchcase(path[0], head)
          and _matches(rest, path[1:]))


def _specificity(pattern: Tuple[str, ...]) -> Tuple[int, int, int]:
  literal = [s for s in pattern if not _WILDCARDS & set(s)]
  return (len(literal), sum(s != "**" for s in pattern),
          sum(len(s) for s in pattern if s != "**") -
          sum(ch in _WILDCARDS for s in pattern for ch in s))


def _to_policy(key: EntryKey, value: Any) -> jmp.Policy:
  if isinstance(value, PolicyMap):
    raise TypeError(
        f"PolicyMap entry {_key_repr(key)}: a PolicyMap cannot be an entry; "
        "give a policy (a preset name, a jmp policy string or a jmp.Policy).")
  if not isinstance(value, (str, jmp.Policy)):
    raise TypeError(
        f"PolicyMap entry {_key_repr(key)}: {value!r} (of type "
        f"{type(value).__name__}) is not a policy; expected a preset name "
        f"{sorted(policy_lib.PRESETS)}, a jmp policy string such as "
        "'p=f32,c=bf16,o=bf16', or a jmp.Policy.")
  try:
    return policy_lib.get_policy(value)
  except (TypeError, ValueError) as e:
    raise ValueError(f"PolicyMap entry {_key_repr(key)}: {e}") from None


@dataclasses.dataclass(frozen=True, init=False, repr=False)
class PolicyMap(jmp.Policy):
  """A default policy plus per-module entries, matched by class or path.

  See the module docstring for the matching rule; in short: path pattern
  beats class, a more specific pattern beats a less specific one (equal
  specificity raises), the nearest class in the MRO wins, user entries beat
  the float32 islands, and unnamed modules inherit from their parent.

  Attributes:
    default: the whole model's policy; also this object's three dtypes.
    overrides: ``((key, jmp.Policy), ...)``, keys are path patterns (str) or
      module classes; sorted for a stable hash.
    islands: whether the float32 islands and low-precision layer lists apply.
    strict: whether applying the map to a model raises when an entry matches
      no module.

  Examples:
    >>> import flax.linen as nn
    >>> import mpjax
    >>> from mpjax._src.policy_map import PolicyMap
    >>> pm = PolicyMap("mixed_bfloat16", {"head": "float32"})
    >>> pm.resolve((("", nn.Sequential), ("head", nn.Dense))).rule
    "path 'head'"
    >>> mpjax.policy_name(
    ...     pm.resolve((("", nn.Sequential), ("ln", nn.LayerNorm))).policy)
    'p=f32,c=f32,o=f32'
  """
  default: jmp.Policy
  overrides: Tuple[Tuple[EntryKey, jmp.Policy], ...]
  islands: bool
  strict: bool

  def __init__(self, default: policy_lib.PolicyLike = "float32",
               overrides: Optional[Union[Mapping[EntryKey, Any],
                                         Iterable[Tuple[EntryKey, Any]]]] = None,
               *, islands: bool = True, strict: bool = False):
    """Builds and validates the map.

    Args:
      default: the policy of the root module and of everything no entry
        names (a preset, a jmp string or a `jmp.Policy`).
      overrides: a mapping (or pairs) from a path pattern (str) or a module
        class to a policy.
      islands: apply the float32 islands and low-precision layer lists.
      strict: raise when an entry matches no module of the model it is
        applied to.

    Raises:
      TypeError: a key that is neither a str nor a class, a value that is not
        a policy, or non-bool flags; the message names the entry.
      ValueError: an unknown preset or dtype in a value, a malformed pattern,
        or an entry whose param dtype differs from the default's.
    """
    if isinstance(default, PolicyMap):
      raise TypeError("PolicyMap: the default must be a policy, not a "
                      "PolicyMap.")
    default = policy_lib.get_policy(default)
    for name, flag in (("islands", islands), ("strict", strict)):
      if not isinstance(flag, bool):
        raise TypeError(f"PolicyMap: {name} must be a bool, got {flag!r}.")
    if overrides is None:
      items = []
    elif isinstance(overrides, Mapping):
      items = list(overrides.items())
    else:
      items = list(overrides)
    entries = {}
    for item in items:
      if not (isinstance(item, tuple) and len(item) == 2):
        raise TypeError(
            f"PolicyMap: overrides must be a mapping or (key, policy) pairs, "
            f"got {item!r}.")
      key, value = item
      if isinstance(key, str):
        _validate_pattern(key)
      elif not isinstance(key, type):
        raise TypeError(
            f"PolicyMap entry key {key!r} (of type {type(key).__name__}) must "
            "be a path pattern (str) or a module class.")
      policy = _to_policy(key, value)
      if jnp.dtype(policy.param_dtype) != jnp.dtype(default.param_dtype):
        suggestion = policy_lib.policy_name(jmp.Policy(
            default.param_dtype, policy.compute_dtype, policy.output_dtype))
        raise ValueError(
            f"PolicyMap entry {_key_repr(key)}: {value!r} stores params in "
            f"{jnp.dtype(policy.param_dtype).name} but the map's master params "
            f"are {jnp.dtype(default.param_dtype).name} (the default's); "
            "per-module param storage is not supported: give the same param "
            f"dtype, e.g. {suggestion!r}.")
      if key in entries:
        raise ValueError(f"PolicyMap entry {_key_repr(key)} is given twice.")
      entries[key] = policy
    ordered = tuple(sorted(
        entries.items(),
        key=lambda kv: (isinstance(kv[0], type),
                        kv[0] if isinstance(kv[0], str)
                        else f"{kv[0].__module__}.{kv[0].__qualname__}")))
    for name, value in (("param_dtype", default.param_dtype),
                        ("compute_dtype", default.compute_dtype),
                        ("output_dtype", default.output_dtype),
                        ("default", default), ("overrides", ordered),
                        ("islands", islands), ("strict", strict)):
      object.__setattr__(self, name, value)

  def __repr__(self) -> str:
    entries = ", ".join(f"{_key_repr(k)}: '{policy_lib.policy_name(p)}'"
                        for k, p in self.overrides)
    return (f"PolicyMap('{policy_lib.policy_name(self.default)}', "
            f"{{{entries}}}, islands={self.islands}, strict={self.strict})")

  def with_output_dtype(self, output_dtype) -> "PolicyMap":
    """The same map with the default's output dtype replaced."""
    return PolicyMap(self.default.with_output_dtype(output_dtype),
                     self.overrides, islands=self.islands, strict=self.strict)

  def resolve(self, chain: Sequence[Tuple[str, type]]) -> ModulePolicy:
    """Decides the policy of the last module of `chain`.

    Args:
      chain: ``((path, class), ...)`` from the root module (path ``""``) to
        the module, each path '/'-joined.

    Returns:
      The `ModulePolicy`.

    Raises:
      ValueError: two path patterns of equal specificity match a module of
        the chain.
    """
    return _resolve(self, tuple(chain))

  def check_matched(self, matched: Iterable[EntryKey],
                    paths: Sequence[str] = ()) -> None:
    """With ``strict=True``, raises if an entry is not in `matched`.

    Args:
      matched: the entry keys that matched at least one module.
      paths: some module paths of the model, quoted in the message.

    Raises:
      ValueError: naming each entry that matched nothing.
    """
    if not self.strict:
      return
    matched = set(matched)
    missing = [_key_repr(k) for k, _ in self.overrides if k not in matched]
    if missing:
      shown = ", ".join(repr(p) for p in list(paths)[:8])
      raise ValueError(
          f"PolicyMap(strict=True): entr{'y' if len(missing) == 1 else 'ies'} "
          f"{', '.join(missing)} matched no module of the model (module paths "
          f"include {shown or 'none'}).")


def _level(pm: PolicyMap, path: str, cls: type, inherited: jmp.Policy,
           is_root: bool) -> ModulePolicy:
  """Applies rules 1-4 to one module given its parent's effective policy."""
  segments = tuple(path.split("/")) if path else ()
  path_hits = [(k, p) for k, p in pm.overrides
               if isinstance(k, str) and _matches(tuple(k.split("/")),
                                                  segments)]
  class_hits = [(k, p) for k, p in pm.overrides
                if isinstance(k, type) and issubclass(cls, k)]
  matched = tuple(k for k, _ in path_hits + class_hits)
  attention = (pm.islands and issubclass(cls, ATTENTION_LAYERS))
  if path_hits:
    ranked = sorted(path_hits,
                    key=lambda kp: _specificity(tuple(kp[0].split("/"))),
                    reverse=True)
    if (len(ranked) > 1 and _specificity(tuple(ranked[0][0].split("/"))) ==
        _specificity(tuple(ranked[1][0].split("/")))):
      raise ValueError(
          f"PolicyMap: entries {ranked[0][0]!r} and {ranked[1][0]!r} both "
          f"match module {path!r} with equal specificity; add an entry for "
          "it or make one pattern more specific.")
    key, policy = ranked[0]
    return ModulePolicy(policy, True, f"path {key!r}", attention, matched)
  if class_hits:
    mro = cls.__mro__
    key, policy = min(class_hits, key=lambda kp: mro.index(kp[0]))
    return ModulePolicy(policy, True, f"class {key.__qualname__}", attention,
                        matched)
  output = inherited.output_dtype if is_root else None
  if pm.islands and issubclass(cls, FLOAT32_LAYERS):
    policy = jmp.Policy(inherited.param_dtype, jnp.float32,
                        output or jnp.float32)
    return ModulePolicy(policy, True, "float32 island", attention, matched)
  if pm.islands and issubclass(cls, LOW_PRECISION_LAYERS):
    policy = jmp.Policy(inherited.param_dtype, inherited.compute_dtype,
                        output or inherited.compute_dtype)
    return ModulePolicy(policy, True, "low-precision layer", attention,
                        matched)
  if is_root:
    return ModulePolicy(inherited, True, "default", attention, matched)
  return ModulePolicy(inherited, False, "inherited", attention, matched)


@functools.lru_cache(maxsize=8192)
def _resolve(pm: PolicyMap, chain: Chain) -> ModulePolicy:
  if not chain:
    raise ValueError("PolicyMap.resolve: the chain of modules is empty.")
  if len(chain) == 1:
    return _level(pm, chain[0][0], chain[0][1], pm.default, is_root=True)
  parent = _resolve(pm, chain[:-1])
  return _level(pm, chain[-1][0], chain[-1][1], parent.policy, is_root=False)


def as_policy_map(policy: Any) -> PolicyMap:
  """`policy` if it is a PolicyMap, else ``PolicyMap(policy)`` (islands on)."""
  if isinstance(policy, PolicyMap):
    return policy
  return PolicyMap(policy)


def is_flax_attention_fn(fn: Any) -> bool:
  """Whether `fn` is flax's default attention function (linen or NNX)."""
  return any(fn is f for f in _FLAX_ATTENTION_FNS)


# flax's own norm layers whose float32 island `float32_norm` computes with
# `mpjax.numerics`; True for LayerNorm (centred), False for RMSNorm.
_NUMERICS_NORMS = {nn.LayerNorm: True, nnx.LayerNorm: True,
                   nn.RMSNorm: False, nnx.RMSNorm: False}
_HALF_OR_SINGLE = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16),
                   jnp.dtype(jnp.float32))


def _last_axis_only(axes: Any, ndim: int) -> bool:
  axes = (axes,) if isinstance(axes, int) else tuple(axes)
  return (all(isinstance(a, int) and -ndim <= a < ndim for a in axes) and
          {a % ndim for a in axes} == {ndim - 1})


def float32_norm(module: Any, cls: type, policy: jmp.Policy, args: tuple,
                 kwargs: Mapping[str, Any]) -> Optional[Callable[..., Any]]:
  """Runs a float32 LayerNorm/RMSNorm island with `mpjax.numerics`, if exact.

  Why: autodiff of flax's float32 LayerNorm keeps, for the backward pass, the
  float32 upcast of the input and float32 intermediates (``x - mean``, ...):
  three float32 arrays of the input's shape per layer, for a bfloat16
  transformer most of what its norms keep. `numerics.layer_norm` and
  `numerics.rms_norm` compute flax's float32 forward values (its operations,
  in its order) and the float32 graph's gradients (up to float32 rounding)
  but keep only the input, in its own dtype, and float32 per-row statistics.
  The boundary must then leave the input uncast: the float32 copy it would
  make is what autodiff would keep.

  Only configurations reproduced exactly qualify: flax's own ``LayerNorm`` or
  ``RMSNorm`` class (not a subclass, whose ``__call__`` may differ),
  computing in float32, called on one bfloat16/float16/float32 array without
  a mask, normalising and scaling the last axis only, with no ``axis_name``,
  ``dtype`` None or float32, ``force_float32_reductions`` (linen) and the
  default ``promote_dtype`` (NNX). Anything else runs flax's layer as before.

  Args:
    module: the linen or NNX module.
    cls: its class (for NNX, the class before `with_nnx_policy`).
    policy: the module's resolved policy.
    args: the call's positional arguments, not cast.
    kwargs: its keyword arguments, not cast.

  Returns:
    None (run the layer), or a function of the layer's ``(scale, bias)``
    (None for a missing one) returning its float32 output.
  """
  center = _NUMERICS_NORMS.get(cls)
  if center is None or jnp.dtype(policy.compute_dtype) != jnp.float32:
    return None
  if len(args) != 1 or any(k != "mask" or v is not None
                           for k, v in kwargs.items()):
    return None
  x = args[0]
  if not (isinstance(x, (jax.Array, np.ndarray)) and x.ndim >= 1 and
          jnp.dtype(x.dtype) in _HALF_OR_SINGLE):
    return None
  if (module.axis_name is not None or module.axis_index_groups is not None or
      (module.dtype is not None and
       jnp.dtype(module.dtype) != jnp.float32) or
      not _last_axis_only(module.reduction_axes, x.ndim) or
      not _last_axis_only(module.feature_axes, x.ndim) or
      not getattr(module, "force_float32_reductions", True) or
      getattr(module, "promote_dtype",
              nnx_dtypes.promote_dtype) is not nnx_dtypes.promote_dtype):
    return None

  def run(scale, bias):
    for name, p in (("scale", scale), ("bias", bias)):
      if p is not None and jnp.shape(p) != x.shape[-1:]:
        raise ValueError(
            f"{cls.__name__}: {name} of shape {jnp.shape(p)} does not match "
            f"the input's last axis, {x.shape[-1]}.")
    if center:
      return numerics.layer_norm(
          x, scale, bias, epsilon=module.epsilon,
          use_fast_variance=module.use_fast_variance)
    return numerics.rms_norm(x, scale, epsilon=module.epsilon)

  return run


def _is_graph_leaf(x: Any) -> bool:
  # jmp's cast maps into every pytree; NNX modules, Rngs and Variables are
  # pytrees whose identity matters, so they pass through whole.
  return isinstance(x, (nnx.Variable, nnx.Pytree))


def cast_floating(tree: Any, dtype: Any) -> Any:
  """Casts the floating array leaves of `tree` to `dtype`.

  Integer arrays, PRNG keys, non-arrays and NNX objects pass untouched.
  """
  def cast(x):
    if (isinstance(x, (jax.Array, np.ndarray)) and
        jnp.issubdtype(x.dtype, jnp.floating) and x.dtype != dtype):
      return x.astype(dtype)
    return x
  return jax.tree.map(cast, tree, is_leaf=_is_graph_leaf)


class _Applied(threading.local):
  """Which maps took effect during the current call (see `note_applied`)."""

  def __init__(self):
    super().__init__()
    self.stack = []


_APPLIED = _Applied()


def note_applied(pm: PolicyMap) -> None:
  """Records that a module ran under `pm` (read by `tracking_applied`)."""
  if _APPLIED.stack:
    _APPLIED.stack[-1].add(pm)


class tracking_applied:  # pylint: disable=invalid-name
  """Context manager collecting the maps modules ran under inside it."""

  def __enter__(self) -> set:
    self.seen = set()
    _APPLIED.stack.append(self.seen)
    return self.seen

  def __exit__(self, *exc) -> None:
    _APPLIED.stack.pop()
