"""Tests for mpjax/_src/checkpoint.py: save / restore / CheckpointManager."""

import os
import signal
import subprocess
import sys
import time

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import mpjax
import models
import seed_mlp
from mpjax._src import checkpoint

HERE = os.path.dirname(os.path.abspath(__file__))
WORKER = os.path.join(HERE, "checkpoint_worker.py")
sys.path.insert(0, HERE)
import checkpoint_worker  # pylint: disable=g-import-not-at-top,wrong-import-position

FEATURES, CLASSES = 8, 4


def batches(n, poisoned=(), seed=0):
  """`n` different batches; those at `poisoned` have an inf input."""
  rng = np.random.default_rng(seed)
  out = []
  for i in range(n):
    x = rng.random((16, FEATURES)).astype(np.float32)
    if i in poisoned:
      x[0, 0] = np.inf
    out.append({"x": jnp.asarray(x),
                "y": jnp.asarray(rng.integers(0, CLASSES, 16), jnp.int32)})
  return out


def noisy_loss_fn(params, batch, apply_fn, rng):
  """seed_mlp's loss on inputs with key-dependent noise: uses the RNG."""
  noise = 0.1 * jax.random.normal(rng, batch["x"].shape)
  return seed_mlp.loss_fn(params, dict(batch, x=batch["x"] + noise), apply_fn,
                          None)


class Run:
  """One model and optimizer; `fresh` states share their static fields."""

  def __init__(self, policy="float32", scaling=mpjax.NoScaling(),
               hidden=(16,), inner=None):
    self.policy = policy
    self.model = models.MLP(hidden=hidden, num_classes=CLASSES)
    self.tx = mpjax.loss_scaled(inner or optax.adam(1e-2), scaling)

  def fresh(self, seed=0, rng="default"):
    params = self.model.init(jax.random.key(seed),
                             jnp.zeros((1, FEATURES)))["params"]
    if isinstance(rng, str):
      rng = jax.random.key(0)  # a new array: the train step donates it
    return mpjax.TrainState.create(apply_fn=self.model.apply, params=params,
                                   tx=self.tx, policy=self.policy, rng=rng)


def train(state, step, data):
  """Runs `step` over `data`; returns the state and per-step metrics."""
  history = []
  for batch in data:
    state, metrics = step(state, batch)
    history.append({k: np.asarray(metrics[k])
                    for k in ("loss", "loss_scale", "grads_finite")})
  return state, history


def stack(history):
  return {k: np.stack([h[k] for h in history]) for k in history[0]}


def test_resume_from_save_is_bit_identical_in_float32(tmp_path):
  run = Run("float32")
  step = mpjax.make_train_step(noisy_loss_fn)
  data = batches(10)
  reference, ref_history = train(run.fresh(), step, data)

  state, history = train(run.fresh(), step, data[:4])
  checkpoint.save(tmp_path / "step4", state)
  del state  # a restart: nothing survives but the checkpoint
  like = run.fresh(seed=1, rng=jax.random.key(99))
  resumed = checkpoint.restore(tmp_path / "step4", like)
  assert int(resumed.step) == 4
  resumed, more = train(resumed, step, data[4:])

  chex.assert_trees_all_equal(resumed, reference)
  chex.assert_trees_all_equal(stack(history + more), stack(ref_history))


def test_resume_from_manager_is_bit_identical_in_mixed_float16_with_skips(
    tmp_path):
  # 2**20 overflows float16 gradients at first, the inf inputs at steps 2 and
  # 8 make two more skips; growth_interval=2 grows the scale between them.
  run = Run("mixed_float16", mpjax.DynamicScaling(initial_scale=2.0**20,
                                                   growth_interval=2))
  step = mpjax.make_train_step(noisy_loss_fn)
  data = batches(14, poisoned=(2, 8))
  k = 10
  reference, ref_history = train(run.fresh(), step, data)
  ref = stack(ref_history)
  finite = ref["grads_finite"]
  assert not finite[:k].all() and not finite[k:].all(), finite
  scale = ref["loss_scale"]
  assert (np.diff(scale[:k]) < 0).any() and (np.diff(scale[:k]) > 0).any()

  with checkpoint.CheckpointManager(tmp_path, max_to_keep=2) as ckpts:
    state, history = train(run.fresh(), step, data[:k - 1])
    ckpts.save(state)
    state, last = train(state, step, data[k - 1:k])
    ckpts.save(state)
    history += last
    interrupted = mpjax.loss_scale_state(state.opt_state)
  assert int(interrupted.growth_count) > 0  # resumes mid-way to a growth
  assert int(interrupted.skipped_steps) > 0
  del state

  with checkpoint.CheckpointManager(tmp_path, max_to_keep=2) as ckpts:
    assert ckpts.all_steps() == [k - 1, k]
    resumed = ckpts.restore(run.fresh(seed=1, rng=jax.random.key(99)))
  chex.assert_trees_all_equal(mpjax.loss_scale_state(resumed.opt_state),
                              interrupted)
  resumed, more = train(resumed, step, data[k:])

  chex.assert_trees_all_equal(resumed, reference)
  chex.assert_trees_all_equal(stack(history + more), ref)


def test_every_loss_scale_field_and_the_key_round_trip_with_their_dtypes(
    tmp_path):
  run = Run("mixed_float16", mpjax.DynamicScaling(initial_scale=2.0**4,
                                                   growth_interval=3))
  step = mpjax.make_train_step(seed_mlp.loss_fn, donate=False)
  state, _ = train(run.fresh(rng=jax.random.key(3)), step, batches(4))
  # Poison only the last bias: a skip with mixed per-leaf flags.
  poison = lambda p, b, f, r: seed_mlp.loss_fn(p, b, f, r) + jnp.sum(
      p["Dense_1"]["bias"] * b["poison"])
  state, _ = mpjax.make_train_step(poison, donate=False)(
      state, dict(batches(1)[0], poison=jnp.float32(jnp.inf)))
  saved = mpjax.loss_scale_state(state.opt_state)
  assert not bool(saved.last_grads_finite)
  assert int(saved.consecutive_skips) == 1 and int(saved.applied_steps) == 4
  # One flag per param leaf (Dense_0 bias, kernel, Dense_1 bias, kernel),
  # whether stored as a tree of scalars or packed in one vector.
  flags = np.concatenate([np.ravel(f) for f in
                          jax.tree.leaves(saved.leaf_grads_finite)])
  assert flags.tolist() == [True, True, False, True]

  checkpoint.save(tmp_path / "ckpt", state)
  restored = checkpoint.restore(tmp_path / "ckpt",
                                run.fresh(seed=2, rng=jax.random.key(4)))
  chex.assert_trees_all_equal(restored, state)
  chex.assert_trees_all_equal_dtypes(restored, state)
  assert restored.rng.dtype == state.rng.dtype  # a typed key, not uint32
  assert restored.policy == state.policy and restored.tx is run.tx


@pytest.mark.parametrize("impl", ["rbg", "unsafe_rbg", "threefry2x32"])
def test_typed_keys_of_every_impl_round_trip_and_draw_the_same(tmp_path,
                                                                impl):
  run = Run()
  state = run.fresh(rng=jax.random.key(7, impl=impl))
  checkpoint.save(tmp_path / "ckpt", state)
  restored = checkpoint.restore(tmp_path / "ckpt",
                                run.fresh(rng=jax.random.key(0, impl=impl)))
  assert str(jax.random.key_impl(restored.rng)) == str(
      jax.random.key_impl(state.rng))
  chex.assert_trees_all_equal(jax.random.key_data(restored.rng),
                              jax.random.key_data(state.rng))
  chex.assert_trees_all_equal(jax.random.normal(restored.rng, (4,)),
                              jax.random.normal(state.rng, (4,)))


def test_restore_into_an_abstract_like_allocates_nothing_first(tmp_path):
  run = Run()
  state = run.fresh(seed=3, rng=jax.random.key(5))
  checkpoint.save(tmp_path / "ckpt", state)
  like = jax.eval_shape(run.fresh)
  chex.assert_trees_all_equal(checkpoint.restore(tmp_path / "ckpt", like),
                              state)


def test_a_state_without_a_key_round_trips(tmp_path):
  run = Run()
  state = run.fresh(seed=3, rng=None)
  checkpoint.save(tmp_path / "ckpt", state)
  restored = checkpoint.restore(tmp_path / "ckpt", run.fresh(rng=None))
  assert restored.rng is None
  chex.assert_trees_all_equal(restored, state)


def _bf16_params(state):
  return state.replace(params=jax.tree.map(lambda p: p.astype(jnp.bfloat16),
                                           state.params))


@pytest.mark.parametrize("make_like, message", [
    (lambda: Run(hidden=(16, 16)).fresh(),
     r"leaf 'params/Dense_1/bias' differs: the checkpoint at .* has "
     r"float32\[4\], `like` has float32\[16\]"),
    (lambda: Run(hidden=(8,)).fresh(),
     r"leaf 'params/Dense_0/bias' differs: .* float32\[16\], `like` has "
     r"float32\[8\]"),
    (lambda: _bf16_params(Run().fresh()),
     r"leaf 'params/Dense_0/bias' differs: .* float32\[16\], `like` has "
     r"bfloat16\[16\]"),
    (lambda: Run(inner=optax.sgd(0.1, momentum=0.9)).fresh(),
     r"leaf 'opt_state/inner_state/0/trace/Dense_0/bias' of `like` "
     r"\(float32\[16\]\) is not in the checkpoint"),
    (lambda: Run().fresh(rng=None),
     r"has leaf 'rng' \(key<fry> \(key data uint32\[2\]\)\) that `like` lacks"),
    (lambda: Run().fresh(rng=jax.random.key(0, impl="rbg")),
     r"leaf 'rng' differs: .* key<fry> .*, `like` has key<rbg>"),
    (lambda: Run().fresh(rng=jax.random.PRNGKey(0)),
     r"leaf 'rng' differs: .* key<fry> \(key data uint32\[2\]\), `like` has "
     r"uint32\[2\]"),
], ids=["extra_layer", "narrower", "dtype", "optimizer", "no_key", "key_impl",
        "raw_key"])
def test_restore_into_a_mismatched_state_names_the_first_leaf(
    tmp_path, make_like, message):
  checkpoint.save(tmp_path / "ckpt", Run().fresh())
  with pytest.raises(ValueError, match=message):
    checkpoint.restore(tmp_path / "ckpt", make_like())


def test_save_refuses_to_overwrite_and_the_checkpoint_survives(tmp_path):
  run = Run()
  first = run.fresh(seed=1)
  checkpoint.save(tmp_path / "ckpt", first)
  with pytest.raises(FileExistsError, match="never overwrites"):
    checkpoint.save(tmp_path / "ckpt", run.fresh(seed=2))
  chex.assert_trees_all_equal(
      checkpoint.restore(tmp_path / "ckpt", run.fresh(seed=3)), first)


def test_restore_of_a_missing_or_unfinished_checkpoint_raises(tmp_path):
  like = Run().fresh()
  with pytest.raises(FileNotFoundError, match="no checkpoint at .*nothing"):
    checkpoint.restore(tmp_path / "nothing", like)
  partial = tmp_path / "ckpt.orbax-checkpoint-tmp"
  partial.mkdir()
  with pytest.raises(FileNotFoundError, match="was interrupted"):
    checkpoint.restore(tmp_path / "ckpt", like)
  with pytest.raises(ValueError, match="unfinished save"):
    checkpoint.restore(partial, like)
  checkpoint.save(tmp_path / "ckpt", like)  # clears the partial one
  assert not partial.exists()
  (tmp_path / "empty").mkdir()
  with pytest.raises(ValueError, match="no readable array metadata"):
    checkpoint.restore(tmp_path / "empty", like)


def test_save_rejects_leaves_that_are_not_arrays(tmp_path):
  with pytest.raises(TypeError, match="leaf 'b' must be an array"):
    checkpoint.save(tmp_path / "ckpt", {"a": jnp.ones(2), "b": "text"})
  with pytest.raises(TypeError, match="leaf 'a' is abstract"):
    checkpoint.save(tmp_path / "ckpt",
                    jax.eval_shape(lambda: {"a": jnp.ones(2)}))


def test_manager_keeps_the_newest_steps_on_the_interval(tmp_path):
  run = Run()
  step = mpjax.make_train_step(seed_mlp.loss_fn)
  state = run.fresh()
  written = []
  with checkpoint.CheckpointManager(tmp_path, max_to_keep=2,
                                    save_interval_steps=3) as ckpts:
    assert ckpts.latest_step() is None
    for batch in batches(8):
      state, _ = step(state, batch)
      written.append(ckpts.save(state))
    assert ckpts.save(state, force=True)  # the final state, off the interval
    assert not ckpts.save(state, force=True)  # already on disk
    # orbax also saves the first step of a fresh directory (and, under
    # jax.distributed, the step at which a preemption notice arrives).
    assert written == [True, False, True, False, False, True, False, False]
    assert ckpts.all_steps() == [6, 8] and ckpts.latest_step() == 8
    chex.assert_trees_all_equal(ckpts.restore(run.fresh(seed=1)), state)
    older = ckpts.restore(run.fresh(seed=1), step=6)
    assert int(older.step) == 6
  assert sorted(os.listdir(tmp_path)) == ["6", "8"]


def test_manager_refuses_steps_not_after_the_latest_of_another_run(tmp_path):
  state = Run().fresh()
  with checkpoint.CheckpointManager(tmp_path) as ckpts:
    assert ckpts.save(state, step=5)
    assert not ckpts.save(state, step=5, force=True)  # this run wrote it
    with pytest.raises(FileExistsError, match="already holds step 5"):
      ckpts.save(state, step=3)
  with checkpoint.CheckpointManager(tmp_path) as other:  # a new run
    for step in (5, 1):
      with pytest.raises(FileExistsError, match="already holds step 5"):
        other.save(state, step=step)
    other.restore(state)  # now it is a resumed run
    assert not other.save(state, step=5, force=True)
    assert other.save(state, step=6)
    assert other.all_steps() == [5, 6]


def test_manager_restore_errors_name_the_directory_and_steps(tmp_path):
  like = Run().fresh()
  with checkpoint.CheckpointManager(tmp_path / "new") as ckpts:
    with pytest.raises(FileNotFoundError, match="no checkpoint in .*new"):
      ckpts.restore(like)
    ckpts.save(like, step=2)
    with pytest.raises(FileNotFoundError, match=r"step 7 .* steps: \[2\]"):
      ckpts.restore(like, step=7)
    with pytest.raises(ValueError, match="leaf 'params/Dense_0/bias' differs"):
      ckpts.restore(Run(hidden=(8,)).fresh())


@pytest.mark.parametrize("kwargs, message", [
    (dict(max_to_keep=0), "max_to_keep must be None or an int >= 1"),
    (dict(max_to_keep=2.0), "max_to_keep must be None or an int >= 1"),
    (dict(save_interval_steps=0), "save_interval_steps must be an int >= 1"),
])
def test_manager_rejects_bad_options(tmp_path, kwargs, message):
  with pytest.raises(ValueError, match=message):
    checkpoint.CheckpointManager(tmp_path, **kwargs)


def _run_until_ready(args, ready, timeout=240):
  proc = subprocess.Popen([sys.executable, WORKER, *args],
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
  deadline = time.monotonic() + timeout
  while not ready.exists():
    if proc.poll() is not None:
      raise AssertionError(proc.stdout.read().decode()[-3000:])
    if time.monotonic() > deadline:
      proc.kill()
      raise AssertionError("the worker never reached the commit")
    time.sleep(0.1)
  return proc


@pytest.mark.parametrize("api", ["save", "manager"])
def test_killed_mid_save_leaves_the_previous_checkpoint_restorable(
    tmp_path, api):
  proc = _run_until_ready(["kill", api, str(tmp_path)], tmp_path / "ready")
  # Killed with every array of the new checkpoint written, before the commit.
  partial = (tmp_path / "next.orbax-checkpoint-tmp" if api == "save" else
             tmp_path / "managed" / "3.orbax-checkpoint-tmp")
  written = [f for _, _, files in os.walk(partial) for f in files]
  assert len(written) > 5, written
  proc.send_signal(signal.SIGKILL)
  assert proc.wait(timeout=60) == -signal.SIGKILL

  like = checkpoint_worker.build_state(**checkpoint_worker.BIG, seed=1,
                                       rng_seed=1)
  expected = np.load(tmp_path / "good.npz")
  expected = [expected[f"arr_{i}"] for i in range(len(expected.files))]
  if api == "save":
    restored = checkpoint.restore(tmp_path / "good", like)
    with pytest.raises(FileNotFoundError, match="was interrupted"):
      checkpoint.restore(tmp_path / "next", like)
    checkpoint.save(tmp_path / "next", restored)  # the retry commits
  else:
    with checkpoint.CheckpointManager(tmp_path / "managed",
                                      max_to_keep=1) as ckpts:
      # max_to_keep=1 did not delete step 2 for a step 3 never committed.
      assert ckpts.all_steps() == [2]
      restored = ckpts.restore(like)
      ckpts.save(restored, step=3)  # deletes the partial step 3 first
      assert ckpts.all_steps() == [3]
  assert not partial.exists()
  assert int(restored.step) == 2
  got = checkpoint_worker.host_arrays(restored)
  chex.assert_trees_all_equal(got, expected)


def test_sharded_state_restores_onto_another_mesh_shape(tmp_path):
  env = dict(os.environ,
             XLA_FLAGS="--xla_force_host_platform_device_count=8")
  result = subprocess.run([sys.executable, WORKER, "reshard", str(tmp_path)],
                          env=env, capture_output=True, text=True, timeout=300,
                          check=False)
  assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
  assert "reshard ok" in result.stdout


def test_import_mpjax_does_not_load_orbax_until_a_checkpoint_is_used():
  code = ("import sys, mpjax\n"
          "assert not [m for m in sys.modules if m.startswith('orbax')]\n"
          "mpjax.CheckpointManager\n"
          "assert not [m for m in sys.modules if m.startswith('orbax')]\n"
          "mpjax._src.checkpoint.ocp.CheckpointManager\n"
          "assert 'orbax.checkpoint' in sys.modules\n")
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  proc = subprocess.run([sys.executable, "-c", code], env=env,
                        capture_output=True, text=True, timeout=300,
                        check=False)
  assert proc.returncode == 0, proc.stderr[-2000:]
