"""attnlib: efficient attention primitives for JAX.

Every primitive is a pure function of arrays shaped like
``jax.nn.dot_product_attention``'s, ``[batch, *spatial, heads, head_dim]``,
jit-, vmap- and grad-compatible, with ``implementation=None | "xla" |
"mosaic_tpu" | "mosaic_gpu"`` and ``interpret=False`` keyword arguments.
"""

from attnlib.ops import feature_maps
from attnlib.ops.attention_scan import AttentionScanState
from attnlib.ops.attention_scan import attention_scan
from attnlib.ops.attention_scan import attention_scan_step
from attnlib.ops.linear_attention import linear_attention
from attnlib.ops.linear_attention import linear_attention_step
from attnlib.ops.neighborhood import neighborhood_attention
from attnlib.ops.sigmoid_attention import sigmoid_attention
from attnlib.ops.sliding_window import sliding_window_attention
from attnlib.ops.softmax import dot_product_attention

__version__ = "0.1.0"

__all__ = [
    "AttentionScanState",
    "attention_scan",
    "attention_scan_step",
    "dot_product_attention",
    "feature_maps",
    "linear_attention",
    "linear_attention_step",
    "neighborhood_attention",
    "sigmoid_attention",
    "sliding_window_attention",
]
