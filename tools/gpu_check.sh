#!/usr/bin/env bash
# The GPU checks of issue 17 in one call on a lent CUDA machine (device tool), within 8 minutes:
#   1. tests/gpu (kernels in bf16 at real sizes, engine = HF greedy in fp32, CUDA graphs = eager)  <= 130 s
#   2. tools/gpu_tune.py: decode attention's K/V read TB/s (128 and 256 sequences, ~1,000-token contexts) and
#      prefill attention's TFLOP/s (2,048-token chunks), defaults and a sweep                        <= 100 s
#   3. benchmarks/throughput.py --preset nano-vllm against HF transformers                            <= 250 s
# Logs go to $OUT (or ./gpu-out). Usage: bash tools/gpu_check.sh [HF batch size, default 256: one batch]
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD HF_HUB_OFFLINE=1
out=${OUT:-gpu-out}; mkdir -p "$out"
gpu=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv
python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)"
date -u +"start %F %T UTC"
timeout 130 python3 -m pytest -q -rA tests/gpu -m gpu -p no:cacheprovider 2>&1 | tee "$out/pytest.log" | tail -25
timeout 100 python3 tools/gpu_tune.py --budget 70 2>&1 | tee "$out/tune.log"
timeout 250 python3 benchmarks/throughput.py --preset nano-vllm --hf-batch-size "${1:-256}" --json "$out/bench.json" 2>&1 \
  | tee "$out/bench.log" | grep -v "it/s\]$" | tail -25
GPU="$gpu" python3 - "$out/bench.json" <<'EOF'
import json, os, sys
try:
    r = json.load(open(sys.argv[1]))["results"]
except (OSError, ValueError, KeyError) as e:
    sys.exit(f"no preset result ({e})")
ours = r[0]
ratio = f"{ours['vs_hf']:.2f}x HF" if ours.get("vs_hf") else "HF not run"
print(f"nano-vllm preset on {os.environ['GPU']}: {ours['tok_per_s']:.0f} tok/s ({ratio})")
EOF
date -u +"end %F %T UTC"
