"""Offline datasets for the experiments: scikit-learn's digits and MNIST IDX files.

Nothing here touches the network. Images come back as float32 in [0, 1] of
shape [N, features], labels as int32 of shape [N].
"""

import gzip
import os
import struct
from typing import NamedTuple

import numpy as np


class Split(NamedTuple):
  """A train/test split. x_*: float32 [N, F] in [0, 1]; y_*: int32 [N]."""
  x_train: np.ndarray
  y_train: np.ndarray
  x_test: np.ndarray
  y_test: np.ndarray
  name: str


def load_digits(seed: int = 0, test_fraction: float = 0.25) -> Split:
  """scikit-learn's bundled 8x8 handwritten digits (1,797 images, 64 features).

  The split is a seeded permutation, so every run and configuration sees the
  same train and test sets.
  """
  from sklearn.datasets import load_digits as sk_load_digits
  data = sk_load_digits()
  x = (data.data / 16.0).astype(np.float32)
  y = data.target.astype(np.int32)
  order = np.random.default_rng(seed).permutation(len(x))
  n_test = int(round(len(x) * test_fraction))
  test, train = order[:n_test], order[n_test:]
  return Split(x[train], y[train], x[test], y[test], "digits")


_IDX_FILES = {
    "x_train": "train-images-idx3-ubyte",
    "y_train": "train-labels-idx1-ubyte",
    "x_test": "t10k-images-idx3-ubyte",
    "y_test": "t10k-labels-idx1-ubyte",
}
_IMAGES_MAGIC, _LABELS_MAGIC = 2051, 2049


def _find(data_dir: str, stem: str) -> str:
  for name in (stem, stem + ".gz"):
    path = os.path.join(data_dir, name)
    if os.path.isfile(path):
      return path
  raise FileNotFoundError(
      f"MNIST file {os.path.join(data_dir, stem)!r} (or '{stem}.gz') not found; "
      f"--data-dir must hold {sorted(_IDX_FILES.values())}, raw or gzipped.")


def read_idx(path: str, expect_images: bool) -> np.ndarray:
  """Reads one MNIST IDX file (raw or .gz).

  Args:
    path: the file.
    expect_images: True for an images file (magic 2051, [N, rows, cols] uint8),
      False for a labels file (magic 2049, [N] uint8).

  Returns:
    uint8 [N, rows*cols] for images, uint8 [N] for labels.

  Raises:
    ValueError: naming the file, if its magic number, dimensions or length are
      not those of the expected IDX file.
  """
  opener = gzip.open if path.endswith(".gz") else open
  try:
    with opener(path, "rb") as f:
      raw = f.read()
  except (OSError, EOFError) as e:
    raise ValueError(f"{path!r}: cannot read as an IDX file ({e}).") from None
  kind = "images" if expect_images else "labels"
  magic = _IMAGES_MAGIC if expect_images else _LABELS_MAGIC
  ndim = 3 if expect_images else 1
  header = 4 + 4 * ndim
  if len(raw) < header:
    raise ValueError(
        f"{path!r}: {len(raw)} bytes is too short for an IDX {kind} header "
        f"({header} bytes).")
  (found_magic,) = struct.unpack(">i", raw[:4])
  if found_magic != magic:
    raise ValueError(
        f"{path!r}: magic number {found_magic}, expected {magic} for an IDX "
        f"{kind} file (uint8, {ndim} dimensions).")
  dims = struct.unpack(f">{ndim}i", raw[4:header])
  expected = int(np.prod(dims))
  if len(raw) - header != expected:
    raise ValueError(
        f"{path!r}: header says dimensions {dims} ({expected} bytes of data) "
        f"but the file holds {len(raw) - header}.")
  data = np.frombuffer(raw, dtype=np.uint8, offset=header)
  return data.reshape(dims[0], -1) if expect_images else data


def load_mnist(data_dir: str) -> Split:
  """MNIST from the four IDX files in `data_dir` (784 features)."""
  if not os.path.isdir(data_dir):
    raise FileNotFoundError(f"--data-dir {data_dir!r} is not a directory.")
  arrays = {}
  for key, stem in _IDX_FILES.items():
    arrays[key] = read_idx(_find(data_dir, stem), key.startswith("x"))
  for part in ("train", "test"):
    n_x, n_y = len(arrays[f"x_{part}"]), len(arrays[f"y_{part}"])
    if n_x != n_y:
      raise ValueError(
          f"MNIST {part} set in {data_dir!r}: {n_x} images but {n_y} labels.")
  to_x = lambda a: (a.astype(np.float32) / 255.0)
  return Split(to_x(arrays["x_train"]), arrays["y_train"].astype(np.int32),
               to_x(arrays["x_test"]), arrays["y_test"].astype(np.int32),
               "mnist")
