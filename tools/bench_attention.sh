#!/usr/bin/env bash
# Flash attention against PyTorch's SDPA on one GPU, the same shapes and masks (JSON lines):
#   bash tools/bench_attention.sh [batch]
# needs a CUDA GPU, the release binary and PyTorch (tools/requirements.txt).
set -euo pipefail
cd "$(dirname "$0")/.."
batch="${1:-32}"
out=$(cargo run --release -- bench attention --device cuda --batch "$batch")
echo "$out"
lengths=$(echo "$out" | sed -n 's/^PGS dynamic lengths: //p')
python3 tools/bench_attention_sdpa.py --batch "$batch" --lengths "$lengths"
