"""The experiments' training loop: steps, metrics.jsonl, guard, progress, checkpoints.

Shared by `seed_mlp.py` and the language-model examples so that every
experiment logs, stops and resumes the same way. Everything it calls is
mpjax's (`MetricsWriter`, `SkipGuard`, `ProgressBar`, `CheckpointManager`,
`debug_forward`); this file only wires them into a loop.
"""

import argparse
import dataclasses
import json
import os
import sys
import time
from typing import Any, Callable, Dict, Iterator, List, Optional

import jax

import mpjax

import cli  # pylint: disable=g-import-not-at-top,wrong-import-position


def open_checkpoints(args: argparse.Namespace, name: str,
                     state: mpjax.TrainState):
  """(manager or None, state): restores `state` when --resume finds a step.

  Raises:
    SystemExit: the directory holds a run and --resume was not given (never
      overwrite or interleave with a run silently).
  """
  if not args.checkpoint_dir:
    return None, state
  manager = mpjax.CheckpointManager(
      os.path.join(args.checkpoint_dir, name), max_to_keep=2,
      save_interval_steps=args.checkpoint_every)
  if manager.latest_step() is not None:
    if not args.resume:
      manager.close()
      raise SystemExit(
          f"{manager.directory} already holds step {manager.latest_step()}: "
          "pass --resume to continue it, or choose another --checkpoint-dir.")
    state = manager.restore(state)  # the fresh state is the template
  return manager, state


@dataclasses.dataclass
class LoopResult:
  state: mpjax.TrainState
  losses: List[Any]  # per step run, device scalars (fetch once at the end)
  records: List[Dict[str, Any]]  # the logged steps
  step_times: List[float]  # per step with time_each_step, else []
  elapsed_s: float  # wall time of the timed steps (ends synchronised)
  timed_steps: int  # steps after `warmup`
  stopped_at: Optional[int] = None  # where --stop-after stopped, if it did


def doctor(args: argparse.Namespace, name: str, model: Any,
           batches: Iterator[Any], loss_fn: Callable, policy: Any = None,
           **kwargs) -> Optional[mpjax.Diagnosis]:
  """With --doctor, prints `mpjax.precision_doctor`'s diagnosis of `model`.

  Args:
    args: the flags (``--doctor``, ``--doctor-batches``).
    name: the configuration, for the heading.
    model: what `precision_doctor` takes (a `TrainState`, an NNX module, a
      linen apply function with ``params=`` in `kwargs`).
    batches: an iterator of training batches; the first ``--doctor-batches``
      are compared.
    loss_fn: the configuration's ``loss_fn(params, batch, apply_fn, rng)``.
    policy: the candidate (default: the TrainState's). A float32 policy is
      not diagnosed: it is the reference.
    **kwargs: further `precision_doctor` arguments.
  """
  if not args.doctor:
    return None
  candidate = model.policy if policy is None else policy
  if mpjax.get_policy(candidate).compute_dtype == jax.numpy.float32:
    return None
  data = [next(batches) for _ in range(args.doctor_batches)]
  diagnosis = mpjax.precision_doctor(model, data, loss_fn, policy, **kwargs)
  print(f"== precision doctor: {name}\n{diagnosis}\n", flush=True)
  return diagnosis


def sequential(batches: Iterator[Any]) -> Callable[[int], Any]:
  """``batch_at(i)`` over an iterator, for increasing i (skips to i)."""
  position, current = 0, None

  def batch_at(i: int) -> Any:
    nonlocal position, current
    while position <= i:
      current, position = next(batches), position + 1
    return current

  return batch_at


def run(step: Callable, state: mpjax.TrainState, batch_at: Callable[[int], Any],
        *, name: str, last: int, args: argparse.Namespace,
        log: Optional[mpjax.MetricsWriter] = None,
        checkpoints: Optional[mpjax.CheckpointManager] = None,
        loss_scaled: bool = True, time_each_step: bool = False,
        debug: Optional[Callable[[Any, Any], Any]] = None,
        extra: Optional[Callable[[int], Dict[str, Any]]] = None,
        warmup: int = 0) -> LoopResult:
  """Runs steps ``int(state.step) .. last - 1`` (fewer with --stop-after).

  Args:
    step: the (compiled) train step.
    state: the state to start from (fresh or restored).
    batch_at: step index -> batch (host arrays), so a resumed run sees the
      batches it would have seen.
    name: the configuration's name (``run`` in the metrics records).
    last: the step count to reach.
    args: the parsed flags of `cli.add_run_arguments`.
    log: where to write the records.
    checkpoints: a manager from `open_checkpoints`, closed at the end.
    loss_scaled: whether a loss scale can back off (see `mpjax.SkipGuard`).
    time_each_step: block on every step and time it (the median step time);
      otherwise only the whole loop is timed.
    warmup: steps left out of `elapsed_s` (the clock starts after them, once
      the device has caught up).
    debug: ``debug(params, batch)`` is printed when the guard stops the run
      (e.g. `mpjax.debug_forward` on the model).
    extra: more keys for step i's record.
  """
  first = int(state.step)
  stopped_at = None
  if args.stop_after is not None and first + args.stop_after < last:
    last = stopped_at = first + args.stop_after
  guard = mpjax.SkipGuard(args.max_consecutive_skips, like=state.params,
                          loss_scaled=loss_scaled)
  result = LoopResult(state, [], [], [], 0.0, 0)
  shown = 0  # steps the progress bar has counted
  warmup = warmup if warmup < last - first else 0
  start = time.perf_counter()
  with mpjax.ProgressBar(max(last - first, 0), desc=name,
                         quiet=args.quiet) as bar:
    for i in range(first, last):
      if warmup and i == first + warmup:
        jax.block_until_ready(state)
        start = time.perf_counter()
      batch = jax.device_put(batch_at(i))
      tick = time.perf_counter()
      state, metrics = step(state, batch)
      if time_each_step:
        jax.block_until_ready((state, metrics))
        result.step_times.append(time.perf_counter() - tick)
      result.losses.append(metrics["loss"])
      if (i - first) % args.log_every == 0 or i == last - 1:
        record = mpjax.record_from_metrics(
            i, jax.device_get(metrics), like=state.params, run=name,
            step_time_s=result.step_times[-1] if time_each_step else None,
            **(extra(i) if extra else {}))
        if log is not None:
          log.write_record(record)
        result.records.append(record)
        try:
          guard.update(record)
        except mpjax.NonFiniteTrainingError:
          if debug is not None:
            print(debug(state.params, batch), file=sys.stderr)
          raise
        bar.update(i + 1 - first - shown, loss=record["loss"],
                   loss_scale=record["loss_scale"])
        shown = i + 1 - first
      if checkpoints is not None:
        checkpoints.save(state, step=i + 1)  # the loop counter: no sync
  jax.block_until_ready(state)
  result.elapsed_s = time.perf_counter() - start
  result.timed_steps = last - first - warmup
  if checkpoints is not None:
    checkpoints.save(state, step=last, force=True)
    checkpoints.close()
  result.state, result.stopped_at = state, stopped_at
  if stopped_at is not None:
    print(f"{name}: stopped at step {stopped_at} by --stop-after "
          f"{args.stop_after}", flush=True)
  return result


def run_configs(run_one: Callable[[Any, Optional[mpjax.MetricsWriter]], dict],
                configs: List[Any], args: argparse.Namespace) -> List[dict]:
  """``run_one(config, log)`` for each config, --metrics' writer open for all
  of them (log is None without --metrics); returns the rows."""
  if not args.metrics:
    return [run_one(c, None) for c in configs]
  with mpjax.MetricsWriter(args.metrics) as log:
    return [run_one(c, log) for c in configs]


def finish(result: dict, rows: List[dict], args: argparse.Namespace,
           argv: List[str], *, title: str) -> None:
  """The end of every experiment: writes --json, names --metrics, draws
  --plot and prints where --stop-after stopped and how to resume."""
  if args.json:
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w") as f:
      json.dump(result, f, indent=2)
    print(f"wrote {args.json}")
  if args.metrics:
    print(f"wrote {args.metrics}")
  plot(args, title=title)
  for line in cli.stopped_lines(rows, args, argv):
    print(line)


def plot(args: argparse.Namespace, title: str) -> None:
  """Draws --metrics into --plot, if asked."""
  if args.plot:
    from mpjax import plot as plot_lib  # pylint: disable=g-import-not-at-top
    plot_lib.plot_runs(plot_lib.load_runs([args.metrics]), args.plot,
                       title=title)
    print(f"wrote {args.plot}")
