"""Whole-train-state checkpoints on orbax: `save`, `restore`, `CheckpointManager`.

What is saved: every array leaf of the state, under its path (``step``,
``params/Dense_0/kernel``, ``opt_state/inner_state/0/mu/...``, ``rng``). For an
`mpjax.TrainState` with a `loss_scaled` optimizer that is the step, the master
params, the whole `LossScaledState` (scale, growth_count, applied / skipped /
consecutive counters, last_grads_finite, leaf_grads_finite) with the inner
optimizer state inside it, and the RNG key. Typed PRNG keys are stored as
their key data (`jax.random.key_data`) plus the implementation name, and are
rewrapped on restore. Static fields (apply_fn, tx, policy) are not saved: they
come from the ``like`` state passed to `restore`.

Atomicity, as orbax-checkpoint 0.12.8 implements it (`_src/path/atomicity.py`,
`_src/checkpointers/checkpointer.py`): a save first writes everything into a
sibling directory ``<path>.orbax-checkpoint-tmp``, then writes
``commit_success.txt`` into it and renames it to ``<path>``. On a local or
POSIX filesystem that rename is one atomic ``rename(2)``, so ``<path>`` either
does not exist or is complete; on GCS (no atomic rename) the commit file alone
marks completion and orbax refuses to read a directory without it. A process
killed mid-save leaves only the ``.orbax-checkpoint-tmp`` directory: `restore`
refuses it, and the next save to the same path (or the next
`CheckpointManager` save) deletes it. Checkpoints that already exist are never
written to.

Overwriting is refused. orbax's ``force=True`` deletes the existing directory
*before* it writes the new one, so a crash in between loses the last good
checkpoint; mpjax never passes it. Use a new path, or a `CheckpointManager`
(one directory per step, old ones deleted only after a newer one is committed).

orbax is imported on first use (about 0.8 s of ``import mpjax`` otherwise),
so a program that never checkpoints never loads it.
"""

from __future__ import annotations

import dataclasses
import importlib
from typing import Any, Dict, List, Optional, Sequence, Tuple

import jax
import numpy as np


class _LazyModule:
  """A module imported when one of its attributes is first read."""

  def __init__(self, name: str):
    self._name = name

  def __getattr__(self, attr: str) -> Any:
    module = importlib.import_module(self._name)
    self.__dict__.update(vars(module))
    return getattr(module, attr)


ocp = _LazyModule("orbax.checkpoint")
epath = _LazyModule("etils.epath")

# custom_metadata key of the mpjax section and its format version.
_META_KEY = "mpjax"
_FORMAT = 1

Name = Tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class _Spec:
  """What one leaf must look like on disk, and how to get it back."""
  shape: Tuple[int, ...]  # of the stored array (key data for keys)
  dtype: np.dtype  # of the stored array (uint32 for threefry keys)
  key_dtype: Optional[str]  # e.g. "key<fry>"; None when not a PRNG key

  def describe(self) -> str:
    if self.key_dtype is not None:
      return f"{self.key_dtype} (key data {self.dtype}{list(self.shape)})"
    return f"{self.dtype}{list(self.shape)}"


def _is_key(x) -> bool:
  return jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


def _segment(entry) -> str:
  """One path entry as a string: a dict key, an attribute name or an index."""
  return jax.tree_util.keystr((entry,), simple=True)


def _leaves(tree: Any, owner: str) -> Tuple[List[Tuple[Name, Any]], Any]:
  """Returns ``[(name, leaf)]`` in `tree`'s flattening order and its treedef.

  None is an empty pytree in jax, so a state whose `rng` is None has no
  ``rng`` leaf.
  """
  with_path, treedef = jax.tree_util.tree_flatten_with_path(tree)
  named = [(tuple(_segment(e) for e in path), leaf) for path, leaf in with_path]
  seen = set()
  for name, leaf in named:
    if name in seen:
      raise ValueError(f"{owner}: two leaves share the path {_show(name)!r}.")
    seen.add(name)
    if not (hasattr(leaf, "shape") and hasattr(leaf, "dtype")):
      raise TypeError(
          f"{owner}: leaf {_show(name)!r} must be an array (jax.Array, "
          f"np.ndarray or jax.ShapeDtypeStruct), got {leaf!r} of type "
          f"{type(leaf).__name__}.")
  return named, treedef


def _show(name: Name) -> str:
  return "/".join(name)


def _nest(pairs: Sequence[Tuple[Name, Any]]) -> Dict[str, Any]:
  """``[(("a", "b"), x)]`` -> ``{"a": {"b": x}}``: the tree orbax stores."""
  root: Dict[str, Any] = {}
  for name, value in pairs:
    node = root
    for segment in name[:-1]:
      node = node.setdefault(segment, {})
    node[name[-1]] = value
  return root


def _pick(tree: Dict[str, Any], name: Name) -> Any:
  for segment in name:
    tree = tree[segment]
  return tree


def _like_spec(leaf) -> _Spec:
  if _is_key(leaf):
    data = jax.eval_shape(jax.random.key_data, leaf)
    return _Spec(tuple(data.shape), np.dtype(data.dtype), str(leaf.dtype))
  return _Spec(tuple(leaf.shape), np.dtype(leaf.dtype), None)


def _saveable(state: Any, owner: str) -> Tuple[Dict[str, Any], Dict[str, Any]]:
  """The nested dict of arrays orbax writes, and mpjax's custom metadata."""
  named, _ = _leaves(state, owner)
  keys = {}
  arrays = []
  for name, leaf in named:
    if isinstance(leaf, jax.ShapeDtypeStruct):
      raise TypeError(
          f"{owner}: leaf {_show(name)!r} is abstract ({leaf}); save a state "
          "with concrete arrays.")
    if _is_key(leaf):
      keys[_show(name)] = {"impl": str(jax.random.key_impl(leaf)),
                           "dtype": str(leaf.dtype)}
      leaf = jax.random.key_data(leaf)
    arrays.append((name, leaf))
  return _nest(arrays), {_META_KEY: {"format": _FORMAT, "prng_keys": keys}}


def _checkpoint_specs(item_metadata: Any, custom_metadata: Optional[dict],
                      where: str, owner: str) -> Dict[Name, _Spec]:
  """The leaves of a checkpoint, from orbax's metadata (no array is read)."""
  if item_metadata is None:
    raise ValueError(
        f"{owner}: {where} has no readable array metadata; it was not written "
        "by mpjax.save (or orbax's StandardSave).")
  tree = getattr(item_metadata, "tree", item_metadata)
  keys = ((custom_metadata or {}).get(_META_KEY) or {}).get("prng_keys", {})
  specs = {}
  for path, meta in jax.tree_util.tree_flatten_with_path(tree)[0]:
    name = tuple(_segment(e) for e in path)
    key = keys.get(_show(name))
    specs[name] = _Spec(tuple(meta.shape), np.dtype(meta.dtype),
                        None if key is None else key["dtype"])
  return specs


def _check_compatible(like_named: List[Tuple[Name, Any]],
                      ckpt: Dict[Name, _Spec], where: str, owner: str) -> None:
  """Raises ValueError naming the first leaf on which `like` and `ckpt` differ.

  First in `like`'s flattening order; then checkpoint leaves `like` lacks, in
  the checkpoint's order. Checked against metadata before anything is read,
  because orbax would otherwise cast a float32 array into a float16 target
  silently or fail with a tensorstore message that names no leaf.
  """
  like_names = set()
  for name, leaf in like_named:
    like_names.add(name)
    want = _like_spec(leaf)
    have = ckpt.get(name)
    if have is None:
      raise ValueError(
          f"{owner}: leaf {_show(name)!r} of `like` ({want.describe()}) is not "
          f"in the checkpoint at {where}. The checkpoint's leaves: "
          f"{_summary(ckpt)}.")
    if have != want:
      raise ValueError(
          f"{owner}: leaf {_show(name)!r} differs: the checkpoint at {where} "
          f"has {have.describe()}, `like` has {want.describe()}.")
  for name, have in ckpt.items():
    if name not in like_names:
      raise ValueError(
          f"{owner}: the checkpoint at {where} has leaf {_show(name)!r} "
          f"({have.describe()}) that `like` lacks; restoring would drop it. "
          "Build `like` with the same model, optimizer (and loss_scaled "
          "wrapper) and rng setting as the saved run.")


def _summary(ckpt: Dict[Name, _Spec], limit: int = 8) -> str:
  names = [_show(n) for n in ckpt]
  more = f", ... ({len(names)} in all)" if len(names) > limit else ""
  return ", ".join(names[:limit]) + more


def _target(like_named: List[Tuple[Name, Any]]) -> Dict[str, Any]:
  """Abstract arrays with `like`'s shardings: orbax reads each shard there.

  Leaves without a sharding (numpy arrays, ShapeDtypeStructs without one) go
  to the first local device.
  """
  default = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  pairs = []
  for name, leaf in like_named:
    sharding = getattr(leaf, "sharding", None) or default
    if _is_key(leaf):
      # The key data has the key's dims plus trailing ones; a NamedSharding's
      # spec leaves trailing dims unsharded, so the key's sharding fits it.
      data = jax.eval_shape(jax.random.key_data, leaf)
      pairs.append((name, jax.ShapeDtypeStruct(data.shape, data.dtype,
                                               sharding=sharding)))
    else:
      pairs.append((name, jax.ShapeDtypeStruct(leaf.shape, leaf.dtype,
                                               sharding=sharding)))
  return _nest(pairs)


def _rebuild(like_named: List[Tuple[Name, Any]], treedef: Any,
             restored: Dict[str, Any], custom_metadata: Optional[dict]) -> Any:
  keys = ((custom_metadata or {}).get(_META_KEY) or {}).get("prng_keys", {})
  leaves = []
  for name, leaf in like_named:
    value = _pick(restored, name)
    if _is_key(leaf):
      value = jax.random.wrap_key_data(value, impl=keys[_show(name)]["impl"])
    leaves.append(value)
  return jax.tree_util.tree_unflatten(treedef, leaves)


def _check_restore_path(path: epath.Path, owner: str) -> None:
  if path.exists():
    if not ocp.path.step.is_path_finalized(path):
      raise ValueError(
          f"{owner}: {path} is an unfinished save (a process stopped while "
          "writing it); restore the previous checkpoint instead.")
    return
  partial = path.parent / (path.name + ocp.path.atomicity_types.TMP_DIR_SUFFIX)
  hint = (f" A partial save is at {partial}: the save to {path} was "
          "interrupted before it committed, so that checkpoint does not "
          "exist; restore the previous one.") if partial.exists() else ""
  raise FileNotFoundError(f"{owner}: no checkpoint at {path}.{hint}")


def save(path: str, state: Any) -> None:
  """Writes `state` to the new directory `path`, atomically.

  Blocks until the checkpoint is committed (the arrays are on disk and the
  directory renamed into place), so the state may be donated to the next
  train step right after. Call it on every process of a multi-host job, with
  the same `path` (a shared filesystem or a bucket); orbax writes each shard
  once.

  Args:
    path: the checkpoint directory; must not exist. A local path or any path
      `etils.epath` understands (``gs://...``). A leftover
      ``<path>.orbax-checkpoint-tmp`` from an interrupted save is deleted.
    state: an `mpjax.TrainState` (or any pytree of arrays: jax arrays with any
      sharding, numpy arrays, typed PRNG keys). Leaves are stored under their
      pytree path, e.g. ``opt_state/inner_state/0/mu/Dense_0/kernel``.

  Raises:
    FileExistsError: `path` exists. mpjax never overwrites a checkpoint, so
      the last good one survives a crash of the next save.
    TypeError: a leaf is not an array.
  """
  owner = "mpjax.save"
  path = epath.Path(path)
  if path.exists():
    raise FileExistsError(
        f"{owner}: {path} already exists; mpjax never overwrites a checkpoint "
        "(a crash mid-overwrite would lose it). Save to a new path, or use "
        "mpjax.CheckpointManager for step-numbered checkpoints.")
  tree, custom = _saveable(state, owner)
  checkpointer = ocp.Checkpointer(ocp.StandardCheckpointHandler())
  try:
    checkpointer.save(path, args=ocp.args.StandardSave(tree),
                      custom_metadata=custom)
  finally:
    checkpointer.close()


def restore(path: str, like: Any) -> Any:
  """Reads the checkpoint at `path` into a state shaped like `like`.

  Args:
    path: a directory written by `save`.
    like: a state with the same tree, shapes and dtypes as the saved one:
      typically a freshly built ``mpjax.TrainState.create(...)`` (its values
      are ignored), or its ``jax.eval_shape`` version to avoid allocating it.
      Each leaf is restored with ``like``'s sharding, which may use another
      mesh shape than the saved state (orbax reads the slices each device
      needs). Static fields (apply_fn, tx, policy) are taken from ``like``.

  Returns:
    The restored state: ``like``'s treedef (static fields included) with the
    checkpoint's arrays, typed PRNG keys rewrapped.

  Raises:
    FileNotFoundError: no checkpoint at `path` (the message says when an
      interrupted save to `path` left a partial directory).
    ValueError: `path` is unfinished, or a leaf's path, shape or dtype differs
      between the checkpoint and `like`; the message names the first such
      leaf and both specs.
  """
  owner = "mpjax.restore"
  path = epath.Path(path)
  _check_restore_path(path, owner)
  like_named, treedef = _leaves(like, owner)
  checkpointer = ocp.Checkpointer(ocp.StandardCheckpointHandler())
  try:
    metadata = checkpointer.metadata(path)
    ckpt = _checkpoint_specs(metadata.item_metadata, metadata.custom_metadata,
                             str(path), owner)
    _check_compatible(like_named, ckpt, str(path), owner)
    restored = checkpointer.restore(
        path, args=ocp.args.StandardRestore(_target(like_named)))
  finally:
    checkpointer.close()
  return _rebuild(like_named, treedef, restored, metadata.custom_metadata)


class CheckpointManager:
  """Step-numbered checkpoints in one directory, with retention.

  A thin layer over `orbax.checkpoint.CheckpointManager` (synchronous saves)
  that stores states as `save` does and checks them as `restore` does. Each
  step is its own directory ``<directory>/<step>``, committed atomically;
  older steps beyond `max_to_keep` are deleted only after the newer one is
  committed, so at least one complete checkpoint always exists once one was
  written. Partial directories left by a killed save are deleted before the
  next save.

  The usual loop saves every ``save_interval_steps`` with the loop counter as
  the step, forces a save of the last step, and on ``--resume`` restores the
  latest step into a freshly built state and continues from its ``step``.

  Examples:
    >>> import tempfile, jax.numpy as jnp, optax, mpjax
    >>> def fresh_state():
    ...   return mpjax.TrainState.create(
    ...       apply_fn=None, params={"w": jnp.zeros(2)},
    ...       tx=mpjax.loss_scaled(optax.sgd(0.5), mpjax.NoScaling()))
    >>> directory = tempfile.mkdtemp()
    >>> with CheckpointManager(directory, max_to_keep=2,
    ...                        save_interval_steps=2) as ckpts:
    ...   state = fresh_state()
    ...   for i in range(5):
    ...     state = state.apply_gradients(grads={"w": jnp.ones(2)})
    ...     _ = ckpts.save(state, step=i + 1)
    ...   _ = ckpts.save(state, step=5, force=True)
    ...   ckpts.all_steps()
    [4, 5]
    >>> with CheckpointManager(directory) as ckpts:  # a restarted process
    ...   state = ckpts.restore(fresh_state())  # the latest step
    >>> int(state.step), state.params["w"].tolist()
    (5, [-2.5, -2.5])
    >>> import shutil; shutil.rmtree(directory)

  Attributes:
    directory: the checkpoint directory (created if missing).
  """

  def __init__(self, directory: str, *, max_to_keep: Optional[int] = 3,
               save_interval_steps: int = 1):
    """Opens (or creates) `directory`.

    Args:
      directory: where the step directories live.
      max_to_keep: how many of the newest checkpoints to keep (int >= 1), or
        None to keep all.
      save_interval_steps: `save` writes only steps that are a multiple of it
        (int >= 1); ``force=True`` writes any step.
    """
    owner = "mpjax.CheckpointManager"
    if max_to_keep is not None and (
        isinstance(max_to_keep, bool) or not isinstance(max_to_keep, int)
        or max_to_keep < 1):
      raise ValueError(
          f"{owner}: max_to_keep must be None or an int >= 1, got "
          f"{max_to_keep!r}.")
    if (isinstance(save_interval_steps, bool)
        or not isinstance(save_interval_steps, int) or save_interval_steps < 1):
      raise ValueError(
          f"{owner}: save_interval_steps must be an int >= 1, got "
          f"{save_interval_steps!r}.")
    self.directory = epath.Path(directory)
    self._manager = ocp.CheckpointManager(
        self.directory,
        # Registered up front: without it a fresh manager (a resumed process)
        # returns None for the metadata of steps it did not write itself.
        item_handlers=ocp.StandardCheckpointHandler(),
        options=ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep,
            save_interval_steps=save_interval_steps,
            # A synchronous save has finished reading the arrays when it
            # returns, so the train step can donate them right after.
            enable_async_checkpointing=False,
            cleanup_tmp_directories=True,
            create=True))
    # Steps this manager wrote or restored: saving one of them again is a
    # no-op rather than an error.
    self._this_run = set()

  def all_steps(self) -> List[int]:
    """The committed steps, ascending."""
    return sorted(self._manager.all_steps())

  def latest_step(self) -> Optional[int]:
    """The newest committed step, or None when there is none."""
    return self._manager.latest_step()

  def save(self, state: Any, *, step: Optional[int] = None,
           force: bool = False) -> bool:
    """Saves `state` as `step` when the save policy says so (or `force`).

    orbax's policy writes a step when it is a multiple of
    `save_interval_steps`, when the directory has no checkpoint yet, and (under
    `jax.distributed`) at the step where a preemption notice arrived.

    Args:
      state: as in `save`.
      step: the step number. Pass the loop's counter: the default,
        ``int(state.step)``, waits for the train step to finish.
      force: save even when the policy would not.

    Returns:
      Whether a checkpoint was written. False also when `step` is already on
      disk because this manager saved or restored it (a final forced save
      right after an interval save is a no-op).

    Raises:
      FileExistsError: `step` is not newer than the latest checkpoint, and
        this manager did not write or restore that step itself. orbax would
        skip it silently; mpjax refuses, because a run restarted from scratch
        into a used directory would otherwise never be saved (or interleave
        its steps with the old run's).
    """
    owner = "mpjax.CheckpointManager.save"
    if step is None:
      step = int(state.step)
    if isinstance(step, bool) or not isinstance(step, (int, np.integer)):
      raise TypeError(f"{owner}: step must be an int, got {step!r}.")
    if not isinstance(force, bool):
      raise TypeError(f"{owner}: force must be a bool, got {force!r}.")
    step = int(step)
    latest = self.latest_step()
    if latest is not None and step <= latest:
      if step == latest and step in self._this_run:
        return False
      raise FileExistsError(
          f"{owner}: {self.directory} already holds step {latest} (steps "
          f"{self.all_steps()}) from another run or manager; saving step "
          f"{step} would overwrite it or go back in time. Resume from it "
          "(CheckpointManager.restore) or use a new directory.")
    if not force and not self._manager.should_save(step):
      return False
    tree, custom = _saveable(state, owner)
    # force=True only skips orbax's policy, decided above; orbax still
    # refuses an existing step.
    saved = self._manager.save(step, args=ocp.args.StandardSave(tree),
                               custom_metadata=custom, force=True)
    self._this_run.add(step)
    return saved

  def restore(self, like: Any, *, step: Optional[int] = None) -> Any:
    """Restores `step` (default: the latest) into a state shaped like `like`.

    See `restore` for `like`, the result and the checks.

    Raises:
      FileNotFoundError: no checkpoint for `step` (or none at all).
      ValueError: a leaf differs between the checkpoint and `like`.
    """
    owner = "mpjax.CheckpointManager.restore"
    steps = self.all_steps()
    if step is None:
      if not steps:
        raise FileNotFoundError(f"{owner}: no checkpoint in {self.directory}.")
      step = steps[-1]
    if step not in steps:
      raise FileNotFoundError(
          f"{owner}: no checkpoint for step {step} in {self.directory}; "
          f"committed steps: {steps}.")
    like_named, treedef = _leaves(like, owner)
    where = f"{self.directory} step {step}"
    metadata = self._manager.metadata(step)
    ckpt = _checkpoint_specs(metadata.item_metadata, metadata.custom_metadata,
                             where, owner)
    _check_compatible(like_named, ckpt, where, owner)
    restored = self._manager.restore(
        step, args=ocp.args.StandardRestore(_target(like_named)))
    self._this_run.add(step)
    return _rebuild(like_named, treedef, restored, metadata.custom_metadata)

  def close(self) -> None:
    """Waits for pending deletions and releases orbax's resources."""
    self._manager.close()

  def __enter__(self) -> "CheckpointManager":
    return self

  def __exit__(self, *exc_info) -> None:
    self.close()
