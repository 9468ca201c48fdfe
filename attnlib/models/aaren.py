"""Aaren stacks for real-valued sequences (Feng et al., 2024, "Attention as
an RNN").

An Aaren layer is softmax attention of a *learned* query per head over every
prefix of the keys (`attnlib.attention_scan`): its output at step t
summarises x_1..x_t, and can be updated in O(1) time and memory per new token
(the prefix-softmax state (m, u, w) of each head), like an RNN; a whole
sequence is computed in parallel by a prefix scan.

* `AarenConfig`: sizes, the per-layer attention (``AttentionConfig(kind=
  "aaren")`` by default; pass ``kind="softmax"`` for a causal Transformer
  baseline of the same shape and parameter count up to the learned queries),
  the head ("classification" or "forecasting"); validated.
* `AarenModel`: input projection [B, T, F] -> [B, T, E] -> pre-norm blocks
  (as `attnlib.models.lm.Block`: RMSNorm -> attention -> residual; RMSNorm ->
  SwiGLU -> residual) -> final RMSNorm -> the head:

  - "classification": logits [B, num_classes] from the last step's
    representation. In the RNN view the output at the last step summarises
    the whole sequence (it is a function of the whole prefix, and with
    Aaren layers it is computed from a constant-size state), so it is what
    a classifier reads; ``decode`` gives the logits after every step
    [B, T, num_classes] (the prediction for every prefix).
  - "forecasting": a prediction [B, T, F_out] at every step; out[:, t] is
    the forecast of the next values (step t + 1) from steps <= t (causal),
    so train it against x[:, 1:] (or any target series aligned that way).

* ``init_cache`` / ``decode``: streaming; an Aaren layer's cache is its scan
  state, [B, H] + [B, H] + [B, H, D] floats whatever the stream's length.

Example::

  cfg = AarenConfig(input_dim=3, embed_dim=64, num_heads=4, num_layers=4,
                    head="forecasting")
  model = AarenModel(cfg, rngs=nnx.Rngs(0))
  pred = model(x)                                    # [B, T, 3]
  baseline = AarenModel(dataclasses.replace(
      cfg, layers=AttentionConfig(kind="softmax", rope=True)), rngs=...)
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from attnlib.models.lm import EMBED
from attnlib.models.lm import _blocks
from attnlib.models.lm import _check_cache
from attnlib.models.lm import _check_cache_len
from attnlib.nn.attention import logical_init
from attnlib.models.lm import _resolve_layers
from attnlib.models.lm import _resolve_sizes
from attnlib.models.lm import _rms_norm
from attnlib.nn.attention import AttentionConfig
from attnlib.ops import _checks

Array = jax.Array

HEADS = ("classification", "forecasting")

_CFG = "AarenConfig"


@dataclasses.dataclass(frozen=True)
class AarenConfig:
  """An `AarenModel`'s sizes, attention and head.

  Attributes:
    input_dim: F, the number of real-valued input features per step.
    embed_dim: the model width E.
    num_layers: the number of blocks; None means len(layers) when layers is
      a tuple, else 2.
    num_heads: query heads H per layer.
    num_kv_heads: key/value heads; None means num_heads.
    head_dim: D per head; None means embed_dim // num_heads.
    mlp_dim: the SwiGLU hidden width; None means 4 * embed_dim.
    layers: the attention of every layer (one causal AttentionConfig) or a
      tuple of one per layer; None means ``AttentionConfig(kind="aaren")``.
      ``AttentionConfig(kind="softmax")`` (with or without rope) gives the
      causal Transformer of the same size to compare against.
    head: "classification" or "forecasting".
    num_classes: classification only (required): the number of classes.
    output_dim: forecasting only: F_out; None means input_dim.
    max_len: the default capacity of ``init_cache`` (matters for softmax /
      sigmoid baselines only; Aaren caches do not grow).
    dtype, param_dtype: compute and parameter dtypes (outputs are float32).
    norm_eps: RMSNorm epsilon.

  Raises:
    ValueError: (at construction) a field with a bad value, a non-causal
      layer, num_classes missing for classification or set for forecasting,
      output_dim set for classification.
  """

  input_dim: int = 1
  embed_dim: int = 64
  num_layers: int | None = None
  num_heads: int = 4
  num_kv_heads: int | None = None
  head_dim: int | None = None
  mlp_dim: int | None = None
  layers: AttentionConfig | tuple[AttentionConfig, ...] | None = None
  head: str = "forecasting"
  num_classes: int | None = None
  output_dim: int | None = None
  max_len: int = 1024
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  norm_eps: float = 1e-6

  def __post_init__(self):
    _checks.check_positive_int(_CFG, "input_dim", self.input_dim)
    _checks.check_positive_int(_CFG, "max_len", self.max_len)
    if self.head not in HEADS:
      _checks.fail(_CFG, "head", self.head, f"one of {HEADS}")
    if self.head == "classification":
      _checks.check_positive_int(_CFG, "num_classes", self.num_classes)
      if self.output_dim is not None:
        _checks.fail(_CFG, "output_dim", self.output_dim,
                     "None with head='classification' (use num_classes)")
    else:
      if self.num_classes is not None:
        _checks.fail(_CFG, "num_classes", self.num_classes,
                     "None with head='forecasting'")
      if self.output_dim is None:
        object.__setattr__(self, "output_dim", self.input_dim)
      _checks.check_positive_int(_CFG, "output_dim", self.output_dim)
    _resolve_sizes(self, _CFG)
    # The aaren default is built only when used.
    layers = AttentionConfig(kind="aaren") if self.layers is None else (
        self.layers)
    n, layers = _resolve_layers(_CFG, self.num_layers, layers, None)
    object.__setattr__(self, "num_layers", n)
    object.__setattr__(self, "layers", layers)
    for i, cfg in enumerate(layers):
      if cfg.rope and self.head_dim % 2:
        _checks.fail(_CFG, "head_dim", self.head_dim,
                     f"an even number (layers[{i}] has rope=True)")

  @property
  def out_dim(self) -> int:
    """The head's output size: num_classes or output_dim."""
    return (self.num_classes if self.head == "classification"
            else self.output_dim)


class AarenModel(nnx.Module):
  """Aaren (or, by config, causal-Transformer) stack with a sequence head.

  Parameters (besides the blocks'):
    in_proj.kernel [F, E] (None, "embed"), in_proj.bias [E] ("embed",);
    norm.scale [E] ("embed",);
    head.kernel [E, out] ("embed", None), head.bias [out] (None,).
  """

  def __init__(self, config: AarenConfig, *, rngs: nnx.Rngs):
    if not isinstance(config, AarenConfig):
      _checks.fail("attnlib.models.AarenModel", "config",
                   type(config).__name__, "an AarenConfig")
    self.config = c = config
    dt = dict(dtype=c.dtype, param_dtype=c.param_dtype)
    init = nnx.initializers.lecun_normal()
    self.in_proj = nnx.Linear(
        c.input_dim, c.embed_dim, rngs=rngs,
        kernel_init=logical_init(init, (None, EMBED)),
        bias_init=logical_init(nnx.initializers.zeros, (EMBED,)), **dt)
    self.blocks = _blocks(c, rngs)
    self.norm = _rms_norm(c.embed_dim, c.norm_eps, rngs, **dt)
    self.head = nnx.Linear(
        c.embed_dim, c.out_dim, rngs=rngs,
        kernel_init=logical_init(init, (EMBED, None)),
        bias_init=logical_init(nnx.initializers.zeros, (None,)), **dt)

  def _check_x(self, op: str, x: Any) -> None:
    f = self.config.input_dim
    if (not hasattr(x, "shape") or not hasattr(x, "dtype") or x.ndim != 3
        or x.shape[1] < 1 or x.shape[2] != f):
      _checks.fail(op, "x.shape", _checks.shape_of(x),
                   f"[B, T, {f}] with T >= 1")
    if not jnp.issubdtype(x.dtype, jnp.floating):
      _checks.fail(op, "x.dtype", str(x.dtype), "a floating dtype")

  def features(self, x: Array) -> Array:
    """x [B, T, F] -> the normalised last-block representation [B, T, E]
    (causal: step t depends on steps <= t)."""
    self._check_x("attnlib.models.AarenModel.features", x)
    h = self.in_proj(x)
    for block in self.blocks:
      h = block(h)
    return self.norm(h)

  def __call__(self, x: Array) -> Array:
    """x [B, T, F] floating -> classification logits [B, num_classes] (from
    the last step) or forecasts [B, T, output_dim] (out[:, t] predicts step
    t + 1), float32.

    Raises:
      ValueError: x not a floating [B, T, input_dim] array with T >= 1.
    """
    self._check_x("attnlib.models.AarenModel", x)
    h = self.features(x)
    if self.config.head == "classification":
      h = h[:, -1]
    return self.head(h).astype(jnp.float32)

  def init_cache(self, batch: int, max_len: int | None = None
                 ) -> tuple[Any, ...]:
    """The empty streaming state: a tuple of each layer's cache (an Aaren
    layer's is its scan state, independent of max_len; default
    config.max_len bounds softmax / sigmoid baselines)."""
    op = "attnlib.models.AarenModel.init_cache"
    _checks.check_positive_int(op, "batch", batch)
    max_len = _check_cache_len(op, max_len, self.config.max_len)
    return tuple(block.attn.init_cache(batch, max_len, dtype=self.config.dtype)
                 for block in self.blocks)

  def decode(self, x: Array, cache: tuple[Any, ...]
             ) -> tuple[Array, tuple[Any, ...]]:
    """Streams x [B, T, F] (T >= 1 new steps) after what ``cache`` holds.

    Returns (out, new cache): out is the head at every new step, float32
    [B, T, out_dim] (for classification: the logits of every prefix, the
    last one equal to ``__call__`` on the whole stream; for forecasting:
    ``__call__``'s outputs at these steps).

    Raises:
      ValueError: bad x (as __call__) or a cache that is not a tuple of one
        cache per layer.
    """
    op = "attnlib.models.AarenModel.decode"
    self._check_x(op, x)
    _check_cache(op, cache, len(self.blocks))
    h = self.in_proj(x)
    new = []
    for block, layer_cache in zip(self.blocks, cache):
      h, layer_cache = block.decode(h, layer_cache)
      new.append(layer_cache)
    return self.head(self.norm(h)).astype(jnp.float32), tuple(new)


__all__ = ["AarenConfig", "AarenModel"]
