"""Flax NNX layers over the attnlib primitives."""

from attnlib.nn.attention import Attention
from attnlib.nn.attention import AttentionConfig
from attnlib.nn.attention import apply_rope
from attnlib.nn.attention import attention_fn

__all__ = ["Attention", "AttentionConfig", "apply_rope", "attention_fn"]
