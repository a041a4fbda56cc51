"""Byte-level text for the language-model examples: Python's own sources.

The corpus is the standard library's top-level ``.py`` files (``os.py``,
``argparse.py``, ...), sorted by name and joined with newlines: real text that
ships with every Python, so no download is needed. Tokens are bytes
(vocabulary 256). The exact bytes depend on the Python version; `Corpus`
records the version, the number of files and a SHA-256 of the text so that
runs can be compared.
"""

import dataclasses
import glob
import hashlib
import os
import platform
import sysconfig
from typing import Dict, Iterator, Optional

import numpy as np

VOCAB_SIZE = 256


@dataclasses.dataclass(frozen=True)
class Corpus:
  """Training and validation bytes.

  Attributes:
    train: uint8 [n_train], the first ``1 - val_fraction`` of the text.
    val: uint8 [n_val], the rest.
    files: number of source files read.
    sha256: hex digest of the whole text.
    python: the Python version whose standard library was read.
  """
  train: np.ndarray
  val: np.ndarray
  files: int
  sha256: str
  python: str

  def describe(self) -> Dict[str, object]:
    return {"corpus": "python-stdlib-py-bytes", "python": self.python,
            "files": self.files, "train_bytes": int(self.train.size),
            "val_bytes": int(self.val.size), "sha256": self.sha256}


def stdlib_sources(max_bytes: Optional[int] = None) -> tuple:
  """``(text, files)``: the standard library's top-level .py files joined.

  Args:
    max_bytes: keep at most this many bytes (whole files first, the last one
      cut); None keeps everything.
  """
  root = sysconfig.get_path("stdlib")
  paths = sorted(glob.glob(os.path.join(root, "*.py")))
  if not paths:
    raise FileNotFoundError(f"No .py files in the standard library at {root}.")
  chunks, total, files = [], 0, 0
  for path in paths:
    with open(path, "rb") as f:
      data = f.read()
    chunks.append(data + b"\n")
    total += len(data) + 1
    files += 1
    if max_bytes is not None and total >= max_bytes:
      break
  text = b"".join(chunks)
  return (text if max_bytes is None else text[:max_bytes]), files


def load(max_bytes: Optional[int] = 2_000_000,
         val_fraction: float = 0.05) -> Corpus:
  """The corpus split into training and validation bytes.

  Args:
    max_bytes: cap on the text size (default 2 MB: plenty for the small
      models; None reads everything, about 6 MB on Python 3.11).
    val_fraction: share of the text (its end) held out for validation.
  """
  if not 0 < val_fraction < 1:
    raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}.")
  text, files = stdlib_sources(max_bytes)
  data = np.frombuffer(text, dtype=np.uint8)
  split = int(len(data) * (1 - val_fraction))
  return Corpus(train=data[:split], val=data[split:], files=files,
                sha256=hashlib.sha256(text).hexdigest(),
                python=platform.python_version())


def _windows(data: np.ndarray, starts: np.ndarray,
             seq_len: int) -> Dict[str, np.ndarray]:
  idx = starts[:, None] + np.arange(seq_len + 1)[None, :]
  tokens = data[idx].astype(np.int32)
  return {"x": tokens[:, :-1], "y": tokens[:, 1:]}


def train_batches(data: np.ndarray, batch_size: int, seq_len: int,
                  seed: int = 0) -> Iterator[Dict[str, np.ndarray]]:
  """Endless random windows: ``{"x": int32 [B, T], "y": int32 [B, T]}``.

  ``y`` is ``x`` shifted by one byte (next-byte prediction).
  """
  if len(data) <= seq_len + 1:
    raise ValueError(f"{len(data)} bytes are too few for seq_len {seq_len}.")
  rng = np.random.default_rng(seed)
  while True:
    yield _windows(data, rng.integers(0, len(data) - seq_len - 1, batch_size),
                   seq_len)


def eval_batches(data: np.ndarray, batch_size: int, seq_len: int,
                 num_batches: int) -> list:
  """Fixed, evenly spaced windows over `data` (the same every run)."""
  count = batch_size * num_batches
  starts = np.linspace(0, len(data) - seq_len - 2, count).astype(np.int64)
  return [_windows(data, starts[i * batch_size:(i + 1) * batch_size], seq_len)
          for i in range(num_batches)]
