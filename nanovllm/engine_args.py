"""vLLM's engine arguments, as a vLLM script passes them to `LLM(...)`: each is implemented (an EngineConfig field
of the same name and meaning, or renamed below), accepted because it cannot change what we do, or refused with a
ValueError that names the argument, the value and what is supported. docs/from-vllm.md is the table;
tests/engine/test_from_vllm.py checks every row of it against this file."""

from dataclasses import fields

from nanovllm.config import EngineConfig

# vLLM's name -> ours
RENAMED = {"num_gpu_blocks_override": "num_kv_blocks"}
# vLLM's dtype spellings -> ours
DTYPE_NAMES = {"half": "float16", "float": "float32", "bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}

# accepted whatever their value: why each changes nothing here
IGNORED = {
    "trust_remote_code": "no model code from a checkpoint is ever run",
    "download_dir": "nothing is downloaded: a model is a local folder or .gguf file",
    "disable_log_stats": "no periodic statistics log is written",
    "swap_space": "preemption recomputes; nothing is swapped to host memory",
    "max_seq_len_to_capture": "CUDA graphs cover decode steps of every context length",
    "disable_custom_all_reduce": "all-reduces go through torch.distributed",
    "hf_token": "nothing is downloaded",
}

# accepted with these values only (the ones that change nothing, or what we do anyway); any other is refused
ONLY = {
    "tokenizer_mode": (("auto", "hf"), "HF tokenizers ('auto')"),
    "kv_cache_dtype": (("auto",), "the model's dtype ('auto'); no fp8 KV cache"),
    "pipeline_parallel_size": ((1,), "1 (tensor parallelism only)"),
    "data_parallel_size": ((1,), "1"),
    "enable_lora": ((False, None), "no LoRA adapters"),
    "cpu_offload_gb": ((0, 0.0), "0 (the weights stay on their device)"),
    "revision": ((None, "main"), "a local folder's one version (None or 'main')"),
    "load_format": (("auto", "safetensors", "gguf"), "'auto': safetensors folders and .gguf files"),
    "distributed_executor_backend": ((None, "mp"), "worker processes ('mp')"),
    "enable_expert_parallel": ((False,), "no expert parallelism"),
    "guided_decoding_backend": (("auto", "xgrammar"), "'xgrammar' (or 'auto'): structured outputs use xgrammar"),
    "structured_outputs_config": (
        (None, {"backend": "auto"}, {"backend": "xgrammar"}),
        "{'backend': 'xgrammar'} (or 'auto'): structured outputs use xgrammar",
    ),
}


def engine_config(model: str | None = None, **kwargs) -> EngineConfig:
    """`LLM(model, **kwargs)`'s arguments, vLLM's names and ours, as one EngineConfig."""
    ours = {f.name for f in fields(EngineConfig)}
    args = {}
    for name, value in kwargs.items():
        if name == "kv_cache_memory_bytes" and value is not None:  # vLLM's pool size in bytes: ours in GiB
            name, value = "kv_cache_gib", value / 2**30
        name = RENAMED.get(name, name)
        if name == "dtype" and isinstance(value, str):
            value = DTYPE_NAMES.get(value, value)
        if name in ours:
            args[name] = value
        elif name in ONLY:
            allowed, supported = ONLY[name]
            if value not in allowed:
                raise ValueError(f"{name}={value!r} is not supported; supported: {supported}")
        elif name not in IGNORED:
            raise ValueError(
                f"{name}={value!r}: unknown engine argument (nanovllm's: {', '.join(sorted(ours))}; "
                f"vLLM's that it accepts: see docs/from-vllm.md)"
            )
    return EngineConfig(model=model, **args)
