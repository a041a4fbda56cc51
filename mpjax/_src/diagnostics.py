"""Say why a step failed: which gradient leaf, which module, and when to stop.

Three tools, all outside the jitted step:

- `nonfinite_leaf_paths` turns the per-leaf finiteness tree that the loss-scale
  state (``LossScaledState.leaf_grads_finite``) and
  ``make_train_step(..., attribution=True)`` produce into parameter paths such
  as ``"Dense_1/kernel"``.
- `debug_forward` re-runs a forward pass with every Flax module call (linen and
  NNX) recorded and names the first module whose output went non-finite.
- `SkipGuard` watches already-fetched metrics and stops a run with
  `NonFiniteTrainingError` after too many consecutive skipped steps, or at the
  first non-finite loss of a run without loss scaling.
"""

import collections
import contextlib
import dataclasses
import math
import numbers
import warnings
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from flax import linen as nn


# --------------------------------------------------------------------------
# Attribution: which gradient leaves were non-finite.
# --------------------------------------------------------------------------


def _key_name(key: Any) -> str:
  """One path component as plain text: ``Dense_1``, ``kernel``, ``0``."""
  for attr in ("key", "name", "idx"):  # DictKey/FlattenedIndexKey, GetAttrKey, SequenceKey
    if hasattr(key, attr):
      return str(getattr(key, attr))
  return str(key)


def path_str(path: Sequence[Any]) -> str:
  """Joins a jax key path (or an NNX graph path) with ``/``.

  ``jax.tree_util.keystr(path, simple=True, separator="/")`` does the same but
  older jax releases that pyproject still allows lack those arguments.

  Examples:
    >>> import jax
    >>> paths = [p for p, _ in jax.tree_util.tree_leaves_with_path(
    ...     {"Dense_1": {"kernel": 0}, "blocks": [1]})]
    >>> [path_str(p) for p in paths]
    ['Dense_1/kernel', 'blocks/0']
  """
  return "/".join(_key_name(k) for k in path)


def leaf_paths(tree: Any) -> List[str]:
  """The ``/``-joined path of every leaf of `tree`, in `jax.tree.leaves` order.

  Index `i` names flag `i` of `mpjax.finite_flags(tree)`.

  Examples:
    >>> leaf_paths({"Dense_0": {"bias": 0, "kernel": 0}, "scale": 0})
    ['Dense_0/bias', 'Dense_0/kernel', 'scale']
  """
  return [path_str(path) for path, _ in
          jax.tree_util.tree_leaves_with_path(tree)]


def nonfinite_leaf_paths(leaf_finite: Any, like: Any = None) -> List[str]:
  """Returns the paths of the leaves flagged non-finite, in tree order.

  Args:
    leaf_finite: one bool vector with a flag per leaf of `like`, in
      `jax.tree.leaves` order, as `mpjax.finite_flags` packs them
      (``metrics["leaf_grads_finite"]`` from ``make_train_step(...,
      attribution=True)``, ``mpjax.loss_scale_state(opt_state)
      .leaf_grads_finite``); or a tree of bool arrays, one per gradient leaf.
      Tree leaves may be scalars or stacked (e.g. one flag per step of a
      scan); a leaf counts as non-finite if any of its flags is False. Device
      arrays are fetched (one host transfer).
    like: a tree with the gradients' structure (e.g. the params), to name
      packed flags; without it they are named by index, ``"leaf[3]"``.

  Returns:
    Paths such as ``"Dense_1/kernel"``: dict keys, NamedTuple/dataclass
    attribute names and sequence indices joined with ``/``. Empty when every
    leaf was finite.

  Examples:
    >>> import jax.numpy as jnp
    >>> flags = {"Dense_0": {"bias": jnp.array(True), "kernel": jnp.array(True)},
    ...          "Dense_1": {"bias": jnp.array(False), "kernel": jnp.array(False)}}
    >>> nonfinite_leaf_paths(flags)
    ['Dense_1/bias', 'Dense_1/kernel']
    >>> params = {"a": jnp.zeros(2), "b": {"c": jnp.zeros(3)}}
    >>> nonfinite_leaf_paths(jnp.array([True, False]), like=params)
    ['b/c']
  """
  if like is not None:
    leaf_finite = _unpack_flags(leaf_finite, like)
  elif isinstance(leaf_finite, (jax.Array, np.ndarray)) and np.ndim(
      leaf_finite) == 1:
    # Packed flags without the params: name them by index, never fail a loop.
    flags = np.asarray(jax.device_get(leaf_finite))
    return [f"leaf[{i}]" for i in np.flatnonzero(~flags)]
  leaves_with_path = jax.tree_util.tree_leaves_with_path(leaf_finite)
  values = jax.device_get([leaf for _, leaf in leaves_with_path])
  return [path_str(path) for (path, _), value in zip(leaves_with_path, values)
          if not np.all(value)]


def _unpack_flags(flags: Any, like: Any) -> Any:
  """A packed bool vector (one flag per leaf of `like`) as a tree like `like`."""
  treedef = jax.tree.structure(like)
  if jax.tree.structure(flags) == treedef:
    return flags
  vector = np.asarray(jax.device_get(flags))
  if vector.shape != (treedef.num_leaves,):
    raise ValueError(
        f"nonfinite_leaf_paths: expected a tree like `like` or a vector of "
        f"{treedef.num_leaves} flags (one per leaf), got shape {vector.shape}.")
  return jax.tree.unflatten(treedef, list(vector))


# --------------------------------------------------------------------------
# Forward debug mode: which module's output went non-finite.
# --------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ModuleCall:
  """One recorded module method call of `debug_forward`.

  Attributes:
    path: the module's path inside the model, ``/``-joined (``"Blk_0/Dense_1"``
      for linen, ``"layers/0"`` for NNX); ``""`` for the root module.
    module_type: the module's class name (``"Dense"``).
    method: the method called (``"__call__"``, or a linen method name).
    inputs_finite: whether every floating input was finite.
    outputs_finite: whether every floating output was finite.
    output_absmax: the largest finite |output| over floating outputs.
    output_nonfinite: how many output entries were inf or NaN.
    output_dtypes: the dtype names of the floating outputs.
  """
  path: str
  module_type: str
  method: str
  inputs_finite: bool
  outputs_finite: bool
  output_absmax: float
  output_nonfinite: int
  output_dtypes: Tuple[str, ...]

  def describe(self) -> str:
    where = self.path or "<root>"
    return f"{where} ({self.module_type}.{self.method})"


@dataclasses.dataclass(frozen=True)
class ForwardReport:
  """What `debug_forward` saw.

  Attributes:
    calls: every module method call that returned a floating array, in the
      order the calls *finished* (children before their parent), so the first
      non-finite entry is the innermost module where non-finiteness appeared.
    output: whatever the function returned.
    output_finite: whether every floating leaf of `output` is finite.
  """
  calls: Tuple[ModuleCall, ...]
  output: Any
  output_finite: bool

  @property
  def first_nonfinite(self) -> Optional[ModuleCall]:
    """The first call (in finishing order) whose output was non-finite, or None."""
    return next((c for c in self.calls if not c.outputs_finite), None)

  def summary(self) -> str:
    """One paragraph saying where the forward pass went non-finite."""
    first = self.first_nonfinite
    if first is None:
      if self.output_finite:
        return "Forward pass finite: no module produced inf or NaN."
      return ("No module output was non-finite, but the function's result "
              "is: the inf/NaN arose outside the modules (e.g. in the loss).")
    text = (f"First non-finite module output: {first.describe()}, output "
            f"dtype {'/'.join(first.output_dtypes)}, "
            f"{first.output_nonfinite} entries inf/NaN, largest finite "
            f"|output| {first.output_absmax:g}.")
    if first.inputs_finite:
      maxima = {np.dtype(d).name: float(jnp.finfo(d).max)
                for d in first.output_dtypes}
      text += (" Its inputs were finite, so it overflowed or produced NaN "
               "itself (largest finite: " + ", ".join(
                   f"{d} {m:g}" for d, m in maxima.items()) + ").")
    else:
      text += (" Its inputs were already non-finite: the data or an "
               "operation outside any module produced them.")
    return text

  def table(self) -> str:
    """Every recorded call, one line each, in finishing order.

    Each line starts with the finiteness of the inputs and of the outputs
    (``ok -> bad`` marks a module that produced inf or NaN from finite
    inputs).
    """
    lines = []
    for call in self.calls:
      flags = (("ok" if call.inputs_finite else "bad") + " -> "
               + ("ok " if call.outputs_finite else "bad"))
      lines.append(f"{flags:<10} {call.describe():<40} "
                   f"{'/'.join(call.output_dtypes):<10} "
                   f"max|finite out|={call.output_absmax:<10.4g} "
                   f"inf/NaN entries={call.output_nonfinite}")
    return "\n".join(lines)

  def __str__(self) -> str:
    return self.summary() + "\n" + self.table()


def _floating_leaves(tree: Any) -> List[jax.Array]:
  return [x for x in jax.tree.leaves(tree)
          if isinstance(x, (jax.Array, np.ndarray))
          and jnp.issubdtype(x.dtype, jnp.inexact)]


def _all_finite(leaves: Sequence[jax.Array]) -> jax.Array:
  flags = [jnp.all(jnp.isfinite(x)) for x in leaves]
  return jnp.all(jnp.stack(flags)) if flags else jnp.array(True)


def _finite_absmax(leaves: Sequence[jax.Array]) -> jax.Array:
  maxima = [jnp.max(jnp.where(jnp.isfinite(x), jnp.abs(x), 0),
                    initial=0).astype(jnp.float32) for x in leaves]
  return jnp.max(jnp.stack(maxima)) if maxima else jnp.zeros([], jnp.float32)


def _nonfinite_count(leaves: Sequence[jax.Array]) -> jax.Array:
  return sum((jnp.sum(~jnp.isfinite(x), dtype=jnp.int32) for x in leaves),
             jnp.zeros([], jnp.int32))


class _Recorder:
  """Collects (static description, array flags) pairs while a function runs."""

  def __init__(self):
    self.meta: List[Tuple[str, str, str, Tuple[str, ...]]] = []
    self.flags: List[Tuple[jax.Array, ...]] = []

  def record(self, path: str, module: Any, method: str, inputs: Any,
             outputs: Any) -> None:
    out_leaves = _floating_leaves(outputs)
    if not out_leaves:
      return
    dtypes = tuple(sorted({np.dtype(x.dtype).name for x in out_leaves}))
    self.meta.append((path, type(module).__name__, method, dtypes))
    self.flags.append((_all_finite(_floating_leaves(inputs)),
                       _all_finite(out_leaves), _finite_absmax(out_leaves),
                       _nonfinite_count(out_leaves)))


@contextlib.contextmanager
def _intercept_linen(recorder: _Recorder):
  def interceptor(next_fun, args, kwargs, context):
    out = next_fun(*args, **kwargs)
    if context.method_name != "setup":
      recorder.record("/".join(context.module.path), context.module,
                      context.method_name, (args, kwargs), out)
    return out

  with nn.intercept_methods(interceptor):
    yield


def _call_owner(cls: type) -> Optional[type]:
  """The class in `cls`'s MRO that defines ``__call__`` (None if none does)."""
  for klass in cls.__mro__:
    if "__call__" in vars(klass):
      return None if klass is object else klass
  return None


@contextlib.contextmanager
def _intercept_nnx(recorder: _Recorder, roots: Sequence[nnx.Module]):
  """Records every ``__call__`` of an NNX module reachable from `roots`.

  NNX has no interception hook, and Python looks ``__call__`` up on the
  class, so the classes are patched for the duration and restored after;
  instances outside `roots` (looked up by id) run unrecorded.
  """
  paths: Dict[int, str] = {}
  for index, root in enumerate(roots):
    for path, node in nnx.iter_graph(root):
      if isinstance(node, nnx.Module) and id(node) not in paths:
        # One root (the usual case): paths start at the model, not at "0/".
        paths[id(node)] = path_str(path if len(roots) == 1 else
                                   (index,) + tuple(path))
  owners = {}
  for root in roots:
    for _, node in nnx.iter_graph(root):
      if isinstance(node, nnx.Module):
        owner = _call_owner(type(node))
        if owner is not None:
          owners[owner] = vars(owner)["__call__"]
  active = set()  # a subclass's __call__ calling super() is one call, not two

  def wrap(original):
    def __call__(self, *args, **kwargs):
      if id(self) not in paths or id(self) in active:
        return original(self, *args, **kwargs)
      active.add(id(self))
      try:
        out = original(self, *args, **kwargs)
      finally:
        active.discard(id(self))
      recorder.record(paths[id(self)], self, "__call__", (args, kwargs), out)
      return out
    return __call__

  try:
    for owner, original in owners.items():
      setattr(owner, "__call__", wrap(original))
    yield
  finally:
    for owner, original in owners.items():
      setattr(owner, "__call__", original)


def debug_forward(fn: Callable, *args, jit: bool = True,
                  **kwargs) -> ForwardReport:
  """Runs ``fn(*args, **kwargs)`` recording every Flax module call's finiteness.

  Meant for after a skipped step, outside the training step: replay the
  batch and learn which module's forward output overflowed first. Linen
  module calls anywhere inside `fn` are seen through
  `flax.linen.intercept_methods`; NNX modules are seen when they are `fn`
  itself or among the arguments (as `nnx.jit` requires), and run on a copy so
  the debug call never changes the model (no batch-statistics or RNG-count
  updates).

  With ``jit=True`` (default) the whole function is compiled once with the
  per-module flags as extra outputs, so the numerics match a jitted training
  step (XLA may fuse, as it does in the step); ``jit=False`` runs op by op.

  Args:
    fn: e.g. ``mpjax.with_policy(model.apply, policy)`` for linen (then
      ``args = ({"params": params}, x)``), an NNX module, or any function
      calling modules (a loss function). Arrays in `args`/`kwargs` are traced;
      other values (flags such as ``train=False``) are passed through as
      Python values.
    *args: positional arguments of `fn`.
    jit: compile the call (see above).
    **kwargs: keyword arguments of `fn`.

  Returns:
    A `ForwardReport`; ``report.first_nonfinite`` names the module, and
    ``print(report)`` shows every call with its output dtype, largest finite
    |output| and count of inf/NaN entries.

  Examples:
    >>> import jax, jax.numpy as jnp, flax.linen as nn
    >>> model = nn.Sequential([nn.Dense(4), nn.Dense(2)])
    >>> x = jnp.full((1, 3), 300.0, jnp.float16)
    >>> params = model.init(jax.random.key(0), x)
    >>> params = jax.tree.map(lambda p: jnp.full_like(p, 100.0, jnp.float16),
    ...                       params)  # float16 Dense: 3 * 300 * 100 > 65504
    >>> report = debug_forward(model.apply, params, x)
    >>> report.first_nonfinite.path
    'layers_0'
  """
  if not callable(fn):
    raise TypeError(f"debug_forward: fn must be callable, got {fn!r}.")
  if not isinstance(jit, bool):
    raise TypeError(f"debug_forward: jit must be a bool, got {jit!r}.")
  is_module = lambda x: isinstance(x, nnx.Module)
  leaves, treedef = jax.tree.flatten((fn, args, kwargs), is_leaf=is_module)
  module_at = [i for i, x in enumerate(leaves) if is_module(x)]
  array_at = [i for i, x in enumerate(leaves)
              if isinstance(x, (jax.Array, np.ndarray, np.generic))]
  graphdef, nnx_state = (nnx.split([leaves[i] for i in module_at])
                         if module_at else (None, None))
  # Fresh Variable objects: merging the split state as is would hand the
  # copy the model's own Variables, and an eager run would update them.
  nnx_state = jax.tree.map(lambda x: x, nnx_state)
  recorder = _Recorder()

  def run(state, arrays):
    call_leaves = list(leaves)
    roots = nnx.merge(graphdef, state) if module_at else []
    for i, root in zip(module_at, roots):
      call_leaves[i] = root
    for i, array in zip(array_at, arrays):
      call_leaves[i] = array
    call_fn, call_args, call_kwargs = jax.tree.unflatten(treedef, call_leaves)
    recorder.meta.clear()
    recorder.flags.clear()
    with _intercept_linen(recorder), _intercept_nnx(recorder, roots):
      out = call_fn(*call_args, **call_kwargs)
    return out, _all_finite(_floating_leaves(out)), list(recorder.flags)

  if jit:
    run = jax.jit(run)
  out, out_finite, flags = run(nnx_state, [leaves[i] for i in array_at])
  flags = jax.device_get(flags)
  calls = tuple(
      ModuleCall(path=path, module_type=kind, method=method,
                 inputs_finite=bool(fin), outputs_finite=bool(fout),
                 output_absmax=float(absmax), output_nonfinite=int(count),
                 output_dtypes=dtypes)
      for (path, kind, method, dtypes), (fin, fout, absmax, count)
      in zip(recorder.meta, flags))
  return ForwardReport(calls=calls, output=out, output_finite=bool(out_finite))


# --------------------------------------------------------------------------
# The guard: stop a run that only skips, or whose loss is NaN without scaling.
# --------------------------------------------------------------------------


class NonFiniteTrainingError(FloatingPointError):
  """Raised by `SkipGuard` when a run is wasting steps on non-finite values.

  Attributes:
    step: the step the guard stopped at (None if the loop did not say).
    consecutive_skips: skipped steps in a row at that point.
    leaf_paths: the non-finite gradient leaves of the last skipped step (empty
      when the metrics did not carry attribution).
    loss: the last loss seen (float or None).
    loss_scale: the last loss scale seen (float or None).
  """

  def __init__(self, message: str, *, step: Optional[int],
               consecutive_skips: int, leaf_paths: Sequence[str],
               loss: Optional[float], loss_scale: Optional[float]):
    super().__init__(message)
    self.step = step
    self.consecutive_skips = consecutive_skips
    self.leaf_paths = tuple(leaf_paths)
    self.loss = loss
    self.loss_scale = loss_scale


class ScaleCollapseWarning(UserWarning):
  """The loss scale fell to its floor more than once: float16 may not fit."""


COLLAPSE_HINT = (
    "the scale keeps collapsing: this model may need bfloat16 (policy "
    "'mixed_bfloat16' has float32's range and needs no loss scale), or the "
    "layers named above need float32 islands")


def _scalar(metrics: Mapping[str, Any], key: str) -> Optional[float]:
  value = metrics.get(key)
  if value is None:
    return None
  value = np.asarray(value)
  if value.size != 1:
    raise ValueError(
        f"SkipGuard.update: metrics[{key!r}] must be a scalar, got shape "
        f"{value.shape}; pass one step's metrics.")
  return value.reshape(()).item()


class SkipGuard:
  """Stops a training loop that keeps skipping steps or whose loss is NaN.

  Call `update` on the host with metrics the loop has already fetched (the
  guard never syncs with the device itself; handing it device arrays makes
  it fetch those scalars). It raises `NonFiniteTrainingError`:

  - when `max_consecutive_skips` steps in a row were skipped for non-finite
    gradients; the message names the non-finite gradient leaves (from
    ``leaf_grads_finite``, see ``make_train_step(..., attribution=True)``)
    and, when the loss scale sits at or below `collapse_scale`, says that the
    scale keeps collapsing and the model may need bfloat16;
  - at the first non-finite loss when ``loss_scaled=False``: without a loss
    scale to back off, a NaN/inf loss is a bug or a divergence, not an
    overflow a smaller scale could fix (big_vision fails loudly on NaN too).

  A healthy run (finite losses, skip streaks shorter than the limit) is never
  stopped. The first time the scale reaches `collapse_scale` from above *a
  second time*, it warns once with `ScaleCollapseWarning`.

  Metrics it reads (any missing key is simply not checked):

  - ``consecutive_skips`` (int): used as is when present, so a loop may call
    `update` every N steps only and still stop on time;
  - otherwise ``grads_finite`` (bool, as `make_train_step` returns it) or
    ``skipped`` (bool, as a metrics-log record has it): the guard counts the
    streak itself, which is exact when it sees every step;
  - ``loss``, ``loss_scale``, and ``leaf_grads_finite`` (a tree) or
    ``nonfinite_leaves`` (a list of paths, as in a metrics-log record).

  Attributes:
    max_consecutive_skips: the K of "stop after K skips in a row" (>= 1).
    loss_scaled: whether the run uses a loss scale that backs off
      (``StaticScaling``/``DynamicScaling``). Pass False for ``NoScaling`` or
      a plain optax optimizer: then the first non-finite loss stops the run.
    collapse_scale: a scale at or below this counts as collapsed (default 1,
      the floor of ``DynamicScaling``).
    like: the params (or any tree shaped like the gradients), to name the
      leaves of packed ``leaf_grads_finite`` flags.

  Examples:
    >>> guard = SkipGuard(max_consecutive_skips=2)
    >>> guard.update({"loss": 0.5, "grads_finite": False, "loss_scale": 4.0})
    >>> try:
    ...   guard.update({"loss": 0.5, "grads_finite": False, "loss_scale": 2.0,
    ...                 "leaf_grads_finite": {"w": False, "b": True}}, step=7)
    ... except NonFiniteTrainingError as e:
    ...   print(e.leaf_paths, e.consecutive_skips)
    ('w',) 2
  """

  def __init__(self, max_consecutive_skips: int = 100, *,
               loss_scaled: bool = True, collapse_scale: float = 1.0,
               like: Any = None):
    k = max_consecutive_skips
    if isinstance(k, bool) or not isinstance(k, numbers.Integral):
      raise TypeError(
          "SkipGuard: max_consecutive_skips must be an int, got "
          f"{k!r} of type {type(k).__name__}.")
    if k < 1:
      raise ValueError(f"SkipGuard: max_consecutive_skips must be >= 1, got {k}.")
    if not isinstance(loss_scaled, bool):
      raise TypeError(f"SkipGuard: loss_scaled must be a bool, got {loss_scaled!r}.")
    if (isinstance(collapse_scale, bool)
        or not isinstance(collapse_scale, numbers.Real)
        or not 0 < collapse_scale < math.inf):
      raise ValueError(
          f"SkipGuard: collapse_scale must be a finite number > 0, got "
          f"{collapse_scale!r}.")
    # Only the structure is kept: the params themselves get donated.
    self._like = (None if like is None else jax.tree.unflatten(
        jax.tree.structure(like), [0] * len(jax.tree.leaves(like))))
    self.max_consecutive_skips = int(k)
    self.loss_scaled = loss_scaled
    self.collapse_scale = float(collapse_scale)
    self.consecutive_skips = 0
    self.collapses = 0
    self._streak_leaves: collections.Counter = collections.Counter()
    self._last_leaves: List[str] = []
    self._last_scale: Optional[float] = None
    self._warned = False

  def _collapsed(self, scale: Optional[float]) -> bool:
    return scale is not None and scale <= self.collapse_scale

  def update(self, metrics: Mapping[str, Any], *,
             step: Optional[int] = None) -> None:
    """Checks one step's metrics; raises `NonFiniteTrainingError` to stop.

    Args:
      metrics: one step's metrics (see the class docstring for the keys).
      step: the step number, for the message (a ``step`` key in `metrics`
        is used when this is None).

    Raises:
      NonFiniteTrainingError: see the class docstring.
      KeyError: if `metrics` says nothing about skipping (none of
        ``consecutive_skips``, ``grads_finite``, ``skipped``) and nothing
        about the loss.
    """
    if not isinstance(metrics, Mapping):
      raise TypeError(
          f"SkipGuard.update: metrics must be a mapping, got "
          f"{type(metrics).__name__}.")
    if step is None and metrics.get("step") is not None:
      step = int(_scalar(metrics, "step"))
    loss = _scalar(metrics, "loss")
    scale = _scalar(metrics, "loss_scale")
    if "consecutive_skips" in metrics:
      consecutive = int(_scalar(metrics, "consecutive_skips"))
      skipped = consecutive > 0
    elif "grads_finite" in metrics or "skipped" in metrics:
      skipped = (not bool(_scalar(metrics, "grads_finite"))
                 if "grads_finite" in metrics
                 else bool(_scalar(metrics, "skipped")))
      consecutive = self.consecutive_skips + 1 if skipped else 0
    elif loss is not None:
      skipped, consecutive = False, 0
    else:
      raise KeyError(
          "SkipGuard.update: metrics need 'consecutive_skips', 'grads_finite' "
          f"or 'skipped' (and ideally 'loss'); got keys {sorted(metrics)}.")

    leaves = self._leaf_paths(metrics)
    if skipped:
      if leaves is not None:
        self._last_leaves = leaves
        self._streak_leaves.update(leaves)
    else:
      self._streak_leaves.clear()
      self._last_leaves = []
    self.consecutive_skips = consecutive

    if self._collapsed(scale) and not self._collapsed(self._last_scale):
      self.collapses += 1
      if self.loss_scaled and self.collapses >= 2 and not self._warned:
        self._warned = True
        warnings.warn(
            f"The loss scale fell to {scale:g} (<= {self.collapse_scale:g}) "
            f"for the {self.collapses}th time: {COLLAPSE_HINT}.",
            ScaleCollapseWarning, stacklevel=2)
    if scale is not None:
      self._last_scale = scale

    loss_finite = loss is None or math.isfinite(loss)
    if not loss_finite and not self.loss_scaled:
      self._raise(
          f"The loss is {loss} at step {self._at(step)} and this run has no "
          "loss scaling, so no smaller scale can fix it.", step, loss, scale,
          loss_finite)
    if consecutive >= self.max_consecutive_skips:
      self._raise(
          f"{consecutive} consecutive steps were skipped for non-finite "
          f"gradients (limit {self.max_consecutive_skips}), at step "
          f"{self._at(step)}.", step, loss, scale, loss_finite)

  @staticmethod
  def _at(step: Optional[int]) -> str:
    return "?" if step is None else str(step)

  def _leaf_paths(self, metrics: Mapping[str, Any]) -> Optional[List[str]]:
    if metrics.get("leaf_grads_finite") is not None:
      return nonfinite_leaf_paths(metrics["leaf_grads_finite"],
                                  like=self._like)
    if metrics.get("nonfinite_leaves") is not None:
      return [str(p) for p in metrics["nonfinite_leaves"]]
    return None

  def _raise(self, headline: str, step, loss, scale, loss_finite) -> None:
    parts = [headline]
    if self._last_leaves:
      parts.append("Non-finite gradient leaves on the last skipped step: "
                   + ", ".join(self._last_leaves) + ".")
      if self.consecutive_skips > 1:
        counts = ", ".join(f"{p} ({n} of {self.consecutive_skips})"
                           for p, n in self._streak_leaves.most_common())
        parts.append(f"Non-finite in how many of the {self.consecutive_skips} "
                     f"skipped steps: {counts}.")
    else:
      parts.append(
          "Which gradient leaves were non-finite is unknown: build the step "
          "with mpjax.make_train_step(..., attribution=True) or read "
          "mpjax.loss_scale_state(state.opt_state).leaf_grads_finite.")
    if scale is not None:
      parts.append(f"Loss scale: {scale:g}.")
    if not loss_finite:
      parts.append(
          f"The loss itself is {loss}: the forward pass went non-finite; "
          "mpjax.debug_forward(apply_fn, variables, batch) names the first "
          "module whose output did.")
    if self.loss_scaled and self._collapsed(scale):
      parts.append(COLLAPSE_HINT[0].upper() + COLLAPSE_HINT[1:] + ".")
    raise NonFiniteTrainingError(
        " ".join(parts), step=step, consecutive_skips=self.consecutive_skips,
        leaf_paths=self._last_leaves, loss=loss, loss_scale=scale)
