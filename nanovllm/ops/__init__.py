"""The seam between the model's math and the machine: the ops that have fast versions, as plain functions.

The model and its layers call `ops.rms_norm(...)`, `ops.linear(...)`, `ops.attention(...)` and never ask what runs
them. One backend serves every op, chosen once when the engine starts (`choose`, then `use`):
- torch: plain torch, no C, no Triton: the reference, and what the other two are tested against (torch_ops.py);
- cpu:   our C kernels where they apply, torch elsewhere (cpu_ops.py);
- cuda:  our Triton attention, torch elsewhere (cuda_ops.py).
`EngineConfig(ops="torch")` or NANOVLLM_OPS=torch forces the reference.

Each backend module has the ops below plus what the loader and the model runner ask of it: `prepare(model)`
(after loading, e.g. repack weights), `packs_weights(dtype)`, `keeps_gguf_blocks(dtype)` and
`step_runner(runner, config)` (a faster way to run whole steps, such as CUDA graphs, or None)."""

import os

import nanovllm.ops.torch_ops as torch_ops

OPS = ("rms_norm", "add_rms_norm", "rotary", "silu_and_mul", "linear", "fused_experts", "attention", "sample")
BACKENDS = ("torch", "cpu", "cuda")

# the ops themselves: the reference until an engine chooses (use() rebinds them)
rms_norm = torch_ops.rms_norm  # (x, weight, eps) -> y
add_rms_norm = torch_ops.add_rms_norm  # (x, residual, weight, eps) -> (RMSNorm(residual + x), residual + x)
rotary = torch_ops.rotary  # (q, k, cos, sin) -> (q, k) rotated
silu_and_mul = torch_ops.silu_and_mul  # ([gate | up]) -> silu(gate) * up
linear = torch_ops.linear  # (x, Linear) -> x W^T + b
fused_experts = torch_ops.fused_experts  # (x, w13, w2, topk_weights, topk_ids) -> sum_j weight_j * expert_j(x)
attention = torch_ops.attention  # (q, k, v, k_cache, v_cache, meta, scale) -> o; stores k, v
sample = torch_ops.sample  # (logits, SamplingBatch, generator) -> token ids
active = torch_ops


def choose(device: str, requested: str = "auto") -> str:
    """The backend for this engine: the reference where asked for (config or NANOVLLM_OPS=torch), else the
    device's own; on CPU the reference also where our C library cannot be built (no gcc: a warning says so)."""
    forced = os.environ.get("NANOVLLM_OPS", "auto")
    for name, value in (("EngineConfig.ops", requested), ("NANOVLLM_OPS", forced)):
        if value not in ("auto", *BACKENDS):
            raise ValueError(f"{name} must be auto or one of {', '.join(BACKENDS)}, got {value!r}")
    name = requested if requested != "auto" else forced
    if name == "auto":
        name = device
        if device == "cpu":
            from nanovllm.kernels.cpu.build import library

            name = "cpu" if library() is not None else "torch"
    if name != "torch" and name != device:
        raise ValueError(f"ops={name!r} cannot run on device {device!r} (use 'torch' or 'auto')")
    return name


def backend(name: str):
    """The backend module of that name (imported on first use: the reference never loads C or Triton)."""
    if name == "cpu":
        import nanovllm.ops.cpu_ops as module
    elif name == "cuda":
        import nanovllm.ops.cuda_ops as module
    else:
        module = torch_ops
    return module


def use(module) -> None:
    """Route every op to this backend module. Called when an engine starts, and by its model runner before a step
    if another engine in the same process chose differently since."""
    global active
    globals().update({op: getattr(module, op) for op in OPS})
    active = module
