export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD HF_HUB_OFFLINE=1 CUDA_LAUNCH_BLOCKING=1
for c in eager eager-torchbackend graphs eager-bf16; do
  timeout 90 python3 tools/gpu_debug.py $c 2>&1 | grep -v "Assertion\|Writing model" | tail -25
done
