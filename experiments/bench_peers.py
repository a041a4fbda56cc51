"""The benchmark's peers: the same models in PyTorch and in Keras 3 on JAX.

Each peer trains the model `bench_models` builds for mpjax (same layers,
shapes, batch, Adam(1e-3), softmax cross-entropy) and is timed the way
mpjax is: one step = forward, backward and optimizer update, waited for
(``torch.cuda.synchronize`` / ``jax.block_until_ready``), median over the
timed steps after warm-up; the first call (where ``torch.compile`` and
Keras's jit compile) is reported separately.

- PyTorch eager and ``torch.compile`` (the model compiled, as nanoGPT does;
  the optimizer step stays eager): float32, and autocast for the mixed rows
  with ``GradScaler`` for float16. On CPU autocast's default and fast dtype is
  bfloat16; the float16 row on CPU is autocast(float16), which CPUs without
  float16 arithmetic emulate. Attention uses
  ``F.scaled_dot_product_attention(is_causal=True)``: what a PyTorch user
  writes (a fused flash kernel on a GPU), not a copy of mpjax's einsums.
- Keras 3 on the JAX backend: the dtype policy set *before* the model is
  built (the seed's bug was setting it after), ``mixed_float16`` with
  `LossScaleOptimizer`, and Keras's own ``train_step`` jitted with the state
  donated, which is what ``model.fit`` runs per step.

A peer whose library is missing, or that fails (``torch.compile`` without a
working C++ compiler, say), returns a skip reason instead of a time; the
benchmark prints it and goes on.
"""

import importlib.metadata
import importlib.util
import os
import time
from typing import Any, Callable, Dict, Optional

import numpy as np

# Keras reads its backend once, at its first import.
os.environ.setdefault("KERAS_BACKEND", "jax")

PEERS = ("torch-eager", "torch-compile", "keras")
PEER_POLICIES = ("float32", "mixed_bfloat16", "mixed_float16")


# A peer's result: {"median_s", "p10_s", "p90_s", "first_step_s",
# "timed_steps", "note"}, or {"skipped": why}.
Result = Dict[str, Any]


def _skip(reason: str) -> Result:
  return {"skipped": reason}


def _timed(step: Callable[[], Any], warmup: int, steps: int) -> Result:
  """Times `step` (which must wait for its own result)."""
  start = time.perf_counter()
  step()
  first = time.perf_counter() - start
  for _ in range(max(warmup - 1, 0)):
    step()
  times = []
  for _ in range(steps):
    start = time.perf_counter()
    step()
    times.append(time.perf_counter() - start)
  return {"median_s": float(np.median(times)), "first_step_s": first,
          "timed_steps": steps, "p10_s": float(np.percentile(times, 10)),
          "p90_s": float(np.percentile(times, 90))}


# ----------------------------------------------------------------- PyTorch


def _torch_models(torch):
  """The torch twins of `bench_models`' flax models (defined lazily)."""
  nn, F = torch.nn, torch.nn.functional

  class MLP(nn.Module):
    def __init__(self, features, hidden, classes):
      super().__init__()
      layers, width = [], features
      for h in hidden:
        layers += [nn.Linear(width, h), nn.ReLU()]
        width = h
      self.net = nn.Sequential(*layers, nn.Linear(width, classes))

    def forward(self, x):
      return self.net(x)

  class CNN(nn.Module):
    """NCHW twin of `models.CNN` (flax is NHWC; the math is the same)."""

    def __init__(self, channels, features, image, classes):
      super().__init__()
      layers, width = [], channels
      for f in features:
        layers += [nn.Conv2d(width, f, 3, padding=1), nn.ReLU(),
                   nn.Conv2d(f, f, 3, padding=1), nn.ReLU(), nn.AvgPool2d(2)]
        width = f
      side = image // 2 ** len(features)
      self.net = nn.Sequential(*layers, nn.Flatten(),
                               nn.Linear(width * side * side, classes))

    def forward(self, x):
      return self.net(x)

  class Block(nn.Module):
    def __init__(self, c):
      super().__init__()
      d = c.d_model
      self.heads = c.num_heads
      self.ln1, self.ln2 = nn.LayerNorm(d, eps=1e-5), nn.LayerNorm(d, eps=1e-5)
      self.qkv, self.out = nn.Linear(d, 3 * d), nn.Linear(d, d)
      self.fc, self.proj = nn.Linear(d, c.mlp_ratio * d), nn.Linear(
          c.mlp_ratio * d, d)

    def forward(self, x):
      b, s, d = x.shape
      q, k, v = self.qkv(self.ln1(x)).split(d, dim=-1)
      split = lambda t: t.view(b, s, self.heads, d // self.heads).transpose(1, 2)
      h = F.scaled_dot_product_attention(split(q), split(k), split(v),
                                         is_causal=True)
      x = x + self.out(h.transpose(1, 2).reshape(b, s, d))
      return x + self.proj(F.gelu(self.fc(self.ln2(x)), approximate="tanh"))

  class GPT(nn.Module):
    """Twin of `lm_models_linen.TransformerLM`: tied output embedding."""

    def __init__(self, c):
      super().__init__()
      self.embed = nn.Embedding(c.vocab_size, c.d_model)
      self.pos = nn.Embedding(c.seq_len, c.d_model)
      self.blocks = nn.ModuleList([Block(c) for _ in range(c.num_layers)])
      self.ln_f = nn.LayerNorm(c.d_model, eps=1e-5)

    def forward(self, tokens):
      x = self.embed(tokens) + self.pos(
          torch.arange(tokens.shape[-1], device=tokens.device))
      for block in self.blocks:
        x = block(x)
      return self.ln_f(x) @ self.embed.weight.t()

  return MLP, CNN, GPT


def run_torch(spec, policy: str, compiled: bool, warmup: int,
              steps: int) -> Result:
  """Times the torch twin of `spec` under `policy` (a `PEER_POLICIES` name)."""
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError:
    return _skip("torch is not installed (pip install -e '.[conformance]')")
  device = "cuda" if torch.cuda.is_available() else "cpu"
  mixed = {"float32": None, "mixed_bfloat16": torch.bfloat16,
           "mixed_float16": torch.float16}[policy]
  # TF32 for float32 matmuls, as JAX's default precision does on a GPU.
  torch.set_float32_matmul_precision("high")
  torch.manual_seed(0)
  MLP, CNN, GPT = _torch_models(torch)
  if spec.kind == "mlp":
    model = MLP(spec.features, spec.hidden, spec.classes)
  elif spec.kind == "cnn":
    model = CNN(spec.channels, spec.conv_features, spec.image, spec.classes)
  else:
    model = GPT(spec.lm)
  model = model.to(device)
  x_np, y_np = spec.numpy_batch()
  if spec.kind == "cnn":
    x_np = np.ascontiguousarray(x_np.transpose(0, 3, 1, 2))
  x, y = torch.from_numpy(x_np).to(device), torch.from_numpy(
      y_np.astype(np.int64)).to(device)
  optimizer = torch.optim.Adam(model.parameters(), lr=1e-3,
                               fused=device == "cuda")
  scaler = torch.amp.GradScaler(device) if mixed == torch.float16 else None
  forward = model
  if compiled:
    try:
      forward = torch.compile(model)
    except Exception as e:  # pylint: disable=broad-except
      return _skip(f"torch.compile failed: {type(e).__name__}: {e}"[:300])

  def step():
    optimizer.zero_grad(set_to_none=True)
    with torch.autocast(device, dtype=mixed or torch.float32,
                        enabled=mixed is not None):
      logits = forward(x)
      loss = torch.nn.functional.cross_entropy(
          logits.float().reshape(-1, logits.shape[-1]), y.reshape(-1))
    if scaler is None:
      loss.backward()
      optimizer.step()
    else:
      scaler.scale(loss).backward()
      scaler.step(optimizer)
      scaler.update()
    if device == "cuda":
      torch.cuda.synchronize()
    return loss

  try:
    result = _timed(step, warmup, steps)
  except Exception as e:  # pylint: disable=broad-except
    what = "torch.compile" if compiled else "torch eager"
    return _skip(f"{what} failed: {type(e).__name__}: {e}"[:300])
  finally:
    # Free the compiled graphs and cached blocks before the next run.
    if compiled:
      torch._dynamo.reset()  # pylint: disable=protected-access
    if device == "cuda":
      torch.cuda.empty_cache()
  notes = [f"torch {torch.__version__} on {device}, "
           f"{torch.get_num_threads()} threads"]
  if mixed is not None:
    notes.append(f"autocast({device}, {str(mixed).split('.')[-1]})")
    if device == "cpu" and mixed == torch.float16:
      notes.append("CPU float16 autocast: emulated on CPUs without float16 "
                   "arithmetic")
  if scaler is not None:
    notes.append("GradScaler")
  if device == "cuda" and mixed is None:
    notes.append("float32 matmuls in TF32 (set_float32_matmul_precision"
                 "('high'))")
  result["note"] = "; ".join(notes)
  return result


# ------------------------------------------------------------------- Keras


def _keras_model(keras, spec):
  """The Keras twin of `spec`'s model, built under the current dtype policy."""
  layers, ops = keras.layers, keras.ops
  if spec.kind == "mlp":
    inputs = keras.Input((spec.features,))
    x = inputs
    for h in spec.hidden:
      x = layers.Dense(h, activation="relu")(x)
    return keras.Model(inputs, layers.Dense(spec.classes)(x))
  if spec.kind == "cnn":
    inputs = keras.Input((spec.image, spec.image, spec.channels))
    x = inputs
    for f in spec.conv_features:
      x = layers.Conv2D(f, 3, padding="same", activation="relu")(x)
      x = layers.Conv2D(f, 3, padding="same", activation="relu")(x)
      x = layers.AveragePooling2D(2)(x)
    return keras.Model(inputs, layers.Dense(spec.classes)(layers.Flatten()(x)))

  c = spec.lm

  class TiedLogits(layers.Layer):
    """``x @ embedding.T``: GPT-2's output layer shares the token embedding."""

    def __init__(self, embedding, **kwargs):
      super().__init__(**kwargs)
      self.embedding = embedding

    def call(self, x):
      return ops.matmul(x, ops.transpose(ops.cast(self.embedding.embeddings,
                                                  x.dtype)))

  tokens = keras.Input((c.seq_len,), dtype="int32")
  embed = layers.Embedding(c.vocab_size, c.d_model)
  positions = layers.Embedding(c.seq_len, c.d_model)(
      ops.expand_dims(ops.arange(c.seq_len), 0))
  x = embed(tokens) + positions
  for _ in range(c.num_layers):
    h = layers.LayerNormalization(epsilon=1e-5)(x)
    x = x + layers.MultiHeadAttention(c.num_heads, c.d_model // c.num_heads)(
        h, h, use_causal_mask=True)
    h = layers.LayerNormalization(epsilon=1e-5)(x)
    h = layers.Dense(c.mlp_ratio * c.d_model)(h)
    h = layers.Activation(lambda t: keras.activations.gelu(t, approximate=True))(h)
    x = x + layers.Dense(c.d_model)(h)
  x = layers.LayerNormalization(epsilon=1e-5)(x)
  return keras.Model(tokens, TiedLogits(embed)(x))


def run_keras(spec, policy: str, warmup: int, steps: int) -> Result:
  """Times the Keras twin of `spec` with Keras's own jitted ``train_step``."""
  try:
    import jax  # pylint: disable=g-import-not-at-top
    import keras  # pylint: disable=g-import-not-at-top
  except ImportError:
    return _skip("keras is not installed (pip install -e '.[conformance]')")
  if keras.backend.backend() != "jax":
    return _skip(f"keras was imported with the {keras.backend.backend()!r} "
                 "backend; this benchmark needs KERAS_BACKEND=jax set before "
                 "keras is first imported")
  previous = keras.config.dtype_policy()
  keras.config.set_dtype_policy(policy)
  try:
    keras.utils.set_random_seed(0)
    model = _keras_model(keras, spec)
    optimizer = keras.optimizers.Adam(1e-3)
    if policy == "mixed_float16":
      optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
    model.compile(optimizer=optimizer,
                  loss=keras.losses.SparseCategoricalCrossentropy(
                      from_logits=True), jit_compile=True)
    x_np, y_np = spec.numpy_batch()
    x, y = jax.device_put(x_np), jax.device_put(y_np)
    model.train_on_batch(x, y)  # builds the model, optimizer and metrics
    state = tuple([v.value for v in variables] for variables in (
        model.trainable_variables, model.non_trainable_variables,
        model.optimizer.variables, model.metrics_variables))
    train_step = jax.jit(model.train_step, donate_argnums=0)
    holder = [state]

    def step():
      logs, holder[0] = train_step(holder[0], (x, y))
      jax.block_until_ready((logs, holder[0]))

    result = _timed(step, warmup, steps)
  except Exception as e:  # pylint: disable=broad-except
    return _skip(f"keras failed: {type(e).__name__}: {e}"[:300])
  finally:
    keras.config.set_dtype_policy(previous)
  note = [f"keras {keras.__version__} (jax backend), dtype policy {policy}"]
  if policy == "mixed_float16":
    note.append("LossScaleOptimizer")
  result["note"] = "; ".join(note)
  return result


def run_peer(peer: str, spec, policy: str, warmup: int,
             steps: int) -> Result:
  """Dispatches to the peer named `peer` (one of `PEERS`)."""
  if peer == "keras":
    return run_keras(spec, policy, warmup, steps)
  return run_torch(spec, policy, peer == "torch-compile", warmup, steps)


def available(peer: str) -> Optional[str]:
  """None when `peer` can run, else why not (checked without importing)."""
  module = "keras" if peer == "keras" else "torch"
  if importlib.util.find_spec(module) is None:
    return (f"{module} is not installed (pip install -e '.[conformance]'); "
            f"{peer} rows skipped")
  return None


def versions() -> Dict[str, str]:
  out = {}
  for name in ("torch", "keras"):
    try:
      out[name] = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
      pass
  return out
