#!/usr/bin/env bash
# The first BENCHMARKS.md table: each primitive's xla reference against softmax
# attention of the same shapes (cuDNN) on one GPU. Shapes are the ones the kernel
# issues (3-6) target. Usage: bash experiments/bench_baselines.sh OUT_DIR [MODE...]
set -u
out=${1:-out/baselines}; shift || true
modes=${*:-fwd fwd_bwd}
mkdir -p "$out"
b() {  # name, flags...
  local name=$1; shift
  for mode in $modes; do
    echo "=== $name $mode"
    timeout 240 python3 experiments/bench.py --mode="$mode" --out="$out/$name-$mode" \
      --implementation=xla --implementation=cudnn_softmax --dtype=bfloat16 "$@" 2>&1 \
      | grep -v -e '^WARNING' -e '^I[0-9]' -e '^W[0-9]' || echo "(failed or timed out: $name $mode)"
  done
}
few="--iters=3 --repeats=3 --warmup=1"
b linear --op=linear_attention --batch=4 --heads=16 --head_dim=128 --causal --decay=gate \
  --seq_len=2048 --seq_len=8192 --seq_len=32768 $few
b swa --op=sliding_window_attention --batch=2 --heads=16 --head_dim=128 --causal \
  --seq_len=16384 --window=128 $few
b swa2048 --op=sliding_window_attention --batch=2 --heads=16 --head_dim=128 --causal \
  --seq_len=16384 --window=2048 $few
b na2d_k7 --op=neighborhood_attention --spatial_dims=2 --batch=2 --heads=16 --head_dim=128 \
  --nocausal --seq_len=128 --kernel_size=7 $few
b na2d_k13 --op=neighborhood_attention --spatial_dims=2 --batch=2 --heads=16 --head_dim=128 \
  --nocausal --seq_len=128 --kernel_size=13 $few
b sigmoid --op=sigmoid_attention --batch=4 --heads=16 --head_dim=128 --nocausal \
  --seq_len=4096 --seq_len=16384 $few
b sigmoid_causal --op=sigmoid_attention --batch=4 --heads=16 --head_dim=128 --causal \
  --seq_len=4096 $few
b scan --op=attention_scan --batch=8 --heads=16 --head_dim=128 --causal \
  --seq_len=1024 --seq_len=16384 $few
