"""The README's Python examples run as written."""

import os
import re

import chex
import jax.numpy as jnp

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(
    __file__))), "README.md")


def python_blocks():
  with open(README) as f:
    return re.findall(r"```python\n(.*?)```", f.read(), flags=re.S)


def test_readme_examples_run_and_train():
  blocks = python_blocks()
  assert len(blocks) >= 2
  namespace = {}
  for block in blocks:
    exec(compile(block, README, "exec"), namespace)  # pylint: disable=exec-used
  metrics, state = namespace["metrics"], namespace["state"]
  chex.assert_tree_all_finite(state.params)
  assert float(metrics["loss"]) < 0.1  # all-zero labels are easy to learn
  # like_torch starts at 2**16 and halves once per skipped step.
  skipped = int(state.opt_state.skipped_steps)
  assert float(metrics["loss_scale"]) == 2.0**(16 - skipped)
  chex.assert_type(namespace["loss"], jnp.float32)
  chex.assert_tree_all_finite(namespace["params"])
