r"""Benchmarks attnlib's primitives against each other and against yardsticks.

Each configuration (one op, one sequence length, one implementation) is jitted,
warmed up, then timed as the median over --repeats of --iters back-to-back calls
ended by one block_until_ready. The table gives milliseconds per call, tokens/s,
TFLOP/s of the op's own arithmetic (see `_Problem.flops`) and the speed-up
against the first implementation listed (> 1 means faster than it). Results go
to --out as JSON and a PNG plot (ms against sequence length).

Implementations: the op's backends ("xla", "mosaic_tpu", "mosaic_gpu"), and
two yardsticks that compute softmax attention of the same q/k/v shapes with the
same causal flag and window: "cudnn_softmax" (jax.nn.dot_product_attention with
implementation="cudnn"; GPU only) and "xla_softmax" (the same with "xla").
Kernel options: for sliding_window_attention "mosaic_gpu_fused_bwd" and
"mosaic_gpu_persistent_bwd" (the Hopper kernel with `backward="fused"` /
`"persistent"` instead of "split"), "mosaic_gpu_pingpong" (with
`pingpong=True`), "mosaic_gpu_single_fwd" and "mosaic_gpu_ws_fwd" (with
`forward="single"` / `"warp_specialized"` instead of the window-dependent
"auto"); for sigmoid_attention "mosaic_gpu_no_pingpong" (the Hopper
kernel with its default `pingpong=True` turned off); for
sliding_window_attention, neighborhood_attention and sigmoid_attention
"mosaic_gpu_full_exit_wait" (kernels leave once their last stores have
landed, `mosaic_gpu_common.EXIT_READ_ONLY` off) and "mosaic_gpu_divide"
(forward outputs acc / l element by element, `NORMALIZE_BY_INVERSE` off),
"mosaic_gpu_old_epilogue" (both off); for neighborhood_attention
"mosaic_gpu_bias_mask" (the forward adds [64, 64] bias tiles instead of
its mask matmul, `mosaic_gpu_sparse.MASK_AS_MATMUL` off) and
"mosaic_gpu_kernel_long_q" (its forward with `SCOPED_Q` off: Q in SMEM for
the whole kernel, two CTAs an SM); for sliding_window_attention
"mosaic_gpu_unfolded_scale" (its forwards scale every score before the
softmax, `mosaic_gpu.FOLD_SCALE` off), "mosaic_gpu_dq_waits_both" (its dq
kernel waits for S and dP together, `mosaic_gpu_backward.OVERLAP_EXP` off)
and "mosaic_gpu_pv_first" (its dk/dv step in `PV_FIRST`'s order) and
"mosaic_gpu_one_loop" (every kernel's steps in one `emit_pipeline` loop,
`SPLIT_LOOPS` off in mosaic_gpu and mosaic_gpu_backward) and
"mosaic_gpu_split_dkv" (the dk/dv kernel's in two, `SPLIT_LOOPS_DKV` on);
for any op "mosaic_gpu_batch_fastest" (the old launch order).

Examples:
  # CPU smoke test
  python experiments/bench.py --op=linear_attention --seq_len=64 --batch=1 \
      --heads=2 --head_dim=16 --iters=2 --repeats=2 --out=/tmp/bench
  # H100: the xla reference against cuDNN softmax attention
  python experiments/bench.py --op=linear_attention --implementation=xla \
      --implementation=cudnn_softmax --batch=4 --heads=16 --head_dim=128 \
      --seq_len=2048 --seq_len=8192 --causal --decay=gate --mode=fwd_bwd
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import statistics
import time
from collections.abc import Callable

from absl import app
from absl import flags
from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

import attnlib as al
import kernel_profile
from kernels_pallas import mosaic_gpu_common
from kernels_pallas.local_attention import mosaic_gpu as swa_mosaic_gpu
from kernels_pallas.local_attention import mosaic_gpu_backward as swa_mosaic_gpu_backward
from kernels_pallas.local_attention import mosaic_gpu_sparse as na_mosaic_gpu
from kernels_pallas.sigmoid_attention import mosaic_gpu as sigmoid_mosaic_gpu

OPS = ("linear_attention", "sliding_window_attention", "neighborhood_attention",
       "sigmoid_attention", "attention_scan", "attention_scan_step",
       "dot_product_attention")
YARDSTICKS = ("cudnn_softmax", "xla_softmax")
# Kernel options not exposed by the ops, timed by calling the kernel module
# directly: sliding_window_attention's mosaic_gpu kernel with
# backward="fused" (one dk/dv/dq kernel; BENCHMARKS.md section 4h) or
# "persistent" (persistent dk/dv CTAs instead of one-shot ones; 4m, 4n) or
# pingpong=True (two compute warpgroups taking turns on the tensor cores), or
# one forward kernel whatever the window (forward="single" or
# "warp_specialized"), and
# sigmoid_attention's mosaic_gpu kernel with its default pingpong=True off.
SWA_FUSED_BWD = "mosaic_gpu_fused_bwd"
SWA_PERSISTENT_BWD = "mosaic_gpu_persistent_bwd"
PINGPONG = "mosaic_gpu_pingpong"
NO_PINGPONG = "mosaic_gpu_no_pingpong"
SWA_FORWARDS = {"mosaic_gpu_single_fwd": "single",
                "mosaic_gpu_ws_fwd": "warp_specialized"}
# Module switches, set while one mosaic_gpu row is traced afresh: the old
# launch order, batch fastest (mosaic_gpu_common.TILES_FASTEST off;
# BENCHMARKS.md section 5f), the epilogues before section 4q (a full wait
# for the last stores; acc / l divided element by element), and the
# neighborhood forward's bias tiles instead of its mask matmul (section 4r;
# mosaic_gpu_sparse.MASK_AS_MATMUL off), and its forward with Q in SMEM for
# the whole kernel (SCOPED_Q off; section 4r), and the sliding-window
# forwards with every score scaled before the softmax (mosaic_gpu.FOLD_SCALE
# off; section 4s), and its dq kernel waiting for both products at once
# (mosaic_gpu_backward.OVERLAP_EXP off; section 4t) or its dk/dv kernel's
# step in PV_FIRST's order (on; section 4t), and its kernels' steps in one
# loop (SPLIT_LOOPS off in both modules; section 4u) or the dk/dv kernel's
# in two (SPLIT_LOOPS_DKV on; section 4u).
BATCH_FASTEST = "mosaic_gpu_batch_fastest"
FULL_EXIT_WAIT = "mosaic_gpu_full_exit_wait"
DIVIDE = "mosaic_gpu_divide"
OLD_EPILOGUE = "mosaic_gpu_old_epilogue"
NA_BIAS_MASK = "mosaic_gpu_bias_mask"
NA_LONG_Q = "mosaic_gpu_kernel_long_q"
SWA_UNFOLDED = "mosaic_gpu_unfolded_scale"
SWA_DQ_WAITS_BOTH = "mosaic_gpu_dq_waits_both"
SWA_PV_FIRST = "mosaic_gpu_pv_first"
SWA_ONE_LOOP = "mosaic_gpu_one_loop"
SWA_SPLIT_DKV = "mosaic_gpu_split_dkv"
_COMMON = mosaic_gpu_common
SWITCHES = {BATCH_FASTEST: {(_COMMON, "TILES_FASTEST"): False},
            FULL_EXIT_WAIT: {(_COMMON, "EXIT_READ_ONLY"): False},
            DIVIDE: {(_COMMON, "NORMALIZE_BY_INVERSE"): False},
            OLD_EPILOGUE: {(_COMMON, "EXIT_READ_ONLY"): False,
                           (_COMMON, "NORMALIZE_BY_INVERSE"): False},
            NA_BIAS_MASK: {(na_mosaic_gpu, "MASK_AS_MATMUL"): False},
            NA_LONG_Q: {(na_mosaic_gpu, "SCOPED_Q"): False},
            SWA_UNFOLDED: {(swa_mosaic_gpu, "FOLD_SCALE"): False},
            SWA_DQ_WAITS_BOTH: {(swa_mosaic_gpu_backward, "OVERLAP_EXP"): False},
            SWA_PV_FIRST: {(swa_mosaic_gpu_backward, "PV_FIRST"): True},
            SWA_ONE_LOOP: {(swa_mosaic_gpu, "SPLIT_LOOPS"): False,
                           (swa_mosaic_gpu_backward, "SPLIT_LOOPS"): False},
            SWA_SPLIT_DKV: {(swa_mosaic_gpu_backward, "SPLIT_LOOPS_DKV"): True}}

_OP = flags.DEFINE_enum("op", "linear_attention", OPS, "Primitive to time.")
_IMPLEMENTATION = flags.DEFINE_multi_string(
    "implementation", ["xla"],
    "Implementations to time, in order; ratios are against the first. An op "
    "backend (xla, mosaic_tpu, mosaic_gpu) or a yardstick "
    f"({', '.join(YARDSTICKS)}); kernel options: {SWA_FUSED_BWD}, {SWA_PERSISTENT_BWD}, {PINGPONG}, "
    f"{', '.join(SWA_FORWARDS)} (sliding_window_attention), {NO_PINGPONG} (sigmoid_attention), "
    f"{FULL_EXIT_WAIT}, {DIVIDE}, {OLD_EPILOGUE} (those three ops), {NA_BIAS_MASK}, {NA_LONG_Q} "
    f"(neighborhood_attention), {SWA_UNFOLDED}, {SWA_DQ_WAITS_BOTH}, {SWA_PV_FIRST}, {SWA_ONE_LOOP}, {SWA_SPLIT_DKV} (sliding_window_attention), {BATCH_FASTEST} (any op's mosaic_gpu).")
_BATCH = flags.DEFINE_integer("batch", 4, "Batch size.")
_SEQ_LEN = flags.DEFINE_multi_integer(
    "seq_len", [1024], "Sequence lengths (for neighborhood_attention: the size "
    "of each of --spatial_dims axes).")
_HEADS = flags.DEFINE_integer("heads", 16, "Query heads.")
_KV_HEADS = flags.DEFINE_integer("kv_heads", None, "Key/value heads (default: --heads).")
_HEAD_DIM = flags.DEFINE_integer("head_dim", 128, "Query/key head dimension.")
_V_DIM = flags.DEFINE_integer("v_dim", None, "Value head dimension (default: --head_dim).")
_DTYPE = flags.DEFINE_enum("dtype", "bfloat16", ["bfloat16", "float16", "float32"], "Input dtype.")
_MODE = flags.DEFINE_enum("mode", "fwd", ["fwd", "fwd_bwd"],
                          "Forward only, or forward plus gradients of all inputs.")
_COTANGENT = flags.DEFINE_enum(
    "cotangent", "ones", ["ones", "random"],
    "fwd_bwd: the output cotangent dO. 'ones' differentiates sum(o) (dO all ones, "
    "which XLA may fold into the op's own reductions, e.g. delta = rowsum(dO * o) "
    "becomes rowsum(o)); 'random' pulls a fixed random dO (a timed input) back "
    "through jax.vjp, as a training step's backward sees it.")
_CAUSAL = flags.DEFINE_bool("causal", True, "is_causal, where the op has it.")
_WINDOW = flags.DEFINE_integer(
    "window", None, "sliding_window/sigmoid: local window w, meaning (w - 1, 0) "
    "when --causal else (w, w). Required for sliding_window_attention.")
_DECAY = flags.DEFINE_enum("decay", "none", ["none", "rate", "gate"],
                           "linear_attention: no decay, per-head rates [H] or per-token gates [B,T,H].")
_KERNEL_SIZE = flags.DEFINE_integer("kernel_size", 7, "neighborhood_attention kernel size per axis.")
_DILATION = flags.DEFINE_integer("dilation", 1, "neighborhood_attention dilation per axis.")
_STRIDE = flags.DEFINE_integer("stride", 1, "neighborhood_attention stride per axis.")
_SPATIAL_DIMS = flags.DEFINE_integer("spatial_dims", 2, "neighborhood_attention spatial axes (1-3).")
_WARMUP = flags.DEFINE_integer("warmup", 2, "Untimed calls after compilation.")
_ITERS = flags.DEFINE_integer("iters", 10, "Calls per timed repeat.")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Timed repeats; the median is reported.")
_MIN_TIME = flags.DEFINE_float(
    "min_time", 0.0, "Seconds each timed repeat lasts at least: --iters is raised "
    "per configuration until it does (short calls then average over more of them, "
    "so host dispatch and the first call's latency weigh less).", lower_bound=0.0)
_PROFILE = flags.DEFINE_bool(
    "profile", False, "Also trace --iters calls with jax.profiler and print each "
    "configuration's device kernels (time per call) and device busy time.")
_INTERPRET = flags.DEFINE_bool("interpret", False, "Run Pallas kernels in interpret mode.")
_OUT = flags.DEFINE_string("out", "out/bench", "Directory for results.json and plot.png.")


@dataclasses.dataclass(frozen=True)
class _Problem:
  """One op at one size: its inputs, the call, and its arithmetic."""
  args: tuple[jax.Array, ...]       # differentiable inputs, in call order
  call: Callable[..., jax.Array]    # call(*args, implementation=...) -> output
  tokens: int                       # query tokens processed (batch included)
  flops: float                      # forward FLOPs of the op's math (see _pairs_flops)
  softmax_flops: float              # forward FLOPs of the softmax yardstick
  softmax_kwargs: dict              # causal flag / window for the yardstick
  softmax_shape: tuple[int, int]    # (B, T) of the flattened tokens for the yardstick


def _attention_flops(batch: int, heads: int, pairs: float, d: int, dv: int) -> float:
  """2 FLOPs per multiply-add for q.k (d) and p.v (dv) on each visible pair."""
  return 2.0 * batch * heads * pairs * (d + dv)


def _window_pairs(t: int, left: int, right: int) -> int:
  """Number of (i, j) with 0 <= i, j < t and i - left <= j <= i + right."""
  i = np.arange(t)
  return int(np.sum(np.minimum(i + right, t - 1) - np.maximum(i - left, 0) + 1))


def _window() -> tuple[int, int] | None:
  if _WINDOW.value is None:
    return None
  w = _WINDOW.value
  return (w - 1, 0) if _CAUSAL.value else (w, w)


def _make_problem(op: str, seq_len: int, key: jax.Array) -> _Problem:
  b, h, d = _BATCH.value, _HEADS.value, _HEAD_DIM.value
  hkv = _KV_HEADS.value or h
  dv = _V_DIM.value or d
  dtype = jnp.dtype(_DTYPE.value)
  causal = _CAUSAL.value
  kq, kk, kv, kg = jax.random.split(key, 4)

  def rand(k, shape, scale=1.0):
    return (scale * jax.random.normal(k, shape, jnp.float32)).astype(dtype)

  if op == "neighborhood_attention":
    spatial = (seq_len,) * _SPATIAL_DIMS.value
    n = math.prod(spatial)
    q = rand(kq, (b, *spatial, h, d))
    k = rand(kk, (b, *spatial, hkv, d))
    v = rand(kv, (b, *spatial, hkv, dv))
    ks, dil = _KERNEL_SIZE.value, _DILATION.value
    # Per axis a query sees kernel_size keys (fewer near the start when causal).
    per_axis = ks
    if causal:
      i_g = np.arange(seq_len) // dil
      per_axis = float(np.mean(np.minimum(i_g + 1, ks)))
    pairs = n * per_axis ** len(spatial)
    call = lambda q, k, v, **kw: al.neighborhood_attention(
        q, k, v, kernel_size=ks, dilation=dil, stride=_STRIDE.value, is_causal=causal, **kw)
    return _Problem((q, k, v), call, b * n, _attention_flops(b, h, pairs, d, dv),
                    _attention_flops(b, h, n * n, d, dv), {}, (b, n))

  t = seq_len
  q = rand(kq, (b, t, h, d))
  k = rand(kk, (b, t, hkv, d))
  v = rand(kv, (b, t, hkv, dv))
  full_pairs = t * (t + 1) // 2 if causal else t * t
  softmax_kwargs = {"is_causal": causal}
  softmax_flops = _attention_flops(b, h, full_pairs, d, dv)

  if op == "linear_attention":
    args = (q, k, v)
    if _DECAY.value == "rate":
      decay = jnp.linspace(0.01, 0.5, h, dtype=jnp.float32)
      call = lambda q, k, v, **kw: al.linear_attention(
          q, k, v, is_causal=causal, decay=decay, **kw)
    elif _DECAY.value == "gate":
      g = jax.nn.log_sigmoid(4.0 + jax.random.normal(kg, (b, t, h), jnp.float32))
      args = (q, k, v, g)
      call = lambda q, k, v, g, **kw: al.linear_attention(
          q, k, v, is_causal=causal, decay=g, **kw)
    else:
      call = lambda q, k, v, **kw: al.linear_attention(q, k, v, is_causal=causal, **kw)
    # Recurrent form: per token and head, S += k^T v (2 K V) and o = q S (2 K V).
    flops = 4.0 * b * t * h * d * dv
    return _Problem(args, call, b * t, flops, softmax_flops, softmax_kwargs, (b, t))

  if op in ("sliding_window_attention", "sigmoid_attention", "dot_product_attention"):
    window = _window()
    if op == "sliding_window_attention" and window is None:
      raise app.UsageError("--op=sliding_window_attention needs --window.")
    pairs = full_pairs
    if window is not None:
      pairs = _window_pairs(t, window[0], 0 if causal else window[1])
      softmax_kwargs = {"is_causal": causal, "local_window_size": window}
      softmax_flops = _attention_flops(b, h, pairs, d, dv)
    if op == "sliding_window_attention":
      def call(q, k, v, implementation=None, interpret=False):
        if implementation in (SWA_FUSED_BWD, SWA_PERSISTENT_BWD, PINGPONG,
                              *SWA_FORWARDS):
          return swa_mosaic_gpu.sliding_window_attention(   # kernel options
              q, k, v, left=window[0], right=window[1], scale=d ** -0.5,
              interpret=interpret,
              forward=SWA_FORWARDS.get(implementation, "auto"),
              backward={SWA_FUSED_BWD: "fused",
                        SWA_PERSISTENT_BWD: "persistent"}.get(
                            implementation, "split"),
              pingpong=implementation == PINGPONG)
        return al.sliding_window_attention(
            q, k, v, local_window_size=window, is_causal=causal,
            implementation=implementation, interpret=interpret)
    elif op == "sigmoid_attention":
      def call(q, k, v, implementation=None, interpret=False):
        if implementation == NO_PINGPONG:  # the op's defaults, option off
          left, right = window if window is not None else (None, None)
          if causal:
            right = 0
          bias = jnp.full((h,), -math.log(t), jnp.float32)
          return sigmoid_mosaic_gpu.sigmoid_attention(
              q, k, v, bias, left=left, right=right, scale=d ** -0.5,
              interpret=interpret, pingpong=False)
        return al.sigmoid_attention(
            q, k, v, is_causal=causal, local_window_size=window,
            implementation=implementation, interpret=interpret)
    else:
      def call(q, k, v, implementation=None, interpret=False):
        del interpret  # jax.nn.dot_product_attention has no Pallas kernel.
        if implementation != "xla":  # its "cudnn" backend is the cudnn_softmax yardstick
          raise NotImplementedError(f"dot_product_attention has no {implementation!r} backend")
        return al.dot_product_attention(q, k, v, implementation="xla", **softmax_kwargs)
    return _Problem((q, k, v), call, b * t, _attention_flops(b, h, pairs, d, dv),
                    softmax_flops, softmax_kwargs, (b, t))

  if op == "attention_scan":
    q1 = rand(kq, (b, h, d))
    call = lambda q, k, v, **kw: al.attention_scan(q, k, v, **kw)
    # Per token and head: one logit (2 D) and one weighted value (2 V).
    flops = 2.0 * b * t * h * (d + dv)
    return _Problem((q1, k, v), call, b * t, flops, softmax_flops, softmax_kwargs, (b, t))

  if op == "attention_scan_step":
    # One decode step after a prefix of seq_len tokens: the state the prefix
    # leaves is [B, H] + [B, H] + [B, H, V] floats whatever seq_len is, so the
    # step's time and memory should not depend on it.
    q1 = rand(kq, (b, h, d))
    _, state = al.attention_scan(q1, k, v, return_final_state=True, implementation="xla")
    k1, v1 = k[:, -1], v[:, -1]
    del k, v
    def call(m, u, w, q, k, v, implementation=None, interpret=False):
      del interpret
      if implementation != "xla":
        raise NotImplementedError(f"attention_scan_step has no {implementation!r} backend")
      o, _ = al.attention_scan_step(al.AttentionScanState(m, u, w), q, k, v)
      return o  # o = new w / new u: the state update is computed either way
    flops = 2.0 * b * h * (d + dv)
    return _Problem((state.m, state.u, state.w, q1, k1, v1), call, b, flops,
                    softmax_flops, softmax_kwargs, (b, t))

  raise app.UsageError(f"--op={op!r}: expected one of {OPS}.")


def _softmax_yardstick(problem: _Problem, implementation: str) -> tuple[Callable, tuple]:
  """Softmax attention over the same tokens, heads and dims as the problem."""
  b, t = problem.softmax_shape
  d = _HEAD_DIM.value
  dv = _V_DIM.value or d
  h, hkv = _HEADS.value, _KV_HEADS.value or _HEADS.value
  if dv != d:
    raise app.UsageError("The softmax yardsticks need --v_dim == --head_dim.")
  dtype = jnp.dtype(_DTYPE.value)
  key = jax.random.key(1)
  shapes = ((b, t, h, d), (b, t, hkv, d), (b, t, hkv, d))
  args = tuple(jax.random.normal(k, s, jnp.float32).astype(dtype)
               for k, s in zip(jax.random.split(key, 3), shapes))
  impl = "cudnn" if implementation == "cudnn_softmax" else "xla"
  call = lambda q, k, v: jax.nn.dot_product_attention(
      q, k, v, implementation=impl, **problem.softmax_kwargs)
  return call, args


def _timed_fn(call: Callable, args: tuple) -> tuple[Callable, tuple]:
  """(jitted fn, its arguments) for --mode and --cotangent: the forward; the
  value and gradients of sum(o); or (o, the VJP of o at a random dO), with dO
  appended to the arguments."""
  if _MODE.value == "fwd":
    return jax.jit(call), args
  if _COTANGENT.value == "ones":
    loss = lambda *a: jnp.sum(call(*a).astype(jnp.float32))
    return jax.jit(jax.value_and_grad(loss, argnums=tuple(range(len(args))))), args
  out = jax.eval_shape(call, *args)
  do = jax.random.normal(jax.random.key(2), out.shape, jnp.float32).astype(out.dtype)

  def pullback(*a):
    o, vjp = jax.vjp(call, *a[:-1])
    return o, vjp(a[-1])
  return jax.jit(pullback), (*args, do)


def _time(fn: Callable, args: tuple) -> float:
  """Median seconds per call over --repeats groups of back-to-back calls:
  --iters calls, or more where --min_time asks for longer repeats."""
  jax.block_until_ready(fn(*args))  # compile
  start = time.perf_counter()
  for _ in range(max(_WARMUP.value, 1 if _MIN_TIME.value > 0 else 0)):
    jax.block_until_ready(fn(*args))
  iters = _ITERS.value
  if _MIN_TIME.value > 0:
    per_call = (time.perf_counter() - start) / max(_WARMUP.value, 1)
    iters = max(iters, math.ceil(_MIN_TIME.value / max(per_call, 1e-6)))
  samples = []
  for _ in range(_REPEATS.value):
    start = time.perf_counter()
    out = None
    for _ in range(iters):
      out = fn(*args)
    jax.block_until_ready(out)
    samples.append((time.perf_counter() - start) / iters)
  return statistics.median(samples)


def _memory(fn: Callable, args: tuple) -> dict:
  """Device memory of one call from XLA's compiled memory analysis: scratch
  ("temp_bytes") and scratch + arguments + outputs ("footprint_bytes", the
  peak XLA plans for; output buffers aliased to arguments counted once)."""
  try:
    stats = fn.lower(*args).compile().memory_analysis()
    temp = int(stats.temp_size_in_bytes)
    footprint = (temp + int(stats.argument_size_in_bytes)
                 + int(stats.output_size_in_bytes) - int(stats.alias_size_in_bytes))
    return {"temp_bytes": temp, "footprint_bytes": footprint}
  except Exception:  # pylint: disable=broad-except  # not every backend reports it
    return {"temp_bytes": None, "footprint_bytes": None}


def run_one(op: str, seq_len: int, implementation: str) -> dict:
  if implementation in SWITCHES:   # mosaic_gpu traced afresh, switch set
    settings = SWITCHES[implementation]
    defaults = {key: getattr(*key) for key in settings}
    jax.clear_caches()
    for (module, name), value in settings.items():
      setattr(module, name, value)
    try:
      row = run_one(op, seq_len, "mosaic_gpu")
    finally:
      for (module, name), value in defaults.items():
        setattr(module, name, value)
      jax.clear_caches()
    return {**row, "implementation": implementation}
  problem = _make_problem(op, seq_len, jax.random.key(0))
  if implementation in YARDSTICKS:
    if implementation == "cudnn_softmax" and jax.default_backend() != "gpu":
      raise RuntimeError("cudnn_softmax needs a GPU")
    call, args = _softmax_yardstick(problem, implementation)
    flops = problem.softmax_flops
  else:
    call = lambda *a: problem.call(*a, implementation=implementation,
                                   interpret=_INTERPRET.value)
    args, flops = problem.args, problem.flops
  fn, fn_args = _timed_fn(call, args)
  seconds = _time(fn, fn_args)
  device_busy_ms = None
  if _PROFILE.value:
    kernels, summary = kernel_profile.profile(fn, fn_args, iters=_ITERS.value)
    print(f"{op} seq_len={seq_len} {implementation}: {seconds * 1e3:.3f} ms/call wall")
    print(kernel_profile.format_table(kernels, summary))
    device_busy_ms = summary.busy_us_per_call / 1e3
  # The least HBM traffic of one forward call: every input read once, every
  # output written once (a roofline for memory-bound ops such as the scan).
  outs = jax.eval_shape(call, *args)
  hbm_bytes = sum(a.size * a.dtype.itemsize for a in jax.tree.leaves((args, outs)))
  if _MODE.value == "fwd_bwd":
    flops *= 3.5  # backward ~2.5x the forward's matmuls (FlashAttention's convention)
  return {
      "op": op, "implementation": implementation, "seq_len": seq_len,
      "batch": _BATCH.value, "heads": _HEADS.value, "kv_heads": _KV_HEADS.value or _HEADS.value,
      "head_dim": _HEAD_DIM.value, "v_dim": _V_DIM.value or _HEAD_DIM.value,
      "dtype": _DTYPE.value, "mode": _MODE.value, "cotangent": _COTANGENT.value,
      "causal": _CAUSAL.value,
      "ms": seconds * 1e3, "tokens_per_s": problem.tokens / seconds,
      "tflops": flops / seconds / 1e12, "hbm_bytes": hbm_bytes,
      "fwd_io_gbps": hbm_bytes / seconds / 1e9, "device_busy_ms": device_busy_ms,
      **_memory(fn, fn_args),
  }


def _print_table(rows: list[dict], implementations: list[str]) -> None:
  header = (f"{'seq_len':>8} {'implementation':>15} {'ms':>10} {'Mtok/s':>10} {'TFLOP/s':>9} "
            f"{'speedup':>8} {'mem GiB':>8} {'io GB/s':>8}")
  print(header)
  print("-" * len(header))
  for seq_len in sorted({r["seq_len"] for r in rows}):
    group = {r["implementation"]: r for r in rows if r["seq_len"] == seq_len}
    base = group.get(implementations[0])
    for impl in implementations:
      r = group.get(impl)
      if r is None:
        continue
      if "error" in r:
        print(f"{seq_len:>8} {impl:>15} {'failed: ' + r['error'][:60]}")
        continue
      ratio = base["ms"] / r["ms"] if base and "ms" in base else float("nan")
      r["speedup_vs_first"] = ratio
      mem = r.get("footprint_bytes")
      mem = f"{mem / 2**30:>8.2f}" if mem is not None else f"{'-':>8}"
      print(f"{seq_len:>8} {impl:>15} {r['ms']:>10.3f} {r['tokens_per_s'] / 1e6:>10.2f} "
            f"{r['tflops']:>9.2f} {ratio:>8.2f} {mem} {r['fwd_io_gbps']:>8.1f}")


def _plot(rows: list[dict], path: str, title: str) -> None:
  try:
    import matplotlib  # pylint: disable=import-outside-toplevel
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  except ImportError:
    logging.warning("matplotlib is not installed (pip install attnlib[bench]); no plot.")
    return
  fig, ax = plt.subplots(figsize=(6, 4))
  for impl in dict.fromkeys(r["implementation"] for r in rows):
    pts = sorted((r["seq_len"], r["ms"]) for r in rows if r["implementation"] == impl and "ms" in r)
    if pts:
      ax.plot(*zip(*pts), marker="o", label=impl)
  ax.set_xscale("log", base=2)
  ax.set_yscale("log")
  ax.set_xlabel("seq_len")
  ax.set_ylabel("ms per call")
  ax.set_title(title, fontsize=9)
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def main(argv: list[str]) -> None:
  del argv
  implementations = list(dict.fromkeys(_IMPLEMENTATION.value))
  rows = []
  for seq_len in _SEQ_LEN.value:
    for impl in implementations:
      try:
        rows.append(run_one(_OP.value, seq_len, impl))
      except (RuntimeError, NotImplementedError, ValueError) as e:
        logging.warning("%s seq_len=%d %s: %s", _OP.value, seq_len, impl, e)
        rows.append({"op": _OP.value, "implementation": impl, "seq_len": seq_len,
                     "error": f"{type(e).__name__}: {e}"})
  title = (f"{_OP.value} {_MODE.value} B={_BATCH.value} H={_HEADS.value} "
           f"D={_HEAD_DIM.value} {_DTYPE.value} on {jax.devices()[0].device_kind}")
  print(title)
  _print_table(rows, implementations)
  os.makedirs(_OUT.value, exist_ok=True)
  meta = {"device": jax.devices()[0].device_kind, "jax": jax.__version__,
          "flags": {f.name: f.value for f in flags.FLAGS.get_key_flags_for_module(__name__)}}
  with open(os.path.join(_OUT.value, "results.json"), "w") as f:
    json.dump({"meta": meta, "rows": rows}, f, indent=1, default=str)
  _plot(rows, os.path.join(_OUT.value, "plot.png"), title)
  if not any("ms" in r for r in rows):
    raise SystemExit("every configuration failed")


if __name__ == "__main__":
  app.run(main)
