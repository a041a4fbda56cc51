"""The seed MLP trained data-parallel or FSDP on every device of one or many hosts.

The same `mpjax.make_train_step` as the single-device experiment, jitted with a
sharding plan: the batch is split over the mesh, params and optimizer state
are replicated (``--parallelism dp``) or split (``--parallelism fsdp``), and
the loss-scale decision is one global decision.

Commands (from the repository root, after `pip install -e .`):

  # one host, every local device (on a CPU, fake 8 devices):
  XLA_FLAGS=--xla_force_host_platform_device_count=8 \\
      python experiments/train_sharded.py --parallelism fsdp --mesh 2,4

  # many hosts: run one process per host with --distributed. Under SLURM
  # jax.distributed.initialize() finds everything itself; elsewhere set
  # JAX_COORDINATOR_ADDRESS=host:port, JAX_NUM_PROCESSES and JAX_PROCESS_ID.
  srun --nodes=2 --ntasks-per-node=1 \\
      python experiments/train_sharded.py --distributed --parallelism fsdp

Expected on digits (8 devices, 200 steps): test accuracy about 96%, the
same final loss (to float tolerance) whatever the mesh and number of hosts.
"""

import argparse
import json
import os
import sys
from typing import List

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import cli  # pylint: disable=g-import-not-at-top,wrong-import-position


# The keys of SCALINGS below, for the flags (parsed before jax loads).
SCALING_NAMES = ("keras", "none", "torch")


def parse_args(argv: List[str]) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--parallelism", choices=("dp", "fsdp"), default="dp")
  parser.add_argument("--mesh", default=None,
                      help="mesh shape, e.g. '8' or '2,4' (default: all "
                           "devices on one axis); axes are named data[,fsdp]")
  parser.add_argument("--policy", default="mixed_float16")
  parser.add_argument("--scaling", choices=SCALING_NAMES, default="torch")
  parser.add_argument("--steps", type=int, default=200)
  parser.add_argument("--batch-size", type=int, default=128,
                      help="global batch size, split over every device")
  parser.add_argument("--hidden", type=int, nargs="+", default=[128])
  parser.add_argument("--lr", type=float, default=1e-3)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--distributed", action="store_true",
                      help="call jax.distributed.initialize() first")
  parser.add_argument("--compile-only", action="store_true",
                      help="compile the step, print its per-device memory "
                           "figures and stop (no training)")
  parser.add_argument("--json", default=None, help="write the result here")
  args = parser.parse_args(argv)
  if args.steps < 1 or args.batch_size < 1:
    parser.error("--steps and --batch-size must be >= 1")
  cli.require_module(parser, "sklearn", "the digits data", "experiments")
  return args


if __name__ == "__main__":
  # --help and flag errors are answered before jax is imported.
  parse_args(sys.argv[1:])

import jax
import numpy as np
import optax

import mpjax

import datasets  # pylint: disable=g-import-not-at-top,wrong-import-position
import models  # pylint: disable=g-import-not-at-top,wrong-import-position
import seed_mlp  # pylint: disable=g-import-not-at-top,wrong-import-position

SCALINGS = {
    "none": mpjax.NoScaling(),
    "torch": mpjax.DynamicScaling.like_torch(),
    "keras": mpjax.DynamicScaling.like_keras(),
}


def initialize_distributed() -> None:
  """jax.distributed.initialize() from SLURM/OpenMPI or JAX_* variables."""
  num = os.environ.get("JAX_NUM_PROCESSES")
  pid = os.environ.get("JAX_PROCESS_ID")
  if os.environ.get("JAX_PLATFORMS") == "cpu":
    # CPU devices of different processes talk through gloo.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(
      num_processes=int(num) if num else None,
      process_id=int(pid) if pid else None)


def make_plan(args: argparse.Namespace) -> mpjax.ShardingPlan:
  if args.mesh:
    try:
      shape = tuple(int(n) for n in args.mesh.split(","))
    except ValueError:
      raise SystemExit(f"--mesh {args.mesh!r}: expected sizes like '8' or "
                       "'2,4'") from None
  else:
    shape = (jax.device_count(),)
  if np.prod(shape) != jax.device_count() or len(shape) > 2:
    raise SystemExit(f"--mesh {args.mesh!r}: needs 1 or 2 axes whose product "
                     f"is the {jax.device_count()} devices")
  if len(shape) == 2:
    names = ("data", "fsdp")
  else:
    names = ("fsdp",) if args.parallelism == "fsdp" else ("data",)
  mesh = jax.make_mesh(shape, names)
  if args.parallelism == "dp":
    return mpjax.ShardingPlan(mesh=mesh, batch_axes=names)
  return mpjax.fsdp(mesh, param_axis="fsdp")


def main(argv: List[str]) -> dict:
  args = parse_args(argv[1:])
  if args.distributed:
    initialize_distributed()
  plan = make_plan(args)
  if args.batch_size % jax.device_count():
    raise SystemExit(f"--batch-size {args.batch_size} must be divisible by "
                     f"the {jax.device_count()} devices")
  split = datasets.load_digits(seed=args.seed)
  model = models.MLP(hidden=tuple(args.hidden), num_classes=10)
  params = model.init(jax.random.key(args.seed), split.x_train[:1])["params"]
  tx = mpjax.loss_scaled(optax.adam(args.lr), SCALINGS[args.scaling])
  state = plan.shard_state(mpjax.TrainState.create(
      apply_fn=model.apply, params=params, tx=tx, policy=args.policy))
  step = mpjax.make_train_step(seed_mlp.loss_fn, sharding=plan)

  # Every host draws the same global batch and keeps its own rows of it.
  rng = np.random.default_rng(args.seed)
  local = args.batch_size // jax.process_count()
  rows = slice(jax.process_index() * local, (jax.process_index() + 1) * local)
  losses, memory = [], None
  for i in range(args.steps):
    idx = rng.choice(len(split.x_train), args.batch_size, replace=False)[rows]
    batch = plan.batch_from_process_local(
        {"x": split.x_train[idx], "y": split.y_train[idx]})
    if i == 0:
      memory = step.lower(state, batch).compile().memory_analysis()
      if args.compile_only:
        break
    state, metrics = step(state, batch)
    losses.append(metrics["loss"])
  losses = [float(x) for x in jax.device_get(losses)]
  memory_figures = {
      # Per device: XLA compiles one SPMD program for every device.
      "argument_bytes_per_device": memory.argument_size_in_bytes,
      "temp_bytes_per_device": memory.temp_size_in_bytes,
      "state_bytes_total": sum(
          x.size * x.dtype.itemsize for x in jax.tree.leaves(
              (state.params, state.opt_state.inner_state))),
  }
  if args.compile_only:
    result = {"parallelism": args.parallelism, "mesh": dict(plan.mesh.shape),
              "devices": jax.device_count(), "hidden": args.hidden,
              "batch_size": args.batch_size,
              "policy": mpjax.policy_name(args.policy), **memory_figures}
    if jax.process_index() == 0:
      print(json.dumps(result))
      if args.json:
        with open(args.json, "w") as f:
          json.dump(result, f, indent=2)
    return result

  predict = jax.jit(lambda p, x: mpjax.with_policy(model.apply, args.policy)(
      {"params": p}, x).argmax(-1), out_shardings=plan.replicated)
  accuracy = float(np.mean(np.asarray(predict(state.params, split.x_test))
                           == split.y_test))
  result = {
      "parallelism": args.parallelism,
      "mesh": dict(plan.mesh.shape),
      "processes": jax.process_count(),
      "devices": jax.device_count(),
      "policy": mpjax.policy_name(args.policy),
      "steps": args.steps,
      "final_loss": losses[-1],
      "losses": losses,
      "test_accuracy": accuracy,
      "skipped_steps": int(state.opt_state.skipped_steps),
      "final_loss_scale": float(state.opt_state.scale),
      **memory_figures,
  }
  if jax.process_index() == 0:
    print(f"{args.parallelism} on mesh {dict(plan.mesh.shape)} "
          f"({jax.process_count()} process(es), {jax.device_count()} devices),"
          f" {mpjax.policy_name(args.policy)}: final loss {losses[-1]:.4f}, "
          f"test accuracy {accuracy:.2%}, skipped {result['skipped_steps']}, "
          f"scale {result['final_loss_scale']:g}; per-device XLA argument "
          f"bytes {result['argument_bytes_per_device']:,} (params + optimizer "
          f"state {result['state_bytes_total']:,} in all)")
    if args.json:
      with open(args.json, "w") as f:
        json.dump(result, f, indent=2)
  return result


if __name__ == "__main__":
  main(sys.argv)
