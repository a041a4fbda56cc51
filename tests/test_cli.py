"""The experiments answer --help and bad flags without importing jax.

Each script parses its flags with `experiments/cli.py` and the standard
library before its heavy imports; run with ``python -X importtime``, the
modules it imported are listed, and none of the heavy ones may be there.
"""

import argparse
import glob
import importlib.util
import os
import re
import subprocess
import sys

import pytest

import cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HEAVY = ("jax", "jaxlib", "flax", "optax", "orbax", "chex", "jmp", "mpjax",
         "sklearn", "matplotlib", "torch", "keras", "tensorflow")


def scripts():
  """The experiments that are commands (they have a __main__ block)."""
  out = []
  for path in sorted(glob.glob(os.path.join(ROOT, "experiments", "*.py"))):
    with open(path, encoding="utf-8") as f:
      if 'if __name__ == "__main__":' in f.read():
        out.append(os.path.relpath(path, ROOT))
  return out


SCRIPTS = scripts()


def run_with_importtime(script, *flags):
  result = subprocess.run(
      [sys.executable, "-X", "importtime", script, *flags], cwd=ROOT,
      capture_output=True, text=True, timeout=120,
      env={**os.environ, "PYTHONPATH": ROOT})
  imported = {m.split(".")[0] for m in re.findall(
      r"^import time:.*\|\s*([\w.]+)\s*$", result.stderr, flags=re.M)}
  return result, imported


def test_every_experiment_is_checked():
  assert "experiments/seed_mlp.py" in SCRIPTS and len(SCRIPTS) >= 10


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_answers_without_heavy_imports(script):
  result, imported = run_with_importtime(script, "--help")
  assert result.returncode == 0, result.stderr[-2000:]
  assert "usage:" in result.stdout
  assert imported and not imported & set(HEAVY), sorted(imported & set(HEAVY))


@pytest.mark.parametrize("script", SCRIPTS)
def test_a_bad_flag_fails_without_heavy_imports(script):
  result, imported = run_with_importtime(script, "--no-such-flag")
  assert result.returncode == 2
  assert "unrecognized arguments: --no-such-flag" in result.stderr
  assert not imported & set(HEAVY), sorted(imported & set(HEAVY))


def test_a_bad_value_fails_before_training():
  result, imported = run_with_importtime("experiments/seed_mlp.py",
                                         "--epochs", "0")
  assert result.returncode == 2
  assert "--epochs must be >= 1, got 0" in result.stderr
  assert not imported & set(HEAVY)


def run_parser(argv):
  parser = argparse.ArgumentParser(prog="x")
  cli.add_run_arguments(parser, "x")
  args = parser.parse_args(argv)
  cli.check_run_arguments(parser, args)
  return args


def test_plot_without_matplotlib_fails_at_once_with_the_install_line(
    monkeypatch, capsys):
  real = importlib.util.find_spec
  monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: (
      None if name == "matplotlib" else real(name, *a)))
  with pytest.raises(SystemExit) as exit_info:
    run_parser(["--plot", "out.png"])
  assert exit_info.value.code == 2
  err = capsys.readouterr().err
  assert "--plot needs matplotlib, which is not installed" in err
  assert "pip install -e '.[experiments]'" in err
  assert run_parser([]).plot is None  # without --plot, nothing is required


def test_a_missing_package_is_named_by_its_pip_name(monkeypatch, capsys):
  monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
  with pytest.raises(SystemExit):
    cli.require_module(argparse.ArgumentParser(prog="x"), "sklearn",
                       "the bundled digits", "experiments")
  assert ("the bundled digits needs scikit-learn, which is not installed: "
          "pip install -e '.[experiments]' (or pip install scikit-learn)"
          in capsys.readouterr().err)


def test_stopped_lines_say_where_and_how_to_resume():
  args = run_parser(["--stop-after", "3", "--checkpoint-dir", "ckpt"])
  rows = [{"config": "float32", "stopped_at_step": 3, "steps": 100},
          {"config": "mixed_bfloat16", "stopped_at_step": None, "steps": 100}]
  lines = cli.stopped_lines(
      rows, args, ["experiments/seed_mlp.py", "--stop-after", "3",
                   "--checkpoint-dir", "ckpt"])
  assert lines[0].startswith("float32: stopped at step 3 of 100 "
                             "(--stop-after 3): not a finished run")
  assert len(lines) == 2
  assert ("resume with: python experiments/seed_mlp.py --stop-after 3 "
          "--checkpoint-dir ckpt --resume") in lines[1]
  assert cli.stopped_lines(rows[1:], args, ["x.py"]) == []


def test_stopped_lines_without_checkpoints_say_nothing_can_resume():
  args = run_parser(["--stop-after", "3"])
  lines = cli.stopped_lines([{"config": "f", "stopped_at_step": 3,
                              "steps": 9}], args, ["x.py"])
  assert "no --checkpoint-dir" in lines[-1]


def test_the_flags_names_match_the_configurations():
  import lm_common  # pylint: disable=g-import-not-at-top
  import optimizer_precision  # pylint: disable=g-import-not-at-top
  import resnet_common  # pylint: disable=g-import-not-at-top
  import seed_mlp  # pylint: disable=g-import-not-at-top
  import train_sharded  # pylint: disable=g-import-not-at-top
  assert seed_mlp.CONFIG_NAMES == tuple(c.name for c in seed_mlp.CONFIGS)
  assert cli.LM_CONFIGS == tuple(c.name for c in lm_common.CONFIGS)
  assert cli.LM_CONFIGS[:3] == cli.PRECISION_CONFIGS
  assert cli.PRECISION_CONFIGS == tuple(c.name for c in resnet_common.CONFIGS)
  assert train_sharded.SCALING_NAMES == tuple(sorted(train_sharded.SCALINGS))
  assert optimizer_precision.PRESETS is cli.OPTIMIZER_PRECISIONS
  import fp8_lm  # pylint: disable=g-import-not-at-top
  assert set(fp8_lm.CONFIGS) <= set(cli.LM_CONFIGS)
  import bench  # pylint: disable=g-import-not-at-top
  assert bench.TARGETS == bench.bench_compiled.TARGETS
  assert bench.POLICIES == tuple(p.name for p in (
      bench.bench_models.POLICIES + bench.bench_models.FP8_POLICIES))
