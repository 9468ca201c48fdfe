"""attnlib.decoding: caches for incremental decoding with attnlib.nn layers,
and generation (prefill, then a jitted token-by-token step)."""

from attnlib.decoding.cache import KVCache
from attnlib.decoding.cache import LinearCache
from attnlib.decoding.cache import ScanCache
from attnlib.decoding.cache import WindowCache
from attnlib.decoding.generation import generate
from attnlib.decoding.generation import sample_logits

__all__ = ["KVCache", "LinearCache", "ScanCache", "WindowCache", "generate",
           "sample_logits"]
