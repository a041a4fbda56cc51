"""`debug_forward`: which module's forward output went non-finite.

Re-runs a forward pass outside the jitted step with every Flax module call
(linen and NNX) observed by a module-call hook (`hooks_linen.intercept`,
`hooks_nnx.observe`) and names the first module whose output went inf or
NaN.
"""

import dataclasses
from typing import Any, Callable, List, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mpjax._src import hooks
from mpjax._src import hooks_linen
from mpjax._src import hooks_nnx


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
  """A hook collecting (static description, array flags) of each call."""

  def __init__(self):
    self.meta: List[Tuple[str, str, str, Tuple[str, ...]]] = []
    self.flags: List[Tuple[jax.Array, ...]] = []

  def __call__(self, next_fun, args, kwargs, call: hooks.CallContext):
    out = next_fun(*args, **kwargs)
    out_leaves = _floating_leaves(out)
    if out_leaves:
      dtypes = tuple(sorted({np.dtype(x.dtype).name for x in out_leaves}))
      self.meta.append((call.path, call.cls.__name__, call.method, dtypes))
      self.flags.append((_all_finite(_floating_leaves((args, kwargs))),
                         _all_finite(out_leaves), _finite_absmax(out_leaves),
                         _nonfinite_count(out_leaves)))
    return out


def debug_forward(fn: Callable, *args, jit: bool = True,
                  **kwargs) -> ForwardReport:
  """Runs ``fn(*args, **kwargs)`` recording every Flax module call's finiteness.

  Meant for after a skipped step, outside the training step: replay the
  batch and learn which module's forward output overflowed first. Linen
  module calls anywhere inside `fn` are seen (`hooks_linen.intercept`); NNX
  modules are seen (`hooks_nnx.observe`) when they are `fn`
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
    # One root (the usual case): paths start at the model, not at "0/".
    with hooks_linen.intercept(recorder), hooks_nnx.observe(
        recorder, roots[0] if len(roots) == 1 else roots):
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
