"""`precision_doctor`: a model under a policy against float32, module by module.

The doctor runs the loss function's forward and backward passes twice on the
same batches, parameters, model state and key: once in float32 (matmuls at
``jax.default_matmul_precision("highest")``, a `PolicyMap` without islands)
and once under the candidate policy, as `mpjax.make_train_step` would (the
loss multiplied by the loss scale, gradients taken with respect to the
float32 master params and unscaled). Every Flax module call (linen and NNX)
is observed by the one module-call hook mechanism (`hooks_linen.intercept`;
for NNX a hook attached to every module of a prepared copy, `hooks_nnx`), so
the two runs are compared call by call:

- **per module**: the relative error of its output against float32
  (``||out - ref|| / ||ref||`` over all its floating outputs and batches),
  the error it *adds* (its output's error minus its inputs', so a module
  downstream of a fragile one is not blamed for it), the largest float32
  |output| against the compute dtype's largest finite value (headroom in
  powers of two), and the share of its nonzero float32 outputs that are zero
  or subnormal in the compute dtype;
- **per parameter leaf**: the cosine similarity and relative error of the
  gradient against float32, and the share of its nonzero float32 gradient
  that the compute dtype flushes to zero at the loss scale (`grad_stats`);
- the loss difference, and where along the depth (the order module calls
  finish: children before parents) the added error first jumps.

The prescription (`Prescription`) follows from the numbers and `DoctorThresholds`
alone (`prescribe` is a pure function of them): the modules to keep in
float32, as `PolicyMap` entries by path (by class when every module of a
class needs it), the loss-scale range, "use bfloat16" when float16's range
is the problem, and the suggested `PolicyMap`, which can be passed straight
to `mpjax.TrainState.create` (linen) or `TrainState.from_nnx` (NNX).

Cost: one float32 and one mixed forward/backward per batch, compiled once
(all batches must share shapes), plus one `grad_stats` per power-of-two loss
scale on the float32 gradients.
"""

import dataclasses
import json
import math
import numbers
import threading
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import jmp
import numpy as np
from flax import nnx

from mpjax._src import attribution
from mpjax._src import grad_stats as grad_stats_lib
from mpjax._src import hooks
from mpjax._src import hooks_linen
from mpjax._src import hooks_nnx
from mpjax._src import islands
from mpjax._src import loss_scaled as loss_scaled_lib
from mpjax._src import model_state as model_state_lib
from mpjax._src import nnx_apply
from mpjax._src import nnx_policy
from mpjax._src import policy as policy_lib
from mpjax._src import policy_map as policy_map_lib
from mpjax._src import train_state as train_state_lib

# The float32 reference: no islands, so flax's own layers run as written.
_REFERENCE = policy_map_lib.PolicyMap("float32", islands=False)
# Loss scales tried for the range: 2**0 ... 2**_MAX_SCALE_LOG2.
_MAX_SCALE_LOG2 = 24


@dataclasses.dataclass(frozen=True)
class DoctorThresholds:
  """When the doctor prescribes something. All comparisons are strict.

  Attributes:
    max_added_error: a module whose output's relative error exceeds its
      inputs' by more than this is kept in float32 (0.05: about 6 bfloat16
      or 50 float16 epsilons, far above what a matmul or a norm adds). A
      module whose inputs are already off by more than this is not judged
      on error (it may only amplify an upstream module's): fix the upstream
      one and run the doctor again.
    min_headroom_log2: a module whose largest float32 |output| is less than
      ``2**min_headroom_log2`` below the compute dtype's largest finite value
      is kept in float32 (1.0: within a factor of 2 of overflowing; below 0
      the dtype cannot hold the value at all).
    max_flush_share: the loss-scale range's lower end is the smallest power
      of two at which at most this share of the nonzero float32 gradient
      entries (all leaves together, float32 noise left out: see
      `Diagnosis.flush_shares`) is flushed to zero or subnormal.
    jump_factor: the error "jumps" at the first module (in finishing order)
      whose added error exceeds this many times the largest added error
      before it (and the compute dtype's epsilon).
  """
  max_added_error: float = 0.05
  min_headroom_log2: float = 1.0
  max_flush_share: float = 1e-3
  jump_factor: float = 10.0

  def __post_init__(self):
    for name in ("max_added_error", "min_headroom_log2", "max_flush_share",
                 "jump_factor"):
      value = getattr(self, name)
      if isinstance(value, bool) or not isinstance(value, numbers.Real) or \
          not math.isfinite(value):
        raise TypeError(f"DoctorThresholds.{name} must be a finite number, got "
                        f"{value!r}.")
    if self.max_added_error <= 0:
      raise ValueError("DoctorThresholds.max_added_error must be > 0, got "
                       f"{self.max_added_error}.")
    if not 0 <= self.max_flush_share < 1:
      raise ValueError("DoctorThresholds.max_flush_share must be in [0, 1), got "
                       f"{self.max_flush_share}.")
    if self.jump_factor <= 1:
      raise ValueError("DoctorThresholds.jump_factor must be > 1, got "
                       f"{self.jump_factor}.")


@dataclasses.dataclass(frozen=True)
class ModuleDiagnosis:
  """One module method's outputs under the policy against float32.

  Attributes:
    path: the module's path (``"Block_0/Dense_1"``, ``"blocks/0/attn"``;
      ``""`` for the root); ``method`` names the method.
    cls: the module's class (the user's).
    method: ``"__call__"`` or a public method's name.
    compute_dtype: the dtype the module computes in under the policy.
    output_error: relative error of its floating outputs (inf when an
      output went non-finite under the policy).
    input_error: relative error of its floating inputs (0 for the root).
    headroom_log2: ``log2(dtype max / max |float32 output|)``.
    max_abs: the largest float32 |output|.
    zero_share: share of nonzero float32 outputs that are zero or subnormal
      in the compute dtype under the policy.
    nonfinite: output entries inf or NaN under the policy.
    float32_already: the policy already computes this module in float32.
    island: the float32 islands of a `PolicyMap` would compute it in float32.
  """
  path: str
  cls: type
  method: str
  compute_dtype: str
  output_error: float
  input_error: float
  headroom_log2: float
  max_abs: float
  zero_share: float
  nonfinite: int
  float32_already: bool
  island: bool

  @property
  def added_error(self) -> float:
    """``output_error - input_error`` (0 when both are inf)."""
    if math.isinf(self.input_error) and math.isinf(self.output_error):
      return 0.0
    return self.output_error - self.input_error

  @property
  def name(self) -> str:
    shown = self.path or "(root)"
    return shown if self.method == "__call__" else f"{shown}.{self.method}"


@dataclasses.dataclass(frozen=True)
class LeafDiagnosis:
  """One parameter leaf's gradient under the policy against float32.

  Attributes:
    path: ``"Dense_0/kernel"``.
    cosine: cosine similarity of the gradients (0 when the policy's is all
      zero; NaN when the float32 one is, or the policy's is non-finite).
    error: ``||g - g_ref|| / ||g_ref||`` (inf when non-finite).
    flush_share: share of nonzero float32 gradient entries that the compute
      dtype flushes to zero or subnormal at the loss scale.
    max_abs: the largest float32 |gradient|.
    nonfinite: gradient entries inf or NaN under the policy.
  """
  path: str
  cosine: float
  error: float
  flush_share: float
  max_abs: float
  nonfinite: int


@dataclasses.dataclass(frozen=True)
class Prescription:
  """What to change, with the reasons.

  Attributes:
    keep_float32: ``(entry key, reason)`` pairs: a path (str) or a class.
    loss_scale_range: ``(low, high)`` powers of two: gradients neither
      overflow (the largest float32 gradient times `high` fits the compute
      dtype) nor lose more than ``DoctorThresholds.max_flush_share`` to underflow
      at `low`; None when no scale does both.
    use_bfloat16: float16's range is the problem (a module's output does not
      fit, or no loss scale fits the gradients): use bfloat16 compute.
    policy_map: the suggested map: the candidate's default, islands and
      strictness plus the `keep_float32` entries.
    notes: further findings in words (modules the islands already cover,
      modules already in float32).
  """
  keep_float32: Tuple[Tuple[Any, str], ...]
  loss_scale_range: Optional[Tuple[float, float]]
  use_bfloat16: bool
  policy_map: policy_map_lib.PolicyMap
  notes: Tuple[str, ...]

  def summary(self) -> str:
    lines = []
    if self.keep_float32:
      lines.append("Keep in float32: " + "; ".join(
          f"{_key_str(k)} ({why})" for k, why in self.keep_float32) + ".")
    else:
      lines.append("Keep in float32: nothing beyond the policy's own "
                   "islands.")
    if self.loss_scale_range is None:
      lines.append("Loss scale: no power of two keeps the largest gradient "
                   "finite and the flushed share small.")
    else:
      low, high = self.loss_scale_range
      lines.append(f"Loss scale: between {low:g} and {high:g} (2**"
                   f"{int(math.log2(low))} to 2**{int(math.log2(high))}).")
    if self.use_bfloat16:
      lines.append("Use bfloat16: float16's range is the problem "
                   "('mixed_bfloat16' has float32's range and needs no loss "
                   "scale).")
    lines.extend(self.notes)
    lines.append(f"Suggested policy: {self.policy_map!r}")
    return "\n".join(lines)


@dataclasses.dataclass(frozen=True)
class Diagnosis:
  """What `precision_doctor` found. ``print(d)`` shows it all.

  Attributes:
    policy: the candidate policy (a `PolicyMap` or a `jmp.Policy`).
    loss_scale: the scale the policy's backward pass used.
    batches: how many batches were compared.
    loss_float32: the mean float32 loss.
    loss_policy: the mean loss under the policy.
    modules: one `ModuleDiagnosis` per module method, in finishing order.
    leaves: one `LeafDiagnosis` per parameter leaf.
    first_jump: the module where the added error first jumps, or None.
    prescription: the `Prescription`.
    thresholds: the `DoctorThresholds` used.
    flush_shares: the share of nonzero float32 gradient entries flushed at
      loss scale ``2**k``, for ``k = 0, ..., 24``, leaving out leaves whose
      largest |gradient| is below float32's epsilon times the largest of
      all (float32 rounding noise of a gradient that is zero in exact
      arithmetic, such as attention key biases').
    seconds: wall time of the diagnosis.
  """
  policy: Any
  loss_scale: float
  batches: int
  loss_float32: float
  loss_policy: float
  modules: Tuple[ModuleDiagnosis, ...]
  leaves: Tuple[LeafDiagnosis, ...]
  first_jump: Optional[ModuleDiagnosis]
  prescription: Prescription
  thresholds: DoctorThresholds
  flush_shares: Tuple[float, ...]
  seconds: float

  @property
  def loss_difference(self) -> float:
    """``loss_policy - loss_float32``."""
    return self.loss_policy - self.loss_float32

  def table(self) -> str:
    """Modules and leaves as fixed-width text tables."""
    flagged = {k for k, _ in self.prescription.keep_float32}
    rows = []
    for m in self.modules:
      mark = ("keep f32" if m.path in flagged or m.cls in flagged else
              "jump" if m is self.first_jump else "")
      rows.append([m.name, m.cls.__name__, m.compute_dtype,
                   _num(m.output_error), _num(m.added_error),
                   _num(m.headroom_log2, ".1f"), f"{m.zero_share:.2%}",
                   str(m.nonfinite), mark])
    modules = _format(("module", "class", "compute", "out err", "added err",
                       "headroom log2", "zero/subn", "inf/nan", "verdict"),
                      rows)
    leaf_rows = [[l.path, _num(l.cosine, ".6f"), _num(l.error),
                  f"{l.flush_share:.2%}", _num(l.max_abs), str(l.nonfinite)]
                 for l in self.leaves]
    leaves = _format(("gradient", "cosine", "rel err",
                      f"flushed @ {self.loss_scale:g}", "max |g|",
                      "inf/nan"), leaf_rows)
    return modules + "\n\n" + leaves

  def summary(self) -> str:
    where = ("none" if self.first_jump is None else
             f"{self.first_jump.name} ({self.first_jump.cls.__name__}, added "
             f"error {self.first_jump.added_error:.3g})")
    policy = (repr(self.policy) if isinstance(self.policy,
                                              policy_map_lib.PolicyMap)
              else policy_lib.policy_name(self.policy))
    return (f"Precision doctor: {policy} against float32 on {self.batches} "
            f"batch(es), loss scale {self.loss_scale:g}, {self.seconds:.1f} s.\n"
            f"Loss: float32 {self.loss_float32:.6g}, policy "
            f"{self.loss_policy:.6g} (difference {self.loss_difference:+.3g})."
            f"\nError first jumps at: {where}.\n"
            + self.prescription.summary())

  def __str__(self) -> str:
    return self.summary() + "\n\n" + self.table()

  def to_dict(self) -> Dict[str, Any]:
    """Plain JSON-ready numbers (non-finite floats as strings)."""
    module_rows = [{
        "path": m.path, "class": m.cls.__name__, "method": m.method,
        "compute_dtype": m.compute_dtype, "output_error": m.output_error,
        "input_error": m.input_error, "added_error": m.added_error,
        "headroom_log2": m.headroom_log2, "max_abs": m.max_abs,
        "zero_share": m.zero_share, "nonfinite": m.nonfinite,
        "float32_already": m.float32_already, "island": m.island}
                   for m in self.modules]
    p = self.prescription
    out = {
        "policy": (repr(self.policy) if isinstance(
            self.policy, policy_map_lib.PolicyMap)
                   else policy_lib.policy_name(self.policy)),
        "loss_scale": self.loss_scale, "batches": self.batches,
        "loss_float32": self.loss_float32, "loss_policy": self.loss_policy,
        "loss_difference": self.loss_difference,
        "first_jump": None if self.first_jump is None else self.first_jump.name,
        "modules": module_rows,
        "leaves": [dataclasses.asdict(l) for l in self.leaves],
        "prescription": {
            "keep_float32": [[_key_str(k), why] for k, why in p.keep_float32],
            "loss_scale_range": (None if p.loss_scale_range is None
                                 else list(p.loss_scale_range)),
            "use_bfloat16": p.use_bfloat16,
            "policy_map": repr(p.policy_map), "notes": list(p.notes)},
        "thresholds": dataclasses.asdict(self.thresholds),
        "flush_shares_by_scale_log2": list(self.flush_shares),
        "seconds": self.seconds,
    }
    return _json_safe(out)

  def to_json(self, **kwargs) -> str:
    """`to_dict` as a JSON string (``json.dumps`` keyword arguments)."""
    return json.dumps(self.to_dict(), **kwargs)

  def plot(self, path: str, title: Optional[str] = None) -> None:
    """Draws each module's output error and added error along the depth.

    Needs matplotlib (the ``plots`` extra); imported only here.
    """
    import matplotlib  # pylint: disable=g-import-not-at-top
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
    floor = 1e-7  # below any 16-bit error: keeps the axis readable
    depth = np.arange(len(self.modules))
    clip = lambda v: min(max(v, floor), 1e3) if not math.isnan(v) else 1e3
    fig, ax = plt.subplots(figsize=(max(6, 0.35 * len(depth) + 2), 4))
    ax.semilogy(depth, [clip(m.output_error) for m in self.modules], "o-",
                label="output error vs float32")
    ax.semilogy(depth, [clip(m.added_error) for m in self.modules], "s--",
                label="added error")
    ax.axhline(self.thresholds.max_added_error, color="red", lw=0.8,
               label="max_added_error")
    flagged = {k for k, _ in self.prescription.keep_float32}
    for i, m in enumerate(self.modules):
      if m.path in flagged or m.cls in flagged:
        ax.axvline(i, color="red", alpha=0.2, lw=6)
    ax.set_xticks(depth)
    ax.set_xticklabels([m.name for m in self.modules], rotation=70,
                       fontsize=7, ha="right")
    ax.set_ylabel("relative error")
    ax.set_title(title or "precision doctor: error along the depth")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _num(x: float, spec: str = ".3g") -> str:
  return format(x, spec) if math.isfinite(x) else str(x)


def _format(header: Sequence[str], rows: List[List[str]]) -> str:
  widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h)
            for i, h in enumerate(header)]
  line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths)
                                 ).rstrip()
  rule = "-" * len(line(["-" * w for w in widths]))
  return "\n".join([line(header), rule] + [line(r) for r in rows])


def _json_safe(x: Any) -> Any:
  if isinstance(x, float) and not math.isfinite(x):
    return str(x)
  if isinstance(x, dict):
    return {k: _json_safe(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [_json_safe(v) for v in x]
  return x


def _key_str(key: Any) -> str:
  return repr(key) if isinstance(key, str) else f"class {key.__qualname__}"


# --------------------------------------------------------------- prescription


def _escape(path: str) -> str:
  """A module path as a literal `PolicyMap` pattern."""
  return "".join(f"[{c}]" if c in "*?[" else c for c in path)


def _epsilon(dtype_name: str) -> float:
  return float(jnp.finfo(jnp.dtype(dtype_name)).eps)


def first_jump(modules: Sequence[ModuleDiagnosis],
               thresholds: DoctorThresholds) -> Optional[ModuleDiagnosis]:
  """The first module whose added error exceeds ``jump_factor`` times the
  largest before it (at least the compute dtype's epsilon), or None."""
  before = 0.0
  for m in modules:
    added = m.added_error
    if math.isnan(added):
      added = math.inf
    floor = max(before, _epsilon(m.compute_dtype))
    if added > thresholds.jump_factor * floor:
      return m
    before = max(before, added)
  return None


def prescribe(modules: Sequence[ModuleDiagnosis],
              policy: Any, grad_max_abs: float,
              flush_shares: Sequence[float], compute_dtype: Any,
              thresholds: DoctorThresholds,
              all_modules: Optional[Dict[type, int]] = None) -> Prescription:
  """The prescription from measured numbers alone (no model is run).

  Args:
    modules: the `ModuleDiagnosis` rows.
    policy: the candidate policy (its `PolicyMap` settings are kept).
    grad_max_abs: the largest float32 |gradient| over all leaves.
    flush_shares: the share of nonzero float32 gradient entries flushed at
      loss scale ``2**k``, for ``k = 0, 1, ...``.
    compute_dtype: the policy's (default) compute dtype.
    thresholds: the `DoctorThresholds`.
    all_modules: how many modules of each class ran (for class entries);
      default: counted from `modules`.

  Returns:
    The `Prescription`.
  """
  compute = jnp.dtype(compute_dtype)
  candidates, notes, range_problem, unjudged = [], [], False, []
  for m in modules:
    added = m.added_error
    reasons = []
    if not m.input_error <= thresholds.max_added_error:
      # Its inputs are already off: what it adds cannot be told apart.
      unjudged.append(m.name)
    elif math.isnan(added) or added > thresholds.max_added_error:
      reasons.append(f"adds error {added:.3g} > {thresholds.max_added_error:g}")
    if m.headroom_log2 < thresholds.min_headroom_log2:
      reasons.append(f"headroom 2**{m.headroom_log2:.1f} < "
                     f"2**{thresholds.min_headroom_log2:g} in {m.compute_dtype}")
    if reasons:
      candidates.append((m, reasons))
  # The innermost module is the culprit: a container holding a flagged
  # module is blamed only through it.
  flagged_paths = {m.path for m, _ in candidates}
  culprits = []
  for m, reasons in candidates:
    inner = any(p != m.path and (m.path == "" or p.startswith(m.path + "/"))
                for p in flagged_paths)
    if inner:
      continue
    if m.float32_already:
      notes.append(f"{m.name} ({m.cls.__name__}) already computes in float32 "
                   f"and still {'; '.join(reasons)}: float32 cannot fix it.")
      continue
    if m.headroom_log2 < thresholds.min_headroom_log2 and \
        compute == jnp.float16:
      range_problem = True
    if m.island and not isinstance(policy, policy_map_lib.PolicyMap):
      notes.append(f"{m.name} ({m.cls.__name__}) {'; '.join(reasons)}: the "
                   "suggested PolicyMap's float32 islands cover it.")
      continue
    culprits.append((m, reasons))
  if unjudged and culprits:
    notes.append(
        f"Not judged, their inputs already off by more than "
        f"{thresholds.max_added_error:g}: {', '.join(unjudged)}; run the "
        "doctor again with the suggested policy.")
  counts = all_modules
  if counts is None:
    counts = {}
    for _, cls in {(m.path, m.cls) for m in modules}:
      counts[cls] = counts.get(cls, 0) + 1
  by_class: Dict[type, List[Tuple[ModuleDiagnosis, List[str]]]] = {}
  for m, reasons in culprits:
    by_class.setdefault(m.cls, []).append((m, reasons))
  keep = []
  for cls, found in by_class.items():
    paths = sorted({m.path for m, _ in found})
    if len(paths) >= 2 and len(paths) == counts.get(cls, 0):
      keep.append((cls, f"all {len(paths)} {cls.__name__} modules: "
                        + "; ".join(found[0][1])))
      continue
    for path in paths:
      reasons = next(r for m, r in found if m.path == path)
      if path == "":
        keep.append((cls, "the root: " + "; ".join(reasons)))
      else:
        keep.append((_escape(path), "; ".join(reasons)))
  if isinstance(policy, policy_map_lib.PolicyMap):
    default, overrides = policy.default, dict(policy.overrides)
    islands_on, strict = policy.islands, policy.strict
  else:
    default, overrides = policy_lib.get_policy(policy), {}
    islands_on, strict = True, False
  float32_entry = jmp.Policy(default.param_dtype, jnp.float32, jnp.float32)
  for key, _ in keep:
    overrides[key] = float32_entry
  suggested = policy_map_lib.PolicyMap(default, overrides, islands=islands_on,
                                       strict=strict)
  scale_range = _scale_range(grad_max_abs, flush_shares, compute, thresholds)
  if scale_range is None:
    high = _highest_safe_log2(grad_max_abs, compute, len(flush_shares))
    if high is None:
      notes.append(f"The largest float32 gradient ({grad_max_abs:.3g}) "
                   f"does not fit {compute.name} even at loss scale 1.")
    else:
      notes.append(
          f"At 2**{high}, the largest scale at which the largest gradient "
          f"fits, {flush_shares[high]:.2%} of the nonzero gradient entries "
          f"still flush to zero (max_flush_share "
          f"{thresholds.max_flush_share:.2%}).")
    if compute == jnp.float16:
      range_problem = True
  if compute != jnp.float16 and scale_range is not None and \
      scale_range[0] == 1.0:
    notes.append(f"{compute.name} needs no loss scale: scale 1 flushes at "
                 f"most {thresholds.max_flush_share:.2%} of the gradients.")
  return Prescription(keep_float32=tuple(keep), loss_scale_range=scale_range,
                      use_bfloat16=range_problem, policy_map=suggested,
                      notes=tuple(notes))


def _highest_safe_log2(grad_max_abs: float, compute: jnp.dtype,
                       count: int) -> Optional[int]:
  """The largest k < count at which ``grad_max_abs * 2**k`` fits, or None."""
  if not math.isfinite(grad_max_abs):
    return None
  if grad_max_abs == 0:
    return count - 1
  high = min(count - 1, math.floor(math.log2(float(jnp.finfo(compute).max))
                                   - math.log2(grad_max_abs)))
  return high if high >= 0 else None


def _scale_range(grad_max_abs: float, flush_shares: Sequence[float],
                 compute: jnp.dtype,
                 thresholds: DoctorThresholds) -> Optional[Tuple[float, float]]:
  """``(2**low, 2**high)``: see `Prescription.loss_scale_range`."""
  high = _highest_safe_log2(grad_max_abs, compute, len(flush_shares))
  low = next((k for k, share in enumerate(flush_shares)
              if share <= thresholds.max_flush_share), None)
  if low is None or high is None or low > high:
    return None
  return float(2 ** low), float(2 ** high)


# ----------------------------------------------------------------- recording


class _Active(threading.local):
  """The calls recorded by this thread's current run (None: not recording)."""

  def __init__(self):
    super().__init__()
    self.calls: Optional[list] = None


_ACTIVE = _Active()


def _floating(tree: Any) -> List[jax.Array]:
  return [x for x in jax.tree.leaves(tree)
          if hasattr(x, "dtype") and hasattr(x, "shape") and
          jnp.issubdtype(x.dtype, jnp.floating)]


def _observe(next_fun, args, kwargs, call: hooks.CallContext):
  """The doctor's hook: records a call's floating inputs and outputs.

  A module-level function, so an NNX graph it is attached to stays hashable
  and the same across runs; it records only while a run is active.
  """
  out = next_fun(*args, **kwargs)
  if _ACTIVE.calls is not None:
    outputs = _floating(out)
    if outputs:
      own = getattr(call.module, "dtype", None)
      _ACTIVE.calls.append((call, own, _floating((args, kwargs)), outputs))
  return out


@dataclasses.dataclass(frozen=True)
class _Meta:
  path: str
  cls: type
  method: str
  compute_dtype: str
  float32_already: bool
  island: bool


def _meta(call: hooks.CallContext, own_dtype: Any,
          whole: jmp.Policy) -> _Meta:
  if own_dtype is not None:
    compute = jnp.dtype(own_dtype)
  elif call.policy is not None:
    compute = jnp.dtype(call.policy.policy.compute_dtype)
  else:
    compute = jnp.dtype(whole.compute_dtype)
  island = issubclass(call.cls, islands.FLOAT32_LAYERS)
  return _Meta(call.path, call.cls, call.method, compute.name,
               compute == jnp.float32 and
               jnp.dtype(whole.compute_dtype) != jnp.float32, island)


# ------------------------------------------------------------------ the model


@dataclasses.dataclass
class _Model:
  """How to run one model under a policy: ``apply_for(policy) -> apply``."""
  apply_for: Callable[[Any], Callable]
  params: Any
  model_state: Optional[Dict[str, Any]]
  is_nnx: bool


def _nnx_apply_for(base: nnx_apply.NNXApply, variables: Dict[str, Any]):
  def apply_for(policy):
    # A copy prepared with the policy, with the doctor's hook attached to
    # every module (outermost: it sees calls as the caller makes them).
    module = base.merge(variables)
    nnx_policy.with_nnx_policy(module, policy)
    modules = {tuple(p): n for p, n in nnx.iter_graph(module)
               if isinstance(n, nnx.Module)}
    for graph_path, (path, chain) in hooks_nnx.sites(module).items():
      site = hooks_nnx.site_of(modules[graph_path]) or hooks_nnx.Site(path,
                                                                      chain)
      hooks_nnx.attach(modules[graph_path], dataclasses.replace(
          site, hooks=(_observe,) + tuple(site.hooks)))
    graphdef, _, _ = nnx_apply.split(module)
    return policy_lib.with_policy(
        nnx_apply.NNXApply(graphdef, base.collections),
        policy_map_lib.as_policy_map(policy))
  return apply_for


def _as_model(model: Any, params: Any, model_state: Any) -> _Model:
  if isinstance(model, train_state_lib.TrainState):
    if params is not None or model_state is not None:
      raise ValueError("precision_doctor: a TrainState carries its params and "
                       "model state; do not pass params= or model_state=.")
    params, model_state, model = (model.params, model.model_state,
                                  model.apply_fn)
  if isinstance(model, nnx.Module):
    if params is not None or model_state is not None:
      raise ValueError("precision_doctor: an nnx.Module holds its params and "
                       "state; do not pass params= or model_state=.")
    graphdef, params, state = nnx_apply.split(model)
    model = nnx_apply.NNXApply(graphdef, tuple(state))
    model_state = state or None
  if isinstance(model, nnx_apply.NNXApply):
    variables = {"params": params, **(model_state or {})}
    return _Model(_nnx_apply_for(model, variables), params, model_state, True)
  if isinstance(model, nn.Module):
    model = model.apply
  if not callable(model):
    raise TypeError(
        "precision_doctor: model must be a linen apply function (model.apply),"
        " a flax.linen.Module, an nnx.Module or an mpjax.TrainState, got "
        f"{model!r} of type {type(model).__name__}.")
  if params is None:
    raise ValueError("precision_doctor: a linen model needs params= (the "
                     "'params' collection; model_state= for the others).")
  if isinstance(params, nnx.State):
    raise TypeError(
        f"precision_doctor: {model!r} is not an NNXApply but its params are "
        "an nnx.State: pass the nnx.Module itself or a TrainState.from_nnx "
        "(the doctor prepares copies of the module under each policy).")
  if model_state is not None and not isinstance(model_state, dict):
    raise TypeError("precision_doctor: model_state must be a dict of "
                    "collections such as {'batch_stats': ...}, got "
                    f"{type(model_state).__name__}.")
  apply_fn = model
  return _Model(lambda policy: policy_lib.with_policy(apply_fn, policy),
                params, model_state, False)


# -------------------------------------------------------------- one batch


def _run(apply_fn, params, model_state, batch, rng, scale, loss_fn,
         has_aux, is_nnx, record: list):
  """Loss, unscaled gradients and recorded calls' arrays of one pass.

  `record` receives ``(CallContext, own dtype)`` of each recorded call, in
  finishing order (static: filled while tracing).
  """
  def scaled(p):
    model_apply = apply_fn
    if model_state is not None:
      model_apply = model_state_lib.ModelStateThread(apply_fn, model_state)
    previous, _ACTIVE.calls = _ACTIVE.calls, []
    try:
      if is_nnx:
        out = loss_fn(p, batch, model_apply, rng)
      else:
        with hooks_linen.intercept(_observe):
          out = loss_fn(p, batch, model_apply, rng)
      calls = _ACTIVE.calls
    finally:
      _ACTIVE.calls = previous
    loss = jnp.asarray(out[0] if has_aux else out)
    if loss.shape != () or not jnp.issubdtype(loss.dtype, jnp.floating):
      raise ValueError(
          "precision_doctor: loss_fn must return a floating scalar loss, got "
          f"shape {loss.shape} dtype {loss.dtype}.")
    loss = loss.astype(jnp.float32)
    record[:] = [(c, own) for c, own, _, _ in calls]
    arrays = [([jax.lax.stop_gradient(x) for x in ins],
               [jax.lax.stop_gradient(x) for x in outs])
              for _, _, ins, outs in calls]
    return loss * scale, (loss, arrays)

  grads, (loss, arrays) = jax.grad(scaled, has_aux=True)(params)
  return loss, loss_scaled_lib.unscale_gradients(grads, scale), arrays


def _sq(x):
  return jnp.sum(jnp.square(x.astype(jnp.float32)))


def _error_sums(pol: List[jax.Array], ref: List[jax.Array]):
  """(sum of squared differences, sum of squared reference) in float32."""
  diff = sum((_sq(p.astype(jnp.float32) - r.astype(jnp.float32))
              for p, r in zip(pol, ref) if p.shape == r.shape),
             jnp.zeros([], jnp.float32))
  norm = sum((_sq(r) for r in ref), jnp.zeros([], jnp.float32))
  return diff, norm


def _module_stats(pol_in, pol_out, ref_in, ref_out, compute: str):
  tiny = float(jnp.finfo(jnp.dtype(compute)).smallest_normal)
  out_d, out_n = _error_sums(pol_out, ref_out)
  in_d, in_n = _error_sums(pol_in, ref_in)
  zero = sum((jnp.sum((r != 0) & (jnp.abs(p.astype(jnp.float32)) < tiny),
                      dtype=jnp.int32)
              for p, r in zip(pol_out, ref_out) if p.shape == r.shape),
             jnp.zeros([], jnp.int32))
  nonzero = sum((jnp.sum(r != 0, dtype=jnp.int32) for r in ref_out),
                jnp.zeros([], jnp.int32))
  nonfinite = sum((jnp.sum(~jnp.isfinite(p), dtype=jnp.int32)
                   for p in pol_out), jnp.zeros([], jnp.int32))
  max_abs = jnp.max(jnp.stack([jnp.max(jnp.abs(r.astype(jnp.float32)),
                                       initial=0) for r in ref_out]))
  return dict(out_d=out_d, out_n=out_n, in_d=in_d, in_n=in_n, zero=zero,
              nonzero=nonzero, nonfinite=nonfinite, max_abs=max_abs)


def _leaf_stats(g, r):
  g = g.astype(jnp.float32)
  r = r.astype(jnp.float32)
  return dict(dot=jnp.sum(g * r), g2=_sq(g), r2=_sq(r), d2=_sq(g - r),
              nonfinite=jnp.sum(~jnp.isfinite(g), dtype=jnp.int32))


def _check_policy(policy: Any) -> Any:
  if isinstance(policy, policy_map_lib.PolicyMap):
    return policy
  if not isinstance(policy, (str, jmp.Policy)):
    raise TypeError(
        f"precision_doctor: policy {policy!r} (of type "
        f"{type(policy).__name__}) is not a policy; expected a preset name "
        f"{sorted(policy_lib.PRESETS)}, a jmp policy string such as "
        "'p=f32,c=f16,o=f32', a jmp.Policy or an mpjax.PolicyMap.")
  try:
    return policy_lib.get_policy(policy)
  except ValueError as e:
    raise ValueError(f"precision_doctor: {e}") from None


def _describe(tree: Any) -> str:
  return str(jax.tree.map(
      lambda x: (f"{jnp.dtype(x.dtype).name}{list(np.shape(x))}"
                 if hasattr(x, "dtype") else repr(x)), tree))


def _check_batches(batches: Any) -> List[Any]:
  if isinstance(batches, dict) or not isinstance(batches, Sequence) or \
      isinstance(batches, str):
    raise TypeError(
        "precision_doctor: batches must be a list of batches (each what "
        f"loss_fn takes), got {type(batches).__name__}; wrap one batch as "
        "[batch].")
  batches = list(batches)
  if not batches:
    raise ValueError("precision_doctor: batches is empty; give at least one.")
  spec = lambda b: (jax.tree.structure(b), [
      (np.shape(x), jnp.result_type(x).name) for x in jax.tree.leaves(b)])
  first = spec(batches[0])
  for i, b in enumerate(batches[1:], 1):
    if spec(b) != first:
      raise ValueError(
          f"precision_doctor: batch {i} is {_describe(b)} but batch 0 is "
          f"{_describe(batches[0])}; all batches must have the same "
          "structure, shapes and dtypes.")
  return batches


def precision_doctor(model: Any, batches: Sequence[Any], loss_fn: Callable,
                     policy: Any = None, *, params: Any = None,
                     model_state: Any = None, rng: Optional[jax.Array] = None,
                     loss_scale: Optional[float] = None,
                     has_aux: bool = False,
                     thresholds: Optional[DoctorThresholds] = None,
                     compiler_options: Optional[Dict[str, Any]] = None
                     ) -> Diagnosis:
  """Compares `model` under `policy` with float32 and prescribes a fix.

  Args:
    model: a linen ``model.apply`` (or a ``flax.linen.Module``) with
      `params`; an ``nnx.Module``; or an `mpjax.TrainState` (linen, or NNX
      from `TrainState.from_nnx`), whose params, model state, policy, key
      and loss scale are the defaults.
    batches: a list of batches, each what `loss_fn` takes (same shapes).
    loss_fn: ``loss_fn(params, batch, apply_fn, rng)``, as for
      `mpjax.make_train_step`; ``apply_fn`` threads the model state.
    policy: the candidate: a preset, a jmp string, a `jmp.Policy` or a
      `PolicyMap` (default: the TrainState's).
    params: linen: the ``"params"`` collection.
    model_state: linen: the other collections (``{"batch_stats": ...}``).
    rng: the key handed to `loss_fn` (``fold_in(rng, i)`` for batch i);
      default the TrainState's, else None.
    loss_scale: the scale of the policy's backward pass; default the
      TrainState's current scale, else ``2**15`` for float16 compute and 1
      otherwise.
    has_aux: `loss_fn` returns ``(loss, aux)``.
    thresholds: `DoctorThresholds` (default: the documented defaults).
    compiler_options: XLA options, as `make_train_step`'s.

  Returns:
    A `Diagnosis`; ``print(d)`` shows the table and the prescription,
    ``d.prescription.policy_map`` is the suggested map.

  Raises:
    TypeError: a model, policy, batches or loss_fn of the wrong kind, naming
      the value.
    ValueError: batches of different shapes, or a batch the model cannot
      run, naming the batch.

  Examples:
    >>> import jax, jax.numpy as jnp, flax.linen as nn, optax
    >>> model = nn.Sequential([nn.Dense(8), nn.relu, nn.Dense(2)])
    >>> x = jax.random.normal(jax.random.key(0), (16, 4))
    >>> params = model.init(jax.random.key(1), x)["params"]
    >>> def loss_fn(params, batch, apply_fn, rng):
    ...   return jnp.mean(apply_fn({"params": params}, batch) ** 2)
    >>> d = precision_doctor(model.apply, [x], loss_fn, "mixed_float16",
    ...                      params=params)
    >>> d.prescription.keep_float32
    ()
  """
  start = time.perf_counter()
  state = model if isinstance(model, train_state_lib.TrainState) else None
  if policy is None:
    if state is None:
      raise TypeError("precision_doctor: give the candidate policy (a preset, "
                      "a jmp string, a jmp.Policy or a PolicyMap).")
    policy = state.policy
  policy = _check_policy(policy)
  if not callable(loss_fn):
    raise TypeError(f"precision_doctor: loss_fn must be callable, got "
                    f"{loss_fn!r}.")
  if not isinstance(has_aux, bool):
    raise TypeError(f"precision_doctor: has_aux must be a bool, got "
                    f"{has_aux!r}.")
  thresholds = DoctorThresholds() if thresholds is None else thresholds
  if not isinstance(thresholds, DoctorThresholds):
    raise TypeError(f"precision_doctor: thresholds must be a DoctorThresholds, got "
                    f"{thresholds!r}.")
  batches = _check_batches(batches)
  compute = jnp.dtype(policy.compute_dtype)
  if rng is None and state is not None:
    rng = state.rng
  if loss_scale is None:
    if state is not None and loss_scaled_lib.find_loss_scaled_states(
        state.opt_state):
      loss_scale = float(loss_scaled_lib.current_loss_scale(state.opt_state))
    else:
      loss_scale = 2.0 ** 15 if compute == jnp.float16 else 1.0
  if isinstance(loss_scale, bool) or not isinstance(
      loss_scale, numbers.Real) or not loss_scale > 0:
    raise ValueError(f"precision_doctor: loss_scale must be a positive "
                     f"number, got {loss_scale!r}.")
  m = _as_model(model, params, model_state)
  reference_apply = m.apply_for(_REFERENCE)
  policy_apply = m.apply_for(policy)
  whole = policy.default if isinstance(policy, policy_map_lib.PolicyMap) \
      else policy
  layout = {}

  def compare(params, model_state, batch, rng, scale):
    with jax.default_matmul_precision("highest"):
      ref_calls = []
      ref_loss, ref_grads, ref_arrays = _run(
          reference_apply, params, model_state, batch, rng,
          jnp.ones([], jnp.float32), loss_fn, has_aux, m.is_nnx, ref_calls)
    pol_calls = []
    pol_loss, pol_grads, pol_arrays = _run(
        policy_apply, params, model_state, batch, rng, scale, loss_fn,
        has_aux, m.is_nnx, pol_calls)
    ref_index, seen = {}, {}
    for i, (call, _) in enumerate(ref_calls):
      key = (call.path, call.method)
      ref_index[key + (seen.get(key, 0),)] = i
      seen[key] = seen.get(key, 0) + 1
    modules, metas, seen = [], [], {}
    for i, (call, own) in enumerate(pol_calls):
      key = (call.path, call.method)
      j = ref_index.get(key + (seen.get(key, 0),))
      seen[key] = seen.get(key, 0) + 1
      if j is None:
        continue
      meta = _meta(call, own, whole)
      metas.append(meta)
      modules.append(_module_stats(*pol_arrays[i], *ref_arrays[j],
                                   meta.compute_dtype))
    layout["metas"] = metas
    ref_flat = jax.tree_util.tree_flatten_with_path(ref_grads)[0]
    pol_flat = jax.tree.leaves(pol_grads)
    layout["leaves"] = [attribution.path_str(p) for p, _ in ref_flat]
    leaves = [_leaf_stats(g, r) for g, (_, r) in zip(pol_flat, ref_flat)]
    current = grad_stats_lib.grad_stats(ref_grads, scale, compute)
    at_scale = [(s.underflow, s.nonzero) for s in jax.tree.leaves(
        current.leaves, is_leaf=lambda x: isinstance(
            x, grad_stats_lib.TensorStats))]
    leaf_max = [jnp.max(jnp.abs(r.astype(jnp.float32)), initial=0)
                for _, r in ref_flat]
    # A leaf below float32's resolution of the largest gradient is rounding
    # noise of a gradient that is zero in exact arithmetic (attention key
    # biases): it would count as "flushed" at every scale.
    resolution = jnp.finfo(jnp.float32).eps * jnp.max(jnp.stack(leaf_max))
    signal = jax.tree.map(
        lambda r: jnp.where(jnp.max(jnp.abs(r), initial=0) < resolution,
                            jnp.zeros_like(r), r), ref_grads)
    # One loop body for every scale: one compiled grad_stats, not 25.
    sweep = jax.lax.map(
        lambda s: grad_stats_lib.grad_stats(signal, s, compute).total,
        2.0 ** jnp.arange(_MAX_SCALE_LOG2 + 1, dtype=jnp.float32))
    return dict(ref_loss=ref_loss, pol_loss=pol_loss, modules=modules,
                leaves=leaves, at_scale=at_scale, leaf_max=leaf_max,
                sweep_underflow=sweep.underflow,
                sweep_nonzero=sweep.nonzero)

  jitted = jax.jit(compare, compiler_options=compiler_options)
  scale = jnp.asarray(loss_scale, jnp.float32)
  totals = None
  for i, batch in enumerate(batches):
    key = None if rng is None else jax.random.fold_in(rng, i)
    try:
      out = jax.device_get(jitted(m.params, m.model_state, batch, key, scale))
    except Exception as e:  # pylint: disable=broad-except
      if str(e).startswith("precision_doctor:"):
        raise
      raise ValueError(
          f"precision_doctor: batch {i} ({_describe(batch)}) failed in the "
          f"model or loss_fn: {type(e).__name__}: {e}") from e
    totals = _accumulate(totals, out)
  n = len(batches)
  modules = tuple(_module_row(meta, s)
                  for meta, s in zip(layout["metas"], totals["modules"]))
  leaves = tuple(
      LeafDiagnosis(path=path, cosine=_cosine(s), error=_ratio(s["d2"],
                                                               s["r2"], s),
                    flush_share=float(u / max(nz, 1)), max_abs=float(mx),
                    nonfinite=int(s["nonfinite"]))
      for path, s, (u, nz), mx in zip(layout["leaves"], totals["leaves"],
                                      totals["at_scale"], totals["leaf_max"]))
  shares = [float(u / max(nz, 1)) for u, nz in zip(
      totals["sweep_underflow"], totals["sweep_nonzero"])]
  grad_max = max((l.max_abs for l in leaves), default=0.0)
  prescription = prescribe(modules, policy, grad_max, shares, compute,
                           thresholds)
  return Diagnosis(
      policy=policy, loss_scale=float(loss_scale), batches=n,
      loss_float32=float(totals["ref_loss"]) / n,
      loss_policy=float(totals["pol_loss"]) / n, modules=modules,
      leaves=leaves, first_jump=first_jump(modules, thresholds),
      prescription=prescription, thresholds=thresholds,
      flush_shares=tuple(shares), seconds=time.perf_counter() - start)


def _accumulate(total: Any, new: Any) -> Any:
  """Sums batches' statistics in float64; ``max_abs``/``leaf_max`` take the
  maximum."""
  new = jax.tree.map(lambda x: np.asarray(x, np.float64), new)
  if total is None:
    return new

  def merge(a, b, key=None):
    if isinstance(a, dict):
      return {k: merge(a[k], b[k], k) for k in a}
    if isinstance(a, (list, tuple)):
      return type(a)(merge(x, y, key) for x, y in zip(a, b))
    return np.maximum(a, b) if key in ("max_abs", "leaf_max") else a + b

  return merge(total, new)


def _ratio(diff2: float, norm2: float, stats: Dict[str, Any]) -> float:
  if stats.get("nonfinite", 0) or not math.isfinite(float(diff2)):
    return math.inf
  if norm2 == 0:
    return 0.0 if diff2 == 0 else math.inf
  return float(math.sqrt(diff2 / norm2))


def _cosine(s: Dict[str, Any]) -> float:
  if s["nonfinite"] or s["r2"] == 0:
    return math.nan
  if s["g2"] == 0:
    return 0.0  # the policy lost the whole gradient
  return float(s["dot"] / math.sqrt(s["g2"] * s["r2"]))


def _module_row(meta: _Meta, s: Dict[str, Any]) -> ModuleDiagnosis:
  out_error = _ratio(s["out_d"], s["out_n"], s)
  in_error = (math.inf if not math.isfinite(float(s["in_d"]))
              else _ratio(s["in_d"], s["in_n"], {}))
  max_abs = float(s["max_abs"])
  limit = float(jnp.finfo(jnp.dtype(meta.compute_dtype)).max)
  headroom = (math.inf if max_abs == 0 else
              math.log2(limit) - math.log2(max_abs))
  return ModuleDiagnosis(
      path=meta.path, cls=meta.cls, method=meta.method,
      compute_dtype=meta.compute_dtype, output_error=out_error,
      input_error=in_error, headroom_log2=headroom, max_abs=max_abs,
      zero_share=float(s["zero"] / max(s["nonzero"], 1)),
      nonfinite=int(s["nonfinite"]), float32_already=meta.float32_already,
      island=meta.island)
