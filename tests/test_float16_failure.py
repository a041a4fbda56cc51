"""experiments/float16_failure.py: attribution, the guard and the forward debug
mode on two runs that go wrong on purpose."""

import os

import float16_failure


def test_attribution_guard_and_debug_mode_name_what_went_wrong(tmp_path):
  recoverable, hopeless = float16_failure.main(
      ["float16_failure.py", "--out", str(tmp_path), "--steps", "30"])

  # Unnormalised pixels: float16 gradients overflow at 2**16; the scale halves
  # on each skip and the kernels (never the biases) are named until it fits.
  steps = [s for s, _, _ in recoverable["skipped"]]
  scales = [scale for _, scale, _ in recoverable["skipped"]]
  assert steps == list(range(len(steps))) and 3 <= len(steps) <= 12
  assert scales == [2.0**(16 - i) for i in range(len(steps))]
  for _, _, leaves in recoverable["skipped"]:
    assert "Dense_1/kernel" in leaves
    assert not any(leaf.endswith("bias") for leaf in leaves)
  assert recoverable["error"] is None and recoverable["steps_run"] == 30

  # Pixels up to 60000: the forward pass overflows, no scale helps.
  error = hopeless["error"]
  assert error is not None and hopeless["steps_run"] == 20
  assert error.consecutive_skips == 20 and error.loss_scale == 1.0
  assert "Dense_0/kernel" in error.leaf_paths
  assert "may need bfloat16" in str(error)
  first = hopeless["report"].first_nonfinite
  assert first.path == "Dense_0" and first.inputs_finite
  assert os.path.getsize(tmp_path / "float16_failure.png") > 10_000
