"""What the benchmark trains: model shapes, precision policies, the mpjax side.

One model definition each, shared with the experiments: the seed MLP and the
CNN (`models`), the GPT-2-style decoder (`lm_models_linen.TransformerLM` with
`lm_common.LMConfig`); `bench_peers` builds their PyTorch and Keras twins
from the same `ModelSpec`. Data are synthetic and fixed (one batch, seeded):
the benchmark measures steps, not learning.
"""

import contextlib
import dataclasses
from typing import Any, Callable, Dict, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

import mpjax
from lm_common import LMConfig
import lm_common
import flax_stock_lm
import lm_models_linen
import models
import resnet_linen
import resnet_models_linen
import seed_mlp
from resnet_common import ResNetConfig

LEARNING_RATE = 1e-3


@dataclasses.dataclass(frozen=True)
class ModelSpec:
  """A model and its batch.

  Attributes:
    name: the name in records and tables (``mlp``, ``cnn``, ``gpt``, ...).
    kind: ``"mlp"`` (x: float32 [batch, features]), ``"cnn"`` (x: float32
      [batch, image, image, channels], NHWC), ``"resnet"`` (x as ``"cnn"``;
      BatchNorm statistics in the state's ``model_state``) or ``"lm"`` (x, y:
      int32 [batch, seq_len] tokens); labels y are int32 [batch] for
      classifiers.
    batch: examples (sequences for ``lm``) per step.
  """
  name: str
  kind: str
  batch: int
  features: int = 784
  hidden: Tuple[int, ...] = (128,)
  classes: int = 10
  image: int = 32
  channels: int = 3
  conv_features: Tuple[int, ...] = (16, 32)
  lm: Optional[LMConfig] = None
  resnet: Optional[ResNetConfig] = None
  # "lm" models: "gpt" (lm_models_linen.TransformerLM) or "flax-stock"
  # (flax_stock_lm.StockLM, stock flax layers only).
  arch: str = "gpt"

  def describe(self) -> Dict[str, Any]:
    """The shape fields a record carries."""
    if self.kind == "mlp":
      return {"batch": self.batch, "input": [self.features],
              "hidden": list(self.hidden), "classes": self.classes}
    if self.kind == "cnn":
      return {"batch": self.batch,
              "input": [self.image, self.image, self.channels],
              "conv_features": list(self.conv_features),
              "classes": self.classes}
    if self.kind == "resnet":
      return {"batch": self.batch,
              "input": [self.image, self.image, self.channels],
              **dataclasses.asdict(self.resnet)}
    return {"batch": self.batch, **dataclasses.asdict(self.lm)}

  @property
  def tokens_per_step(self) -> Optional[int]:
    return self.batch * self.lm.seq_len if self.kind == "lm" else None

  def numpy_batch(self) -> Tuple[np.ndarray, np.ndarray]:
    """``(x, y)``: one fixed, seeded batch (see the class docstring)."""
    rng = np.random.default_rng(0)
    if self.kind == "lm":
      tokens = rng.integers(0, self.lm.vocab_size,
                            (self.batch, self.lm.seq_len + 1), np.int32)
      return tokens[:, :-1], tokens[:, 1:]
    shape = ((self.features,) if self.kind == "mlp" else
             (self.image, self.image, self.channels))
    x = rng.standard_normal((self.batch,) + shape, np.float32)
    return x, rng.integers(0, self.classes, (self.batch,), np.int32)

  def flax_model(self):
    if self.kind == "mlp":
      return models.MLP(hidden=self.hidden, num_classes=self.classes)
    if self.kind == "cnn":
      return models.CNN(features=self.conv_features, num_classes=self.classes)
    if self.kind == "resnet":
      return resnet_models_linen.ResNet(self.resnet)
    if self.arch == "flax-stock":
      return flax_stock_lm.StockLM(self.lm)
    return lm_models_linen.TransformerLM(self.lm)

  @property
  def loss_fn(self) -> Callable:
    """``loss_fn(params, batch, apply_fn, rng)``: mean cross-entropy in float32."""
    if self.kind == "resnet":
      return resnet_linen.loss_fn  # training mode
    return lm_common.loss_fn if self.kind == "lm" else seed_mlp.loss_fn

  @property
  def init_kwargs(self) -> Dict[str, Any]:
    return {"train": False} if self.kind == "resnet" else {}


def cpu_models() -> Dict[str, ModelSpec]:
  """The CPU suite's models (a few ms to ~100 ms a step on 2 cores)."""
  return {
      "mlp": ModelSpec("mlp", "mlp", batch=128),
      "cnn": ModelSpec("cnn", "cnn", batch=32),
      "resnet": ModelSpec("resnet", "resnet", batch=32,
                          resnet=ResNetConfig()),  # resnet_linen's model
      "gpt": ModelSpec("gpt", "lm", batch=8, lm=LMConfig(
          vocab_size=1024, seq_len=128, num_layers=2, d_model=128,
          num_heads=4)),
  }


def gpt2_124m(batch: int, seq_len: int = 1024) -> ModelSpec:
  return ModelSpec("gpt2-124m", "lm", batch=batch,
                   lm=LMConfig.gpt2_124m(vocab_size=50257, seq_len=seq_len))


def flax_lm(batch: int, seq_len: int = 1024) -> ModelSpec:
  """The stock-flax decoder (8 layers, d_model 512, vocabulary 32000)."""
  return ModelSpec("flax-lm", "lm", batch=batch, arch="flax-stock",
                   lm=LMConfig(vocab_size=32000, seq_len=seq_len,
                               num_layers=8, d_model=512, num_heads=8))


def quick(spec: ModelSpec) -> ModelSpec:
  """Tiny shapes of the same models, for ``--quick`` (tests)."""
  if spec.kind == "mlp":
    return dataclasses.replace(spec, batch=16, features=32, hidden=(16,))
  if spec.kind == "cnn":
    return dataclasses.replace(spec, batch=4, image=8, conv_features=(4,))
  if spec.kind == "resnet":
    return dataclasses.replace(spec, batch=4, image=8,
                               resnet=ResNetConfig(widths=(4, 8)))
  return dataclasses.replace(spec, batch=2, lm=LMConfig(
      vocab_size=64, seq_len=16, num_layers=1, d_model=16, num_heads=2))


@dataclasses.dataclass(frozen=True)
class PolicySpec:
  """A precision configuration of the benchmark.

  Attributes:
    name: the name in records and tables.
    policy: the jmp policy string or preset (a `PolicyMap` default for the
      language model and for `overrides`).
    scaling: the loss scaling (`loss_scaled(adam, scaling)`), or None for a
      plain ``optax.adam``.
    precision: ``jax.default_matmul_precision`` while the step is traced
      (``"highest"``: true float32 matmuls), or None for JAX's default
      (TF32 for float32 matmuls on Ampere and Hopper GPUs).
    overrides: `PolicyMap` entries; the negative control forces a layer to
      float32 on purpose.
    control: a deliberately wrong configuration the audit must flag.
    fp8: an fp8 recipe (`mpjax.DelayedScaling`, `mpjax.CurrentScaling`)
      for every matmul layer of the language model
      (`lm_common.fp8_policy`, as the LM examples' fp8 configs: the
      mixed_bfloat16 LM map plus the recipe on linen ``Dense`` and
      ``DenseGeneral``), or None.
  """
  name: str
  policy: str
  scaling: Optional[mpjax.LossScaling]
  precision: Optional[str] = None
  overrides: Tuple[Tuple[str, str], ...] = ()
  control: bool = False
  note: str = ""
  fp8: Any = None

  @property
  def compute_dtype(self) -> str:
    return jnp.dtype(mpjax.get_policy(self.policy).compute_dtype).name

  def policy_for(self, spec: ModelSpec):
    """The policy `TrainState.create` gets: the language model's `PolicyMap`
    (float32 islands, logits in the compute dtype: `lm_common.lm_policy`), as
    the LM examples run it; a `PolicyMap` for the ResNet (BatchNorm a float32
    island), as `resnet_common` runs it; the whole-model policy for the other
    classifiers."""
    if spec.kind == "lm" and self.fp8 is not None:
      if self.policy != "mixed_bfloat16":
        raise ValueError(f"{self.name}: fp8 rows build on mixed_bfloat16 "
                         f"(lm_common.fp8_policy), not {self.policy!r}.")
      return lm_common.fp8_policy(self.fp8, "linen")
    if spec.kind == "lm":
      return lm_common.lm_policy(self.policy)
    if spec.kind == "resnet":
      return mpjax.PolicyMap(self.policy, dict(self.overrides))
    if self.overrides:
      return mpjax.PolicyMap(self.policy, dict(self.overrides))
    return self.policy

  def optimizer(self) -> optax.GradientTransformation:
    adam = optax.adam(LEARNING_RATE)
    return adam if self.scaling is None else mpjax.loss_scaled(adam,
                                                               self.scaling)

  def matmul_precision(self):
    """The context the step must be traced *and* called in."""
    if self.precision is None:
      return contextlib.nullcontext()
    return jax.default_matmul_precision(self.precision)


STATIC_SCALE = 2.0**15

POLICIES = (
    PolicySpec("float32_highest", "float32", None, precision="highest",
               note="float32, jax.default_matmul_precision('highest'): true "
                    "float32 matmuls"),
    PolicySpec("float32", "float32", None,
               note="float32, JAX's default matmul precision (TF32 on "
                    "Ampere/Hopper GPUs; plain float32 on CPU)"),
    PolicySpec("mixed_bfloat16", "mixed_bfloat16", None,
               note="p=f32,c=bf16,o=f32, no loss scaling"),
    PolicySpec("mixed_float16", "mixed_float16",
               mpjax.DynamicScaling.like_torch(),
               note="p=f32,c=f16,o=f32, DynamicScaling.like_torch()"),
    PolicySpec("float16_static", "p=f32,c=f16,o=f32",
               mpjax.StaticScaling(STATIC_SCALE),
               note="p=f32,c=f16,o=f32, StaticScaling(2**15): float16 "
                    "compute on float32 master params with a fixed scale"),
)

# fp8 rows of the language models (gpu-compiled suite): the mixed_bfloat16
# LM map with an fp8 recipe on every matmul layer, as the LM examples'
# fp8_delayed / fp8_current configs train it.
FP8_POLICIES = (
    PolicySpec("fp8_delayed", "mixed_bfloat16", None,
               fp8=mpjax.DelayedScaling(),
               note="mixed_bfloat16 + fp8 DelayedScaling() on every Dense/"
                    "DenseGeneral (e4m3 forward, e5m2 gradients)"),
    PolicySpec("fp8_current", "mixed_bfloat16", None,
               fp8=mpjax.CurrentScaling(),
               note="mixed_bfloat16 + fp8 CurrentScaling() (per tensor) on "
                    "every Dense/DenseGeneral"),
)

# The audit's negative control: the seed MLP's output layer forced to float32
# inside a mixed_bfloat16 step; its matmul share must come out below 100%.
CONTROL = PolicySpec(
    "mixed_bfloat16_wrong", "mixed_bfloat16", None,
    overrides=(("Dense_1", "float32"),), control=True,
    note="negative control: mixed_bfloat16 with Dense_1 forced to float32")


def build(spec: ModelSpec, pol: PolicySpec, abstract: bool = False):
  """``(state, batch, params, apply_fn)`` for `spec` under `pol`.

  `params` are the float32 initial params (`state` owns its own copy: the
  train step donates it); `batch` is ``{"x", "y"}`` on the default device.
  With ``abstract=True`` the params and state are `jax.ShapeDtypeStruct`
  trees (the batch stays real: loss functions close over it): enough to
  lower, audit and trace the step of a model too large to run here.
  """
  x, y = spec.numpy_batch()
  batch = {"x": jnp.asarray(x), "y": jnp.asarray(y)}
  model = spec.flax_model()

  # An fp8 map creates the layers' fp8 state (the "_overwrite_with_gradient"
  # collection) when the model is initialised under it.
  init = (mpjax.with_policy(model.init, pol.policy_for(spec)) if pol.fp8
          else model.init)

  def make(x):
    variables = dict(init(jax.random.key(0), x[:1], **spec.init_kwargs))
    params = variables.pop("params")
    state = mpjax.TrainState.create(apply_fn=model.apply, params=params,
                                    model_state=variables or None,
                                    tx=pol.optimizer(),
                                    policy=pol.policy_for(spec))
    return state, params

  state, params = (jax.eval_shape(make, batch["x"]) if abstract
                   else jax.jit(make)(batch["x"]))
  return state, batch, params, model.apply


def loss_of_params(spec: ModelSpec, pol: PolicySpec, apply_fn,
                   batch) -> Callable:
  """``params -> loss`` under `pol`: what the step differentiates, without
  the optimizer (whose float32 math is not a precision island)."""
  apply = mpjax.with_policy(apply_fn, pol.policy_for(spec))
  if spec.kind == "resnet":
    # Training mode normalises with the batch's statistics; the running
    # averages it updates start fresh here and are dropped (the step keeps
    # its own in the state).
    apply = _dropping_batch_stats(apply)
  return lambda params: spec.loss_fn(params, batch, apply, None)


def _dropping_batch_stats(apply: Callable) -> Callable:
  return lambda variables, *args, **kwargs: apply(
      variables, *args, mutable=["batch_stats"], **kwargs)[0]
