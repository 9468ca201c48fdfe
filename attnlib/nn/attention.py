"""Flax NNX attention layers over the attnlib primitives.

* `AttentionConfig`: which primitive a layer runs and its options (validated).
* `Attention`: projections (with grouped-query / multi-query key-value heads),
  optional rotary position embeddings, the primitive, the output projection.
  Parameters carry logical axis names ("embed", "heads", "kv_heads",
  "head_dim") as sharding metadata, so that `nnx.get_partition_spec` together
  with logical axis rules maps them onto a mesh.
* `attention_fn(kind, **options)`: a drop-in ``attention_fn`` for
  `flax.nnx.MultiHeadAttention`.
* `apply_rope`: rotary position embeddings (RoFormer, half-split layout).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from attnlib.ops import _checks
from attnlib.ops import feature_maps as _feature_maps
from attnlib.ops.linear_attention import linear_attention
from attnlib.ops.sigmoid_attention import sigmoid_attention
from attnlib.ops.sliding_window import sliding_window_attention
from attnlib.ops.softmax import dot_product_attention

Array = jax.Array

KINDS = ("softmax", "linear", "sliding_window", "sigmoid")
FEATURE_MAPS = ("identity", "elu_plus_one", "relu", "taylor")
DECAYS = (None, "rate", "gate")

# Logical axis names of the parameters.
EMBED, HEADS, KV_HEADS, HEAD_DIM = "embed", "heads", "kv_heads", "head_dim"

# Initial gate bias of decay="gate": sigmoid(3) ~ 0.95, a slow initial decay.
GATE_BIAS_INIT = 3.0

_CFG = "AttentionConfig"


def _is_int(x: Any) -> bool:
  return isinstance(x, int) and not isinstance(x, bool)


def _is_real(x: Any) -> bool:
  return isinstance(x, (int, float)) and not isinstance(x, bool)


@dataclasses.dataclass(frozen=True)
class AttentionConfig:
  """Which attention an `Attention` layer computes.

  Attributes:
    kind: "softmax" (`al.dot_product_attention`), "linear"
      (`al.linear_attention` on feature-mapped q, k), "sliding_window"
      (`al.sliding_window_attention`) or "sigmoid" (`al.sigmoid_attention`).
    is_causal: mask keys after the query (every kind). A non-causal linear
      layer has no decay.
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
      default -log(T).
    rope: apply rotary position embeddings to q and k (before the feature
      map for linear attention).
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
    if (not _is_real(self.rope_theta) or not math.isfinite(self.rope_theta)
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
      ok = (_is_int(w) and w >= 0) or (
          isinstance(w, tuple) and len(w) == 2
          and all(_is_int(x) and x >= 0 for x in w))
      if not ok:
        _checks.fail(_CFG, "window", w,
                     "an int >= 0 or a tuple (left, right) of ints >= 0")
    if self.bias is not None and (not _is_real(self.bias)
                                  or not math.isfinite(self.bias)):
      _checks.fail(_CFG, "bias", self.bias, "None or a finite float")

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


def _partitioned(init, names):
  # Logical names only: no eager sharding (it needs a mesh and rules that map
  # the names onto mesh axes); shard with nnx.get_partition_spec under
  # nnx.logical_axis_rules after construction (e.g. in a jitted init).
  return nnx.with_partitioning(init, names, eager_sharding=False)


class Attention(nnx.Module):
  """Multi-head attention layer running one attnlib primitive.

  x [B, T, E] -> q [B, T, H, D], k, v [B, T, Hkv, D] (no biases; H % Hkv ==
  0: Hkv == H is multi-head, 1 < Hkv < H grouped-query, Hkv == 1
  multi-query) -> optional RoPE on q, k -> the primitive of `config` (with
  ``implementation=None``: the platform's kernel where it fits) -> the
  output projection to [B, T, E].

  Parameters and their logical axes:
    q.kernel [E, H, D] ("embed", "heads", "head_dim");
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
    self.q = nnx.LinearGeneral(
        embed_dim, (num_heads, head_dim),
        kernel_init=_partitioned(init, (EMBED, HEADS, HEAD_DIM)), **common)
    self.k = nnx.LinearGeneral(
        embed_dim, (num_kv_heads, head_dim),
        kernel_init=_partitioned(init, (EMBED, KV_HEADS, HEAD_DIM)), **common)
    self.v = nnx.LinearGeneral(
        embed_dim, (num_kv_heads, head_dim),
        kernel_init=_partitioned(init, (EMBED, KV_HEADS, HEAD_DIM)), **common)
    self.o = nnx.LinearGeneral(
        (num_heads, head_dim), embed_dim, axis=(-2, -1),
        kernel_init=_partitioned(init, (HEADS, HEAD_DIM, EMBED)), **common)
    self.log_rate = nnx.data(None)
    self.gate = nnx.data(None)
    self.out_norm = nnx.data(None)
    if config.decay == "rate":
      rate_init = lambda key, shape, dtype: jnp.log(   # noqa: E731
          _retnet_rates(shape[0])).astype(dtype)
      self.log_rate = nnx.Param(
          _partitioned(rate_init, (HEADS,))(rngs.params(), (num_heads,),
                                            param_dtype))
    elif config.decay == "gate":
      self.gate = nnx.Linear(
          embed_dim, num_heads, dtype=dtype, param_dtype=param_dtype,
          kernel_init=_partitioned(init, (EMBED, HEADS)),
          bias_init=_partitioned(nnx.initializers.constant(GATE_BIAS_INIT),
                                 (HEADS,)), rngs=rngs)
    if config.output_norm:
      self.out_norm = nnx.RMSNorm(
          head_dim, dtype=dtype, param_dtype=param_dtype,
          scale_init=_partitioned(nnx.initializers.ones, (HEAD_DIM,)),
          rngs=rngs)

  def decay(self, x: Array) -> Array | None:
    """The linear kind's decay argument for input x: None, [H] or [B, T, H]."""
    if self.log_rate is not None:
      return jnp.exp(self.log_rate[...].astype(jnp.float32))
    if self.gate is not None:
      return jax.nn.log_sigmoid(self.gate(x).astype(jnp.float32))
    return None

  def __call__(self, x: Array, *, positions: Array | None = None) -> Array:
    """x [B, T, E] -> [B, T, E]; positions [T] or [B, T] (default arange(T))."""
    op = "attnlib.nn.Attention"
    if not hasattr(x, "shape") or x.ndim != 3 or x.shape[-1] != self.embed_dim:
      _checks.fail(op, "x.shape", _checks.shape_of(x),
                   f"[B, T, {self.embed_dim}]")
    cfg = self.config
    q, k, v = self.q(x), self.k(x), self.v(x)
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


def _attend(cfg: AttentionConfig, q: Array, k: Array, v: Array, *,
            decay: Array | None = None, is_causal: bool | None = None,
            implementation: str | None = None) -> Array:
  """Runs cfg's primitive on [B, T, H, D] q and [B, T, Hkv, D] k, v."""
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
  phi = cfg.feature_map_fn
  return linear_attention(phi(q), phi(k), v, is_causal=causal, decay=decay,
                          implementation=implementation)


def attention_fn(kind: str, **options: Any) -> Callable[..., Array]:
  """An ``attention_fn`` for `flax.nnx.MultiHeadAttention` running a primitive.

  ``options`` are `AttentionConfig` fields other than ``kind``; the ones
  that need parameters or positions (linear ``decay``, ``output_norm``,
  ``rope``) are not available here (use `Attention`). ``is_causal`` (default
  False here, like nnx's) is or-ed with the ``is_causal`` the module passes.

  The returned function takes nnx's arguments (query [..., T, H, D], key and
  value [..., S, H, D], bias, mask, dropout arguments, dtype, precision,
  module, promote_dtype, is_causal); ``mask`` and ``bias`` are supported by
  the softmax kind only; dropout (rate > 0, not deterministic) and
  ``module`` (sow_weights) are not supported.

  Raises:
    ValueError: a bad kind or option (as `AttentionConfig`), or, at call
      time, an unsupported argument.
  """
  options.setdefault("is_causal", False)
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
    if dropout_rate > 0.0 and not deterministic:
      _checks.fail(op, "dropout_rate", dropout_rate,
                   "0.0 (or deterministic=True)")
    if module is not None:
      _checks.fail(op, "module", type(module).__name__,
                   "None (sow_weights is not supported)")
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
