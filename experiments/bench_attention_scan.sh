#!/usr/bin/env bash
# BENCHMARKS.md section 6: the Mosaic GPU attention-scan (Aaren) kernels on one
# GPU, through the public op, against the xla backend (a blocked lax.scan) and
# causal cuDNN softmax attention of the same shape, timed in the same process;
# then the O(1) decode step after prefixes of growing length.
# Usage: bash experiments/bench_attention_scan.sh OUT_DIR
set -u
out=${1:-out/attention_scan}
mkdir -p "$out"
B="python3 experiments/bench.py --batch=8 --heads=16 --head_dim=128 --dtype=bfloat16 --causal"
quiet() { grep -v -e '^WARNING' -e '^I[0-9]' -e '^W[0-9]' -e '^---'; }
echo "=== A: forward"
$B --op=attention_scan --mode=fwd --iters=5 --repeats=3 --warmup=1 --out="$out/A" \
  --implementation=mosaic_gpu --implementation=xla --implementation=cudnn_softmax \
  --seq_len=1024 --seq_len=16384 --seq_len=131072 2>&1 | quiet
echo "=== B: forward + backward"
$B --op=attention_scan --mode=fwd_bwd --iters=3 --repeats=3 --warmup=1 --out="$out/B" \
  --implementation=mosaic_gpu --implementation=xla --implementation=cudnn_softmax \
  --seq_len=1024 --seq_len=16384 --seq_len=131072 2>&1 | quiet
echo "=== C: decode step after a prefix"
$B --op=attention_scan_step --mode=fwd --iters=100 --repeats=5 --warmup=10 --out="$out/C" \
  --implementation=xla --seq_len=1024 --seq_len=16384 --seq_len=131072 2>&1 | quiet
