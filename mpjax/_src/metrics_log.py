"""Training metrics as JSON Lines, and a progress bar showing loss and scale.

One JSON object a line (``metrics.jsonl``, as big_vision writes), one line per
logged step. `record_from_metrics` turns a train step's metrics into a flat
record of Python numbers, `MetricsWriter` appends records, `read_metrics`
reads them back. Non-finite floats are written as the strings ``"NaN"``,
``"Infinity"`` and ``"-Infinity"`` so that every line is strict JSON (``jq``,
browsers and pandas accept it) and `read_metrics` turns them back into floats.

Record keys (each only when known): ``step``, ``loss``, ``loss_scale``,
``skipped`` (bool: this step's update was skipped), ``grad_norm``,
``step_time_s``, ``skipped_steps`` (total), ``consecutive_skips``,
``nonfinite_leaves`` (paths, on steps with non-finite gradients and
attribution on), ``grad_stats`` (`grad_stats_summary`, on steps it was
computed), plus any extra keys the loop passes (a ``run`` name, ...).
"""

import json
import math
import os
import sys
import warnings
from typing import Any, Dict, IO, Iterator, List, Mapping, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np

from mpjax._src import attribution
from mpjax._src import grad_stats as grad_stats_lib

_NONFINITE = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}


def _float(value: float) -> Union[float, str]:
  if math.isnan(value):
    return "NaN"
  if math.isinf(value):
    return "Infinity" if value > 0 else "-Infinity"
  return value


def to_jsonable(value: Any, *, where: str = "value") -> Any:
  """Converts numbers, arrays and containers into JSON-ready Python values.

  numpy/jax scalars become ``int``/``float``/``bool`` (non-finite floats the
  strings ``"NaN"``, ``"Infinity"``, ``"-Infinity"``), arrays nested lists,
  mappings dicts with string keys, NamedTuples dicts, tuples lists, a
  `GradStats` its `grad_stats_summary`.

  Raises:
    TypeError: for anything else, naming where in the record it was.
  """
  if isinstance(value, grad_stats_lib.GradStats):
    return to_jsonable(grad_stats_lib.grad_stats_summary(value), where=where)
  if value is None or isinstance(value, (str, bool)):
    return value
  if isinstance(value, int):
    return value
  if isinstance(value, float):
    return _float(value)
  if isinstance(value, (jax.Array, np.ndarray, np.generic)):
    array = np.asarray(value)
    if array.dtype == np.bool_ or jnp.issubdtype(array.dtype, jnp.integer):
      return array.tolist()
    # jnp, not np: numpy does not count bfloat16 as floating.
    if jnp.issubdtype(array.dtype, jnp.floating):
      # float16/bfloat16 go through float64 so that tolist gives Python floats.
      listed = array.astype(np.float64).tolist()
      return (_float(listed) if array.ndim == 0
              else jax.tree.map(_float, listed))
    raise TypeError(f"to_jsonable: {where} has dtype {array.dtype}; only "
                    "bool, integer and floating arrays can be logged.")
  if hasattr(value, "_asdict"):
    value = value._asdict()
  if isinstance(value, Mapping):
    return {str(k): to_jsonable(v, where=f"{where}[{k!r}]")
            for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [to_jsonable(v, where=f"{where}[{i}]") for i, v in enumerate(value)]
  raise TypeError(
      f"to_jsonable: {where} is a {type(value).__name__}; only numbers, "
      "strings, arrays, mappings, sequences and GradStats can be logged.")


def from_jsonable(value: Any) -> Any:
  """Inverse of the non-finite encoding: ``"NaN"`` etc. back to floats."""
  if isinstance(value, str):
    return _NONFINITE.get(value, value)
  if isinstance(value, list):
    return [from_jsonable(v) for v in value]
  if isinstance(value, dict):
    return {k: from_jsonable(v) for k, v in value.items()}
  return value


def record_from_metrics(step: int, metrics: Mapping[str, Any], *,
                        step_time_s: Optional[float] = None,
                        like: Any = None, **extra: Any) -> Dict[str, Any]:
  """One log record from a train step's metrics (fetched to the host here).

  Args:
    step: the step number.
    metrics: the dict `make_train_step` returns (``loss``, ``loss_scale``,
      ``grads_finite``, ``grad_norm``, ``skipped_steps``, optionally
      ``consecutive_skips``, ``leaf_grads_finite``, ``grad_stats``, ``aux``);
      other keys are converted with `to_jsonable`.
    step_time_s: wall-clock seconds of the step, if the loop measured it.
    like: the params, to name packed ``leaf_grads_finite`` flags (see
      `nonfinite_leaf_paths`).
    **extra: more keys for the record (e.g. ``run="mixed_float16"``).

  Returns:
    A dict of plain Python values (see the module docstring for the keys;
    non-finite floats stay floats, `MetricsWriter` encodes them):
    ``grads_finite`` becomes ``skipped``; ``leaf_grads_finite`` becomes
    ``nonfinite_leaves`` (only on steps with a non-finite leaf);
    ``grad_stats`` is kept only when it was computed this step.
  """
  if not isinstance(metrics, Mapping):
    raise TypeError(f"record_from_metrics: metrics must be a mapping, got "
                    f"{type(metrics).__name__}.")
  metrics = dict(jax.device_get(dict(metrics)))
  record: Dict[str, Any] = {"step": int(step)}
  if "grads_finite" in metrics:
    record["skipped"] = not bool(metrics.pop("grads_finite"))
  leaf_finite = metrics.pop("leaf_grads_finite", None)
  if leaf_finite is not None:
    paths = attribution.nonfinite_leaf_paths(leaf_finite, like=like)
    if paths:
      record["nonfinite_leaves"] = paths
  stats = metrics.pop("grad_stats", None)
  if stats is not None and bool(np.asarray(stats.computed)):
    record["grad_stats"] = stats
  if step_time_s is not None:
    record["step_time_s"] = float(step_time_s)
  record.update(metrics)
  record.update(extra)
  # Plain Python values; non-finite floats stay floats (NaN, inf) so that the
  # record can be checked (SkipGuard) before it is written.
  return from_jsonable(to_jsonable(record, where="record"))


class MetricsWriter:
  """Appends one JSON object per line to a file (a context manager).

  Every record is flushed as it is written, so a crashed run keeps its log.

  Args:
    path: the ``.jsonl`` file; its directory is created.
    append: add to an existing file instead of starting it afresh.

  Examples:
    >>> import os, tempfile
    >>> path = os.path.join(tempfile.mkdtemp(), "metrics.jsonl")
    >>> with MetricsWriter(path) as log:
    ...   _ = log.write(0, {"loss": float("nan"), "grads_finite": False})
    >>> open(path).read()
    '{"step": 0, "skipped": true, "loss": "NaN"}\\n'
    >>> read_metrics(path)
    [{'step': 0, 'skipped': True, 'loss': nan}]
  """

  def __init__(self, path: str, *, append: bool = False):
    if not isinstance(path, (str, os.PathLike)):
      raise TypeError(f"MetricsWriter: path must be a file path, got {path!r}.")
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    self.path = os.fspath(path)
    self._file: Optional[IO[str]] = open(self.path, "a" if append else "w")

  def write_record(self, record: Mapping[str, Any]) -> Dict[str, Any]:
    """Writes `record` (any values `to_jsonable` takes).

    Returns:
      The record as written, with non-finite floats as floats again.
    """
    if self._file is None:
      raise ValueError(f"MetricsWriter: {self.path} is closed.")
    record = to_jsonable(dict(record), where="record")
    self._file.write(json.dumps(record, allow_nan=False) + "\n")
    self._file.flush()
    return from_jsonable(record)

  def write(self, step: int, metrics: Mapping[str, Any], *,
            step_time_s: Optional[float] = None, like: Any = None,
            **extra: Any) -> Dict[str, Any]:
    """Writes `record_from_metrics(step, metrics, ...)`; returns the record."""
    return self.write_record(record_from_metrics(
        step, metrics, step_time_s=step_time_s, like=like, **extra))

  def close(self) -> None:
    if self._file is not None:
      self._file.close()
      self._file = None

  def __enter__(self) -> "MetricsWriter":
    return self

  def __exit__(self, *exc) -> None:
    self.close()


def iter_metrics(path: str) -> Iterator[Dict[str, Any]]:
  """Yields the records of a ``.jsonl`` file; see `read_metrics`."""
  with open(path) as f:
    lines = f.readlines()
  for number, line in enumerate(lines, 1):
    if not line.strip():
      continue
    try:
      record = json.loads(line)
    except json.JSONDecodeError as e:
      if number == len(lines) and not line.endswith("\n"):
        warnings.warn(f"{path}:{number}: ignoring a truncated last line (the "
                      "run stopped while writing it).", stacklevel=2)
        return
      raise ValueError(f"{path}:{number}: not a JSON object: {e}") from e
    if not isinstance(record, dict):
      raise ValueError(f"{path}:{number}: expected a JSON object, got "
                       f"{type(record).__name__}.")
    yield from_jsonable(record)


def read_metrics(path: str) -> List[Dict[str, Any]]:
  """Reads a ``.jsonl`` metrics file written by `MetricsWriter`.

  ``"NaN"``, ``"Infinity"`` and ``"-Infinity"`` strings become floats again;
  blank lines are skipped and a truncated last line (a run killed mid-write)
  is dropped with a warning.
  """
  return list(iter_metrics(path))


def _is_tty(stream: Any) -> bool:
  isatty = getattr(stream, "isatty", None)
  try:
    return bool(isatty and isatty())
  except ValueError:  # a closed stream
    return False


class ProgressBar:
  """A tqdm progress bar over steps that shows the loss and the loss scale.

  Silent (a no-op) with ``quiet=True``, when `file` is not a terminal (logs,
  CI, pytest) or when tqdm is not installed. `update` only formats numbers the
  loop hands it: pass values already fetched from the device (e.g. every N
  steps) so the bar never forces a sync of its own.

  Args:
    total: number of steps (or None when unknown).
    desc: text before the bar, e.g. the configuration's name.
    quiet: never show the bar.
    file: where to draw it (default: ``sys.stderr``, as tqdm does).

  Examples:
    >>> with ProgressBar(100, quiet=True) as bar:
    ...   bar.update(10, loss=0.25, loss_scale=32768.0, skipped_steps=1)
    >>> bar.enabled
    False
  """

  def __init__(self, total: Optional[int], *, desc: Optional[str] = None,
               quiet: bool = False, file: Optional[IO[str]] = None):
    if not isinstance(quiet, bool):
      raise TypeError(f"ProgressBar: quiet must be a bool, got {quiet!r}.")
    file = sys.stderr if file is None else file
    self._bar = None
    if not quiet and _is_tty(file):
      try:
        import tqdm  # pylint: disable=g-import-not-at-top
      except ImportError:
        tqdm = None
      if tqdm is not None:
        self._bar = tqdm.tqdm(total=total, desc=desc, file=file,
                              dynamic_ncols=True, unit="step")

  @property
  def enabled(self) -> bool:
    """Whether a bar is being drawn."""
    return self._bar is not None

  def update(self, n: int = 1, *, loss: Any = None, loss_scale: Any = None,
             **postfix: Any) -> None:
    """Advances by `n` steps and shows the given values.

    Args:
      n: steps done since the last call.
      loss: the latest loss (a host number or a fetched scalar).
      loss_scale: the latest loss scale.
      **postfix: more values to show (``skipped_steps=3``).
    """
    if self._bar is None:
      return
    shown = {}
    if loss is not None:
      shown["loss"] = f"{float(np.asarray(loss)):.4g}"
    if loss_scale is not None:
      shown["scale"] = f"{float(np.asarray(loss_scale)):g}"
    for key, value in postfix.items():
      value = np.asarray(value) if not isinstance(value, str) else value
      shown[key] = (f"{value.item():g}" if isinstance(value, np.ndarray)
                    and value.size == 1 else str(value))
    if shown:
      self._bar.set_postfix(shown, refresh=False)
    self._bar.update(n)

  def write(self, message: str) -> None:
    """Prints a line without breaking the bar (plain print when silent)."""
    if self._bar is None:
      print(message)
    else:
      self._bar.write(message)

  def close(self) -> None:
    if self._bar is not None:
      self._bar.close()

  def __enter__(self) -> "ProgressBar":
    return self

  def __exit__(self, *exc) -> None:
    self.close()
