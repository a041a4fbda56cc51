"""Plot training metrics logged as JSON Lines (`mpjax.MetricsWriter`).

Command (matplotlib needed: ``pip install -e '.[plots]'``):

  python -m mpjax.plot runs/metrics.jsonl [more.jsonl ...] --out run.png

Panels: the loss; the loss scale on a log2 axis with skipped steps marked; and,
when the records carry ``grad_stats``, the underflow fraction of each layer
over time. Several runs are overlaid, one colour each: every file is a run,
and a file whose records carry a ``run`` key holds one run per name.

The figure is drawn with matplotlib's Agg canvas directly, so importing or
calling this never changes the pyplot backend of the caller.
"""

import argparse
import collections
import importlib.util
import itertools
import math
import os
import sys
from typing import Any, Dict, List, Mapping, Optional, Sequence

from mpjax._src import metrics_log

Records = List[Dict[str, Any]]


def load_runs(paths: Sequence[str]) -> Dict[str, Records]:
  """Reads metrics files into ``{run label: records}`` (records in file order).

  A file's records are grouped by their ``run`` key; records without one are
  labelled with the file name (without ``.jsonl``). When two files give the
  same label, the file name is prefixed.
  """
  grouped = []
  for path in paths:
    stem = os.path.splitext(os.path.basename(path))[0]
    by_run = collections.OrderedDict()
    for record in metrics_log.read_metrics(path):
      by_run.setdefault(str(record.get("run", stem)), []).append(record)
    grouped.extend((stem, label, records) for label, records in by_run.items())
  counts = collections.Counter(label for _, label, _ in grouped)
  runs: Dict[str, Records] = {}
  for stem, label, records in grouped:
    runs[f"{stem}:{label}" if counts[label] > 1 else label] = records
  return runs


def _series(records: Records, key: str):
  """(steps, values) of finite numeric `key` values."""
  steps, values = [], []
  for i, record in enumerate(records):
    value = record.get(key)
    if isinstance(value, (int, float)) and not isinstance(value, bool) \
        and math.isfinite(value):
      steps.append(record.get("step", i))
      values.append(value)
  return steps, values


def _underflow_series(records: Records) -> Dict[str, tuple]:
  """``{layer: (steps, underflow fractions)}`` from records with grad_stats."""
  out: Dict[str, tuple] = collections.OrderedDict()
  for i, record in enumerate(records):
    stats = record.get("grad_stats")
    if not isinstance(stats, Mapping) or not stats.get("computed", True):
      continue
    for layer, values in stats.get("layers", {}).items():
      steps, fractions = out.setdefault(layer, ([], []))
      steps.append(record.get("step", i))
      fractions.append(values["underflow_fraction"])
  return out


def plot_runs(runs: Mapping[str, Records], out: Optional[str] = None, *,
              title: Optional[str] = None):
  """Draws the loss, loss-scale and underflow panels for one or more runs.

  Args:
    runs: ``{label: records}`` (records as `mpjax.read_metrics` returns).
    out: where to save the figure (PNG, PDF, SVG by extension), or None.
    title: a figure title.

  Returns:
    The `matplotlib.figure.Figure`.

  Raises:
    ValueError: if no run has any record.
  """
  # pylint: disable=g-import-not-at-top
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure
  # pylint: enable=g-import-not-at-top
  runs = {label: list(records) for label, records in runs.items() if records}
  if not runs:
    raise ValueError("plot_runs: no records to plot.")
  underflow = {label: _underflow_series(r) for label, r in runs.items()}
  has_underflow = any(underflow.values())
  rows = 3 if has_underflow else 2
  fig = Figure(figsize=(9, 2.8 * rows + 0.6), layout="constrained")
  FigureCanvasAgg(fig)
  axes = fig.subplots(rows, 1, sharex=True, squeeze=False)[:, 0]
  colors = itertools.cycle(
      ["C0", "C1", "C2", "C3", "C4", "C5", "C6", "C7", "C8", "C9"])
  marked_skip = False
  for (label, records), color in zip(runs.items(), colors):
    steps, losses = _series(records, "loss")
    axes[0].plot(steps, losses, color=color, label=label, linewidth=1.2)
    steps, scales = _series(records, "loss_scale")
    if scales:
      axes[1].plot(steps, scales, color=color, label=label, linewidth=1.2,
                   drawstyle="steps-post")
      skipped = [(record.get("step", i), record["loss_scale"])
                 for i, record in enumerate(records)
                 if record.get("skipped") and isinstance(
                     record.get("loss_scale"), (int, float))]
      if skipped:
        axes[1].scatter([s for s, _ in skipped], [v for _, v in skipped],
                        marker="x", color=color, s=30, zorder=3,
                        label=None if marked_skip else "skipped step")
        marked_skip = True
    if has_underflow:
      styles = itertools.cycle(["-", "--", ":", "-."])
      for (layer, (steps, fractions)), style in zip(
          underflow[label].items(), styles):
        axes[2].plot(steps, fractions, color=color, linestyle=style,
                     marker=".", label=f"{label}: {layer}")
  axes[0].set_ylabel("loss")
  axes[0].legend(loc="upper right", fontsize="small")
  axes[1].set_yscale("log", base=2)
  axes[1].set_ylabel("loss scale (log2)")
  if axes[1].has_data():
    axes[1].legend(loc="best", fontsize="small")
  if has_underflow:
    axes[2].set_ylabel("underflow fraction")
    axes[2].set_ylim(bottom=0)
    axes[2].legend(loc="best", fontsize="x-small", ncol=2)
  axes[-1].set_xlabel("step")
  for ax in axes:
    ax.grid(True, alpha=0.3)
  if title:
    fig.suptitle(title)
  if out is not None:
    directory = os.path.dirname(os.path.abspath(out))
    os.makedirs(directory, exist_ok=True)
    fig.savefig(out, dpi=120)
  return fig


def main(argv: Optional[Sequence[str]] = None) -> str:
  """The command line; returns the path written."""
  parser = argparse.ArgumentParser(
      prog="python -m mpjax.plot",
      description="Plot loss, loss scale (skipped steps marked) and per-layer "
                  "gradient underflow from metrics.jsonl files.")
  parser.add_argument("metrics", nargs="+", help="metrics .jsonl files")
  parser.add_argument("--out", default="run.png",
                      help="output image (default: run.png)")
  parser.add_argument("--title", default=None, help="figure title")
  args = parser.parse_args(argv)
  missing = [p for p in args.metrics if not os.path.exists(p)]
  if missing:
    parser.error(f"no such file: {', '.join(missing)}")
  if importlib.util.find_spec("matplotlib") is None:
    parser.error("matplotlib is not installed: pip install matplotlib "
                 "(or pip install -e '.[plots]').")
  runs = load_runs(args.metrics)
  if not any(runs.values()):
    parser.error(f"no records in {', '.join(args.metrics)}")
  plot_runs(runs, args.out, title=args.title)
  print(f"wrote {args.out}")
  return args.out


if __name__ == "__main__":
  main(sys.argv[1:])
