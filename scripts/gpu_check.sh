#!/usr/bin/env bash
# The GPU checks of issue 5 in one call on a lent CUDA machine (device tool): tests/gpu, then the nano-vllm preset.
# Logs go to $OUT (or ./gpu-out). Usage: bash scripts/gpu_check.sh [HF batch size]
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD HF_HUB_OFFLINE=1
out=${OUT:-gpu-out}; mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv
python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)"
timeout 180 python3 -m pytest -q -rA tests/gpu -m gpu -p no:cacheprovider --timeout 170 2>&1 | tee "$out/pytest.log" | tail -40
timeout 430 python3 benchmarks/throughput.py --preset nano-vllm --hf-batch-size "${1:-64}" --json "$out/bench.json" 2>&1 \
  | tee "$out/bench.log" | grep -v "it/s\]$" | tail -40
