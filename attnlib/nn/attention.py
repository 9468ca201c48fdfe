"""Flax NNX attention layers over the attnlib primitives.

* `AttentionConfig`: which primitive a layer runs and its options (validated).
* `Attention`: projections (with grouped-query / multi-query key-value heads),
  optional rotary position embeddings, the primitive, the output projection;
  causal layers also decode incrementally (`Attention.init_cache`,
  `Attention.decode`, with the caches of `attnlib.decoding.cache`).
  Parameters carry logical axis names ("embed", "heads", "kv_heads",
  "head_dim") as sharding metadata, so that `nnx.get_partition_spec` together
  with logical axis rules maps them onto a mesh.
* `attention_fn(kind, **options)`: a drop-in ``attention_fn`` for
  `flax.nnx.MultiHeadAttention`.
* `apply_rope`: rotary position embeddings (RoFormer, half-split layout).
"""

from __future__ import annotations

import dataclasses
import importlib
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from attnlib.ops import _checks
from attnlib.ops import feature_maps as _feature_maps
from attnlib.ops.attention_scan import AttentionScanState
from attnlib.ops.attention_scan import attention_scan
from attnlib.ops.linear_attention import linear_attention
from attnlib.ops.sigmoid_attention import sigmoid_attention
from attnlib.ops.sliding_window import sliding_window_attention
from attnlib.ops.softmax import dot_product_attention

Array = jax.Array

KINDS = ("softmax", "linear", "sliding_window", "sigmoid", "aaren")
FEATURE_MAPS = ("identity", "elu_plus_one", "relu", "taylor")
DECAYS = (None, "rate", "gate")

# Logical axis names of the parameters.
EMBED, HEADS, KV_HEADS, HEAD_DIM = "embed", "heads", "kv_heads", "head_dim"

# Initial gate bias of decay="gate": sigmoid(3) ~ 0.95, a slow initial decay.
GATE_BIAS_INIT = 3.0

_CFG = "AttentionConfig"


@dataclasses.dataclass(frozen=True)
class AttentionConfig:
  """Which attention an `Attention` layer computes.

  Attributes:
    kind: "softmax" (`al.dot_product_attention`), "linear"
      (`al.linear_attention` on feature-mapped q, k), "sliding_window"
      (`al.sliding_window_attention`), "sigmoid" (`al.sigmoid_attention`)
      or "aaren" (`al.attention_scan`: Aaren, "Attention as an RNN", Feng et
      al. 2024). An aaren layer has no query projection but one learned
      query q_h [D] per head, constant in time, and its output at step t is
      softmax attention of that query over the prefix 0..t:

        s_j = q_h . k_{j, h // G} / sqrt(D)      (G = H // Hkv)
        o_{t, h} = sum_{j <= t} exp(s_j) v_{j, h // G}
                   / sum_{j <= t} exp(s_j)

      (a many-to-many RNN with an O(1) state per head; causal only, no
      rope).
    is_causal: mask keys after the query (every kind; must be True for
      aaren). A non-causal linear layer has no decay. Only causal layers can
      decode (`Attention.init_cache`).
    feature_map: linear only: a name in `attnlib.feature_maps` (FEATURE_MAPS);
      None means "elu_plus_one".
    decay: linear only: None; "rate" (a learned per-head rate lambda_h >= 0,
      a_t = exp(-lambda_h), initialised as RetNet's 1 - 2**(-5 - h)); or
      "gate" (data-dependent log-gates g_t = log_sigmoid(x_t W_g + b_g) [H],
      as in gated linear attention).
    output_norm: linear only: RMSNorm over the head dim of each head's output
      (with a learned scale), as TransNormerLLM / Lightning Attention do.
    window: sliding_window only (required): an int w >= 0 or a pair (left,
      right) of ints >= 0; query i sees keys i - left .. i + right.
    bias: sigmoid only: the logit bias, a finite float; None means the op's
      default -log(T) (T the sequence length: such a layer cannot decode,
      since T is not known while decoding).
    rope: apply rotary position embeddings to q and k (before the feature
      map for linear attention); not with aaren.
    rope_theta: the RoPE base, > 0.

  Raises:
    ValueError: (at construction) a field with a bad value, or an option of
      another kind set; the message names the field, its value and what was
      expected.
  """

  kind: str = "softmax"
  is_causal: bool = True
  feature_map: str | None = None
  decay: str | None = None
  output_norm: bool = False
  window: int | tuple[int, int] | None = None
  bias: float | None = None
  rope: bool = False
  rope_theta: float = 10000.0

  def __post_init__(self):
    if self.kind not in KINDS:
      _checks.fail(_CFG, "kind", self.kind, f"one of {KINDS}")
    for name in ("is_causal", "output_norm", "rope"):
      if not isinstance(getattr(self, name), bool):
        _checks.fail(_CFG, name, getattr(self, name), "a bool")
    if (not _checks.is_real(self.rope_theta) or not math.isfinite(self.rope_theta)
        or self.rope_theta <= 0):
      _checks.fail(_CFG, "rope_theta", self.rope_theta, "a finite number > 0")
    # Options of one kind only.
    owners = {"feature_map": ("linear", None), "decay": ("linear", None),
              "output_norm": ("linear", False),
              "window": ("sliding_window", None), "bias": ("sigmoid", None)}
    for name, (owner, default) in owners.items():
      if self.kind != owner and getattr(self, name) != default:
        _checks.fail(_CFG, name, getattr(self, name),
                     f"{default!r} with kind={self.kind!r} (only kind="
                     f"{owner!r} uses it)")
    if self.feature_map is not None and self.feature_map not in FEATURE_MAPS:
      _checks.fail(_CFG, "feature_map", self.feature_map,
                   f"None or one of {FEATURE_MAPS}")
    if self.decay not in DECAYS:
      _checks.fail(_CFG, "decay", self.decay, f"one of {DECAYS}")
    if self.kind == "linear" and not self.is_causal and self.decay is not None:
      _checks.fail(_CFG, "decay", self.decay,
                   "None with is_causal=False (a decay needs an order)")
    if self.kind == "sliding_window":
      w = self.window
      ok = (_checks.is_int(w) and w >= 0) or (
          isinstance(w, tuple) and len(w) == 2
          and all(_checks.is_int(x) and x >= 0 for x in w))
      if not ok:
        _checks.fail(_CFG, "window", w,
                     "an int >= 0 or a tuple (left, right) of ints >= 0")
    if self.bias is not None and (not _checks.is_real(self.bias)
                                  or not math.isfinite(self.bias)):
      _checks.fail(_CFG, "bias", self.bias, "None or a finite float")
    if self.kind == "aaren":
      if not self.is_causal:
        _checks.fail(_CFG, "is_causal", self.is_causal,
                     "True with kind='aaren' (a prefix scan is causal)")
      if self.rope:
        _checks.fail(_CFG, "rope", self.rope,
                     "False with kind='aaren' (its query is constant in "
                     "time: no positions to rotate)")

  @property
  def left_window(self) -> int | None:
    """sliding_window: the left reach (query i sees keys from i - left)."""
    if self.kind != "sliding_window":
      return None
    return self.window if _checks.is_int(self.window) else self.window[0]

  @property
  def feature_map_fn(self) -> Callable[[Array], Array]:
    """The linear kind's feature map (elu_plus_one when feature_map is None)."""
    return getattr(_feature_maps, self.feature_map or "elu_plus_one")


def apply_rope(x: Array, positions: Array, theta: float = 10000.0) -> Array:
  """Rotary position embeddings (RoFormer), half-split layout.

  With d = x.shape[-1] (even), frequencies f_i = theta ** (-2 i / d) for
  i < d / 2 and angles a = p * f_i at position p, the pairs
  (x[i], x[i + d/2]) are rotated by a:

    out[i]       = x[i] cos a - x[i + d/2] sin a
    out[i + d/2] = x[i + d/2] cos a + x[i] sin a

  so <rope(q, m), rope(k, n)> depends on m - n only.

  Args:
    x: [..., T, H, d] (or [T, d]) floating, d even.
    positions: [T] or [..., T] (broadcast against x's leading axes) integer
      or float positions.
    theta: the base, > 0.

  Returns:
    x rotated, in x.dtype (computed in float32 or wider).

  Raises:
    ValueError: x of rank < 2, odd d, or positions not [T] / [..., T].
  """
  op = "attnlib.nn.apply_rope"
  if not hasattr(x, "shape") or x.ndim < 2:
    _checks.fail(op, "x.shape", _checks.shape_of(x), "[..., T, H, d]")
  d, t = x.shape[-1], x.shape[-3] if x.ndim >= 3 else x.shape[-2]
  if d % 2:
    _checks.fail(op, "x.shape", x.shape, "an even last dimension")
  positions = jnp.asarray(positions)
  if positions.ndim < 1 or positions.shape[-1] != t:
    _checks.fail(op, "positions.shape", positions.shape, f"[..., {t}]")
  compute = jnp.promote_types(x.dtype, jnp.float32)
  freqs = theta ** (-jnp.arange(0, d // 2, dtype=compute) * 2 / d)
  angles = positions.astype(compute)[..., None] * freqs      # [..., T, d/2]
  if x.ndim >= 3:
    angles = angles[..., None, :]                            # [..., T, 1, d/2]
  cos, sin = jnp.cos(angles), jnp.sin(angles)
  xf = x.astype(compute)
  x1, x2 = xf[..., :d // 2], xf[..., d // 2:]
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x.dtype)


def _retnet_rates(num_heads: int) -> Array:
  """lambda_h = -log(1 - 2 ** (-5 - h)): RetNet's per-head decays."""
  h = jnp.arange(num_heads, dtype=jnp.float32)
  return -jnp.log1p(-(2.0 ** (-5.0 - h)))


def _caches():
  """attnlib.decoding.cache, imported on first use: attnlib.decoding also
  holds generation code that may import attnlib.nn, so neither package may
  need the other at import time."""
  return importlib.import_module("attnlib.decoding.cache")


def logical_init(init, names):
  """`init` with logical axis names as metadata only: no eager sharding (it
  needs a mesh and rules mapping the names onto mesh axes); shard with
  nnx.get_partition_spec under nnx.logical_axis_rules after construction
  (attnlib.sharding.rules does). Every attnlib layer and model uses it."""
  return nnx.with_partitioning(init, names, eager_sharding=False)



class Attention(nnx.Module):
  """Multi-head attention layer running one attnlib primitive.

  x [B, T, E] -> q [B, T, H, D], k, v [B, T, Hkv, D] (no biases; H % Hkv ==
  0: Hkv == H is multi-head, 1 < Hkv < H grouped-query, Hkv == 1
  multi-query) -> optional RoPE on q, k -> the primitive of `config` (with
  ``implementation=None``: the platform's kernel where it fits) -> the
  output projection to [B, T, E]. An "aaren" layer has no q projection:
  its query is the learned ``query`` [H, D], the same at every position.

  Causal layers decode incrementally: ``cache = layer.init_cache(B,
  max_len)``, then ``y, cache = layer.decode(x_chunk, cache)`` for chunks of
  any lengths; the outputs equal ``layer(x)`` on the concatenated sequence.

  Parameters and their logical axes:
    q.kernel [E, H, D] ("embed", "heads", "head_dim") (not with aaren);
    aaren: query [H, D] ("heads", "head_dim");
    k.kernel, v.kernel [E, Hkv, D] ("embed", "kv_heads", "head_dim");
    o.kernel [H, D, E] ("heads", "head_dim", "embed");
    linear, decay="rate": log_rate [H] ("heads",), lambda = exp(log_rate);
    linear, decay="gate": gate.kernel [E, H] ("embed", "heads"), gate.bias
      [H] ("heads",);
    linear, output_norm: out_norm.scale [D] ("head_dim",).
  The names are metadata only (``eager_sharding=False``): map them onto a
  mesh with ``nnx.logical_axis_rules`` and ``nnx.get_partition_spec``.
  Projections compute in ``dtype``; decays and RoPE angles in float32.
  """

  def __init__(self, embed_dim: int, num_heads: int, num_kv_heads: int,
               head_dim: int, config: AttentionConfig, *, rngs: nnx.Rngs,
               dtype: Any = jnp.float32, param_dtype: Any = jnp.float32):
    op = "attnlib.nn.Attention"
    for name, value in (("embed_dim", embed_dim), ("num_heads", num_heads),
                        ("num_kv_heads", num_kv_heads),
                        ("head_dim", head_dim)):
      _checks.check_positive_int(op, name, value)
    if num_heads % num_kv_heads:
      _checks.fail(op, "num_kv_heads", num_kv_heads,
                   f"a divisor of num_heads={num_heads}")
    if not isinstance(config, AttentionConfig):
      _checks.fail(op, "config", type(config).__name__, "an AttentionConfig")
    if config.rope and head_dim % 2:
      _checks.fail(op, "head_dim", head_dim, "an even number with rope=True")
    self.embed_dim, self.num_heads = embed_dim, num_heads
    self.num_kv_heads, self.head_dim = num_kv_heads, head_dim
    self.config = config
    self.dtype = dtype
    init = nnx.initializers.lecun_normal()
    common = dict(use_bias=False, dtype=dtype, param_dtype=param_dtype,
                  rngs=rngs)
    self.q = nnx.data(None)
    self.query = nnx.data(None)
    if config.kind == "aaren":
      # Unit variance, like the entries of x W_q for unit-variance x.
      self.query = nnx.Param(logical_init(
          nnx.initializers.normal(1.0), (HEADS, HEAD_DIM))(
              rngs.params(), (num_heads, head_dim), param_dtype))
    else:
      self.q = nnx.LinearGeneral(
          embed_dim, (num_heads, head_dim),
          kernel_init=logical_init(init, (EMBED, HEADS, HEAD_DIM)), **common)
    self.k = nnx.LinearGeneral(
        embed_dim, (num_kv_heads, head_dim),
        kernel_init=logical_init(init, (EMBED, KV_HEADS, HEAD_DIM)), **common)
    self.v = nnx.LinearGeneral(
        embed_dim, (num_kv_heads, head_dim),
        kernel_init=logical_init(init, (EMBED, KV_HEADS, HEAD_DIM)), **common)
    self.o = nnx.LinearGeneral(
        (num_heads, head_dim), embed_dim, axis=(-2, -1),
        kernel_init=logical_init(init, (HEADS, HEAD_DIM, EMBED)), **common)
    self.log_rate = nnx.data(None)
    self.gate = nnx.data(None)
    self.out_norm = nnx.data(None)
    if config.decay == "rate":
      rate_init = lambda key, shape, dtype: jnp.log(   # noqa: E731
          _retnet_rates(shape[0])).astype(dtype)
      self.log_rate = nnx.Param(
          logical_init(rate_init, (HEADS,))(rngs.params(), (num_heads,),
                                            param_dtype))
    elif config.decay == "gate":
      self.gate = nnx.Linear(
          embed_dim, num_heads, dtype=dtype, param_dtype=param_dtype,
          kernel_init=logical_init(init, (EMBED, HEADS)),
          bias_init=logical_init(nnx.initializers.constant(GATE_BIAS_INIT),
                                 (HEADS,)), rngs=rngs)
    if config.output_norm:
      self.out_norm = nnx.RMSNorm(
          head_dim, dtype=dtype, param_dtype=param_dtype,
          scale_init=logical_init(nnx.initializers.ones, (HEAD_DIM,)),
          rngs=rngs)

  def decay(self, x: Array) -> Array | None:
    """The linear kind's decay argument for input x: None, [H] or [B, T, H]."""
    if self.log_rate is not None:
      return jnp.exp(self.log_rate[...].astype(jnp.float32))
    if self.gate is not None:
      return jax.nn.log_sigmoid(self.gate(x).astype(jnp.float32))
    return None

  def _queries(self, x: Array, k: Array) -> Array:
    """q [B, T, H, D] from x, or an aaren layer's query [H, D] (k's dtype)."""
    if self.query is not None:
      return self.query[...].astype(k.dtype)
    return self.q(x)

  def __call__(self, x: Array, *, positions: Array | None = None) -> Array:
    """x [B, T, E] -> [B, T, E]; positions [T] or [B, T] (default arange(T),
    used by rope layers only)."""
    op = "attnlib.nn.Attention"
    if not hasattr(x, "shape") or x.ndim != 3 or x.shape[-1] != self.embed_dim:
      _checks.fail(op, "x.shape", _checks.shape_of(x),
                   f"[B, T, {self.embed_dim}]")
    cfg = self.config
    k, v = self.k(x), self.v(x)
    q = self._queries(x, k)
    if cfg.rope:
      if positions is None:
        positions = jnp.arange(x.shape[1])
      q = apply_rope(q, positions, cfg.rope_theta)
      k = apply_rope(k, positions, cfg.rope_theta)
    o = _attend(cfg, q, k, v, decay=self.decay(x) if cfg.kind == "linear"
                else None)
    if self.out_norm is not None:
      o = self.out_norm(o)
    return self.o(o)

  # ------------------------------------------------------------ decoding

  def _check_decodable(self, op: str) -> None:
    cfg = self.config
    if not cfg.is_causal:
      _checks.fail(op, "config.is_causal", cfg.is_causal,
                   "True (a cache continues a causal sequence)")
    if cfg.kind == "sigmoid" and cfg.bias is None:
      _checks.fail(op, "config.bias", cfg.bias,
                   "a fixed float to decode a sigmoid layer (the default "
                   "-log(T) depends on the total length T)")

  def _feature_dim(self) -> int:
    """K of a linear layer's state: the feature map's output size."""
    phi = self.config.feature_map_fn
    x = jax.ShapeDtypeStruct((1, 1, self.num_heads, self.head_dim),
                             jnp.float32)
    return jax.eval_shape(phi, x).shape[-1]

  def init_cache(self, batch: int, max_len: int, dtype: Any = None) -> Any:
    """An empty cache for `decode` (``length == 0``).

    Args:
      batch: B >= 1.
      max_len: the longest sequence the cache will summarise, >= 1. Only a
        `KVCache` (softmax, sigmoid) depends on it; decoding past it is
        rejected when ``length`` is concrete, and under jit it silently
        overwrites the last rows (``lax.dynamic_update_slice`` clamps).
      dtype: dtype of the cached keys and values (KVCache, WindowCache);
        None means the layer's ``dtype``. The recurrent states (LinearCache,
        ScanCache) are float32 always.

    Returns:
      by ``config.kind`` (Hkv = num_kv_heads, D = head_dim, int32 length []):
        softmax, sigmoid: `KVCache` (k, v [B, max_len, Hkv, D] zeros);
        sliding_window: `WindowCache` (k, v [B, W, Hkv, D] zeros, W the
          window's left reach, whatever max_len; a window reaching further
          back than max_len is better served by a softmax layer);
        linear: `LinearCache` (state float32 [B, H, K, D] zeros, K the
          feature map's output size);
        aaren: `ScanCache` (state `AttentionScanState.empty(B, H, D)`).

    Raises:
      ValueError: batch or max_len not a positive int, a non-floating dtype,
        a non-causal layer (``config.is_causal``), or a sigmoid layer without
        a fixed ``config.bias``.
    """
    caches = _caches()
    op = "attnlib.nn.Attention.init_cache"
    _checks.check_positive_int(op, "batch", batch)
    _checks.check_positive_int(op, "max_len", max_len)
    self._check_decodable(op)
    dtype = self.dtype if dtype is None else dtype
    try:
      floating = jnp.issubdtype(jnp.dtype(dtype), jnp.floating)
    except TypeError:
      floating = False
    if not floating:
      _checks.fail(op, "dtype", dtype, "None or a floating dtype")
    kind = self.config.kind
    length = jnp.zeros((), jnp.int32)
    kv = lambda n: jnp.zeros(  # noqa: E731
        (batch, n, self.num_kv_heads, self.head_dim), dtype)
    if kind in ("softmax", "sigmoid"):
      return caches.KVCache(k=kv(max_len), v=kv(max_len), length=length)
    if kind == "sliding_window":
      w = self.config.left_window
      return caches.WindowCache(k=kv(w), v=kv(w), length=length)
    if kind == "linear":
      state = jnp.zeros((batch, self.num_heads, self._feature_dim(),
                         self.head_dim), jnp.float32)
      return caches.LinearCache(state=state, length=length)
    return caches.ScanCache(
        state=AttentionScanState.empty(batch, self.num_heads, self.head_dim),
        length=length)

  def _check_cache(self, op: str, cache: Any, batch: int) -> None:
    """cache must be this kind's cache type with shapes for batch B."""
    caches = _caches()
    kind = self.config.kind
    want = {"softmax": caches.KVCache, "sigmoid": caches.KVCache,
            "sliding_window": caches.WindowCache,
            "linear": caches.LinearCache, "aaren": caches.ScanCache}[kind]
    if not isinstance(cache, want):
      _checks.fail(op, "cache", type(cache).__name__,
                   f"a {want.__name__} (from init_cache of this "
                   f"kind={kind!r} layer)")
    h, hkv, d = self.num_heads, self.num_kv_heads, self.head_dim
    if kind in ("softmax", "sigmoid", "sliding_window"):
      if kind == "sliding_window":
        n = self.config.left_window
      else:  # any capacity: KVCache(max_len)
        n = np.shape(cache.k)[1] if np.ndim(cache.k) >= 2 else "max_len"
      rows = "W" if kind == "sliding_window" else "max_len"
      shapes = {"k": (batch, n, hkv, d), "v": (batch, n, hkv, d)}
      axes = f"[B, {rows}, Hkv, D] with B = x.shape[0]"
      fields = {name: getattr(cache, name) for name in shapes}
    elif kind == "linear":
      shapes = {"state": (batch, h, self._feature_dim(), d)}
      axes = "[B, H, K, D] with B = x.shape[0]"
      fields = {"state": cache.state}
    else:
      if not isinstance(cache.state, AttentionScanState):
        _checks.fail(op, "cache.state", type(cache.state).__name__,
                     "an AttentionScanState")
      shapes = {"state.m": (batch, h), "state.u": (batch, h),
                "state.w": (batch, h, d)}
      axes = "[B, H] / [B, H, D] with B = x.shape[0]"
      fields = {"state.m": cache.state.m, "state.u": cache.state.u,
                "state.w": cache.state.w}
    for name, shape in shapes.items():
      got = _checks.shape_of(fields[name])
      if got != shape:
        _checks.fail(op, f"cache.{name}.shape", got, f"{shape} ({axes})")
    length = cache.length
    if (not hasattr(length, "dtype") or _checks.shape_of(length) != ()
        or not jnp.issubdtype(length.dtype, jnp.integer)):
      _checks.fail(op, "cache.length", length,
                   "an integer scalar array (tokens consumed so far)")

  def decode(self, x: Array, cache: Any) -> tuple[Array, Any]:
    """Continues the sequence `cache` summarises by the T tokens of `x`.

    ``decode`` of a sequence in chunks of any lengths (a prefill of the
    prompt on an empty cache, then steps of T = 1, say) gives the outputs of
    ``layer(x)`` on the whole sequence; works under ``jax.jit`` /
    ``nnx.jit`` (``cache.length`` traced, T static). With L =
    ``cache.length`` the new tokens are positions L .. L + T - 1 (RoPE
    positions ``L + arange(T)``), and by kind:

    * softmax: the chunk's keys/values are written into the KVCache at row
      L (``lax.dynamic_update_slice``); its queries attend over the cache
      with ``al.dot_product_attention`` and the mask key_pos <= query_pos,
      key_pos < L + T.
    * sigmoid: the same cache and mask; ``al.sigmoid_attention`` takes no
      mask with query and key lengths differing, so the decode path computes
      ``sum_j [mask] sigmoid(q . k_j / sqrt(D) + bias) v_j`` with jnp
      (float32 logits and sums, as the op).
    * sliding_window (left reach W): queries attend over [the W buffered
      keys ++ the chunk] (``al.dot_product_attention``) with the causal
      window mask query_pos - W <= key_pos <= query_pos, key_pos >= 0; the
      buffer then keeps the last W keys/values.
    * linear: ``al.linear_attention`` with ``initial_state=cache.state`` and
      ``return_final_state=True`` (feature map, decay of the chunk, output
      norm as in ``__call__``).
    * aaren: ``al.attention_scan`` with ``initial_state=cache.state`` and
      ``return_final_state=True``.

    Args:
      x: [B, T, E] the next T >= 1 tokens' inputs.
      cache: this layer's cache (`init_cache`, or a previous decode).

    Returns:
      (y [B, T, E], the cache with the chunk consumed, length L + T).

    Raises:
      ValueError: x not [B, T >= 1, E]; a cache of another type or shapes
        (batch B of x); a layer that cannot decode (see `init_cache`); a
        chunk longer than a KVCache's max_len or, when ``cache.length`` is
        concrete, L + T > max_len.
    """
    op = "attnlib.nn.Attention.decode"
    if (not hasattr(x, "shape") or x.ndim != 3 or x.shape[1] < 1
        or x.shape[-1] != self.embed_dim):
      _checks.fail(op, "x.shape", _checks.shape_of(x),
                   f"[B, T >= 1, {self.embed_dim}]")
    self._check_decodable(op)
    self._check_cache(op, cache, x.shape[0])
    cfg = self.config
    t = x.shape[1]
    length = cache.length.astype(jnp.int32)
    k, v = self.k(x), self.v(x)
    q = self._queries(x, k)
    if cfg.rope:
      positions = length + jnp.arange(t, dtype=jnp.int32)
      q = apply_rope(q, positions, cfg.rope_theta)
      k = apply_rope(k, positions, cfg.rope_theta)
    decay = self.decay(x) if cfg.kind == "linear" else None
    o, cache = self._attend_cached(op, q, k, v, cache, decay)
    if self.out_norm is not None:
      o = self.out_norm(o)
    return self.o(o), cache

  def _attend_cached(self, op: str, q: Array, k: Array, v: Array, cache: Any,
                     decay: Array | None) -> tuple[Array, Any]:
    """The attention output of a chunk (q, k, v after RoPE) and the cache
    with the chunk consumed (length L + T), per kind; shared with
    `attnlib.sharding.ShardedAttention`, which passes its local shards."""
    cfg = self.config
    # + T from k: aaren's q is its learned query, not the chunk's tokens.
    new_length = cache.length.astype(jnp.int32) + k.shape[1]
    if cfg.kind in ("softmax", "sigmoid"):
      o, cache_k, cache_v = self._decode_kv(op, q, k, v, cache)
      return o, cache.replace(k=cache_k, v=cache_v, length=new_length)
    if cfg.kind == "sliding_window":
      o, cache_k, cache_v = self._decode_window(q, k, v, cache)
      return o, cache.replace(k=cache_k, v=cache_v, length=new_length)
    if cfg.kind == "linear":
      phi = cfg.feature_map_fn
      o, state = linear_attention(
          phi(q), phi(k), v, is_causal=True, decay=decay,
          initial_state=cache.state, return_final_state=True)
    else:
      o, state = attention_scan(q, k, v, initial_state=cache.state,
                                return_final_state=True)
    return o, cache.replace(state=state, length=new_length)

  def _decode_kv(self, op: str, q: Array, k: Array, v: Array,
                 cache: Any) -> tuple[Array, Array, Array]:
    """softmax / sigmoid: write the chunk at row L, attend over the cache."""
    t, max_len = q.shape[1], cache.max_len
    if t > max_len:
      _checks.fail(op, "x.shape", _checks.shape_of(q)[:2] + (self.embed_dim,),
                   f"a chunk of at most max_len={max_len} tokens (the "
                   "KVCache's capacity)")
    if _checks.is_concrete(cache.length) and int(cache.length) + t > max_len:
      _checks.fail(op, "cache.length", int(cache.length),
                   f"<= {max_len - t} (max_len={max_len} minus the {t} new "
                   "tokens)")
    length = cache.length.astype(jnp.int32)
    zero = jnp.zeros((), jnp.int32)
    start = (zero, length, zero, zero)
    cache_k = jax.lax.dynamic_update_slice(cache.k, k.astype(cache.k.dtype),
                                           start)
    cache_v = jax.lax.dynamic_update_slice(cache.v, v.astype(cache.v.dtype),
                                           start)
    q_pos = length + jnp.arange(t, dtype=jnp.int32)[:, None]      # [T, 1]
    k_pos = jnp.arange(max_len, dtype=jnp.int32)[None, :]         # [1, S]
    mask = (k_pos <= q_pos) & (k_pos < length + t)                # [T, S]
    keys, values = cache_k.astype(q.dtype), cache_v.astype(q.dtype)
    if self.config.kind == "softmax":
      o = dot_product_attention(q, keys, values, mask=mask[None, None])
    else:
      o = _masked_sigmoid_attention(q, keys, values, mask, self.config.bias)
    return o, cache_k, cache_v

  def _decode_window(self, q: Array, k: Array, v: Array,
                     cache: Any) -> tuple[Array, Array, Array]:
    """sliding_window: attend over [buffer ++ chunk], keep the last W."""
    t, w = q.shape[1], cache.window
    keys = jnp.concatenate([cache.k.astype(k.dtype), k], axis=1)  # [B, W+T]
    values = jnp.concatenate([cache.v.astype(v.dtype), v], axis=1)
    length = cache.length.astype(jnp.int32)
    q_pos = length + jnp.arange(t, dtype=jnp.int32)[:, None]       # [T, 1]
    k_pos = length - w + jnp.arange(w + t, dtype=jnp.int32)[None, :]
    mask = (k_pos >= 0) & (k_pos <= q_pos) & (k_pos >= q_pos - w)  # [T, W+T]
    o = dot_product_attention(q, keys, values, mask=mask[None, None])
    # Rows t .. t + W - 1 are positions L + T - W .. L + T - 1 (static slice).
    return (o, keys[:, t:].astype(cache.k.dtype),
            values[:, t:].astype(cache.v.dtype))


def _masked_sigmoid_attention(q: Array, k: Array, v: Array, mask: Array,
                              bias: float) -> Array:
  """sum_j mask_ij sigmoid(q_i . k_j / sqrt(D) + bias) v_j (jnp, float32).

  q [B, T, H, D]; k [B, S, Hkv, D]; v [B, S, Hkv, V]; mask [T, S] bool.
  Query head h reads kv head h // (H // Hkv), like al.sigmoid_attention.
  """
  b, t, h, d = q.shape
  hkv = k.shape[2]
  qg = q.reshape(b, t, hkv, h // hkv, d)
  logits = jnp.einsum("btngd,bsnd->bngts", qg, k,
                      preferred_element_type=jnp.float32) * (d ** -0.5)
  weights = jnp.where(mask, jax.nn.sigmoid(logits + jnp.float32(bias)), 0.0)
  o = jnp.einsum("bngts,bsnv->btngv", weights, v.astype(jnp.float32),
                 preferred_element_type=jnp.float32)
  return o.reshape(b, t, h, v.shape[-1]).astype(q.dtype)


def _attend(cfg: AttentionConfig, q: Array, k: Array, v: Array, *,
            decay: Array | None = None, is_causal: bool | None = None,
            implementation: str | None = None) -> Array:
  """Runs cfg's primitive on [B, T, H, D] q (aaren: [H, D] or [B, H, D])
  and [B, T, Hkv, D] k, v."""
  causal = cfg.is_causal if is_causal is None else is_causal
  if cfg.kind == "softmax":
    return dot_product_attention(q, k, v, is_causal=causal,
                                 implementation=implementation)
  if cfg.kind == "sliding_window":
    return sliding_window_attention(q, k, v, local_window_size=cfg.window,
                                    is_causal=causal,
                                    implementation=implementation)
  if cfg.kind == "sigmoid":
    return sigmoid_attention(q, k, v, bias=cfg.bias, is_causal=causal,
                             implementation=implementation)
  if cfg.kind == "aaren":  # q: the learned [H, D]; causal by construction
    return attention_scan(q, k, v, implementation=implementation)
  phi = cfg.feature_map_fn
  return linear_attention(phi(q), phi(k), v, is_causal=causal, decay=decay,
                          implementation=implementation)


def check_fn_options(op: str, dropout_rate: float, deterministic: bool,
                     module: Any) -> None:
  """The nnx.MultiHeadAttention arguments an attention_fn here cannot honour:
  dropout (rate > 0, not deterministic) and ``module`` (sow_weights)."""
  if dropout_rate > 0.0 and not deterministic:
    _checks.fail(op, "dropout_rate", dropout_rate,
                 "0.0 (or deterministic=True)")
  if module is not None:
    _checks.fail(op, "module", type(module).__name__,
                 "None (sow_weights is not supported)")


def attention_fn(kind: str, **options: Any) -> Callable[..., Array]:
  """An ``attention_fn`` for `flax.nnx.MultiHeadAttention` running a primitive.

  ``options`` are `AttentionConfig` fields other than ``kind``; the ones
  that need parameters or positions (linear ``decay``, ``output_norm``,
  ``rope``) are not available here (use `Attention`). ``is_causal`` (default
  False here, like nnx's) is or-ed with the ``is_causal`` the module passes.

  ``kind="aaren"`` (`al.attention_scan`): the query has length 1, a learned
  query token the caller passes as ``inputs_q`` ([1, 1, E] or [B, 1, E]; it
  is broadcast over the key's batch axes), and the output has the key
  length: row t is softmax attention of the query over keys 0..t
  ([..., S, H, V], so the module returns [..., S, E]). It is causal by
  construction (``is_causal`` defaults to True and the module's flag is
  implied). ``kind="neighborhood"`` delegates to
  `attnlib.nn.neighborhood.neighborhood_attention_fn` (imported on use) with
  the ``options`` (kernel_size, dilation, is_causal, spatial_dims).

  The returned function takes nnx's arguments (query [..., T, H, D], key and
  value [..., S, H, D], bias, mask, dropout arguments, dtype, precision,
  module, promote_dtype, is_causal); ``mask`` and ``bias`` are supported by
  the softmax kind only; dropout (rate > 0, not deterministic) and
  ``module`` (sow_weights) are not supported.

  Raises:
    ValueError: a bad kind or option (as `AttentionConfig`), or, at call
      time, an unsupported argument (aaren: also a query length other than
      1).
  """
  if kind == "neighborhood":
    neighborhood = importlib.import_module("attnlib.nn.neighborhood")
    return neighborhood.neighborhood_attention_fn(**options)
  options.setdefault("is_causal", kind == "aaren")
  for name in ("decay", "output_norm", "rope"):
    if options.get(name):
      _checks.fail("attnlib.nn.attention_fn", name, options[name],
                   "not set (needs parameters or positions: use "
                   "attnlib.nn.Attention)")
  cfg = AttentionConfig(kind=kind, **options)
  op = f"attnlib.nn.attention_fn({kind!r})"

  def fn(query, key, value, bias=None, mask=None, broadcast_dropout=True,
         dropout_rng=None, dropout_rate=0.0, deterministic=False, dtype=None,
         precision=None, module=None, promote_dtype=None, is_causal=False,
         **unused):
    del broadcast_dropout, dropout_rng, precision, unused
    check_fn_options(op, dropout_rate, deterministic, module)
    if kind != "softmax":
      if mask is not None:
        _checks.fail(op, "mask", _checks.shape_of(mask),
                     "None (use the kind's options)")
      if bias is not None:
        _checks.fail(op, "bias", _checks.shape_of(bias), "None")
    if promote_dtype is not None:
      query, key, value = promote_dtype((query, key, value), dtype=dtype)
    elif dtype is not None:
      query, key, value = (x.astype(dtype) for x in (query, key, value))
    if kind == "aaren":
      if query.ndim < 3 or query.shape[-3] != 1:
        _checks.fail(op, "query.shape", _checks.shape_of(query),
                     "[..., 1, H, D] (one learned query token: inputs_q of "
                     "length 1)")
      try:
        batch = jnp.broadcast_shapes(query.shape[:-3], key.shape[:-3])
      except ValueError:
        _checks.fail(op, "query.shape", _checks.shape_of(query),
                     f"batch axes broadcastable to the key's "
                     f"{key.shape[:-3]}")
      query = jnp.broadcast_to(query, batch + query.shape[-3:])
      flat_b = lambda x: jnp.broadcast_to(  # noqa: E731
          x, batch + x.shape[-3:]).reshape((-1,) + x.shape[-3:])
      k, v = flat_b(key), flat_b(value)
      q = query.reshape((-1,) + query.shape[-2:])        # [B, H, D]
      o = attention_scan(q, k, v)
      return o.reshape(batch + o.shape[1:])
    # Flatten the batch axes to one (add one when there is none).
    batch = query.shape[:-3]
    flat = lambda x: x.reshape((-1,) + x.shape[-3:])  # noqa: E731
    q, k, v = flat(query), flat(key), flat(value)
    causal = cfg.is_causal or bool(is_causal)
    if kind == "softmax":
      def flat_bh(x):  # [batch..., H, T, S] (broadcastable) -> [B, H, T, S]
        if x is None:
          return None
        x = jnp.asarray(x)
        x = x.reshape((1,) * max(0, len(batch) + 3 - x.ndim) + x.shape)
        return jnp.broadcast_to(x, batch + x.shape[-3:]).reshape(
            (-1,) + x.shape[-3:])
      mask = None if mask is None else jnp.asarray(mask).astype(bool)
      o = dot_product_attention(q, k, v, bias=flat_bh(bias),
                                mask=flat_bh(mask), is_causal=causal)
    else:
      o = _attend(cfg, q, k, v, is_causal=causal)
    return o.reshape(batch + o.shape[1:])

  return fn
