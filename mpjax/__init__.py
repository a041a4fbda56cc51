"""mpjax: mixed-precision training for JAX and Flax.

Precision policies (on `jmp.Policy`), loss scaling as an optax wrapper with
PyTorch's and Keras's semantics, and a jit-compiled Flax train step.
"""

from mpjax import numerics
from mpjax._src.adam import adam
from mpjax._src.fused_skip import FiniteDecision
from mpjax._src.fused_skip import moving_average
from mpjax._src.optimizers import AdamWState
from mpjax._src.optimizers import SGDState
from mpjax._src.optimizers import adamw
from mpjax._src.optimizers import sgd
from mpjax._src.stochastic_rounding import stochastic_round
from mpjax._src.policy_table import PolicyRow
from mpjax._src.policy_table import policy_table
from mpjax._src.checkpoint import CheckpointManager
from mpjax._src.checkpoint import restore
from mpjax._src.checkpoint import save
from mpjax._src.debug_forward import ForwardReport
from mpjax._src.debug_forward import ModuleCall
from mpjax._src.skip_guard import NonFiniteTrainingError
from mpjax._src.skip_guard import ScaleCollapseWarning
from mpjax._src.skip_guard import SkipGuard
from mpjax._src.debug_forward import debug_forward
from mpjax._src.precision_doctor import Diagnosis
from mpjax._src.precision_doctor import LeafDiagnosis
from mpjax._src.precision_doctor import ModuleDiagnosis
from mpjax._src.precision_doctor import Prescription
from mpjax._src.precision_doctor import DoctorThresholds
from mpjax._src.precision_doctor import precision_doctor
from mpjax._src.attribution import leaf_paths
from mpjax._src.attribution import nonfinite_leaf_paths
from mpjax._src.grad_stats import GradStats
from mpjax._src.grad_stats import TensorStats
from mpjax._src.grad_stats import grad_stats
from mpjax._src.grad_stats import grad_stats_summary
from mpjax._src.grad_stats import periodic_grad_stats
from mpjax._src.scaling import DynamicScaling
from mpjax._src.scaling import LossScaling
from mpjax._src.scaling import NoScaling
from mpjax._src.scaling import StaticScaling
from mpjax._src.metrics_log import MetricsWriter
from mpjax._src.metrics_log import ProgressBar
from mpjax._src.metrics_log import read_metrics
from mpjax._src.metrics_log import record_from_metrics
from mpjax._src.fp8 import CurrentScaling
from mpjax._src.fp8 import DelayedScaling
from mpjax._src.fp8 import MXScaling
from mpjax._src.fp8 import saturating_cast
from mpjax._src.fp8_dot import fp8_dot_general
from mpjax._src.fp8_dot import fp8_einsum
from mpjax._src.mxfp8_dot import mxfp8_dot_general
from mpjax._src.mxfp8_dot import mxfp8_quantize
from mpjax._src.policy_map import PolicyMap
from mpjax._src.model_state import OVERWRITE_WITH_GRADIENT
from mpjax._src.nnx_apply import NNXApply
from mpjax._src.nnx_apply import OverwriteWithGradient
from mpjax._src.nnx_policy import with_nnx_policy
from mpjax._src.policy import PRESETS
from mpjax._src.compiled_audit import CompiledAudit
from mpjax._src.compiled_audit import audit_compiled
from mpjax._src.compiled_audit import audit_for_target
from mpjax._src.compiled_audit import project as project_compiled
from mpjax._src.fused_attention import fused_dot_product_attention
from mpjax._src.gpu_target import FAITHFUL_ROUNDING
from mpjax._src.gpu_target import GpuCompileUnavailableError
from mpjax._src.gpu_target import GpuTarget
from mpjax._src.gpu_target import abstract_for_target
from mpjax._src.gpu_target import compile_for_target
from mpjax._src.gpu_target import gpu_target
from mpjax._src.gpu_target import target_devices
from mpjax._src.gpu_target import target_mesh
from mpjax._src.program_audit import ProgramAudit
from mpjax._src.program_audit import Residuals
from mpjax._src.program_audit import audit as audit_program
from mpjax._src.program_audit import residuals
from mpjax._src.policy import get_policy
from mpjax._src.policy import policy_name
from mpjax._src.policy import with_policy
from mpjax._src.sharding import ShardingPlan
from mpjax._src.sharding import data_parallel
from mpjax._src.sharding import fsdp
from mpjax._src.train_state import TrainState
from mpjax._src.train_step import make_train_step
from mpjax._src.loss_scaled import LossScaledState
from mpjax._src.loss_scaled import current_loss_scale
from mpjax._src.loss_scaled import finite_flags
from mpjax._src.loss_scaled import loss_scale_state
from mpjax._src.loss_scaled import loss_scaled
from mpjax._src.loss_scaled import scale_loss
from mpjax._src.loss_scaled import unscale_gradients

__version__ = "0.1.0"

__all__ = (
    "AdamWState",
    "CheckpointManager",
    "CompiledAudit",
    "CurrentScaling",
    "DelayedScaling",
    "Diagnosis",
    "DoctorThresholds",
    "DynamicScaling",
    "FAITHFUL_ROUNDING",
    "FiniteDecision",
    "moving_average",
    "ForwardReport",
    "GpuCompileUnavailableError",
    "GpuTarget",
    "GradStats",
    "LeafDiagnosis",
    "LossScaledState",
    "LossScaling",
    "MXScaling",
    "MetricsWriter",
    "NNXApply",
    "OVERWRITE_WITH_GRADIENT",
    "OverwriteWithGradient",
    "ModuleCall",
    "ModuleDiagnosis",
    "NoScaling",
    "NonFiniteTrainingError",
    "PRESETS",
    "PolicyMap",
    "PolicyRow",
    "Prescription",
    "ProgramAudit",
    "ProgressBar",
    "Residuals",
    "SGDState",
    "ScaleCollapseWarning",
    "ShardingPlan",
    "SkipGuard",
    "StaticScaling",
    "TensorStats",
    "TrainState",
    "abstract_for_target",
    "adam",
    "adamw",
    "audit_compiled",
    "audit_for_target",
    "audit_program",
    "compile_for_target",
    "current_loss_scale",
    "data_parallel",
    "debug_forward",
    "finite_flags",
    "fp8_dot_general",
    "fp8_einsum",
    "fsdp",
    "fused_dot_product_attention",
    "get_policy",
    "gpu_target",
    "grad_stats",
    "grad_stats_summary",
    "leaf_paths",
    "loss_scale_state",
    "loss_scaled",
    "make_train_step",
    "mxfp8_dot_general",
    "mxfp8_quantize",
    "nonfinite_leaf_paths",
    "numerics",
    "periodic_grad_stats",
    "policy_name",
    "policy_table",
    "precision_doctor",
    "project_compiled",
    "read_metrics",
    "record_from_metrics",
    "residuals",
    "restore",
    "saturating_cast",
    "save",
    "scale_loss",
    "sgd",
    "stochastic_round",
    "target_devices",
    "target_mesh",
    "unscale_gradients",
    "with_nnx_policy",
    "with_policy",
)
