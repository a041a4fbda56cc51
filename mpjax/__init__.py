"""mpjax: mixed-precision training for JAX and Flax.

Precision policies (on `jmp.Policy`), loss scaling as an optax wrapper with
PyTorch's and Keras's semantics, and a jit-compiled Flax train step.
"""

from mpjax._src.loss_scale import DynamicScaling
from mpjax._src.loss_scale import LossScaling
from mpjax._src.loss_scale import NoScaling
from mpjax._src.loss_scale import StaticScaling
from mpjax._src.policy import PRESETS
from mpjax._src.policy import get_policy
from mpjax._src.policy import policy_name
from mpjax._src.sharding import ShardingPlan
from mpjax._src.sharding import data_parallel
from mpjax._src.sharding import fsdp
from mpjax._src.train_state import TrainState
from mpjax._src.train_step import make_train_step
from mpjax._src.train_step import with_policy
from mpjax._src.transform import LossScaledState
from mpjax._src.transform import all_finite_from_leaves
from mpjax._src.transform import current_loss_scale
from mpjax._src.transform import leaf_finiteness
from mpjax._src.transform import loss_scale_state
from mpjax._src.transform import loss_scaled
from mpjax._src.transform import scale_loss
from mpjax._src.transform import unscale_gradients

__version__ = "0.1.0"

__all__ = (
    "DynamicScaling",
    "LossScaledState",
    "LossScaling",
    "NoScaling",
    "PRESETS",
    "ShardingPlan",
    "StaticScaling",
    "TrainState",
    "all_finite_from_leaves",
    "current_loss_scale",
    "data_parallel",
    "fsdp",
    "get_policy",
    "leaf_finiteness",
    "loss_scale_state",
    "loss_scaled",
    "make_train_step",
    "policy_name",
    "scale_loss",
    "unscale_gradients",
    "with_policy",
)
