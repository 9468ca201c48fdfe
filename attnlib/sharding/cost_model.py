r"""Analytical inference cost model of Pope et al. 2022 (arXiv 2211.05102).

"Efficiently Scaling Transformer Inference" (below: "the paper") prices one
forward step of a decoder-only Transformer partitioned over an x*y*z mesh of
chips by three per-chip quantities -- FLOPs, HBM bytes and network bytes --
and turns them into time with a chip's peak FLOP/s, HBM bandwidth and
interconnect bandwidth (§2, §3, Appendix A). This module does the same, per
layer and per layout, for a `ModelSpec` on a `ChipSpec` (attnlib.sharding.chips).

Notation (the paper's, §3.1): B batch, L tokens per sequence in this step
(prefill: the prompt length; decode: 1), T = B*L, E = d_model, F = d_ff,
n = x*y*z chips, X, Y, Z the mesh axis sizes.

Feedforward layouts (§3.2; weights stay in the E_x F_yz layout for all of
them, as in the paper, so prefill and decode can use different layouts):

* "ws1d" -- 1D weight-stationary (§3.2.1): F sharded over xyz. Activations
  all-gathered before and reduce-scattered after: per chip
  T_comm ~ 2BLE / bandwidth, independent of n.
* "ws2d" -- 2D weight-stationary (§3.2.2): E over x, F over yz.
  T_comm ~ 2BLE/(X bw) + 2BLF/(YZ bw); with X = sqrt(n E/F) this is
  8BLE / (sqrt(n) bw) for F = 4E, so it beats 1D once sqrt(n) > F/E.
* "wg_x", "wg_xy", "wg_xyz" -- weight-gathered (§3.2.3): the weights are
  all-gathered over N = X, XY or XYZ chips and the batch is split N ways.
  T_comm ~ 2EFN/(n bw) (weights) + 2BLE/(N bw) (activations), minimal at
  N = sqrt(BLn/F) where it is 4E sqrt(BLF) / (sqrt(n) bw) -- it grows like
  sqrt(BL), so it wins over weight-stationary at large prefill batches.

Attention layouts (§3.3):

* "heads" -- query heads sharded like the feedforward hidden axis. With
  multi-query/GQA and fewer KV heads than head shards the KV heads (and the
  whole KV cache) are replicated on every chip of a group: the memory savings
  of multi-query attention are lost (Figure 4b).
* "batch_kv" -- the KV cache sharded over the batch on all n chips; q (and the new
  k, v) are resharded from heads to batch with an all-to-all and the attention
  output is sent back with another (Figure 4c / 5b). The all-to-alls move
  O(B L H d_head / n) bytes; the KV cache read shrinks n-fold.

Parallel block (§3.4, PaLM): attention and feedforward read the same
layer-normed input, so the fused input matmul [W_in | W_q | W_k | W_v] and the
fused output matmul [W_out ; W_o] share one set of activation collectives per
layer. A serial block pays them twice.

Network bytes. The feedforward collectives come from
`attnlib.sharding.feedforward.ffn_collectives` (the exact list of collectives
the shard_map program performs; checked there against the compiled HLO) and
those of a stand-alone attention layer from
`attnlib.sharding.attention.attention_collectives`, so model and programs
agree exactly. `_reference_ffn_collectives` / `_reference_attention_collectives`
here are the same dataflow (the paper's Appendix A) written independently,
used for shapes the programs do not take (fractional equivalent widths,
replicated KV heads) and cross-checked against them in the tests. Convention:
`bytes_per_chip` is what each chip sends; ring all-gathers / reduce-scatters
over k chips send (k-1)/k of the gathered / reduced buffer. A gated (SwiGLU)
or fused block has a wider first matmul (h1 columns) than second (h2 rows);
every layout communicates either both widths once over the same group
(weight-stationary: reduce-scatter of h1, all-gather of h2) or both weight
matrices (weight-gathered: E*h1 + h2*E), so it is priced exactly as a plain
two-matmul FFN with d_ff = (h1 + h2) / 2.

Time convention (documented choice). The paper overlaps communication with
compute where it can (Looped CollectiveEinsum, §3.5) but its analytical
formulas price communication on its own. Default ("roofline"):

    time = max(compute, memory) + communication,

i.e. matmuls stream their operands from HBM at full overlap (the roofline) and
collectives are not hidden. `CostConfig(overlap="full")` gives
max(compute, memory, communication) (everything hidden: a lower bound) and
`overlap="none"` the plain sum (an upper bound, before fixed overheads).
All collectives run at the chip's single `ici_bandwidth` ("flat", the paper's
convention: its formulas have one "network bandwidth"); `network="axis_aware"`
instead gives a collective over k of a torus' d dimensions k/d of it.

FLOPs: 2 per parameter per token for the matmuls (§2) plus 4 * n_heads *
d_head * (attended positions) per token per layer for q.k and p.v (causal
prefill: (L+1)/2 on average). MFU (§2) counts the model's own FLOPs (without
the head padding of PaLM 540B, §4) against bf16 peak. HBM bytes: each chip
reads its weight shard once per step (weight-gathered layouts: the gathered
copy), reads its KV-cache shard once per decode step (writes it in prefill),
and reads + writes its activation shards around the two fused matmuls.
Not priced: layer norms, softmax, sampling, embedding lookups, the logits'
collectives, kernel launch and collective latencies (see
docs/sharding_cost_model.md for what that leaves out of the small-batch decode
numbers).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

from attnlib.sharding.chips import ChipSpec
from attnlib.sharding.chips import get_chip

__all__ = [
    "ATTENTION_LAYOUTS",
    "Collective",
    "CostConfig",
    "FFN_COLLECTIVES_SOURCE",
    "FFN_LAYOUTS",
    "InferenceCost",
    "ModelSpec",
    "PAPER_COMPUTE_EFFICIENCY",
    "PAPER_CONFIG",
    "PALM_8B",
    "PALM_62B",
    "PALM_540B",
    "PHASES",
    "asymptotic_ffn_comm_bytes",
    "attention_collectives",
    "collectives_time",
    "default_mesh",
    "estimate",
    "ffn_collectives",
    "ffn_network_bytes",
    "kv_cache_bytes_per_chip",
    "layer_collectives",
    "max_context_length",
]

FFN_LAYOUTS = ("ws1d", "ws2d", "wg_x", "wg_xy", "wg_xyz")
ATTENTION_LAYOUTS = ("heads", "batch_kv")
PHASES = ("prefill", "decode")
_AXES = ("x", "y", "z")

# The one global constant of the PaLM reproduction: the fraction of bf16 peak
# that large matmuls reach. The paper reports 76% MFU for large-batch prefill
# with weight-gathered layouts "when the communication overhead is almost
# negligible" (§4.1, Figure 7; Table 2), i.e. it states that ~76% of peak is
# what its kernels achieve with communication out of the way.
PAPER_COMPUTE_EFFICIENCY = 0.76


# --------------------------------------------------------------------------- collectives


@dataclasses.dataclass(frozen=True)
class _LocalCollective:
  """Fallback of attnlib.sharding.feedforward.Collective (same fields)."""

  kind: str
  axes: tuple[str, ...]
  bytes_per_chip: float


def _ring(full_bytes: float, group: int) -> float:
  sent = (group - 1) * full_bytes / group
  return int(sent) if float(sent).is_integer() else sent


def _reference_ffn_collectives(layout: str, *, tokens: int, d_model: int, d_ff: float,
                               mesh_shape: Mapping[str, int], dtype_bytes: float,
                               mlp: str = "gelu") -> list[Any]:
  """Exact per-chip collectives of the paper's feedforward layouts (Appendix A).

  The same signature, dataflow and convention as
  attnlib.sharding.feedforward.ffn_collectives (helper I's program-exact
  list; the cost model checks the two agree): a plain (mlp="gelu":
  W_in [E, F], W_out [F, E]) or gated (mlp="swiglu": W_gate, W_up [E, F],
  W_down [F, E]) FFN on `tokens` tokens, weights stored E_x F_yz,
  activations entering and leaving the layer as T E_xyz (weight-stationary)
  or T_G E_R (weight-gathered over G, R the other axes). bytes_per_chip is
  what one chip sends: a ring all-gather over k chips sends (k-1)/k of the
  gathered buffer, a ring reduce-scatter (k-1)/k of the reduced buffer.
  Collectives over groups of size 1 are omitted and `axes` names only axes of
  size > 1. Unlike the program's version, fractional widths are allowed
  (bytes stay floats), which `layer_collectives` uses for fused blocks.
  """
  if layout not in FFN_LAYOUTS:
    raise ValueError(f"unknown feedforward layout {layout!r}; expected one of {FFN_LAYOUTS}")
  if mlp not in ("gelu", "swiglu"):
    raise ValueError(f"unknown mlp {mlp!r}; expected gelu or swiglu")
  shape = {a: int(mesh_shape.get(a, 1)) for a in _AXES}
  x, y, z = (shape[a] for a in _AXES)
  t, e, f, b = tokens, d_model, d_ff, dtype_bytes
  n_in = 1 if mlp == "gelu" else 2
  out: list[Any] = []

  def add(kind, axes, full_bytes):
    axes = tuple(a for a in axes if shape[a] > 1)
    group = math.prod(shape[a] for a in axes)
    if group > 1:
      out.append(Collective(kind, axes, _ring(full_bytes, group)))

  if layout == "ws1d":
    add("all-gather", _AXES, t * e * b)              # T E_xyz -> T E
    add("reduce-scatter", _AXES, t * e * b)          # T E {partial xyz} -> T E_xyz
  elif layout == "ws2d":
    yz = y * z
    add("all-gather", ("y", "z"), t * e / x * b)     # T E_xyz -> T E_x
    for _ in range(n_in):                            # T F_yz {partial x} -> T F_xyz
      add("reduce-scatter", ("x",), t * f / yz * b)
    add("all-gather", ("x",), t * f / yz * b)        # T F_xyz -> T F_yz
    add("reduce-scatter", ("y", "z"), t * e / x * b)  # T E_x {partial yz} -> T E_xyz
  else:
    gathered = _WG_GATHER[layout]
    rest = tuple(a for a in _AXES if a not in gathered)
    g = math.prod(shape[a] for a in gathered)
    r = math.prod(shape[a] for a in rest)
    add("all-gather", rest, t / g * e * b)           # T_G E_R -> T_G E
    for _ in range(n_in + 1):                        # each E_x F_yz weight -> E F_R
      add("all-gather", gathered, e * f / r * b)
    add("reduce-scatter", rest, t / g * e * b)       # T_G E {partial R} -> T_G E_R
  return out


def _reference_attention_collectives(layout: str, *, batch: int, tokens: int, embed_dim: int,
                                     num_heads: int, num_kv_heads: int, head_dim: int,
                                     mesh_shape: Mapping[str, int], dtype_bytes: float,
                                     kind: str = "softmax") -> list[Any]:
  """Per-chip collectives of one stand-alone attention layer (§3.3).

  The dataflow and convention of attnlib.sharding.attention's programs
  (helper J's `attention_collectives`): activations B T E_A in and out (A =
  the mesh axes of size > 1, n chips), an all-gather of x, for "batch_kv"
  an all-to-all of q (B T H D / n per chip) to batch-sharding and one of the
  attention output back, and a reduce-scatter of the output projection's
  partial sums. Here "heads" also accepts fewer KV heads than chips (the
  paper's "baseline multiquery", Figure 4b): each chip then computes its KV
  heads from the gathered x with replicated W_k, W_v -- no extra
  communication, but the KV cache is replicated (see kv_cache_bytes_per_chip).
  """
  if layout not in ATTENTION_LAYOUTS:
    raise ValueError(f"unknown attention layout {layout!r}; expected one of {ATTENTION_LAYOUTS}")
  shape = {a: int(mesh_shape.get(a, 1)) for a in _AXES}
  axes = tuple(a for a in _AXES if shape[a] > 1)
  n = math.prod(shape[a] for a in axes)
  if n == 1:
    return []
  act = batch * tokens * embed_dim * dtype_bytes
  out = [Collective("all-gather", axes, _ring(act, n))]
  if layout == "batch_kv":
    local_q = batch * tokens * num_heads * head_dim * dtype_bytes / n
    a2a = Collective("all-to-all", axes, _ring(local_q, n))
    out += [a2a] if kind == "aaren" else [a2a, a2a]
  out.append(Collective("reduce-scatter", axes, _ring(act, n)))
  return out


_WG_GATHER = {"wg_x": ("x",), "wg_xy": ("x", "y"), "wg_xyz": _AXES}

try:  # helper I's program-exact collectives, if present
  from attnlib.sharding.feedforward import Collective  # type: ignore[no-redef]
  from attnlib.sharding.feedforward import ffn_collectives as _program_ffn_collectives
  FFN_COLLECTIVES_SOURCE = "attnlib.sharding.feedforward.ffn_collectives"
except ModuleNotFoundError as _err:  # pragma: no cover - depends on the tree
  if _err.name != "attnlib.sharding.feedforward":
    raise
  Collective = _LocalCollective  # type: ignore[misc,assignment]
  _program_ffn_collectives = None
  FFN_COLLECTIVES_SOURCE = "attnlib.sharding.cost_model._reference_ffn_collectives"

_ATTENTION_MODULE: Any = None


def _program_attention_collectives():
  """helper J's attention_collectives, imported lazily (it pulls in flax)."""
  global _ATTENTION_MODULE
  if _ATTENTION_MODULE is None:
    try:
      from attnlib.sharding import attention as mod  # pylint: disable=import-outside-toplevel
    except ModuleNotFoundError as err:  # pragma: no cover - depends on the tree
      if err.name != "attnlib.sharding.attention":
        raise
      mod = False
    _ATTENTION_MODULE = mod
  return getattr(_ATTENTION_MODULE, "attention_collectives", None) if _ATTENTION_MODULE else None


def _is_int(v) -> bool:
  return not isinstance(v, bool) and float(v).is_integer()


def ffn_collectives(layout: str, *, tokens: int, d_model: int, d_ff: float,
                    mesh_shape: Mapping[str, int], dtype_bytes: float,
                    mlp: str = "gelu") -> list[Any]:
  """Per-chip collectives of one feedforward layer in `layout`.

  Delegates to attnlib.sharding.feedforward.ffn_collectives -- the exact list
  the shard_map program of that layout performs -- when it is present and the
  shape is one that program accepts; a fractional width (the equivalent d_ff
  of a fused block) or a non-integer dtype size uses the reference formulas
  (`_reference_ffn_collectives`: same dataflow; tests check they agree).

  Raises:
    ValueError: unknown layout, or (program) dimensions not divisible by the
      mesh axes they are sharded over.
  """
  if layout not in FFN_LAYOUTS:
    raise ValueError(f"unknown feedforward layout {layout!r}; expected one of {FFN_LAYOUTS}")
  kw = dict(tokens=tokens, d_model=d_model, mesh_shape=dict(mesh_shape), mlp=mlp)
  if (_program_ffn_collectives is not None and _is_int(d_ff) and _is_int(dtype_bytes)
      and _is_int(tokens)):
    return list(_program_ffn_collectives(layout, d_ff=int(d_ff), dtype_bytes=int(dtype_bytes),
                                         **{**kw, "tokens": int(tokens)}))
  return _reference_ffn_collectives(layout, d_ff=d_ff, dtype_bytes=dtype_bytes, **kw)


def attention_collectives(layout: str, *, batch: int, tokens: int, embed_dim: int,
                          num_heads: int, num_kv_heads: int, head_dim: int,
                          mesh_shape: Mapping[str, int], dtype_bytes: float,
                          kind: str = "softmax") -> list[Any]:
  """Per-chip collectives of one stand-alone attention layer in `layout`.

  Delegates to attnlib.sharding.attention.attention_collectives (the exact
  list its shard_map programs perform) when present; requests that program
  rejects only because there are fewer KV heads than chips ("heads" with
  multi-query: the paper's baseline layout, which replicates the KV cache)
  use `_reference_attention_collectives`.
  """
  kw = dict(batch=batch, tokens=tokens, embed_dim=embed_dim, num_heads=num_heads,
            num_kv_heads=num_kv_heads, head_dim=head_dim, mesh_shape=dict(mesh_shape),
            kind=kind)
  program = _program_attention_collectives()
  shape = {a: int(mesh_shape.get(a, 1)) for a in _AXES}
  n = math.prod(shape.values())
  replicated_kv = layout == "heads" and num_kv_heads % n != 0 and n % num_kv_heads == 0
  if program is not None and not replicated_kv and _is_int(dtype_bytes):
    return list(program(layout, dtype_bytes=int(dtype_bytes), **kw))
  if layout not in ATTENTION_LAYOUTS:
    raise ValueError(f"unknown attention layout {layout!r}; expected one of {ATTENTION_LAYOUTS}")
  return _reference_attention_collectives(layout, dtype_bytes=dtype_bytes, **kw)


def ffn_network_bytes(layout: str, *, tokens: int, d_model: int, d_ff: float,
                      mesh_shape: Mapping[str, int], dtype_bytes: float,
                      mlp: str = "gelu") -> float:
  """Total bytes one chip sends for one feedforward layer (`ffn_collectives`)."""
  return sum(c.bytes_per_chip for c in ffn_collectives(
      layout, tokens=tokens, d_model=d_model, d_ff=d_ff, mesh_shape=mesh_shape,
      dtype_bytes=dtype_bytes, mlp=mlp))


def asymptotic_ffn_comm_bytes(layout: str, *, tokens: int, d_model: int, d_ff: float,
                              mesh_shape: Mapping[str, int], dtype_bytes: float) -> float:
  """The paper's per-chip communication volume of a plain FFN, no (k-1)/k.

  §3.2 / Appendix A, with T = BL tokens:
    1D weight-stationary:  2 T E                       (T_comm = 2BLE / bw)
    2D weight-stationary:  2 T E / X + 2 T F / (YZ)    (= 8 T E / sqrt(n) at
                           X = sqrt(n E / F) when F = 4E)
    weight-gathered over N (N = X, XY, XYZ):
                           2 E F N / n + 2 T E / N     (= 4 E sqrt(T F / n) at
                           N = sqrt(T n / F); the activation term vanishes
                           for N = n)
  times the dtype size. Divide by the network bandwidth for the paper's T_comm.
  """
  x, y, z = (int(mesh_shape.get(a, 1)) for a in _AXES)
  n = x * y * z
  t, e, f = tokens, d_model, d_ff
  if layout == "ws1d":
    v = 2 * t * e
  elif layout == "ws2d":
    v = 2 * t * e / x + 2 * t * f / (y * z)
  elif layout in _WG_GATHER:
    big_n = {"wg_x": x, "wg_xy": x * y, "wg_xyz": n}[layout]
    v = 2 * e * f * big_n / n + (2 * t * e / big_n if big_n < n else 0.0)
  else:
    raise ValueError(f"unknown feedforward layout {layout!r}; expected one of {FFN_LAYOUTS}")
  return v * dtype_bytes


# --------------------------------------------------------------------------- model


@dataclasses.dataclass(frozen=True)
class ModelSpec:
  """A decoder-only Transformer, as the cost model sees it.

  Attributes:
    name: label.
    n_layers, d_model, d_ff, n_heads, n_kv_heads, d_head, vocab: shapes
      (n_kv_heads = 1: multi-query; = n_heads: multi-head; else GQA).
    parallel_block: PaLM's parallel attention + feedforward (§3.4).
    gated_ffn: SwiGLU/GeGLU feedforward (two E x F input matrices), as PaLM.
    weight_bytes: bytes per stored weight (2 bf16, 1 int8 -- §3.6).
    kv_bytes, act_bytes: bytes per KV-cache / activation element.
    n_heads_padded: query heads actually stored and computed (PaLM 540B pads
      48 -> 64 to partition over 64 chips, §4); defaults to n_heads.
    tied_embeddings: input embedding shared with the output projection.
  """

  name: str
  n_layers: int
  d_model: int
  d_ff: int
  n_heads: int
  n_kv_heads: int
  d_head: int
  vocab: int
  parallel_block: bool = True
  gated_ffn: bool = True
  weight_bytes: float = 2
  kv_bytes: float = 2
  act_bytes: float = 2
  n_heads_padded: int | None = None
  tied_embeddings: bool = True

  def __post_init__(self):
    for f in ("n_layers", "d_model", "d_ff", "n_heads", "n_kv_heads", "d_head", "vocab"):
      if int(getattr(self, f)) < 1:
        raise ValueError(f"ModelSpec.{f} must be >= 1, got {getattr(self, f)!r}")
    if self.n_heads % self.n_kv_heads:
      raise ValueError(f"n_heads={self.n_heads} is not a multiple of n_kv_heads={self.n_kv_heads}")
    if self.n_heads_padded is not None and self.n_heads_padded < self.n_heads:
      raise ValueError("n_heads_padded must be >= n_heads")
    for f in ("weight_bytes", "kv_bytes", "act_bytes"):
      if not getattr(self, f) > 0:
        raise ValueError(f"ModelSpec.{f} must be > 0")

  # shapes ------------------------------------------------------------------
  @property
  def heads_stored(self) -> int:
    return self.n_heads_padded or self.n_heads

  def _layer_params(self, heads: int) -> int:
    e, f, d = self.d_model, self.d_ff, self.d_head
    ffn = (3 if self.gated_ffn else 2) * e * f
    attn = 2 * e * heads * d + 2 * e * self.n_kv_heads * d
    return ffn + attn

  @property
  def n_params(self) -> int:
    """Parameters of the model (PaLM 540B: 540.35e9, as in Chowdhery et al.)."""
    emb = self.vocab * self.d_model * (1 if self.tied_embeddings else 2)
    return self.n_layers * self._layer_params(self.n_heads) + emb

  @property
  def n_params_stored(self) -> int:
    """Parameters held in memory, including padded heads."""
    emb = self.vocab * self.d_model * (1 if self.tied_embeddings else 2)
    return self.n_layers * self._layer_params(self.heads_stored) + emb

  @property
  def matmul_params(self) -> int:
    """Parameters that take part in a matmul per token (the output projection
    once; the input embedding is a lookup)."""
    return self.n_layers * self._layer_params(self.n_heads) + self.vocab * self.d_model

  @property
  def matmul_params_stored(self) -> int:
    return self.n_layers * self._layer_params(self.heads_stored) + self.vocab * self.d_model

  def kv_bytes_per_token(self) -> float:
    """KV-cache bytes of one token of one sequence, all layers (unsharded)."""
    return 2 * self.n_layers * self.n_kv_heads * self.d_head * self.kv_bytes

  def hidden_widths(self) -> tuple[int, int]:
    """(h1, h2): output width of the fused first matmul and input width of the
    fused second matmul of a parallel block (§3.4)."""
    hp, d = self.heads_stored, self.d_head
    h1 = (2 if self.gated_ffn else 1) * self.d_ff + (hp + 2 * self.n_kv_heads) * d
    h2 = self.d_ff + hp * d
    return h1, h2

  def replace(self, **changes) -> ModelSpec:
    return dataclasses.replace(self, **changes)

  def with_int8_weights(self) -> ModelSpec:
    return self.replace(weight_bytes=1, name=self.name + "-int8")


# PaLM (Chowdhery et al. 2022, Table 1) as used by the paper (§4): multi-query
# attention (one KV head of 256), SwiGLU, parallel blocks, 256k vocabulary,
# tied embeddings. These reproduce PaLM's parameter counts 8.63B / 62.50B /
# 540.35B. PaLM 540B's 48 heads are padded to 64 for inference (§4).
PALM_8B = ModelSpec("palm-8b", n_layers=32, d_model=4096, d_ff=16384, n_heads=16,
                    n_kv_heads=1, d_head=256, vocab=256_000)
PALM_62B = ModelSpec("palm-62b", n_layers=64, d_model=8192, d_ff=32768, n_heads=32,
                     n_kv_heads=1, d_head=256, vocab=256_000)
PALM_540B = ModelSpec("palm-540b", n_layers=118, d_model=18432, d_ff=73728, n_heads=48,
                      n_kv_heads=1, d_head=256, vocab=256_000, n_heads_padded=64)


# --------------------------------------------------------------------------- config and result


@dataclasses.dataclass(frozen=True)
class CostConfig:
  """How FLOPs and bytes become time (see the module docstring).

  Attributes:
    overlap: "roofline" (max(compute, memory) + comm), "full" (max of all
      three) or "none" (sum of all three).
    compute_efficiency: fraction of peak FLOP/s that matmuls reach (1.0: pure
      roofline; PAPER_CONFIG uses the paper's 76%).
    network: "flat" (every collective at chip.ici_bandwidth, as the paper) or
      "axis_aware" (k of d torus dimensions get k/d of it).
    compute_dtype: "bf16" (weights dequantized, §3.6) or "int8".
  """

  overlap: str = "roofline"
  compute_efficiency: float = 1.0
  network: str = "flat"
  compute_dtype: str = "bf16"

  def __post_init__(self):
    if self.overlap not in ("roofline", "full", "none"):
      raise ValueError(f"unknown overlap {self.overlap!r}; expected roofline, full or none")
    if not 0 < self.compute_efficiency <= 1:
      raise ValueError("compute_efficiency must be in (0, 1]")
    if self.network not in ("flat", "axis_aware"):
      raise ValueError(f"unknown network {self.network!r}; expected flat or axis_aware")
    if self.compute_dtype not in ("bf16", "int8"):
      raise ValueError(f"unknown compute_dtype {self.compute_dtype!r}")


PAPER_CONFIG = CostConfig(compute_efficiency=PAPER_COMPUTE_EFFICIENCY)


@dataclasses.dataclass(frozen=True)
class InferenceCost:
  """Cost of one forward step (prefill of B x L tokens, or one decode step).

  Per-chip quantities unless named otherwise; bytes are HBM traffic except
  `network_bytes` (bytes the chip sends) and the capacity fields.
  """

  model: ModelSpec
  chip: ChipSpec
  mesh: tuple[int, int, int]
  ffn_layout: str
  attention_layout: str
  phase: str
  batch: int
  seq_len: int
  context_len: int
  config: CostConfig
  flops: float
  model_flops: float
  weight_bytes: float
  kv_bytes: float
  activation_bytes: float
  network_bytes: float
  layer_collectives: tuple[Any, ...]
  compute_s: float
  memory_s: float
  comm_s: float
  time_s: float
  weight_capacity_bytes: float
  kv_capacity_bytes: float

  @property
  def n_chips(self) -> int:
    return math.prod(self.mesh)

  @property
  def tokens(self) -> int:
    return self.batch * self.seq_len

  @property
  def hbm_bytes(self) -> float:
    return self.weight_bytes + self.kv_bytes + self.activation_bytes

  @property
  def mfu(self) -> float:
    """Model FLOPs utilization: model FLOPs / (time * n * bf16 peak) (§2)."""
    return self.model_flops / (self.time_s * self.n_chips * self.chip.peak_flops)

  @property
  def cost_chip_s_per_token(self) -> float:
    """Chip-seconds per token (§4.4: n_chips * time / tokens)."""
    return self.n_chips * self.time_s / self.tokens

  @property
  def memory_capacity_bytes(self) -> float:
    return self.weight_capacity_bytes + self.kv_capacity_bytes

  @property
  def fits(self) -> bool:
    """Weights + KV cache fit in HBM (activations / workspace not counted)."""
    return self.memory_capacity_bytes <= self.chip.hbm_bytes

  @property
  def bound(self) -> str:
    parts = {"compute": self.compute_s, "memory": self.memory_s, "communication": self.comm_s}
    return max(parts, key=parts.get)

  def describe(self) -> str:
    x, y, z = self.mesh
    return (f"{self.ffn_layout}/{self.attention_layout} mesh {x}x{y}x{z}: "
            f"{self.time_s * 1e3:.2f} ms, MFU {self.mfu:.1%} "
            f"(compute {self.compute_s * 1e3:.2f}, memory {self.memory_s * 1e3:.2f}, "
            f"comm {self.comm_s * 1e3:.2f} ms)")


# --------------------------------------------------------------------------- layout geometry


def _mesh_tuple(mesh) -> tuple[int, int, int]:
  if isinstance(mesh, Mapping):
    unknown = set(mesh) - set(_AXES)
    if unknown:
      raise ValueError(f"unknown mesh axes {sorted(unknown)}; expected x, y, z")
    mesh = tuple(int(mesh.get(a, 1)) for a in _AXES)
  mesh = tuple(int(m) for m in mesh)
  if not 1 <= len(mesh) <= 3:
    raise ValueError(f"mesh must have 1 to 3 axes, got {mesh!r}")
  mesh = mesh + (1,) * (3 - len(mesh))
  if any(m < 1 for m in mesh):
    raise ValueError(f"mesh axis sizes must be >= 1, got {mesh!r}")
  return mesh  # type: ignore[return-value]


def _layout_geometry(layout: str, mesh: tuple[int, int, int]) -> dict[str, Any]:
  """Sharding of one layout: batch shards, hidden (F / heads) shards, E shards."""
  x, y, z = mesh
  n = x * y * z
  if layout == "ws1d":
    return dict(batch_shards=1, hidden_shards=n, e_shards=1, rest_axes=_AXES)
  if layout == "ws2d":
    return dict(batch_shards=1, hidden_shards=y * z, e_shards=x, rest_axes=_AXES)
  if layout == "wg_x":
    return dict(batch_shards=x, hidden_shards=y * z, e_shards=1, rest_axes=("y", "z"))
  if layout == "wg_xy":
    return dict(batch_shards=x * y, hidden_shards=z, e_shards=1, rest_axes=("z",))
  if layout == "wg_xyz":
    return dict(batch_shards=n, hidden_shards=1, e_shards=1, rest_axes=())
  raise ValueError(f"unknown feedforward layout {layout!r}; expected one of {FFN_LAYOUTS}")


def _attention_geometry(model: ModelSpec, layout: str, attention_layout: str,
                        mesh: tuple[int, int, int], batch: int) -> dict[str, Any]:
  """Batch and head sharding of attention (and of the KV cache)."""
  if attention_layout not in ATTENTION_LAYOUTS:
    raise ValueError(f"unknown attention layout {attention_layout!r}; expected one of "
                     f"{ATTENTION_LAYOUTS}")
  n = math.prod(mesh)
  geo = _layout_geometry(layout, mesh)
  if attention_layout == "batch_kv":
    if batch % n:
      raise ValueError(f"batch-sharded attention (batch_kv) needs the batch ({batch}) to be a "
                       f"multiple of the number of chips ({n}); use attention_layout='heads'")
    return dict(batch_shards=n, head_shards=1, kv_heads_per_chip=model.n_kv_heads,
                kv_replicated=False)
  # Query heads follow the feedforward hidden axis: in weight-stationary layouts
  # the fused first matmul leaves them sharded over all n chips (2D: after the
  # reduce-scatter over x), in weight-gathered ones over the non-gathered axes.
  bsh = geo["batch_shards"]
  hsh = n // bsh
  hp = model.heads_stored
  if hsh > hp:
    raise ValueError(f"head-sharded attention over {hsh} shards but the model has only {hp} "
                     f"heads (more shards than heads); use attention_layout='batch_kv' or fewer "
                     f"chips")
  if hp % hsh:
    raise ValueError(f"{hp} heads are not divisible into {hsh} head shards")
  kv = model.n_kv_heads
  if kv % hsh == 0:
    kv_pc, replicated = kv // hsh, False
  elif hsh % kv == 0:
    kv_pc, replicated = 1, True  # Figure 4b: KV heads (and cache) replicated
  else:
    raise ValueError(f"{kv} KV heads cannot be split over {hsh} head shards")
  if batch % bsh:
    raise ValueError(f"batch {batch} is not divisible by the {bsh} batch shards of {layout}")
  return dict(batch_shards=bsh, head_shards=hsh, kv_heads_per_chip=kv_pc, kv_replicated=replicated)


def _check_divisible(model: ModelSpec, layout: str, mesh: tuple[int, int, int], batch: int):
  """The divisibility the layouts' programs need (attnlib.sharding.feedforward)."""
  geo = _layout_geometry(layout, mesh)
  n = math.prod(mesh)
  e_div = n if layout in ("ws1d", "ws2d") else max(geo["e_shards"], n // geo["batch_shards"])
  if model.d_model % e_div:
    raise ValueError(f"d_model={model.d_model} is not divisible by {e_div} (layout {layout}, "
                     f"mesh {mesh})")
  f_div = n if layout in ("ws1d", "ws2d") else mesh[1] * mesh[2]
  if model.d_ff % f_div:
    raise ValueError(f"d_ff={model.d_ff} is not divisible by {f_div} (layout {layout}, "
                     f"mesh {mesh})")
  if batch % geo["batch_shards"]:
    raise ValueError(f"batch={batch} is not divisible by the {geo['batch_shards']} batch shards "
                     f"of {layout}")


def kv_cache_bytes_per_chip(model: ModelSpec, *, batch: int, context_len: int, n_chips: int = 1,
                            attention_layout: str = "batch_kv", ffn_layout: str = "ws2d",
                            mesh=None) -> float:
  """KV-cache bytes held by one chip for `batch` sequences of `context_len`.

  "batch_kv": batch / n sequences of all KV heads; "heads": all sequences of
  the chip's KV heads -- Hkv / shards, or one whole replicated head when there
  are fewer KV heads than shards (baseline multi-query, Figure 4b).
  """
  mesh = _mesh_tuple(mesh or (n_chips,))
  att = _attention_geometry(model, ffn_layout, attention_layout, mesh, batch)
  per_seq = 2 * model.n_layers * att["kv_heads_per_chip"] * model.d_head * model.kv_bytes
  return batch // att["batch_shards"] * context_len * per_seq


def max_context_length(model: ModelSpec, chip: ChipSpec | str, n_chips: int, *, batch: int,
                       attention_layout: str, kv_fraction: float = 0.3, mesh=None,
                       ffn_layout: str = "ws2d") -> int:
  """Longest context whose KV cache fits in `kv_fraction` of each chip's HBM.

  §4.2 / Table 1 reserve 30% of memory for the KV cache.
  """
  chip = get_chip(chip)
  per_token = kv_cache_bytes_per_chip(model, batch=batch, context_len=1, n_chips=n_chips,
                                      attention_layout=attention_layout, ffn_layout=ffn_layout,
                                      mesh=mesh)
  return int(kv_fraction * chip.hbm_bytes // per_token)


# --------------------------------------------------------------------------- collectives of a layer


def _fused_attention_collectives(model: ModelSpec, layout: str, attention_layout: str,
                                 mesh: tuple[int, int, int], tokens: int, batch: int) -> list[Any]:
  """Attention's own collectives in a parallel (fused) block."""
  att = _attention_geometry(model, layout, attention_layout, mesh, batch)
  geo = _layout_geometry(layout, mesh)
  shape = dict(zip(_AXES, mesh))
  b = model.act_bytes
  d, hp, kv = model.d_head, model.heads_stored, model.n_kv_heads
  out: list[Any] = []
  group_axes = tuple(a for a in geo["rest_axes"] if shape[a] > 1)
  group = math.prod(shape[a] for a in group_axes)
  if group <= 1:
    return out
  t_local = tokens / geo["batch_shards"]
  if attention_layout == "batch_kv":
    # All-to-all over the chips holding different heads of the same tokens:
    # q (with the new k, v riding along) from heads- to batch-sharded, and the
    # attention output back (Figure 5b).
    for width in ((hp + 2 * kv) * d, hp * d):
      out.append(Collective("all-to-all", group_axes, _ring(t_local * width / group * b, group)))
  elif att["kv_replicated"]:
    # Fewer KV heads than head shards: the fused matmul leaves the new k, v
    # split over the group, but every chip needs whole KV heads (Figure 4b).
    full = t_local * 2 * att["kv_heads_per_chip"] * d * b
    out.append(Collective("all-gather", group_axes, _ring(full, group)))
  return out


def layer_collectives(model: ModelSpec, *, ffn_layout: str, attention_layout: str, mesh,
                      tokens: int, batch: int) -> list[Any]:
  """All per-chip collectives of one Transformer layer.

  Parallel block (§3.4): the fused matmuls [W_in | W_q | W_k | W_v] (h1
  columns) and [W_out ; W_o] (h2 rows) share one set of feedforward-layout
  collectives, priced as a plain FFN with d_ff = (h1 + h2) / 2 (exact, see the
  module docstring), plus attention's all-to-alls (batch_kv) or KV gather
  (heads with replicated KV heads). Serial block: the feedforward layer's
  collectives (`ffn_collectives`, mlp="swiglu" when gated) plus the
  stand-alone attention layer's (`attention_collectives`; in weight-gathered
  layouts over the non-gathered axes for the chip's batch shard).
  Weight all-gathers are priced in weight bytes (int8 weights travel as int8).
  """
  mesh = _mesh_tuple(mesh)
  shape = dict(zip(_AXES, mesh))
  e, f = model.d_model, model.d_ff
  gathered = tuple(a for a in _WG_GATHER.get(ffn_layout, ()) if shape[a] > 1)
  ratio = model.weight_bytes / model.act_bytes

  def weights_in_weight_bytes(colls):
    out = []
    for c in colls:
      if gathered and ratio != 1 and c.kind == "all-gather" and tuple(c.axes) == gathered:
        c = Collective(c.kind, tuple(c.axes), c.bytes_per_chip * ratio)
      out.append(c)
    return out

  def fused(h1, h2, with_attention):
    width = (h1 + h2) / 2
    width = int(width) if float(width).is_integer() else width
    try:
      colls = ffn_collectives(ffn_layout, tokens=tokens, d_model=e, d_ff=width,
                              mesh_shape=shape, dtype_bytes=model.act_bytes)
    except ValueError:
      # The program needs the equivalent width itself to divide the mesh; the
      # real h1, h2 may still do (checked by _check_divisible): same formulas.
      colls = _reference_ffn_collectives(ffn_layout, tokens=tokens, d_model=e, d_ff=width,
                                         mesh_shape=shape, dtype_bytes=model.act_bytes)
    colls = weights_in_weight_bytes(colls)
    if with_attention:
      colls += _fused_attention_collectives(model, ffn_layout, attention_layout, mesh, tokens,
                                            batch)
    return colls

  if model.parallel_block:
    return fused(*model.hidden_widths(), with_attention=True)

  out = weights_in_weight_bytes(ffn_collectives(
      ffn_layout, tokens=tokens, d_model=e, d_ff=f, mesh_shape=shape,
      dtype_bytes=model.act_bytes, mlp="swiglu" if model.gated_ffn else "gelu"))
  hp, kv, d = model.heads_stored, model.n_kv_heads, model.d_head
  if ffn_layout == "ws1d":
    # The stand-alone attention program (attnlib.sharding.attention) is the
    # 1D layout: all-gather x, local heads (or batch rows), reduce-scatter.
    out += attention_collectives(
        attention_layout, batch=batch, tokens=tokens // batch, embed_dim=e, num_heads=hp,
        num_kv_heads=kv, head_dim=d, mesh_shape=shape, dtype_bytes=model.act_bytes)
  else:
    # Attention projections partitioned like the feedforward (the paper's
    # serial variant of §4.3): their own set of layout collectives.
    out += fused((hp + 2 * kv) * d, hp * d, with_attention=True)
  return out


def collectives_time(collectives: Sequence[Any], chip: ChipSpec, mesh,
                     network: str = "flat") -> float:
  """Seconds to run `collectives` one after another on `chip`."""
  mesh = _mesh_tuple(mesh)
  sizes = dict(zip(_AXES, mesh))
  total = 0.0
  for c in collectives:
    if c.bytes_per_chip <= 0:
      continue
    bw = chip.ici_bandwidth
    if network == "axis_aware" and chip.topology != "switch":
      k = sum(1 for a in c.axes if sizes.get(a, 1) > 1)
      bw = chip.ici_bandwidth * min(1.0, max(k, 1) / chip.torus_dims)
    total += c.bytes_per_chip / bw + chip.collective_latency_s
  return total


# --------------------------------------------------------------------------- the estimate


def estimate(model: ModelSpec, chip: ChipSpec | str, n_chips: int | None = None, *, batch: int,
             phase: str, seq_len: int | None = None, context_len: int | None = None,
             ffn_layout: str = "ws2d", attention_layout: str = "batch_kv", mesh=None,
             config: CostConfig | None = None) -> InferenceCost:
  """Cost of one prefill (B x seq_len tokens) or one decode step.

  Args:
    model: the model.
    chip: a ChipSpec or its name.
    n_chips: number of chips; may be omitted when `mesh` is given.
    batch: sequences.
    phase: "prefill" or "decode".
    seq_len: prompt length (prefill only).
    context_len: KV-cache length attended per sequence (decode only).
    ffn_layout: one of FFN_LAYOUTS.
    attention_layout: "heads" or "batch_kv".
    mesh: (x, y, z) or {"x": .., "y": .., "z": ..}; default: the paper's
      2D split X = 2^round(log2(sqrt(n E / F))) when possible, else (n, 1, 1).
    config: CostConfig (default: pure roofline).

  Raises:
    ValueError: unknown layout / phase names, a mesh whose size is not
      n_chips, shapes not divisible by their mesh axes, more head shards than
      heads, a batch that cannot be sharded as the layout asks.
  """
  chip = get_chip(chip)
  config = config or CostConfig()
  if phase not in PHASES:
    raise ValueError(f"unknown phase {phase!r}; expected one of {PHASES}")
  if ffn_layout not in FFN_LAYOUTS:
    raise ValueError(f"unknown feedforward layout {ffn_layout!r}; expected one of {FFN_LAYOUTS}")
  if attention_layout not in ATTENTION_LAYOUTS:
    raise ValueError(f"unknown attention layout {attention_layout!r}; expected one of "
                     f"{ATTENTION_LAYOUTS}")
  if batch < 1:
    raise ValueError(f"batch must be >= 1, got {batch}")
  if mesh is None:
    if n_chips is None:
      raise ValueError("give n_chips or mesh")
    mesh = default_mesh(model, n_chips)
  mesh = _mesh_tuple(mesh)
  n = math.prod(mesh)
  if n_chips is not None and n != n_chips:
    raise ValueError(f"mesh {mesh} has {n} chips, not n_chips={n_chips}")
  if phase == "prefill":
    if not seq_len or seq_len < 1:
      raise ValueError("prefill needs seq_len >= 1")
    length, ctx = seq_len, 0
  else:
    if context_len is None or context_len < 0:
      raise ValueError("decode needs context_len >= 0")
    length, ctx = 1, context_len
  _check_divisible(model, ffn_layout, mesh, batch)
  att = _attention_geometry(model, ffn_layout, attention_layout, mesh, batch)
  geo = _layout_geometry(ffn_layout, mesh)
  tokens = batch * length
  layers = model.n_layers
  e, d = model.d_model, model.d_head

  # FLOPs ------------------------------------------------------------------
  if phase == "prefill":
    positions = tokens * (length + 1) / 2  # causal: token i attends to i + 1 positions
  else:
    positions = tokens * (ctx + 1)
  attn_flops_per_head = 4 * d * positions * layers
  model_flops = 2 * model.matmul_params * tokens + attn_flops_per_head * model.n_heads
  exec_flops = 2 * model.matmul_params_stored * tokens + attn_flops_per_head * model.heads_stored
  flops = exec_flops / n

  # HBM bytes --------------------------------------------------------------
  layer_w = model.n_params_stored - model.vocab * e * (1 if model.tied_embeddings else 2)
  emb_w = model.vocab * e
  stored_w_bytes = (layer_w + emb_w * (1 if model.tied_embeddings else 2)) * model.weight_bytes / n
  if ffn_layout.startswith("wg"):
    gather = geo["batch_shards"]  # the gathered group size N
    weight_read = (layer_w * gather / n + emb_w / n) * model.weight_bytes
  else:
    weight_read = (layer_w + emb_w) * model.weight_bytes / n
  kv_per_chip_token = 2 * layers * att["kv_heads_per_chip"] * d * model.kv_bytes
  seqs_per_chip = batch // att["batch_shards"]
  if phase == "prefill":
    kv_traffic = seqs_per_chip * length * kv_per_chip_token          # written once
    kv_capacity = kv_traffic
  else:
    kv_traffic = seqs_per_chip * (ctx + 1) * kv_per_chip_token       # read all, write one
    kv_capacity = kv_traffic
  h1, h2 = model.hidden_widths()
  t_local = tokens / geo["batch_shards"]
  e_in = e / geo["e_shards"]
  act_elems = t_local * (e_in + h1 / geo["hidden_shards"] + h2 / geo["hidden_shards"] + e_in)
  activation_bytes = act_elems * model.act_bytes * layers

  # Network ----------------------------------------------------------------
  colls = layer_collectives(model, ffn_layout=ffn_layout, attention_layout=attention_layout,
                            mesh=mesh, tokens=tokens, batch=batch)
  network_bytes = sum(c.bytes_per_chip for c in colls) * layers
  comm_s = collectives_time(colls, chip, mesh, config.network) * layers

  # Time -------------------------------------------------------------------
  peak = chip.peak_flops
  if config.compute_dtype == "int8":
    peak = chip.peak_flops_int8 or chip.peak_flops
  compute_s = flops / (peak * config.compute_efficiency)
  memory_s = (weight_read + kv_traffic + activation_bytes) / chip.hbm_bandwidth
  if config.overlap == "roofline":
    time_s = max(compute_s, memory_s) + comm_s
  elif config.overlap == "full":
    time_s = max(compute_s, memory_s, comm_s)
  else:
    time_s = compute_s + memory_s + comm_s

  return InferenceCost(
      model=model, chip=chip, mesh=mesh, ffn_layout=ffn_layout,
      attention_layout=attention_layout, phase=phase, batch=batch, seq_len=length,
      context_len=ctx, config=config, flops=flops, model_flops=model_flops,
      weight_bytes=weight_read, kv_bytes=kv_traffic, activation_bytes=activation_bytes,
      network_bytes=network_bytes, layer_collectives=tuple(colls), compute_s=compute_s,
      memory_s=memory_s, comm_s=comm_s, time_s=time_s,
      weight_capacity_bytes=stored_w_bytes, kv_capacity_bytes=kv_capacity)


def default_mesh(model: ModelSpec, n_chips: int) -> tuple[int, int, int]:
  """The paper's 2D split: X ~ sqrt(n E / F) (Appendix A.2.1), a power of two
  dividing n and d_model; the rest of n goes to y (and z)."""
  if n_chips < 1:
    raise ValueError(f"n_chips must be >= 1, got {n_chips}")
  target = math.sqrt(n_chips * model.d_model / model.d_ff)
  best = 1
  for x in range(1, n_chips + 1):
    if n_chips % x == 0 and model.d_model % x == 0:
      if abs(math.log(x / target)) < abs(math.log(best / target)):
        best = x
  rest = n_chips // best
  y = 1
  for cand in range(int(math.isqrt(rest)), 0, -1):
    if rest % cand == 0:
      y = cand
      break
  return (best, rest // y, y)

