"""attnlib.models: a decoder-only LM with a per-layer attention kind, a
neighborhood-attention vision backbone (NAT) and an Aaren sequence stack."""

from attnlib.models.aaren import AarenConfig
from attnlib.models.aaren import AarenModel
from attnlib.models.lm import LMConfig
from attnlib.models.lm import TransformerLM
from attnlib.models.lm import based_layers
from attnlib.models.lm import every_nth
from attnlib.models.lm import layer_pattern
from attnlib.models.vision import NAT
from attnlib.models.vision import NATConfig

__all__ = ["AarenConfig", "AarenModel", "LMConfig", "NAT", "NATConfig",
           "TransformerLM", "based_layers", "every_nth", "layer_pattern"]
