#!/usr/bin/env bash
# Every GPU check in one short run, for a lent GPU machine (it has torch, triton, peft, transformers and
# accelerate, no internet): the GPU-marked tests (bf16 and fp32 steps, peak memory) and the GPU figures of the
# 1-/2-process benchmark. Results go to $OUT (default ./gpu_results).
set -euo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-gpu_results}"
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" TOKENIZERS_PARALLELISM=false
nvidia-smi --query-gpu=name,memory.total --format=csv | tee "$out/gpu.txt"
python -m pytest -q -m gpu -s -p no:cacheprovider tests/test_gpu.py 2>&1 | tee "$out/gpu_tests.txt"
python benchmarks/distributed_step.py --size 30m --threads 4 --json "$out/distributed_step.json" 2>&1 \
  | tail -8 | tee "$out/distributed_step.txt"
