"""CIFAR-shaped synthetic images with a learnable class structure, generated deterministically.

No download: every image is made from a seed. Each of the ``num_classes``
classes owns a few colour gratings (a spatial frequency, an orientation and
an RGB colour each); an image of class k is the sum of class k's gratings at
random phases (random translations) and amplitudes, plus distractor gratings
drawn from no class, plus Gaussian pixel noise; the images are standardised
per channel. The label is recoverable from frequency, orientation and colour
together, not from any single pixel, so a convolutional network has to learn
it, and the noise keeps the task from being trivial. Images are float32
[n, 32, 32, 3] (NHWC), labels int32 [n].
"""

import dataclasses
import hashlib
from typing import Dict, Iterator, List

import numpy as np

IMAGE = 32
CHANNELS = 3


@dataclasses.dataclass(frozen=True)
class Dataset:
  x_train: np.ndarray  # float32 [num_train, 32, 32, 3]
  y_train: np.ndarray  # int32 [num_train]
  x_eval: np.ndarray  # float32 [num_eval, 32, 32, 3]
  y_eval: np.ndarray  # int32 [num_eval]
  num_classes: int
  seed: int
  noise: float

  @property
  def sha256(self) -> str:
    """Digest of all four arrays: the same seed gives the same digest."""
    digest = hashlib.sha256()
    for array in (self.x_train, self.y_train, self.x_eval, self.y_eval):
      digest.update(np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()

  def describe(self) -> Dict[str, object]:
    return {"data": "synthetic colour gratings (resnet_data.py)",
            "num_train": len(self.y_train), "num_eval": len(self.y_eval),
            "num_classes": self.num_classes, "data_seed": self.seed,
            "data_noise": self.noise, "data_sha256": self.sha256}


def _gratings(rng: np.random.Generator, n: int, low: float,
              high: float) -> Dict[str, np.ndarray]:
  """n random gratings: frequency (cycles per image), angle, unit colour."""
  colour = rng.standard_normal((n, CHANNELS))
  return {"frequency": rng.uniform(low, high, n),
          "angle": rng.uniform(0.0, np.pi, n),
          "colour": colour / np.linalg.norm(colour, axis=-1, keepdims=True)}


def _render(g: Dict[str, np.ndarray], phase: np.ndarray,
            amplitude: np.ndarray) -> np.ndarray:
  """Images [n, 32, 32, 3] of gratings g (one per image) at phase/amplitude [n]."""
  v, u = np.meshgrid(np.arange(IMAGE), np.arange(IMAGE), indexing="ij")
  direction = (np.cos(g["angle"])[:, None, None] * u +
               np.sin(g["angle"])[:, None, None] * v)
  wave = np.cos(2 * np.pi * g["frequency"][:, None, None] * direction / IMAGE
                + phase[:, None, None])
  return (amplitude[:, None, None, None] * wave[..., None] *
          g["colour"][:, None, None, :])


def _images(rng: np.random.Generator, classes: Dict[str, np.ndarray],
            labels: np.ndarray, per_class: int, distractors: int,
            noise: float) -> np.ndarray:
  n = len(labels)
  x = np.zeros((n, IMAGE, IMAGE, CHANNELS))
  for j in range(per_class):
    g = {k: v.reshape(-1, per_class, *v.shape[1:])[labels, j]
         for k, v in classes.items()}
    x += _render(g, rng.uniform(0, 2 * np.pi, n), rng.uniform(0.5, 1.5, n))
  for _ in range(distractors):
    x += _render(_gratings(rng, n, 1.0, 8.0), rng.uniform(0, 2 * np.pi, n),
                 rng.uniform(0.5, 1.5, n))
  return x + noise * rng.standard_normal(x.shape)


def make(num_train: int = 5000, num_eval: int = 1000, num_classes: int = 10,
         seed: int = 0, noise: float = 3.0, per_class: int = 2,
         distractors: int = 2) -> Dataset:
  """The dataset for `seed` (same seed, same arrays, on any machine).

  Args:
    num_train: training images.
    num_eval: evaluation images (same classes, independent draws).
    num_classes: classes (labels 0 .. num_classes - 1, balanced in
      expectation).
    seed: the only source of randomness.
    noise: standard deviation of the pixel noise, relative to a grating's
      amplitude of about 1.
    per_class: gratings that make up a class.
    distractors: class-free gratings added to every image.
  """
  for name, value in (("num_train", num_train), ("num_eval", num_eval),
                      ("num_classes", num_classes), ("per_class", per_class)):
    if not isinstance(value, int) or value < 1:
      raise ValueError(f"resnet_data.make: {name} must be a positive int, "
                       f"got {value!r}.")
  if noise < 0 or distractors < 0:
    raise ValueError(f"resnet_data.make: noise ({noise}) and distractors "
                     f"({distractors}) must be >= 0.")
  rng = np.random.default_rng(seed)
  classes = _gratings(rng, num_classes * per_class, 1.0, 6.0)
  y_train = rng.integers(0, num_classes, num_train).astype(np.int32)
  y_eval = rng.integers(0, num_classes, num_eval).astype(np.int32)
  x_train = _images(rng, classes, y_train, per_class, distractors, noise)
  x_eval = _images(rng, classes, y_eval, per_class, distractors, noise)
  mean = x_train.mean(axis=(0, 1, 2))
  std = x_train.std(axis=(0, 1, 2))
  standardise = lambda x: ((x - mean) / std).astype(np.float32)
  return Dataset(standardise(x_train), y_train, standardise(x_eval), y_eval,
                 num_classes, seed, noise)


def train_batches(x: np.ndarray, y: np.ndarray, batch_size: int,
                  seed: int) -> Iterator[Dict[str, np.ndarray]]:
  """Endless shuffled full batches ``{"x", "y"}``, epoch after epoch (seeded)."""
  if batch_size > len(y):
    raise ValueError(f"batch_size {batch_size} exceeds the {len(y)} training "
                     "images.")
  rng = np.random.default_rng(seed)
  while True:
    order = rng.permutation(len(y))
    for start in range(0, len(y) - batch_size + 1, batch_size):
      idx = order[start:start + batch_size]
      yield {"x": x[idx], "y": y[idx]}


def eval_batches(x: np.ndarray, y: np.ndarray,
                 batch_size: int) -> List[Dict[str, np.ndarray]]:
  """The whole evaluation set in order, the last batch possibly smaller."""
  return [{"x": x[i:i + batch_size], "y": y[i:i + batch_size]}
          for i in range(0, len(y), batch_size)]
