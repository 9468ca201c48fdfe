"""A NAT-style 2-D backbone and image classifier (Flax NNX).

Neighborhood Attention Transformer (Hassani et al., "Neighborhood Attention
Transformer", CVPR 2023), with DiNAT's per-block dilations (Hassani & Shi,
"Dilated Neighborhood Attention Transformer", 2022) as an option::

  images [B, H, W, C]
   -> stem: log2(patch_size) overlapping 3x3 stride-2 convs, LayerNorm
   -> stage 0: depths[0] blocks at embed_dims[0] features
   -> conv 3x3 stride 2 + LayerNorm (to embed_dims[1]) -> stage 1 -> ...
   -> LayerNorm -> global average pool -> linear -> logits [B, num_classes]

  block(x) = x + NA(LN(x));  x + MLP(LN(x)),  MLP = Linear, GELU, Linear

NA is `attnlib.nn.NeighborhoodAttention` with ``kernel_size`` and the
block's dilation (head_dim = embed_dims[i] // num_heads[i]). Differences
from the paper's models: no relative position bias (the op takes no logit
bias), no biases in the attention projections, no stochastic depth or layer
scale. Every spatial axis of stage i must hold at least ``kernel_size *
dilation`` tokens (the op raises a ValueError otherwise): stage i has
``ceil(H / (patch_size * 2**i))`` rows (likewise columns).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from attnlib.nn.attention import logical_init
from attnlib.nn.neighborhood import NeighborhoodAttention
from attnlib.ops import _checks

Array = jax.Array

_CFG = "NATConfig"


def _is_int(x: Any, minimum: int = 1) -> bool:
  return isinstance(x, int) and not isinstance(x, bool) and x >= minimum


@dataclasses.dataclass(frozen=True)
class NATConfig:
  """A NAT model's hyper-parameters (validated; sequences stored as tuples).

  Attributes:
    in_channels: C of the input images.
    patch_size: the stem's downsampling, a power of 2 >= 2 (log2 of it 3x3
      stride-2 convs; NAT uses 4).
    embed_dims: features per stage.
    depths: blocks per stage (>= 1 each), one per stage.
    num_heads: heads per stage, each dividing that stage's embed dim.
    kernel_size: the neighborhood window, an int >= 2 (NAT uses 7).
    dilations: None (all 1: NAT) or one entry per stage: an int >= 1 for
      every block of the stage, or a tuple of one int per block (DiNAT
      alternates 1 and a larger dilation, e.g. (1, 8, 1, 8)).
    mlp_ratio: MLP hidden features / embed dim, > 0.
    num_classes: classifier outputs.
    dtype: the computation dtype; logits are float32 regardless.
    param_dtype: the parameters' dtype.
  """

  in_channels: int = 3
  patch_size: int = 4
  embed_dims: tuple[int, ...] = (64, 128, 256, 512)
  depths: tuple[int, ...] = (3, 4, 18, 5)
  num_heads: tuple[int, ...] = (2, 4, 8, 16)
  kernel_size: int = 7
  dilations: tuple[int | tuple[int, ...], ...] | None = None
  mlp_ratio: float = 3.0
  num_classes: int = 1000
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  def __post_init__(self):
    fail = lambda name, expected: _checks.fail(  # noqa: E731
        _CFG, name, getattr(self, name), expected)
    for name in ("embed_dims", "depths", "num_heads", "dilations"):
      value = getattr(self, name)
      if isinstance(value, list):
        object.__setattr__(self, name, tuple(
            tuple(v) if isinstance(v, list) else v for v in value))
    for name in ("in_channels", "num_classes"):
      if not _is_int(getattr(self, name)):
        fail(name, "an int >= 1")
    p = self.patch_size
    if not _is_int(p, 2) or p & (p - 1):
      fail("patch_size", "a power of 2 >= 2")
    stages = self.embed_dims
    if (not isinstance(stages, tuple) or not stages
        or not all(_is_int(e) for e in stages)):
      fail("embed_dims", "a non-empty tuple of ints >= 1")
    n = len(stages)
    for name in ("depths", "num_heads"):
      value = getattr(self, name)
      if (not isinstance(value, tuple) or len(value) != n
          or not all(_is_int(x) for x in value)):
        fail(name, f"a tuple of {n} ints >= 1 (one per stage)")
    if any(e % h for e, h in zip(stages, self.num_heads)):
      fail("num_heads", f"divisors of embed_dims={stages}")
    if not _is_int(self.kernel_size, 2):
      fail("kernel_size", "an int >= 2")
    if self.dilations is not None:
      ok = isinstance(self.dilations, tuple) and len(self.dilations) == n
      for d, depth in zip(self.dilations if ok else (), self.depths):
        ok = ok and (_is_int(d) or (
            isinstance(d, tuple) and len(d) == depth
            and all(_is_int(x) for x in d)))
      if not ok:
        fail("dilations", f"None or a tuple of {n} entries (one per stage), "
             "each an int >= 1 or a tuple of one int >= 1 per block")
    r = self.mlp_ratio
    if (isinstance(r, bool) or not isinstance(r, (int, float))
        or not math.isfinite(r) or r <= 0 or int(min(stages) * r) < 1):
      fail("mlp_ratio", "a finite number > 0 (at least one hidden feature)")
    for name in ("dtype", "param_dtype"):
      try:
        floating = jnp.issubdtype(jnp.dtype(getattr(self, name)), jnp.floating)
      except TypeError:
        floating = False
      if not floating:
        fail(name, "a floating dtype")

  def block_dilations(self, stage: int) -> tuple[int, ...]:
    """The dilation of each block of a stage."""
    d = 1 if self.dilations is None else self.dilations[stage]
    return d if isinstance(d, tuple) else (d,) * self.depths[stage]


class _Block(nnx.Module):
  """x + NA(LN(x)), then x + MLP(LN(x)) on [B, h, w, E]."""

  def __init__(self, cfg: NATConfig, dim: int, heads: int, dilation: int, *,
               rngs: nnx.Rngs):
    kw = dict(dtype=cfg.dtype, param_dtype=cfg.param_dtype, rngs=rngs)
    self.norm1 = _norm(dim, kw)
    self.attn = NeighborhoodAttention(dim, heads, dim // heads,
                                      kernel_size=cfg.kernel_size,
                                      dilation=dilation, **kw)
    self.norm2 = _norm(dim, kw)
    hidden = int(dim * cfg.mlp_ratio)
    self.fc1 = _linear(dim, hidden, ("embed", "mlp"), kw)
    self.fc2 = _linear(hidden, dim, ("mlp", "embed"), kw)

  def __call__(self, x: Array) -> Array:
    x = x + self.attn(self.norm1(x))
    return x + self.fc2(jax.nn.gelu(self.fc1(self.norm2(x)), approximate=False))


def _norm(dim, kw):
  init = nnx.initializers
  return nnx.LayerNorm(dim, epsilon=1e-5,
                       scale_init=logical_init(init.ones, ("embed",)),
                       bias_init=logical_init(init.zeros, ("embed",)), **kw)


def _linear(d_in, d_out, names, kw):
  return nnx.Linear(
      d_in, d_out,
      kernel_init=logical_init(nnx.initializers.lecun_normal(), names),
      bias_init=logical_init(nnx.initializers.zeros, names[1:]), **kw)


def _conv(d_in, d_out, kw, use_bias=True):
  """3x3, stride 2, padding 1 (PyTorch's), as in NAT's tokenizer/downsampler."""
  return nnx.Conv(
      d_in, d_out, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)),
      use_bias=use_bias,
      kernel_init=logical_init(nnx.initializers.lecun_normal(),
                               (None, None, None, "embed")),
      bias_init=logical_init(nnx.initializers.zeros, ("embed",)), **kw)


class NAT(nnx.Module):
  """NAT image classifier; see the module docstring for the architecture.

  Parameter logical axes: attention as `NeighborhoodAttention`; MLP kernels
  ("embed", "mlp") / ("mlp", "embed"); conv kernels (None, None, None,
  "embed"); LayerNorm scale and bias ("embed",); the classifier ("embed",
  None).
  """

  def __init__(self, config: NATConfig, *, rngs: nnx.Rngs):
    if not isinstance(config, NATConfig):
      _checks.fail("attnlib.models.NAT", "config", type(config).__name__,
                   "a NATConfig")
    self.config = cfg = config
    kw = dict(dtype=cfg.dtype, param_dtype=cfg.param_dtype, rngs=rngs)
    dims = cfg.embed_dims
    num_convs = int(math.log2(cfg.patch_size))
    widths = [cfg.in_channels] + [max(dims[0] // 2, 1)] * (num_convs - 1) + [
        dims[0]]
    self.stem = nnx.List([_conv(a, b, kw) for a, b in zip(widths, widths[1:])])
    self.stem_norm = _norm(dims[0], kw)
    self.stages = nnx.List([
        nnx.List([_Block(cfg, dims[i], cfg.num_heads[i], d, rngs=rngs)
                  for d in cfg.block_dilations(i)])
        for i in range(len(dims))])
    self.downsample = nnx.List([_conv(dims[i], dims[i + 1], kw, use_bias=False)
                                for i in range(len(dims) - 1)])
    self.down_norms = nnx.List([_norm(d, kw) for d in dims[1:]])
    self.norm = _norm(dims[-1], kw)
    self.head = nnx.Linear(
        dims[-1], cfg.num_classes,
        kernel_init=logical_init(nnx.initializers.lecun_normal(),
                                 ("embed", None)),
        bias_init=logical_init(nnx.initializers.zeros, (None,)), **kw)

  def features(self, images: Array) -> Array:
    """images [B, H, W, C] -> the last stage's map [B, h, w, embed_dims[-1]].

    ``h = ceil(H / (patch_size * 2**(num_stages - 1)))`` (likewise w), after
    the final LayerNorm, in the computation dtype.
    """
    cfg = self.config
    if (not hasattr(images, "shape") or images.ndim != 4
        or images.shape[-1] != cfg.in_channels):
      _checks.fail("attnlib.models.NAT", "images.shape",
                   _checks.shape_of(images), f"[B, H, W, {cfg.in_channels}]")
    x = images
    for conv in self.stem:
      x = conv(x)
    x = self.stem_norm(x)
    for i, blocks in enumerate(self.stages):
      if i > 0:
        x = self.down_norms[i - 1](self.downsample[i - 1](x))
      for block in blocks:
        x = block(x)
    return self.norm(x)

  def __call__(self, images: Array) -> Array:
    """images [B, H, W, C] -> logits [B, num_classes] float32."""
    pooled = jnp.mean(self.features(images).astype(jnp.float32), axis=(1, 2))
    return self.head(pooled.astype(self.config.dtype)).astype(jnp.float32)
