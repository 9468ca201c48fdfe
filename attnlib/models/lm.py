"""A decoder-only Transformer language model over `attnlib.nn.Attention`.

* `LMConfig`: sizes, one `AttentionConfig` per layer (so hybrids are a
  config, not a new model), dtypes; validated at construction.
* Layer-pattern helpers returning the ``layers`` tuple:
  `layer_pattern` (cycle a pattern), `every_nth` ("every 4th layer softmax,
  the rest linear") and `based_layers` (BASED: Taylor linear attention
  alternating with small sliding windows).
* `TransformerLM`: token embedding -> pre-norm blocks [RMSNorm -> attention
  -> residual; RMSNorm -> SwiGLU MLP -> residual] -> final RMSNorm -> output
  head (tied to the embedding or not). ``__call__`` runs a whole sequence;
  ``init_cache`` / ``decode`` continue a sequence chunk by chunk (prefill, then
  one token per step; see `attnlib.decoding.generate`).

Example (8 layers, every 4th softmax, the others gated linear attention)::

  from attnlib.nn import AttentionConfig as A
  cfg = LMConfig(embed_dim=512, num_heads=8, mlp_dim=1536,
                 layers=every_nth(8, 4, A(kind="linear", decay="gate"),
                                  A(kind="softmax", rope=True)))
  model = TransformerLM(cfg, rngs=nnx.Rngs(0))
  logits = model(tokens)                 # [B, T, 256] float32

Parameters carry logical axis names ("vocab", "embed", "mlp" here, "heads",
"kv_heads", "head_dim" in the attention layers) as metadata, like
`attnlib.nn.Attention`'s: map them onto a mesh with ``nnx.logical_axis_rules``
and ``nnx.get_partition_spec``.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from attnlib.nn.attention import Attention
from attnlib.nn.attention import AttentionConfig
from attnlib.nn.attention import logical_init
from attnlib.ops import _checks

Array = jax.Array

# Logical axis names of the parameters defined here (the attention layers add
# "heads", "kv_heads", "head_dim").
VOCAB, EMBED, MLP = "vocab", "embed", "mlp"

DEFAULT_NUM_LAYERS = 2

_CFG = "LMConfig"


# ------------------------------------------------------------ layer patterns


def layer_pattern(num_layers: int,
                  pattern: AttentionConfig | tuple[AttentionConfig, ...]
                  ) -> tuple[AttentionConfig, ...]:
  """``num_layers`` layer configs cycling through ``pattern``.

  ``layer_pattern(6, (a, b))`` is ``(a, b, a, b, a, b)``; a single config
  repeats (a uniform stack).

  Raises:
    ValueError: num_layers not an int >= 1, or pattern not an
      AttentionConfig or a non-empty tuple of them.
  """
  op = "attnlib.models.layer_pattern"
  _checks.check_positive_int(op, "num_layers", num_layers)
  if isinstance(pattern, AttentionConfig):
    pattern = (pattern,)
  if (not isinstance(pattern, (tuple, list)) or not pattern
      or not all(isinstance(c, AttentionConfig) for c in pattern)):
    _checks.fail(op, "pattern", pattern,
                 "an AttentionConfig or a non-empty tuple of them")
  return tuple(pattern[i % len(pattern)] for i in range(num_layers))


def every_nth(num_layers: int, n: int, base: AttentionConfig,
              every: AttentionConfig) -> tuple[AttentionConfig, ...]:
  """Layers ``n - 1, 2n - 1, ...`` (every n-th, counting from 1) use
  ``every``, the others ``base``.

  ``every_nth(8, 4, linear, softmax)`` is 3 linear layers, 1 softmax, 3
  linear, 1 softmax.

  Raises:
    ValueError: num_layers or n not an int >= 1, or base / every not an
      AttentionConfig.
  """
  op = "attnlib.models.every_nth"
  _checks.check_positive_int(op, "num_layers", num_layers)
  _checks.check_positive_int(op, "n", n)
  for name, cfg in (("base", base), ("every", every)):
    if not isinstance(cfg, AttentionConfig):
      _checks.fail(op, name, cfg, "an AttentionConfig")
  return layer_pattern(num_layers, (base,) * (n - 1) + (every,))


def based_layers(num_layers: int, *, window: int = 64,
                 linear_first: bool = True) -> tuple[AttentionConfig, ...]:
  """BASED (Arora et al., 2024): causal linear attention with the 2nd-order
  Taylor feature map (global, no decay) alternating with causal
  sliding-window softmax attention of left reach ``window`` (with RoPE).

  BASED's linear layers use a small feature dimension: pick a small
  ``head_dim`` (the Taylor map has 1 + D + D^2 features per head).

  Raises:
    ValueError: num_layers not an int >= 1, window not an int >= 0 or
      linear_first not a bool.
  """
  op = "attnlib.models.based_layers"
  _checks.check_positive_int(op, "num_layers", num_layers)
  if not _checks.is_int(window) or window < 0:
    _checks.fail(op, "window", window, "an int >= 0")
  if not isinstance(linear_first, bool):
    _checks.fail(op, "linear_first", linear_first, "a bool")
  linear = AttentionConfig(kind="linear", feature_map="taylor")
  local = AttentionConfig(kind="sliding_window", window=window, rope=True)
  pair = (linear, local) if linear_first else (local, linear)
  return layer_pattern(num_layers, pair)


def _resolve_layers(op: str, num_layers: Any, layers: Any, default: Any
                    ) -> tuple[int, tuple[AttentionConfig, ...]]:
  """(num_layers, layers tuple) from the config fields (see LMConfig)."""
  if num_layers is not None:
    _checks.check_positive_int(op, "num_layers", num_layers)
  if layers is None:
    layers = default
  if isinstance(layers, AttentionConfig):
    n = DEFAULT_NUM_LAYERS if num_layers is None else num_layers
    layers = (layers,) * n
  if isinstance(layers, list):
    layers = tuple(layers)
  if (not isinstance(layers, tuple) or not layers
      or not all(isinstance(c, AttentionConfig) for c in layers)):
    _checks.fail(op, "layers", layers,
                 "None, an AttentionConfig or a non-empty tuple of them")
  if num_layers is not None and len(layers) != num_layers:
    _checks.fail(op, "layers", f"<{len(layers)} configs>",
                 f"num_layers={num_layers} configs (one per layer)")
  for i, cfg in enumerate(layers):
    if not cfg.is_causal:
      _checks.fail(op, f"layers[{i}].is_causal", cfg.is_causal,
                   "True (a causal stack: outputs at t see inputs <= t only)")
  return len(layers), layers


def _check_dtype(op: str, name: str, value: Any) -> None:
  try:
    ok = jnp.issubdtype(jnp.dtype(value), jnp.floating)
  except TypeError:
    ok = False
  if not ok:
    _checks.fail(op, name, value, "a floating dtype")


def _resolve_sizes(obj: Any, op: str) -> None:
  """Checks and fills embed_dim, num_heads, num_kv_heads, head_dim, mlp_dim,
  dtype, param_dtype, norm_eps of a frozen config (shared by LMConfig and
  attnlib.models.aaren.AarenConfig)."""
  set_ = lambda name, value: object.__setattr__(obj, name, value)  # noqa: E731
  for name in ("embed_dim", "num_heads"):
    _checks.check_positive_int(op, name, getattr(obj, name))
  if obj.num_kv_heads is None:
    set_("num_kv_heads", obj.num_heads)
  _checks.check_positive_int(op, "num_kv_heads", obj.num_kv_heads)
  if obj.num_heads % obj.num_kv_heads:
    _checks.fail(op, "num_kv_heads", obj.num_kv_heads,
                 f"a divisor of num_heads={obj.num_heads}")
  if obj.head_dim is None:
    if obj.embed_dim % obj.num_heads:
      _checks.fail(op, "head_dim", None,
                   f"an int (embed_dim={obj.embed_dim} is not a multiple of "
                   f"num_heads={obj.num_heads})")
    set_("head_dim", obj.embed_dim // obj.num_heads)
  _checks.check_positive_int(op, "head_dim", obj.head_dim)
  if obj.mlp_dim is None:
    set_("mlp_dim", 4 * obj.embed_dim)
  _checks.check_positive_int(op, "mlp_dim", obj.mlp_dim)
  _check_dtype(op, "dtype", obj.dtype)
  _check_dtype(op, "param_dtype", obj.param_dtype)
  if (not _checks.is_real(obj.norm_eps) or not math.isfinite(obj.norm_eps)
      or obj.norm_eps <= 0):
    _checks.fail(op, "norm_eps", obj.norm_eps, "a finite number > 0")


@dataclasses.dataclass(frozen=True)
class LMConfig:
  """A `TransformerLM`'s sizes and per-layer attention.

  Attributes:
    vocab_size: tokens are ints in [0, vocab_size); 256 (bytes) by default.
    embed_dim: the model width E.
    num_layers: the number of blocks; None means len(layers) when layers is
      a tuple, else DEFAULT_NUM_LAYERS (2).
    num_heads: query heads H per layer.
    num_kv_heads: key/value heads (GQA / MQA); None means num_heads.
    head_dim: D per head; None means embed_dim // num_heads.
    mlp_dim: the SwiGLU hidden width; None means 4 * embed_dim.
    layers: one causal `AttentionConfig` per layer (a tuple of num_layers;
      build patterns with `layer_pattern`, `every_nth`, `based_layers`), or
      one config for every layer; None means causal softmax with RoPE.
      After construction this is always a tuple of num_layers configs.
    max_len: the default capacity of `TransformerLM.init_cache` (the forward
      pass takes any length).
    dtype: the compute dtype (logits are float32 regardless).
    param_dtype: the parameter dtype.
    tie_embeddings: the output head is the transposed token embedding
      (scaled by embed_dim ** -0.5) instead of its own [E, vocab] matrix.
    norm_eps: RMSNorm epsilon, > 0.
    layer_scale: None, or LayerScale (CaiT): each block's attention and MLP
      branch is multiplied by a learned per-channel vector [E] initialised to
      this value (FlashSigmoid's stabiliser for sigmoid attention; e.g. 1e-4).
    hybrid_norm: an RMSNorm on the attention branch's output before the
      residual add, x + norm(attn(norm(x))) (FlashSigmoid's hybrid-norm).

  Raises:
    ValueError: (at construction) a field with a bad value (non-positive
      sizes, num_kv_heads not dividing num_heads, layers of the wrong length
      or with a non-causal config, a non-floating dtype ...); the message
      names the field, its value and what was expected.
  """

  vocab_size: int = 256
  embed_dim: int = 64
  num_layers: int | None = None
  num_heads: int = 4
  num_kv_heads: int | None = None
  head_dim: int | None = None
  mlp_dim: int | None = None
  layers: AttentionConfig | tuple[AttentionConfig, ...] | None = None
  max_len: int = 1024
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  tie_embeddings: bool = True
  norm_eps: float = 1e-6
  layer_scale: float | None = None
  hybrid_norm: bool = False

  def __post_init__(self):
    _checks.check_positive_int(_CFG, "vocab_size", self.vocab_size)
    if self.layer_scale is not None and (
        not _checks.is_real(self.layer_scale) or not math.isfinite(self.layer_scale)
        or self.layer_scale <= 0):
      _checks.fail(_CFG, "layer_scale", self.layer_scale,
                   "None or a finite number > 0")
    if not isinstance(self.hybrid_norm, bool):
      _checks.fail(_CFG, "hybrid_norm", self.hybrid_norm, "a bool")
    _checks.check_positive_int(_CFG, "max_len", self.max_len)
    if not isinstance(self.tie_embeddings, bool):
      _checks.fail(_CFG, "tie_embeddings", self.tie_embeddings, "a bool")
    _resolve_sizes(self, _CFG)
    n, layers = _resolve_layers(_CFG, self.num_layers, self.layers,
                                AttentionConfig(kind="softmax", rope=True))
    object.__setattr__(self, "num_layers", n)
    object.__setattr__(self, "layers", layers)
    for i, cfg in enumerate(layers):
      if cfg.rope and self.head_dim % 2:
        _checks.fail(_CFG, "head_dim", self.head_dim,
                     f"an even number (layers[{i}] has rope=True)")


# -------------------------------------------------------------------- blocks


class SwiGLU(nnx.Module):
  """SwiGLU: down(silu(x W_gate) * (x W_up)).

  Parameters: gate.kernel, up.kernel [E, mlp] ("embed", "mlp"); down.kernel
  [mlp, E] ("mlp", "embed"). No biases.
  """

  def __init__(self, embed_dim: int, mlp_dim: int, *, rngs: nnx.Rngs,
               dtype: Any = jnp.float32, param_dtype: Any = jnp.float32):
    init = nnx.initializers.lecun_normal()
    common = dict(use_bias=False, dtype=dtype, param_dtype=param_dtype,
                  rngs=rngs)
    self.gate = nnx.Linear(embed_dim, mlp_dim,
                           kernel_init=logical_init(init, (EMBED, MLP)),
                           **common)
    self.up = nnx.Linear(embed_dim, mlp_dim,
                         kernel_init=logical_init(init, (EMBED, MLP)),
                         **common)
    self.down = nnx.Linear(mlp_dim, embed_dim,
                           kernel_init=logical_init(init, (MLP, EMBED)),
                           **common)

  def __call__(self, x: Array) -> Array:
    return self.down(jax.nn.silu(self.gate(x)) * self.up(x))


def _rms_norm(dim: int, eps: float, rngs: nnx.Rngs, dtype: Any,
              param_dtype: Any) -> nnx.RMSNorm:
  return nnx.RMSNorm(dim, epsilon=eps, dtype=dtype, param_dtype=param_dtype,
                     scale_init=logical_init(nnx.initializers.ones, (EMBED,)),
                     rngs=rngs)


class Block(nnx.Module):
  """Pre-norm block: x + attn(norm(x)), then h + mlp(norm(h)).

  Options: ``layer_scale`` multiplies each branch by a learned [E] vector
  ("embed",) initialised to that value (attn_scale, mlp_scale);
  ``hybrid_norm`` adds an RMSNorm (attn_out_norm) on the attention branch:
  x + scale * norm(attn(norm(x))).

  ``decode`` is the same map on a chunk that continues the sequence the
  layer's cache summarises (the MLP and norms act per position).
  """

  def __init__(self, embed_dim: int, num_heads: int, num_kv_heads: int,
               head_dim: int, mlp_dim: int, attention: AttentionConfig, *,
               norm_eps: float, rngs: nnx.Rngs, dtype: Any = jnp.float32,
               param_dtype: Any = jnp.float32, layer_scale: float | None = None,
               hybrid_norm: bool = False):
    dt = dict(dtype=dtype, param_dtype=param_dtype)
    self.attn_norm = _rms_norm(embed_dim, norm_eps, rngs, **dt)
    self.attn = Attention(embed_dim, num_heads, num_kv_heads, head_dim,
                          attention, rngs=rngs, **dt)
    self.mlp_norm = _rms_norm(embed_dim, norm_eps, rngs, **dt)
    self.mlp = SwiGLU(embed_dim, mlp_dim, rngs=rngs, **dt)
    self.attn_out_norm = (_rms_norm(embed_dim, norm_eps, rngs, **dt)
                          if hybrid_norm else nnx.data(None))
    self.attn_scale = self.mlp_scale = nnx.data(None)
    if layer_scale is not None:
      init = logical_init(nnx.initializers.constant(layer_scale), (EMBED,))
      self.attn_scale = nnx.Param(init(rngs.params(), (embed_dim,), param_dtype))
      self.mlp_scale = nnx.Param(init(rngs.params(), (embed_dim,), param_dtype))

  def _attn_branch(self, y: Array) -> Array:
    if self.attn_out_norm is not None:
      y = self.attn_out_norm(y)
    return y if self.attn_scale is None else y * self.attn_scale[...]

  def _mlp_branch(self, x: Array) -> Array:
    y = self.mlp(self.mlp_norm(x))
    return y if self.mlp_scale is None else y * self.mlp_scale[...]

  def __call__(self, x: Array) -> Array:
    x = x + self._attn_branch(self.attn(self.attn_norm(x)))
    return x + self._mlp_branch(x)

  def decode(self, x: Array, cache: Any) -> tuple[Array, Any]:
    y, cache = self.attn.decode(self.attn_norm(x), cache)
    x = x + self._attn_branch(y)
    return x + self._mlp_branch(x), cache


def _blocks(cfg: Any, rngs: nnx.Rngs) -> nnx.List:
  return nnx.List([
      Block(cfg.embed_dim, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim,
            cfg.mlp_dim, layer, norm_eps=cfg.norm_eps, rngs=rngs,
            dtype=cfg.dtype, param_dtype=cfg.param_dtype,
            layer_scale=getattr(cfg, "layer_scale", None),
            hybrid_norm=getattr(cfg, "hybrid_norm", False))
      for layer in cfg.layers])


def _check_cache(op: str, cache: Any, num_layers: int) -> None:
  if not isinstance(cache, tuple) or len(cache) != num_layers:
    _checks.fail(op, "cache", type(cache).__name__,
                 f"a tuple of {num_layers} layer caches (from init_cache)")


def _check_cache_len(op: str, max_len: Any, default: int) -> int:
  max_len = default if max_len is None else max_len
  _checks.check_positive_int(op, "max_len", max_len)
  return max_len


# ------------------------------------------------------------------------ LM


class TransformerLM(nnx.Module):
  """Decoder-only language model (see the module docstring).

  Parameters (besides the blocks' attention and MLP parameters):
    embed.embedding [vocab, E] ("vocab", "embed"), init normal(1);
    blocks[i].attn_norm.scale, blocks[i].mlp_norm.scale, norm.scale [E]
      ("embed",);
    head.kernel [E, vocab] ("embed", "vocab") when not tie_embeddings.
  """

  def __init__(self, config: LMConfig, *, rngs: nnx.Rngs):
    if not isinstance(config, LMConfig):
      _checks.fail("attnlib.models.TransformerLM", "config",
                   type(config).__name__, "an LMConfig")
    self.config = config
    c = config
    dt = dict(dtype=c.dtype, param_dtype=c.param_dtype)
    self.embed = nnx.Embed(
        c.vocab_size, c.embed_dim, rngs=rngs,
        embedding_init=logical_init(nnx.initializers.normal(1.0),
                                    (VOCAB, EMBED)), **dt)
    self.blocks = _blocks(c, rngs)
    self.norm = _rms_norm(c.embed_dim, c.norm_eps, rngs, **dt)
    self.head = nnx.data(None)
    if not c.tie_embeddings:
      self.head = nnx.Linear(
          c.embed_dim, c.vocab_size, use_bias=False, rngs=rngs,
          kernel_init=logical_init(nnx.initializers.lecun_normal(),
                                   (EMBED, VOCAB)), **dt)

  def _check_tokens(self, op: str, tokens: Any) -> None:
    if (not hasattr(tokens, "shape") or not hasattr(tokens, "dtype")
        or tokens.ndim != 2 or tokens.shape[1] < 1):
      _checks.fail(op, "tokens.shape", _checks.shape_of(tokens),
                   "[B, T] with T >= 1")
    if not jnp.issubdtype(tokens.dtype, jnp.integer):
      _checks.fail(op, "tokens.dtype", str(tokens.dtype), "an integer dtype")
    if _checks.is_concrete(tokens) and tokens.size:
      lo, hi = int(jnp.min(tokens)), int(jnp.max(tokens))
      if lo < 0 or hi >= self.config.vocab_size:
        _checks.fail(op, "tokens", f"<values in [{lo}, {hi}]>",
                     f"values in [0, {self.config.vocab_size})")

  def _logits(self, x: Array) -> Array:
    x = self.norm(x)
    if self.head is None:
      logits = self.embed.attend(x) * (self.config.embed_dim ** -0.5)
    else:
      logits = self.head(x)
    return logits.astype(jnp.float32)

  def __call__(self, tokens: Array) -> Array:
    """tokens [B, T] int in [0, vocab) -> logits [B, T, vocab] float32.

    Causal: logits[:, t] depend on tokens[:, :t + 1] only (every layer
    config is causal).

    Raises:
      ValueError: tokens not a [B, T] integer array (T >= 1), or, when
        concrete, with values outside [0, vocab_size).
    """
    self._check_tokens("attnlib.models.TransformerLM", tokens)
    x = self.embed(tokens)
    for block in self.blocks:
      x = block(x)
    return self._logits(x)

  def init_cache(self, batch: int, max_len: int | None = None
                 ) -> tuple[Any, ...]:
    """The empty decoding cache: a tuple of each layer's cache
    (`Attention.init_cache(batch, max_len, dtype=config.dtype)`).

    ``max_len`` (default config.max_len) bounds the total number of tokens
    ``decode`` may consume for the layers that keep every key (softmax,
    sigmoid); the linear, sliding-window and aaren caches do not grow with
    it.

    Raises:
      ValueError: batch or max_len not an int >= 1, or a layer that cannot
        decode (e.g. sigmoid without a fixed bias; see Attention.init_cache).
    """
    op = "attnlib.models.TransformerLM.init_cache"
    _checks.check_positive_int(op, "batch", batch)
    max_len = _check_cache_len(op, max_len, self.config.max_len)
    return tuple(block.attn.init_cache(batch, max_len, dtype=self.config.dtype)
                 for block in self.blocks)

  def decode(self, tokens: Array, cache: tuple[Any, ...]
             ) -> tuple[Array, tuple[Any, ...]]:
    """Continues the sequence ``cache`` summarises by tokens [B, T] (T >= 1).

    Returns (logits [B, T, vocab] float32, the new cache). A prefill is a
    decode of the prompt on ``init_cache``'s empty cache, a generation step a
    decode of one token; any chunking of a sequence gives the logits of
    ``__call__`` on the whole sequence.

    Raises:
      ValueError: bad tokens (as __call__) or a cache that is not a tuple of
        one cache per layer.
    """
    op = "attnlib.models.TransformerLM.decode"
    self._check_tokens(op, tokens)
    _check_cache(op, cache, len(self.blocks))
    x = self.embed(tokens)
    new = []
    for block, layer_cache in zip(self.blocks, cache):
      x, layer_cache = block.decode(x, layer_cache)
      new.append(layer_cache)
    return self._logits(x), tuple(new)


__all__ = ["LMConfig", "TransformerLM", "SwiGLU", "Block", "layer_pattern",
           "every_nth", "based_layers"]
