import os
from dataclasses import dataclass

import torch

from nanovllm.spec.config import SpeculativeConfig


def cache_dir(kind: str) -> str:
    """Where nanovllm keeps what it builds once per machine: `kernels` (compiled C), `gguf` (converted configs and
    tokenizers). ~/.cache/nanovllm/<kind>, or $NANOVLLM_CACHE/<kind>."""
    root = os.environ.get("NANOVLLM_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "nanovllm")
    return os.path.join(root, kind)


@dataclass(frozen=True)
class EngineConfig:
    """Engine knobs, validated once and never changed. The engine resolves what is left open ("auto", None: the
    model path, device, max_model_len, threads, ops backend) into a second, resolved EngineConfig
    (`LLMEngine.config`; the user's stays as given)."""

    model: str | None = None  # HF folder or .gguf file; None = the embedded SmolLM2
    tokenizer: str | None = None  # defaults to the model's own
    dtype: str = "auto"  # auto | float32 | bfloat16 | float16
    device: str = "auto"  # auto | cpu | cuda
    max_num_seqs: int | None = None  # default: 512 on CUDA (a big card's decode batch), 256 on CPU
    max_num_batched_tokens: int | None = None  # per-step token budget (default 2048); longer prompts are chunked
    enable_chunked_prefill: bool = True  # False: a prompt is prefilled whole, in one step (the budget must hold
    # max_model_len tokens; by default it is raised to)
    max_model_len: int | None = None  # default: the model's max_position_embeddings
    block_size: int = 16
    kv_cache_gib: float = 4.0  # KV pool size on CPU (per process)
    gpu_memory_utilization: float = 0.9  # on CUDA: the KV pool takes what is left of this share of the GPU
    # after the weights and a profiled forward of the largest step
    num_kv_blocks: int | None = None  # exact pool size, overrides kv_cache_gib (tests, tuning)
    enable_prefix_caching: bool = True
    tensor_parallel_size: int = 1
    seed: int = 0
    num_threads: int | None = None  # CPU threads for torch; default: torch's choice
    enforce_eager: bool = False  # on CUDA: no CUDA graphs for decode steps
    async_scheduling: bool = False  # schedule and prepare step N+1 while step N runs (its tokens stay on the
    # device); stops are seen one step later, at most one token wasted
    ops: str = "auto"  # auto | torch | cpu | cuda: who runs the accelerated ops (nanovllm/ops)
    quantization: str | None = None  # a GGUF file on CPU: None or "gguf" keep its quantized weights as blocks
    # (vLLM's "gguf"), multiplied with activations held to 16 bits; "gguf_int8": with activations rounded to int8
    # per block (llama.cpp's numerics, faster in batches); "dequantize": every weight dequantized to dtype at
    # load (the float path, HF's values)
    max_logprobs: int = 20  # the most logprobs a request may ask for (-1: the whole vocabulary)
    generation_config: str = "auto"  # sampling defaults: auto (the model folder's generation_config.json),
    # vllm (none), or a folder holding one
    speculative_config: dict | None = None  # vLLM's: {"method": "ngram", "num_speculative_tokens": k, ...} or
    # {"model": DRAFT, "num_speculative_tokens": k} (nanovllm/spec)
    logits_processors: list | None = None  # vLLM's: LogitsProcessor classes, or "package.module:Class" strings
    # (nanovllm/logits_processor.py); each request's arguments in SamplingParams.extra_args

    def __post_init__(self) -> None:
        for name in ["block_size", "tensor_parallel_size"]:
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"EngineConfig.{name} must be an integer >= 1, got {value!r}")
        for name in ["max_num_seqs", "max_model_len", "num_kv_blocks", "num_threads", "max_num_batched_tokens"]:
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"EngineConfig.{name} must be None or an integer >= 1, got {value!r}")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError(
                f"EngineConfig.gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}"
            )
        if not isinstance(self.max_logprobs, int) or self.max_logprobs < -1:
            raise ValueError(
                f"EngineConfig.max_logprobs must be -1 (the whole vocabulary) or an integer >= 0, got "
                f"{self.max_logprobs!r}"
            )
        if self.kv_cache_gib <= 0:
            raise ValueError(f"EngineConfig.kv_cache_gib must be > 0, got {self.kv_cache_gib}")
        if self.dtype not in DTYPES:
            raise ValueError(f"EngineConfig.dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"EngineConfig.device must be auto, cpu or cuda, got {self.device!r}")
        if self.ops not in ("auto", "torch", "cpu", "cuda"):
            raise ValueError(f"EngineConfig.ops must be auto, torch, cpu or cuda, got {self.ops!r}")
        if self.quantization not in QUANTIZATIONS:
            raise ValueError(
                f"quantization={self.quantization!r} is not supported; supported: "
                f"{', '.join(map(repr, QUANTIZATIONS))} (None, 'gguf' and 'gguf_int8' keep a GGUF file's quantized "
                "weights, 'dequantize' loads them as float weights)"
            )
        if self.max_num_seqs is None and self.device != "auto":  # the device's default once it is known (resolve)
            object.__setattr__(self, "max_num_seqs", DEFAULT_MAX_NUM_SEQS[self.device])
        if self.speculative_config is not None:
            SpeculativeConfig.from_dict(self.speculative_config)  # checked here, read by the engine
            if self.async_scheduling:  # as vLLM refused it
                raise ValueError(
                    "speculative_config cannot be combined with async_scheduling=True: a step's "
                    "proposals depend on the tokens the step before sampled"
                )
            if self.logits_processors:  # as vLLM: a user's processor sees one row per request, not per position
                raise ValueError(
                    "speculative_config cannot be combined with logits_processors: a verification samples several "
                    "positions of a request at once, which a logits processor's per-row state does not follow"
                )

    def resolved_device(self) -> str:
        if self.device != "auto":
            return self.device
        return "cuda" if torch.cuda.is_available() else "cpu"

    def torch_dtype(self) -> torch.dtype:
        if self.dtype != "auto":
            return DTYPES[self.dtype]
        if self.resolved_device() == "cuda":
            return torch.bfloat16
        # bf16 on CPU only where the hardware has native bf16 dot products; emulated bf16 is slower than fp32.
        return torch.bfloat16 if torch.ops.mkldnn._is_mkldnn_bf16_supported() else torch.float32


DEFAULT_MAX_NUM_SEQS = {"cpu": 256, "cuda": 512}  # sequences a step may hold; CUDA graphs are captured up to it
QUANTIZATIONS = (None, "gguf", "gguf_int8", "dequantize")
DTYPES = {"auto": None, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
