#!/usr/bin/env bash
# BENCHMARKS.md section 3: the Mosaic GPU linear-attention kernels on one GPU,
# through the public op, against the xla reference and cuDNN softmax attention
# timed in the same process. Usage: bash experiments/bench_linear_attention.sh OUT_DIR
set -u
out=${1:-out/linear_attention}
mkdir -p "$out"
B="python3 experiments/bench.py --op=linear_attention --batch=4 --heads=16 --head_dim=128 \
   --dtype=bfloat16 --causal"
quiet() { grep -v -e '^WARNING' -e '^I[0-9]' -e '^W[0-9]'; }
echo "=== A: forward, gated"
$B --decay=gate --mode=fwd --iters=10 --repeats=5 --warmup=3 --out="$out/A" \
  --implementation=mosaic_gpu --implementation=xla --implementation=cudnn_softmax \
  --seq_len=2048 --seq_len=8192 --seq_len=32768 --seq_len=131072 2>&1 | quiet
echo "=== B: forward, no decay"
$B --decay=none --mode=fwd --iters=10 --repeats=5 --warmup=3 --out="$out/B" \
  --implementation=mosaic_gpu --implementation=xla \
  --seq_len=2048 --seq_len=8192 --seq_len=32768 --seq_len=131072 2>&1 | quiet
echo "=== C: forward + backward, gated"
$B --decay=gate --mode=fwd_bwd --iters=5 --repeats=3 --warmup=1 --out="$out/C" \
  --implementation=mosaic_gpu --implementation=xla --implementation=cudnn_softmax \
  --seq_len=2048 --seq_len=8192 --seq_len=32768 2>&1 | quiet
$B --decay=gate --mode=fwd_bwd --iters=5 --repeats=3 --warmup=1 --out="$out/C128k" \
  --implementation=mosaic_gpu --seq_len=131072 2>&1 | quiet
