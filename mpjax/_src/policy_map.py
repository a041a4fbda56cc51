"""`PolicyMap`: a precision policy per module, like Keras's `DTypePolicyMap`.

A `PolicyMap` holds a default policy and entries keyed by module class or by
module path pattern. `mpjax.with_policy` (linen) and `mpjax.with_nnx_policy`
(NNX) apply it without touching the model's code; this module only decides,
for one module, which policy it runs under and why (`PolicyMap.resolve`).

How a module's policy is decided (first rule that applies):

1. **Path entries.** Patterns are matched against the module's path
   (``"Block_0/attn/query"`` in linen, ``"blocks/0/attn/query"`` in NNX),
   segment by segment, with `fnmatch` rules inside one segment (case
   sensitive): ``*`` matches any run of characters, ``?`` one character,
   ``[..]`` one character of a class (``[0-3]``, ``[qkv]``; ``[!..]``
   negates; ``[[]`` is a literal ``[``). ``**`` matches any number of
   segments (zero included), and a pattern must match the whole path. A
   malformed pattern (an empty segment, ``**`` inside a segment, an unclosed
   ``[``) raises `ValueError` naming it. Of several matching patterns the
   most specific wins:
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
   `mpjax._src.islands.float32_norm`);
   matmul-like layers (`LOW_PRECISION_LAYERS`: Dense/Linear, DenseGeneral/
   LinearGeneral, Conv, ConvTranspose, Einsum, Embed with its ``attend``)
   compute in the inherited compute dtype and return it, so a float32 island
   upstream never drags them to float32; attention layers (`ATTENTION_LAYERS`)
   that use flax's default attention function get
   `mpjax.fused_dot_product_attention` (float32 logits and softmax; cuDNN's
   fused kernel when compiled for CUDA).
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

**FP8 entries.** An entry's value may be an fp8 recipe
(`mpjax.DelayedScaling`, `mpjax.CurrentScaling`, `mpjax.MXScaling`) instead
of a policy:
``{nn.Dense: mpjax.DelayedScaling()}`` or ``{"**/mlp/*": ...}``. A matched
matmul layer (`islands.FP8_LAYERS`: Dense, DenseGeneral, Einsum; NNX
Linear, LinearGeneral, Einsum) runs its matmul in fp8 (`mpjax._src.fp8_dot`)
and the rest of its call (bias, casts) like a low-precision layer of the inherited
policy; a matched attention layer or container is not a boundary and passes
the recipe to the matmul layers under it (the attention projections; its
softmax stays as the policy says), where any other entry still wins. An fp8
entry that matches a flax layer with no matmul fp8 can run
(`islands.NO_FP8_LAYERS`: norms, Conv, Embed, Dropout)
raises `ValueError` naming the module.
"""

import dataclasses
import fnmatch
import functools
from typing import (Any, Iterable, Mapping, NamedTuple, Optional, Sequence,
                    Tuple, Union)

import jax.numpy as jnp
import jmp

from mpjax._src import fp8 as fp8_lib
from mpjax._src import islands as islands_lib
from mpjax._src import policy as policy_lib

EntryKey = Union[str, type]
Chain = Tuple[Tuple[str, type], ...]

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
      `mpjax.fused_dot_product_attention` in this module.
    matched: the entry keys that matched this module (won or not), for
      ``strict=True``.
    fp8: the fp8 recipe of this module's matmuls (fp8 layers) or of the
      matmul layers under it, or None.
  """
  policy: jmp.Policy
  boundary: bool
  rule: str
  attention_island: bool
  matched: Tuple[EntryKey, ...]
  fp8: Optional[fp8_lib.Recipe] = None


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
    _validate_classes(pattern, s)
  return segments


def _validate_classes(pattern: str, segment: str) -> None:
  """Raises unless every ``[`` of `segment` opens a closed character class."""
  i = 0
  while i < len(segment):
    if segment[i] == "[":
      # As fnmatch reads it: a leading '!' negates, a leading ']' is a member.
      j = i + 1
      if j < len(segment) and segment[j] == "!":
        j += 1
      if j < len(segment) and segment[j] == "]":
        j += 1
      end = segment.find("]", j)
      if end < 0:
        raise ValueError(
            f"PolicyMap entry {pattern!r}: the character class starting at "
            f"{segment[i:]!r} in segment {segment!r} has no closing ']'; "
            "write [abc], [0-9] or [!x], and [[] for a literal '['.")
      i = end
    i += 1


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


def _to_policy(key: EntryKey, value: Any) -> Any:
  if fp8_lib.is_recipe(value):
    return value
  if isinstance(value, PolicyMap):
    raise TypeError(
        f"PolicyMap entry {_key_repr(key)}: a PolicyMap cannot be an entry; "
        "give a policy (a preset name, a jmp policy string or a jmp.Policy).")
  if not isinstance(value, (str, jmp.Policy)):
    raise TypeError(
        f"PolicyMap entry {_key_repr(key)}: {value!r} (of type "
        f"{type(value).__name__}) is not a policy; expected a preset name "
        f"{sorted(policy_lib.PRESETS)}, a jmp policy string such as "
        "'p=f32,c=bf16,o=bf16', a jmp.Policy, or an fp8 recipe "
        "(mpjax.DelayedScaling(), mpjax.CurrentScaling(), "
        "mpjax.MXScaling()).")
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
      if (not fp8_lib.is_recipe(policy) and jnp.dtype(policy.param_dtype) !=
          jnp.dtype(default.param_dtype)):
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
    entries = ", ".join(
        f"{_key_repr(k)}: "
        + (repr(p) if fp8_lib.is_recipe(p) else
           f"'{policy_lib.policy_name(p)}'") for k, p in self.overrides)
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


def _fp8_level(key: EntryKey, recipe: fp8_lib.Recipe, path: str, cls: type,
               inherited: jmp.Policy, rule: str, attention: bool,
               matched: Tuple[EntryKey, ...], is_root: bool) -> ModulePolicy:
  """What an fp8 entry that won gives a module (see the module docstring)."""
  if issubclass(cls, islands_lib.NO_FP8_LAYERS):
    raise ValueError(
        f"PolicyMap entry {_key_repr(key)}: {recipe!r} matches module "
        f"{path or '(root)'!r} ({cls.__module__}.{cls.__name__}), which has "
        "no matmul fp8 can run; fp8 runs in linen Dense, DenseGeneral and "
        "Einsum and NNX Linear, LinearGeneral and Einsum layers (and in those "
        "under an attention layer or container an entry names): narrow the "
        "pattern or class.")
  if issubclass(cls, islands_lib.FP8_LAYERS):
    policy = jmp.Policy(inherited.param_dtype, inherited.compute_dtype,
                        (inherited.output_dtype if is_root
                         else inherited.compute_dtype))
    return ModulePolicy(policy, True, f"{rule} (fp8)", attention, matched,
                        recipe)
  return ModulePolicy(inherited, is_root, f"{rule} (fp8)", attention,
                      matched, recipe)


def _level(pm: PolicyMap, path: str, cls: type, inherited: jmp.Policy,
           is_root: bool, inherited_fp8: Any = None) -> ModulePolicy:
  """Applies rules 1-4 to one module given its parent's effective policy."""
  segments = tuple(path.split("/")) if path else ()
  path_hits = [(k, p) for k, p in pm.overrides
               if isinstance(k, str) and _matches(tuple(k.split("/")),
                                                  segments)]
  class_hits = [(k, p) for k, p in pm.overrides
                if isinstance(k, type) and issubclass(cls, k)]
  matched = tuple(k for k, _ in path_hits + class_hits)
  attention = (pm.islands and issubclass(cls, islands_lib.ATTENTION_LAYERS))
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
    if fp8_lib.is_recipe(policy):
      return _fp8_level(key, policy, path, cls, inherited, f"path {key!r}",
                        attention, matched, is_root)
    return ModulePolicy(policy, True, f"path {key!r}", attention, matched)
  if class_hits:
    mro = cls.__mro__
    key, policy = min(class_hits, key=lambda kp: mro.index(kp[0]))
    if fp8_lib.is_recipe(policy):
      return _fp8_level(key, policy, path, cls, inherited,
                        f"class {key.__qualname__}", attention, matched,
                        is_root)
    return ModulePolicy(policy, True, f"class {key.__qualname__}", attention,
                        matched)
  output = inherited.output_dtype if is_root else None
  if pm.islands and issubclass(cls, islands_lib.FLOAT32_LAYERS):
    policy = jmp.Policy(inherited.param_dtype, jnp.float32,
                        output or jnp.float32)
    return ModulePolicy(policy, True, "float32 island", attention, matched)
  if pm.islands and issubclass(cls, islands_lib.LOW_PRECISION_LAYERS):
    policy = jmp.Policy(inherited.param_dtype, inherited.compute_dtype,
                        output or inherited.compute_dtype)
    fp8 = (inherited_fp8 if issubclass(cls, islands_lib.FP8_LAYERS)
           else None)
    return ModulePolicy(policy, True, "low-precision layer" +
                        (" (fp8)" if fp8 is not None else ""), attention,
                        matched, fp8)
  if is_root:
    return ModulePolicy(inherited, True, "default", attention, matched)
  return ModulePolicy(inherited, False, "inherited", attention, matched,
                      inherited_fp8)


@functools.lru_cache(maxsize=8192)
def _resolve(pm: PolicyMap, chain: Chain) -> ModulePolicy:
  if not chain:
    raise ValueError("PolicyMap.resolve: the chain of modules is empty.")
  if len(chain) == 1:
    return _level(pm, chain[0][0], chain[0][1], pm.default, is_root=True)
  parent = _resolve(pm, chain[:-1])
  return _level(pm, chain[-1][0], chain[-1][1], parent.policy, is_root=False,
                inherited_fp8=parent.fp8)


def as_policy_map(policy: Any) -> PolicyMap:
  """`policy` if it is a PolicyMap, else ``PolicyMap(policy)`` (islands on)."""
  if isinstance(policy, PolicyMap):
    return policy
  return PolicyMap(policy)
