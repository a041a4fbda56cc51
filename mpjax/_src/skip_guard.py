"""`SkipGuard`: stop a run that only skips, or whose loss is NaN unscaled.

The guard watches metrics the loop has already fetched (it never syncs with
the device itself) and raises `NonFiniteTrainingError` naming the non-finite
gradient leaves (`attribution.nonfinite_leaf_paths`); `ScaleCollapseWarning`
says when float16's loss scale keeps collapsing.
"""

import collections
import math
import numbers
import warnings
from typing import Any, List, Mapping, Optional, Sequence

import jax
import numpy as np

from mpjax._src.attribution import nonfinite_leaf_paths


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


def _collapse_hint(named_leaves: bool) -> str:
  """The advice when the scale collapses; names layers only if some were."""
  layers = ("the layers named above" if named_leaves else
            "the layers whose gradients overflow (make_train_step(..., "
            "attribution=True) names them)")
  return ("the scale keeps collapsing: this model may need bfloat16 (policy "
          "'mixed_bfloat16' has float32's range and needs no loss scale), or "
          f"{layers} need float32 islands")


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
            f"for the {self.collapses}th time: {_collapse_hint(False)}.",
            ScaleCollapseWarning, stacklevel=2)
    if scale is not None:
      self._last_scale = scale

    loss_finite = loss is None or math.isfinite(loss)
    if not loss_finite and not self.loss_scaled:
      self._raise(
          f"The loss is {loss}{self._at(step)} and this run has no "
          "loss scaling, so no smaller scale can fix it.", step, loss, scale,
          loss_finite)
    if consecutive >= self.max_consecutive_skips:
      self._raise(
          f"{consecutive} consecutive steps were skipped for non-finite "
          f"gradients (limit {self.max_consecutive_skips})"
          f"{self._at(step, ',')}.", step, loss, scale, loss_finite)

  @staticmethod
  def _at(step: Optional[int], separator: str = "") -> str:
    """`` at step N`` after `separator`, or nothing when the step is unknown."""
    return "" if step is None else f"{separator} at step {step}"

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
      hint = _collapse_hint(bool(self._last_leaves))
      parts.append(hint[0].upper() + hint[1:] + ".")
    raise NonFiniteTrainingError(
        " ".join(parts), step=step, consecutive_skips=self.consecutive_skips,
        leaf_paths=self._last_leaves, loss=loss, loss_scale=scale)
