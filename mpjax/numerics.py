"""float32 islands for functional ops (`mpjax.numerics`).

Each function upcasts its floating inputs to float32, computes in float32 and
returns float32 (PyTorch autocast's float32-list behaviour); ``dtype=`` casts
the result. See `mpjax._src.numerics` for the contract.
"""

from mpjax._src.numerics import dot_product_attention
from mpjax._src.numerics import layer_norm
from mpjax._src.numerics import log_softmax
from mpjax._src.numerics import logsumexp
from mpjax._src.numerics import rms_norm
from mpjax._src.numerics import softmax
from mpjax._src.numerics import softmax_cross_entropy
from mpjax._src.numerics import softmax_cross_entropy_with_integer_labels

__all__ = (
    "dot_product_attention",
    "layer_norm",
    "log_softmax",
    "logsumexp",
    "rms_norm",
    "softmax",
    "softmax_cross_entropy",
    "softmax_cross_entropy_with_integer_labels",
)
