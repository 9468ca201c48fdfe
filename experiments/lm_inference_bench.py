r"""Times a prefill and a decode step of `attnlib.models.TransformerLM` on one
chip and prints the analytical cost model's single-chip prediction beside
each measurement (issue 8; BENCHMARKS.md section 7).

The model is a serial-block decoder (RMSNorm, SwiGLU, causal softmax GQA
with RoPE), bf16 parameters and activations, byte-level vocabulary. The
prefill is one forward pass over [B, T] tokens (`model(tokens)`); the
decode step is `model.decode` of one token per sequence against a KV cache
holding `--context` tokens (jitted over `nnx.split`, cache donated). The
prediction is `attnlib.sharding.cost_model.estimate` on a 1 x 1 x 1 mesh
with the chip's datasheet peak FLOP/s and HBM bandwidth (pure roofline:
max(compute, memory); no communication on one chip).

Example (CPU smoke test):
  python experiments/lm_inference_bench.py --embed_dim=64 --num_layers=2 \
      --num_heads=4 --num_kv_heads=2 --mlp_dim=128 --batch=2 --prefill_len=32 \
      --context=32 --iters=2 --chip=h200
"""

from __future__ import annotations

import statistics
import time

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
from flax import nnx

from attnlib.models import LMConfig
from attnlib.models import TransformerLM
from attnlib.nn import AttentionConfig
from attnlib.sharding import cost_model

_EMBED = flags.DEFINE_integer("embed_dim", 2048, "Model width E.")
_LAYERS = flags.DEFINE_integer("num_layers", 16, "Layers.")
_HEADS = flags.DEFINE_integer("num_heads", 16, "Query heads.")
_KV_HEADS = flags.DEFINE_integer("num_kv_heads", 4, "Key/value heads.")
_MLP = flags.DEFINE_integer("mlp_dim", 5632, "SwiGLU hidden width F.")
_BATCH = flags.DEFINE_integer("batch", 8, "Sequences.")
_PREFILL = flags.DEFINE_integer("prefill_len", 2048, "Prefill tokens per sequence.")
_CONTEXT = flags.DEFINE_integer("context", 2048, "KV-cache tokens before the decode step.")
_ITERS = flags.DEFINE_integer("iters", 10, "Calls per timed repeat (median of 5 repeats).")
_CHIP = flags.DEFINE_string("chip", "h200", "Chip spec of the prediction (attnlib.sharding.chips).")


def _median_seconds(fn, *args) -> float:
  jax.block_until_ready(fn(*args))
  samples = []
  for _ in range(5):
    start = time.perf_counter()
    for _ in range(_ITERS.value):
      out = fn(*args)
    jax.block_until_ready(out)
    samples.append((time.perf_counter() - start) / _ITERS.value)
  return statistics.median(samples)


def main(argv):
  del argv
  e, h, hkv = _EMBED.value, _HEADS.value, _KV_HEADS.value
  d = e // h
  cfg = LMConfig(embed_dim=e, num_layers=_LAYERS.value, num_heads=h, num_kv_heads=hkv,
                 head_dim=d, mlp_dim=_MLP.value,
                 layers=AttentionConfig(kind="softmax", rope=True),
                 dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
  model = TransformerLM(cfg, rngs=nnx.Rngs(0))
  graph, state = nnx.split(model)
  b, t, ctx = _BATCH.value, _PREFILL.value, _CONTEXT.value
  tokens = jax.random.randint(jax.random.key(1), (b, t), 0, cfg.vocab_size, jnp.int32)

  prefill = jax.jit(lambda s, x: nnx.merge(graph, s)(x))
  t_prefill = _median_seconds(prefill, state, tokens)

  @jax.jit
  def fill(s, x):
    m = nnx.merge(graph, s)
    return m.decode(x, m.init_cache(b, ctx + 1))[1]
  cache = fill(state, jax.random.randint(jax.random.key(2), (b, ctx), 0, cfg.vocab_size, jnp.int32))

  @jax.jit
  def step(s, x, c):
    logits, _ = nnx.merge(graph, s).decode(x, c)
    return logits
  t_decode = _median_seconds(step, state, tokens[:, :1], cache)

  spec = cost_model.ModelSpec(
      name="bench", n_layers=cfg.num_layers, d_model=e, d_ff=cfg.mlp_dim, n_heads=h,
      n_kv_heads=hkv, d_head=d, vocab=cfg.vocab_size, parallel_block=False,
      gated_ffn=True, tied_embeddings=cfg.tie_embeddings)
  est = {"prefill": cost_model.estimate(spec, _CHIP.value, mesh=(1, 1, 1), batch=b,
                                        phase="prefill", seq_len=t),
         "decode": cost_model.estimate(spec, _CHIP.value, mesh=(1, 1, 1), batch=b,
                                       phase="decode", context_len=ctx + 1)}
  n_params = sum(x.size for x in jax.tree.leaves(state))
  print(f"TransformerLM {n_params / 1e6:.0f}M params, E={e} L={cfg.num_layers} H={h} "
        f"Hkv={hkv} F={cfg.mlp_dim}, bf16, B={b}, prefill T={t}, decode context {ctx}, "
        f"on {jax.devices()[0].device_kind}; prediction for chip {_CHIP.value}")
  print(f"{'phase':>8} {'measured ms':>12} {'model ms':>9} {'measured/model':>15} "
        f"{'model bound':>12} {'model compute ms':>17} {'model memory ms':>16}")
  for phase, seconds in (("prefill", t_prefill), ("decode", t_decode)):
    c = est[phase]
    print(f"{phase:>8} {seconds * 1e3:>12.3f} {c.time_s * 1e3:>9.4f} "
          f"{seconds / c.time_s:>15.2f} {c.bound:>12} {c.compute_s * 1e3:>17.3f} "
          f"{c.memory_s * 1e3:>16.3f}")


if __name__ == "__main__":
  app.run(main)
