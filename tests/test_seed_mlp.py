"""Tests for the main job, experiments/seed_mlp.py, and its data loaders."""

import gzip
import json
import os
import struct

import chex
import numpy as np
import pytest

import datasets
import mpjax
import seed_mlp


@pytest.fixture(scope="module")
def digits_result(tmp_path_factory):
  path = tmp_path_factory.mktemp("run") / "seed.json"
  seed_mlp.main(["seed_mlp.py", "--json", str(path)])
  with open(path) as f:
    return json.load(f)


def test_main_job_runs_four_configurations_and_writes_json(digits_result):
  rows = {r["config"]: r for r in digits_result["rows"]}
  assert list(rows) == [c.name for c in seed_mlp.CONFIGS]
  env = digits_result["environment"]
  assert env["dataset"] == "digits" and env["epochs"] == 10
  assert env["batch_size"] == 128 and env["features"] == 64
  for row in rows.values():
    assert row["params_all_finite"]
    assert np.isfinite(row["final_train_loss"])
    assert row["median_step_ms"] > 0 and row["compile_s"] > 0
    assert row["steps"] == 10 * (env["train_examples"] // 128)
    assert row["xla_argument_bytes"] > 0
  assert rows["mixed_float16+keras"]["final_loss_scale"] == 2.0**15
  assert rows["float16_autocast+torch"]["final_loss_scale"] == 2.0**16
  assert rows["float32"]["policy"] == "p=f32,c=f32,o=f32"
  assert rows["float16_autocast+torch"]["policy"] == "p=f32,c=f16,o=f16"


def test_mixed_configurations_within_one_point_of_float32(digits_result):
  rows = {r["config"]: r for r in digits_result["rows"]}
  reference = rows["float32"]["test_accuracy"]
  assert reference > 0.85
  for name, row in rows.items():
    assert 100 * (reference - row["test_accuracy"]) <= 1.0, name


def test_half_precision_export_is_half_the_bytes(digits_result):
  rows = {r["config"]: r for r in digits_result["rows"]}
  full = rows["float32"]["export_bytes"]
  for name in ("mixed_float16+keras", "mixed_bfloat16"):
    assert 0.45 * full < rows[name]["export_bytes"] < 0.55 * full, name


def write_idx(path, array, magic, compress=False):
  header = struct.pack(">i", magic) + struct.pack(f">{array.ndim}i",
                                                  *array.shape)
  opener = gzip.open if compress else open
  with opener(path, "wb") as f:
    f.write(header + array.astype(np.uint8).tobytes())


def fake_mnist(directory, n_train=300, n_test=100, compress=False):
  rng = np.random.default_rng(0)
  suffix = ".gz" if compress else ""
  for part, n in (("train", n_train), ("t10k", n_test)):
    labels = rng.integers(0, 10, n)
    images = np.zeros((n, 28, 28), np.uint8)
    for i, label in enumerate(labels):  # a learnable pattern per class
      images[i, label * 2:label * 2 + 3, :] = 255
    write_idx(os.path.join(directory, f"{part}-images-idx3-ubyte{suffix}"),
              images, 2051, compress)
    write_idx(os.path.join(directory, f"{part}-labels-idx1-ubyte{suffix}"),
              labels, 2049, compress)


@pytest.mark.parametrize("compress", [False, True])
def test_mnist_idx_files_load(tmp_path, compress):
  fake_mnist(tmp_path, compress=compress)
  split = datasets.load_mnist(str(tmp_path))
  assert split.x_train.shape == (300, 784) and split.x_test.shape == (100, 784)
  assert split.x_train.dtype == np.float32 and split.y_train.dtype == np.int32
  assert split.x_train.max() == 1.0 and split.x_train.min() == 0.0


def test_main_job_reads_mnist_from_data_dir(tmp_path):
  fake_mnist(tmp_path)
  out = tmp_path / "mnist.json"
  result = seed_mlp.main(["seed_mlp.py", "--data-dir", str(tmp_path),
                          "--epochs", "2", "--batch-size", "64",
                          "--configs", "float32", "mixed_bfloat16",
                          "--json", str(out)])
  assert result["environment"]["features"] == 784
  assert [r["config"] for r in result["rows"]] == ["float32", "mixed_bfloat16"]
  assert json.loads(out.read_text())["rows"][0]["steps"] == 8


def test_missing_mnist_file_is_named(tmp_path):
  fake_mnist(tmp_path)
  os.remove(tmp_path / "t10k-labels-idx1-ubyte")
  with pytest.raises(FileNotFoundError, match="t10k-labels-idx1-ubyte"):
    datasets.load_mnist(str(tmp_path))


def test_missing_data_dir_is_named(tmp_path):
  with pytest.raises(FileNotFoundError, match="nowhere"):
    datasets.load_mnist(str(tmp_path / "nowhere"))


def test_wrong_magic_is_named(tmp_path):
  fake_mnist(tmp_path)
  labels = tmp_path / "train-labels-idx1-ubyte"
  images = tmp_path / "train-images-idx3-ubyte"
  labels.write_bytes(images.read_bytes())  # an images file under a label name
  with pytest.raises(ValueError, match="train-labels-idx1-ubyte.*magic number "
                     "2051, expected 2049"):
    datasets.load_mnist(str(tmp_path))


def test_truncated_file_is_named(tmp_path):
  fake_mnist(tmp_path)
  path = tmp_path / "train-images-idx3-ubyte"
  path.write_bytes(path.read_bytes()[:-10])
  with pytest.raises(ValueError, match="train-images-idx3-ubyte.*holds"):
    datasets.load_mnist(str(tmp_path))


def test_corrupt_gzip_is_named(tmp_path):
  fake_mnist(tmp_path)
  os.remove(tmp_path / "train-images-idx3-ubyte")
  (tmp_path / "train-images-idx3-ubyte.gz").write_bytes(b"not gzip at all")
  with pytest.raises(ValueError, match="train-images-idx3-ubyte.gz"):
    datasets.load_mnist(str(tmp_path))


def test_image_and_label_counts_must_agree(tmp_path):
  fake_mnist(tmp_path)
  write_idx(tmp_path / "train-labels-idx1-ubyte", np.zeros(299), 2049)
  with pytest.raises(ValueError, match="300 images but 299 labels"):
    datasets.load_mnist(str(tmp_path))


@pytest.mark.parametrize("argv", [["--epochs", "0"], ["--batch-size", "-1"],
                                  ["--warmup", "-2"], ["--configs", "fp8"]])
def test_bad_command_line_is_rejected(argv, capsys):
  with pytest.raises(SystemExit):
    seed_mlp.parse_args(argv)
  assert argv[1] in capsys.readouterr().err


def test_interrupted_and_resumed_run_ends_bit_identical(tmp_path):
  common = ["--configs", "float16_autocast+torch", "--quiet", "--metrics", "",
            "--checkpoint-every", "7"]
  seed_mlp.main(["seed_mlp.py", *common, "--epochs", "4", "--json",
                 str(tmp_path / "full.json"),
                 "--checkpoint-dir", str(tmp_path / "full")])
  seed_mlp.main(["seed_mlp.py", *common, "--epochs", "4", "--stop-after",
                 "20", "--json", str(tmp_path / "part.json"),
                 "--checkpoint-dir", str(tmp_path / "resumed")])
  with pytest.raises(SystemExit, match="--resume"):  # never clobbers a run
    seed_mlp.main(["seed_mlp.py", *common, "--epochs", "4",
                   "--checkpoint-dir", str(tmp_path / "resumed")])
  result = seed_mlp.main(["seed_mlp.py", *common, "--epochs", "4", "--json",
                          str(tmp_path / "resumed.json"), "--resume",
                          "--checkpoint-dir", str(tmp_path / "resumed")])
  row = result["rows"][0]
  assert row["resumed_at_step"] == 20 and row["steps_this_run"] == 20
  config = seed_mlp.CONFIGS[2]
  args = seed_mlp.parse_args([])
  _, like = seed_mlp.new_state(config, datasets.load_digits(), args)
  states = [mpjax.CheckpointManager(str(tmp_path / d / config.name)).restore(
      like) for d in ("full", "resumed")]
  assert [int(s.step) for s in states] == [40, 40]
  chex.assert_trees_all_equal(states[0], states[1])
  full = json.loads((tmp_path / "full.json").read_text())["rows"][0]
  assert full["test_accuracy"] == row["test_accuracy"]


@pytest.mark.parametrize("points, text", [
    (0.0, "equal to float32's"), (-0.001, "equal to float32's"),
    (0.45, "0.45 points below float32"), (-0.22, "0.22 points above float32"),
])
def test_verdict_never_says_plus_zero_points_below(points, text):
  assert seed_mlp.accuracy_gap(points) == text
