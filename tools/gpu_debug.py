"""Debug: one engine configuration per process (a device-side assert kills the CUDA context)."""

import sys
import traceback

sys.path.insert(0, "tests")
from conftest import hf_greedy, random_prompts, save_tiny_model

from nanovllm import LLM, SamplingParams

case = sys.argv[1]
path = save_tiny_model("llama", f"/tmp/dbg-{case}")
prompts = random_prompts(8, 5, 60)
if "torchbackend" in case:
    import nanovllm.kernels.attention as ka
    from nanovllm.layers.attention import torch_attention

    ka.triton_attention = torch_attention
try:
    llm = LLM(path, dtype="bfloat16" if "bf16" in case else "float32", device="cuda", enforce_eager="eager" in case)
    print(case, "blocks", llm.engine.runner.num_blocks)
    out = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=24, ignore_eos=True), use_tqdm=False)
    got = [o.outputs[0].token_ids for o in out]
    if "bf16" not in case:
        print(case, "HF equal:", got == hf_greedy(path, prompts, 24))
    else:
        print(case, "ran", got[0][:8])
except Exception:
    traceback.print_exc(limit=-6)
    print(case, "FAILED")
