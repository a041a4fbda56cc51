"""mpjax's `DynamicScaling.like_torch` against the real `torch.amp.GradScaler`.

Both sides train the same toy least-squares problem (conftest.py) with Adam
for thousands of steps; on the steps a pattern chooses, the gradients of the
scaled loss get an inf or NaN written into them after the backward pass. After
every step the tests compare the loss scale, the growth counter, the skip
decision, Adam's step count (torch's ``state['step']`` against the inner
optax Adam's ``count``) and whether the parameters moved; at the end, the
parameters and Adam's moments. With gradient accumulation (torch's recipe of
k backward passes per ``scaler.step``, mpjax's
``loss_scaled(optax.MultiSteps(adam, k), ...)``) they compare the scale,
counter and step after every optimizer step, and test mpjax's documented rule
for a non-finite micro-batch.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import mpjax

torch = pytest.importorskip(
    "torch", reason="torch is not installed; it comes with the `conformance` "
    "extra: pip install -e '.[conformance]'")

STEPS = 2400
LR = 1e-3


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def run_torch(problem, codes, poison_of, **scaler_kwargs):
  """Drives `GradScaler("cpu")` + `torch.optim.Adam` as torch's AMP recipe does.

  Returns ``(records, final)`` shaped like the mpjax side's (conftest.py).
  """
  model = torch.nn.Linear(problem["w"].shape[0], problem["w"].shape[1])
  with torch.no_grad():
    model.weight.copy_(torch.from_numpy(problem["w"].T.copy()))
    model.bias.copy_(torch.from_numpy(problem["b"]))
  params = {"w": model.weight, "b": model.bias}
  optimizer = torch.optim.Adam(model.parameters(), lr=LR)
  scaler = torch.amp.GradScaler("cpu", **scaler_kwargs)
  x, y = torch.from_numpy(problem["x"]), torch.from_numpy(problem["y"])
  records = {name: [] for name in
             ("scale", "growth_count", "skipped", "adam_count", "params_moved")}
  for code in codes:
    optimizer.zero_grad(set_to_none=True)
    loss = torch.mean((model(x) - y) ** 2)
    scaler.scale(loss).backward()
    if code:
      leaf, index, value = poison_of(int(code))
      # torch's weight is w transposed: w[0, 0] is weight[0, 0] all the same.
      params[leaf].grad[index] = value
    before = [p.detach().clone() for p in model.parameters()]
    scaler.step(optimizer)
    # The decision `step` itself consulted (GradScaler has no public getter).
    found_inf = sum(v.item() for v in
                    scaler._found_inf_per_device(optimizer).values())
    scaler.update()
    records["scale"].append(scaler.get_scale())
    records["growth_count"].append(scaler._get_growth_tracker())
    records["skipped"].append(found_inf > 0)
    records["adam_count"].append(
        int(optimizer.state[model.weight].get("step", 0)))
    records["params_moved"].append(any(
        not torch.equal(b, p) for b, p in zip(before, model.parameters())))
  state = optimizer.state
  as_np = lambda t: t.detach().numpy().copy()
  final = {
      "params": {"w": as_np(model.weight).T, "b": as_np(model.bias)},
      "mu": {"w": as_np(state[model.weight]["exp_avg"]).T,
             "b": as_np(state[model.bias]["exp_avg"])},
      "nu": {"w": as_np(state[model.weight]["exp_avg_sq"]).T,
             "b": as_np(state[model.bias]["exp_avg_sq"])},
  }
  return {k: np.asarray(v) for k, v in records.items()}, final


def assert_same_final_state(toy, ours, theirs):
  """Same updates taken: only float32 rounding (torch's Adam vs optax's) apart.

  The second moment (an average over the last ~1000 squared gradients) is
  compared to 0.01% of its largest element.
  """
  toy.assert_adam_states_close(ours, theirs, params_atol=LR * 1e-2,
                               rtol=1e-4, nu_atol=1e-4)


@pytest.mark.parametrize("seed,growth_interval", [(0, 2), (1, 3), (2, 5)])
def test_scale_skips_and_adam_count_match_torch_on_random_patterns(
    toy, seed, growth_interval):
  problem = toy.make_problem(seed)
  codes = toy.make_pattern(seed, STEPS, growth_interval, initial_log2=16,
                           band=(8, 40), floor_log2=2)
  theirs, their_final = run_torch(problem, codes, toy.poison_of,
                                  growth_interval=growth_interval)
  # The default floor of 1 never binds: torch stays above it here.
  assert theirs["scale"].min() >= 1.0
  ours, our_final = toy.run_mpjax(
      mpjax.DynamicScaling.like_torch(growth_interval=growth_interval),
      problem, codes, LR)
  toy.assert_same_trajectory(ours, theirs, codes, "torch")
  assert_same_final_state(toy, our_final, their_final)
  # The pattern exercised both directions many times.
  assert np.sum(np.diff(np.log2(theirs["scale"])) > 0) > 50
  assert np.sum(codes > 0) > 100


def test_growth_that_would_overflow_keeps_the_old_scale_like_torch(toy):
  growth_interval = 2
  problem = toy.make_problem(3)
  codes = toy.make_pattern(3, STEPS, growth_interval, initial_log2=16,
                           band=(120, 200), floor_log2=2, p_bad=0.05)
  theirs, their_final = run_torch(problem, codes, toy.poison_of,
                                  growth_interval=growth_interval)
  ours, our_final = toy.run_mpjax(
      mpjax.DynamicScaling.like_torch(growth_interval=growth_interval),
      problem, codes, LR)
  toy.assert_same_trajectory(ours, theirs, codes, "torch")
  assert_same_final_state(toy, our_final, their_final)
  assert np.all(np.isfinite(theirs["scale"]))
  # The suppressed growth happened often: a finite step that reset the
  # counter at 2**127 and kept the scale there.
  at_max = theirs["scale"] == 2.0**127
  suppressed = (at_max[1:] & at_max[:-1] & (theirs["growth_count"][1:] == 0)
                & ~theirs["skipped"][1:])
  assert suppressed.sum() > 20


def test_scale_below_one_matches_torch_with_min_scale_lowered(toy):
  growth_interval = 3
  problem = toy.make_problem(4)
  codes = toy.make_pattern(4, STEPS, growth_interval, initial_log2=16,
                           band=(-40, -20), floor_log2=-60, p_bad=0.3)
  theirs, their_final = run_torch(problem, codes, toy.poison_of,
                                  growth_interval=growth_interval)
  assert theirs["scale"].min() < 2.0**-30
  ours, our_final = toy.run_mpjax(
      mpjax.DynamicScaling.like_torch(growth_interval=growth_interval,
                                      min_scale=2.0**-126),
      problem, codes, LR)
  toy.assert_same_trajectory(ours, theirs, codes, "torch")
  assert_same_final_state(toy, our_final, their_final)


def test_default_floor_of_one_differs_from_torch_on_purpose(toy):
  # From 4, six non-finite steps then four finite ones, interval 2.
  problem = toy.make_problem(5)
  codes = np.array([1, 2, 3, 4, 5, 6, 0, 0, 0, 0], np.int32)
  theirs, _ = run_torch(problem, codes, toy.poison_of, init_scale=4.0,
                        growth_interval=2)
  ours, _ = toy.run_mpjax(
      mpjax.DynamicScaling.like_torch(initial_scale=4.0, growth_interval=2),
      problem, codes, LR)
  # torch halves below 1 (pytorch #99640); mpjax stops at its floor of 1.
  np.testing.assert_array_equal(
      theirs["scale"], [2, 1, 0.5, 0.25, 0.125, 0.0625, 0.0625, 0.125, 0.125,
                        0.25])
  np.testing.assert_array_equal(
      ours["scale"], [2, 1, 1, 1, 1, 1, 1, 2, 2, 4])
  # The skip decisions and Adam's count agree all the same.
  np.testing.assert_array_equal(ours["skipped"], theirs["skipped"])
  np.testing.assert_array_equal(ours["adam_count"], theirs["adam_count"])


# Gradient accumulation: torch's AMP recipe sums k scaled micro-batch
# backward passes (each loss divided by k) and calls `scaler.step` and
# `scaler.update` once per optimizer step; mpjax wraps the accumulation,
# ``loss_scaled(optax.MultiSteps(adam, k), scaling)``.
MICRO_BATCHES = 4  # k; micro-batch i is rows 2i, 2i + 1 of the toy batch
WINDOWS = 24


def run_torch_accumulated(problem, windows, **scaler_kwargs):
  """torch over `windows` optimizer steps of `MICRO_BATCHES` micro-batches.

  Returns ``(records, final)``: per optimizer step the scale after
  ``update()``, the growth tracker and Adam's step; the final params and
  moments as `run_torch`'s.
  """
  model = torch.nn.Linear(problem["w"].shape[0], problem["w"].shape[1])
  with torch.no_grad():
    model.weight.copy_(torch.from_numpy(problem["w"].T.copy()))
    model.bias.copy_(torch.from_numpy(problem["b"]))
  optimizer = torch.optim.Adam(model.parameters(), lr=LR)
  scaler = torch.amp.GradScaler("cpu", **scaler_kwargs)
  xs = torch.from_numpy(problem["x"]).chunk(MICRO_BATCHES)
  ys = torch.from_numpy(problem["y"]).chunk(MICRO_BATCHES)
  records = {"scale": [], "growth_count": [], "adam_count": []}
  for _ in range(windows):
    optimizer.zero_grad(set_to_none=True)
    for x, y in zip(xs, ys):
      loss = torch.mean((model(x) - y) ** 2) / MICRO_BATCHES
      scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()
    records["scale"].append(scaler.get_scale())
    records["growth_count"].append(scaler._get_growth_tracker())
    records["adam_count"].append(int(optimizer.state[model.weight]["step"]))
  state = optimizer.state
  as_np = lambda t: t.detach().numpy().copy()
  final = {
      "params": {"w": as_np(model.weight).T, "b": as_np(model.bias)},
      "mu": {"w": as_np(state[model.weight]["exp_avg"]).T,
             "b": as_np(state[model.bias]["exp_avg"])},
      "nu": {"w": as_np(state[model.weight]["exp_avg_sq"]).T,
             "b": as_np(state[model.bias]["exp_avg_sq"])},
  }
  return {k: np.asarray(v) for k, v in records.items()}, final


def run_mpjax_accumulated(toy, problem, blocks, codes, scaling):
  """mpjax over a stream of micro-batches: `blocks[i]` (which rows) with
  pattern code `codes[i]` (0 finite, else poisoned).

  Returns ``(records, final)``: per micro-batch the scale after the update,
  the growth counter, the inner Adam's count and whether the update
  completed a window; the final params and moments.
  """
  tx = mpjax.loss_scaled(optax.MultiSteps(mpjax.adam(LR), MICRO_BATCHES),
                         scaling)
  split = lambda a: jnp.asarray(a).reshape(MICRO_BATCHES, -1, a.shape[-1])
  xs, ys = split(problem["x"]), split(problem["y"])

  def step(carry, block_and_code):
    params, state = carry
    block, code = block_and_code
    grads = jax.grad(lambda p: mpjax.scale_loss(
        toy.loss(p, xs[block], ys[block]), state))(params)
    updates, state = tx.update(toy.poison_grads(grads, code), state, params)
    multi = state.inner_state
    record = {"scale": state.scale, "growth_count": state.growth_count,
              "adam_count": multi.inner_opt_state[0].count,
              "completed": state.last_grads_finite & (multi.mini_step == 0)}
    return (optax.apply_updates(params, updates), state), record

  params = {"w": jnp.asarray(problem["w"]), "b": jnp.asarray(problem["b"])}
  (params, state), records = jax.jit(lambda c, s: jax.lax.scan(step, c, s))(
      (params, tx.init(params)), (jnp.asarray(blocks), jnp.asarray(codes)))
  adam = state.inner_state.inner_opt_state[0]
  final = {"params": params, "mu": adam.mu, "nu": adam.nu}
  return jax.tree.map(np.asarray, records), jax.tree.map(np.asarray, final)


def assert_same_accumulated_state(problem, ours, theirs):
  """The same updates: the params' movement and the moments within 1e-5 of
  the largest (MultiSteps keeps a running mean, torch a sum of loss / k;
  measured 3e-7 apart)."""
  for leaf in ("w", "b"):
    moved = {side: tree["params"][leaf] - problem[leaf]
             for side, tree in (("ours", ours), ("theirs", theirs))}
    pairs = (("params moved", moved["ours"], moved["theirs"]),
             ("mu", ours["mu"][leaf], theirs["mu"][leaf]),
             ("nu", ours["nu"][leaf], theirs["nu"][leaf]))
    for name, mine, their in pairs:
      np.testing.assert_allclose(mine, their, rtol=1e-5,
                                 atol=1e-5 * np.abs(their).max(),
                                 err_msg=f"{name}[{leaf!r}]")


def test_accumulated_scale_follows_optimizer_steps_like_torch(toy):
  growth_interval = 2
  problem = toy.make_problem(6)
  theirs, their_final = run_torch_accumulated(
      problem, WINDOWS, growth_interval=growth_interval)
  blocks = np.tile(np.arange(MICRO_BATCHES), WINDOWS)
  ours, our_final = run_mpjax_accumulated(
      toy, problem, blocks, np.zeros_like(blocks),
      mpjax.DynamicScaling.like_torch(growth_interval=growth_interval))
  window_ends = ours["completed"]
  np.testing.assert_array_equal(np.flatnonzero(window_ends) % MICRO_BATCHES,
                                MICRO_BATCHES - 1)
  for name in ("scale", "growth_count", "adam_count"):
    np.testing.assert_array_equal(ours[name][window_ends], theirs[name],
                                  err_msg=name)
  # One scale for a whole window: it only changes where a window ends.
  changes = np.flatnonzero(np.diff(ours["scale"])) + 1
  assert np.all(window_ends[changes])
  assert np.sum(np.diff(np.log2(theirs["scale"])) > 0) == WINDOWS // 2
  assert_same_accumulated_state(problem, our_final, their_final)


def test_a_non_finite_micro_batch_backs_off_and_is_dropped_alone(toy):
  """The documented rule (`mpjax.loss_scaled`), where torch would skip the
  whole window: the scale backs off at once, the bad micro-batch is dropped
  and its window still averages `MICRO_BATCHES` finite ones. So the params
  and moments equal torch's on the same stream without the bad micro-batches.
  """
  growth_interval = 2
  problem = toy.make_problem(7)
  blocks = np.tile(np.arange(MICRO_BATCHES), WINDOWS)
  codes = np.zeros_like(blocks)
  # Poisoned micro-batches inserted into windows 2, 5 (twice) and 11.
  for position, code in sorted([(9, 1), (21, 4), (22, 2), (45, 6)],
                               reverse=True):
    blocks = np.insert(blocks, position, 0)
    codes = np.insert(codes, position, code)
  ours, our_final = run_mpjax_accumulated(
      toy, problem, blocks, codes,
      mpjax.DynamicScaling.like_torch(growth_interval=growth_interval))
  # The rule, written out per micro-batch.
  scale, count, finite_in_window, expected = 2.0**16, 0, 0, []
  for code in codes:
    if code:
      scale, count = scale / 2, 0
    else:
      finite_in_window += 1
      if finite_in_window == MICRO_BATCHES:
        finite_in_window, count = 0, count + 1
        if count == growth_interval:
          scale, count = scale * 2, 0
    expected.append(scale)
  np.testing.assert_array_equal(ours["scale"], expected)
  assert ours["completed"].sum() == WINDOWS
  theirs, their_final = run_torch_accumulated(
      problem, WINDOWS, growth_interval=growth_interval)
  np.testing.assert_array_equal(ours["adam_count"][ours["completed"]],
                                theirs["adam_count"])
  assert_same_accumulated_state(problem, our_final, their_final)
