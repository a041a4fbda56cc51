"""Every Python block of README.md and docs/*.md runs as written, alone.

Each ```python block is executed by itself in a fresh namespace (nothing
carries over from the blocks above it), from a temporary working directory,
so a reader can copy any one of them into a new file and run it. A block that
needs a model, a state or data builds its own (tiny ones keep this fast).
"""

import glob
import os
import re
from typing import Dict, List, NamedTuple

import chex
import jax.numpy as jnp
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAGES = [os.path.join(ROOT, "README.md")] + sorted(
    glob.glob(os.path.join(ROOT, "docs", "*.md")))


class Block(NamedTuple):
  path: str  # the Markdown file
  line: int  # 1-based line of the opening fence
  heading: str  # the nearest heading above it
  code: str

  @property
  def name(self) -> str:
    return f"{os.path.relpath(self.path, ROOT)}:{self.line} ({self.heading})"


def python_blocks(path: str) -> List[Block]:
  """The ```python blocks of one Markdown file, in order."""
  blocks, heading, code, start, other_fence = [], "", None, 0, False
  with open(path, encoding="utf-8") as f:
    for number, line in enumerate(f, start=1):
      if code is not None:
        if line.startswith("```"):
          blocks.append(Block(path, start, heading, "".join(code)))
          code = None
        else:
          code.append(line)
      elif re.match(r"```python\s*$", line):
        code, start = [], number
      elif line.startswith("```"):
        other_fence = not other_fence  # a bash or text block: no headings
      elif line.startswith("#") and not other_fence:
        heading = line.lstrip("#").strip()
  return blocks


BLOCKS = [b for page in PAGES for b in python_blocks(page)]


def run_alone(block: Block) -> Dict[str, object]:
  namespace = {"__name__": "__main__"}
  code = compile(block.code, block.name, "exec")
  exec(code, namespace)  # pylint: disable=exec-used
  return namespace


def test_the_pages_have_python_blocks():
  assert any(b.heading == "Quickstart" for b in BLOCKS)
  assert len(BLOCKS) >= 5


@pytest.mark.parametrize("block", BLOCKS, ids=[b.name for b in BLOCKS])
def test_block_runs_alone(block, tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)  # whatever a block writes lands here
  run_alone(block)


def test_ci_runs_the_readmes_test_command():
  """.ci/run's last line is README's second set-up command, word for word."""
  with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
    readme = f.read()
  commands = re.findall(r"^(pip install -e .*?)\s+# ", readme, flags=re.M)
  with open(os.path.join(ROOT, ".ci", "run"), encoding="utf-8") as f:
    ci = f.read().strip().splitlines()[-1]
  assert any("pytest" in c for c in commands), commands
  assert ci == next(c for c in commands if "pytest" in c)


def test_quickstart_trains_and_its_skipped_steps_halved_the_scale(
    tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  quickstart = next(b for b in BLOCKS if b.heading == "Quickstart")
  namespace = run_alone(quickstart)
  metrics, state = namespace["metrics"], namespace["state"]
  chex.assert_tree_all_finite(state.params)
  assert float(metrics["loss"]) < 0.1  # all-zero labels are easy to learn
  # like_torch starts at 2**16 and halves once per skipped step, as README says.
  skipped = int(state.opt_state.skipped_steps)
  assert float(metrics["loss_scale"]) == 2.0**(16 - skipped)
  chex.assert_type(metrics["loss"], jnp.float32)
