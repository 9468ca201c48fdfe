r"""Times the Mosaic GPU linear-attention forward kernel's configurations.

The kernel alone (`kernels_pallas.linear_attention.mosaic_gpu`), on the public
[B, T, H, D] layout with per-token gates, for each --config and --seq_len; each
result is checked against the xla reference (relative L2 error of o and of the
final state) before it is timed. Timing and the shape flags are bench.py's:
the median over --repeats of --iters back-to-back calls. Also times the gate
packing alone (the XLA part of the forward). GPU only (Hopper).

  PYTHONPATH=. python3 experiments/linear_attention_tune.py --seq_len=8192 --seq_len=131072 \
      --config=fwd:64:64:2 --config=fwd:64:32:2

A config is `kernel:chunk:v_block:max_concurrent_steps`, with kernel `fwd`
(linear_attention_fwd's one-warpgroup sweep), `ws` (its warp-specialized
forward, kernels_pallas/linear_attention/mosaic_gpu_fwd.py) or `wsk` (that
kernel alone, with the gates packed beforehand: the gate packing's share).
"""

from __future__ import annotations

from absl import app
from absl import flags
import jax
import jax.numpy as jnp

import attnlib as al
from experiments import bench
from kernels_pallas.linear_attention import mosaic_gpu as mgpu
from kernels_pallas.linear_attention import mosaic_gpu_fwd as wsf

_CONFIG = flags.DEFINE_multi_string("config", ["fwd:64:64:2"],
                                    "kernel:chunk:v_block:max_concurrent_steps")
_GATES = flags.DEFINE_bool("gates", True, "Per-token gates log_sigmoid(4 + N(0, 1)).")
# --seq_len, --batch, --heads, --kv_heads, --head_dim, --iters, --repeats and
# --warmup are bench.py's flags (defined when it is imported); its _time too.


def _rel(a, b) -> float:
  a, b = jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32)
  return float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))


def main(argv):
  del argv
  b, h, d = bench._BATCH.value, bench._HEADS.value, bench._HEAD_DIM.value
  hkv = bench._KV_HEADS.value or h
  print(f"device {jax.devices()[0].device_kind}, jax {jax.__version__}, "
        f"B{b} H{h} Hkv{hkv} K=V={d} bf16, gates={_GATES.value}")
  print(f"{'T':>7} {'config':>16} {'ms':>8} {'Mtok/s':>8} {'err o':>9} {'err S':>9}")
  for t in bench._SEQ_LEN.value:
    keys = jax.random.split(jax.random.key(t), 4)
    q, k, v = (jax.random.normal(kk, (b, t, hh, d), jnp.float32).astype(jnp.bfloat16)
               for kk, hh in zip(keys[:3], (h, hkv, hkv)))
    g = (jax.nn.log_sigmoid(4.0 + jax.random.normal(keys[3], (b, t, h)))
         if _GATES.value else None)
    scale = d ** -0.5
    o_ref, s_ref = jax.jit(lambda q, k, v, g: al.linear_attention(
        q, k, v, decay=g, scale=scale, return_final_state=True,
        implementation="xla"))(q, k, v, g)
    if g is not None:
      pack = jax.jit(lambda g: wsf.chunk_cumsum(g, 64))
      ms = bench._time(pack, (g,)) * 1e3
      print(f"{t:>7} {'gate packing':>16} {ms:>8.3f}")
    for cfg in _CONFIG.value:
      name, chunk, vb, steps = cfg.split(":")
      chunk, vb, steps = int(chunk), int(vb), int(steps)
      if name not in ("fwd", "ws", "wsk"):
        raise app.UsageError(f"unknown kernel {name!r} in --config={cfg}")
      if name == "wsk":   # the warp-specialized kernel alone, gates pre-packed
        packed = None if g is None else wsf.chunk_cumsum(g, chunk)
        fn = jax.jit(lambda q, k, v, g, p=packed: wsf.forward_sweep(
            q, k, v, p, None, heads=h, out_scale=scale, chunk=chunk,
            v_block=vb, max_concurrent_steps=steps, interpret=False))
      else:
        fn = jax.jit(lambda q, k, v, g, ws=name == "ws": mgpu.linear_attention_fwd(
            q, k, v, g, None, scale=scale, chunk=chunk, v_block=vb,
            max_concurrent_steps=steps, seq_major=True, warp_specialized=ws))
      try:
        o, s = fn(q, k, v, g)
        err_o, err_s = _rel(o, o_ref), _rel(s, s_ref)
        ms = bench._time(fn, (q, k, v, g)) * 1e3
      except Exception as e:  # pylint: disable=broad-except
        print(f"{t:>7} {cfg:>16} failed: {type(e).__name__}: {str(e)[:200]}")
        continue
      print(f"{t:>7} {cfg:>16} {ms:>8.3f} {b * t / ms / 1e3:>8.1f} "
            f"{err_o:>9.2e} {err_s:>9.2e}")


if __name__ == "__main__":
  app.run(main)
