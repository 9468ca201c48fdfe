"""Flax NNX layers over the attnlib primitives."""

from attnlib.nn.attention import Attention
from attnlib.nn.attention import AttentionConfig
from attnlib.nn.attention import apply_rope
from attnlib.nn.attention import attention_fn
from attnlib.nn.neighborhood import NeighborhoodAttention
from attnlib.nn.neighborhood import neighborhood_attention_fn

__all__ = ["Attention", "AttentionConfig", "NeighborhoodAttention", "apply_rope",
           "attention_fn", "neighborhood_attention_fn"]
