import functools
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import gguf
import numpy as np
import torch
from transformers import PretrainedConfig

from nanovllm.kernels.cpu import BLOCK_BYTES, Q4_1, Q8_0
from nanovllm.memory import huge_page_buffer

# GGUF tensor name (after "blk.N.") -> HF name (after "model.layers.N.")
LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    # a mixture-of-experts layer: the router, and every expert's matrices in one [E, rows, cols] tensor each
    "ffn_gate_inp": "mlp.gate",
    "ffn_gate_exps": "mlp.experts.gate_proj",
    "ffn_up_exps": "mlp.experts.up_proj",
    "ffn_down_exps": "mlp.experts.down_proj",
}
GLOBAL_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}


class CheckedReader(gguf.GGUFReader):
    """gguf-py's reader, with a clear error where a tensor's data runs past the end of the file (a truncated
    copy): its own fails on a numpy reshape of the last tensor, naming nothing."""

    def _build_tensors(self, start_offs: int, fields: list) -> None:
        for field in fields:
            try:  # the reader's private layout of a tensor's info: if it ever changes, the reader's own checks stand
                _, name, _, dims, raw_type, offset = field.parts
                elems, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(int(raw_type[0]))]
                start = int(start_offs + offset[0])
                end = start + int(np.prod(dims)) * size // elems
            except Exception:
                break
            if end > len(self.data):
                name = bytes(name).decode(errors="replace")
                raise ValueError(
                    f"GGUF tensor {name} lies at bytes {start}-{end} but the file has {len(self.data)}: truncated?"
                )
        super()._build_tensors(start_offs, fields)


@functools.lru_cache(maxsize=2)  # the config check and the weight loading read the same file
def open_gguf(path: str) -> gguf.GGUFReader:
    try:
        return CheckedReader(path)
    except Exception as e:  # the reader raises anything from ValueError to struct errors on a bad file
        raise ValueError(f"cannot read GGUF file {path}: {e}") from None


def hf_name(gguf_name: str) -> str:
    base, _, kind = gguf_name.rpartition(".")
    if base.startswith("blk."):
        _, layer, part = base.split(".", 2)
        if part not in LAYER_NAMES:
            raise ValueError(f"GGUF tensor {gguf_name!r} is not supported")
        return f"model.layers.{layer}.{LAYER_NAMES[part]}.{kind}"
    if base not in GLOBAL_NAMES:
        raise ValueError(f"GGUF tensor {gguf_name!r} is not supported")
    return f"{GLOBAL_NAMES[base]}.{kind}"


def unpermute(w: np.ndarray, num_heads: int) -> np.ndarray:
    """llama.cpp stores Llama q/k rows interleaved per head for its rope; put them back in HF's half-split order."""
    return w.reshape(num_heads, w.shape[0] // num_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def tensor_index(reader: gguf.GGUFReader) -> list[dict]:
    """Where each tensor lies in the file: saved with the converted config, so that later loads need not parse
    the file's metadata again (GGUFReader takes seconds over a tokenizer's ~100k strings)."""
    return [
        {
            "name": t.name,
            "type": int(t.tensor_type),
            "shape": [int(d) for d in reversed(t.shape)],
            "offset": int(t.data_offset),
            "nbytes": int(t.n_bytes),
        }
        for t in reader.tensors
    ]


def moe_config(reader: gguf.GGUFReader, index: list[dict]) -> PretrainedConfig | None:
    """The config of a mixture-of-experts GGUF that transformers does not convert, from the file's metadata:
    Mixtral (llama.cpp writes it as a llama with expert_count, which transformers takes for a dense Llama) and
    OLMoE (an architecture transformers' GGUF support lacks). None for any other file."""
    field = lambda key, default=None: reader.fields[key].contents() if key in reader.fields else default  # noqa: E731
    arch = field("general.architecture")
    key = lambda name, default=None: field(f"{arch}.{name}", default)  # noqa: E731
    if arch not in ("llama", "olmoe") or not key("expert_count"):
        return None
    from transformers import MixtralConfig, OlmoeConfig  # (imported only for these files: see load_hf_config)

    shapes = {t["name"]: t["shape"] for t in index}
    vocab, hidden = shapes["token_embd.weight"]
    common = dict(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=shapes["blk.0.ffn_gate_exps.weight"][1],
        num_hidden_layers=key("block_count"),
        num_attention_heads=key("attention.head_count"),
        num_key_value_heads=key("attention.head_count_kv"),
        max_position_embeddings=key("context_length"),
        rms_norm_eps=key("attention.layer_norm_rms_epsilon"),
        num_experts_per_tok=key("expert_used_count"),
        rope_parameters={"rope_type": "default", "rope_theta": key("rope.freq_base", 10000.0)},
        tie_word_embeddings="output.weight" not in shapes,
        bos_token_id=field("tokenizer.ggml.bos_token_id"),
        eos_token_id=field("tokenizer.ggml.eos_token_id"),
    )
    if arch == "olmoe":  # llama.cpp's OLMoE graph never renormalizes the top-k weights
        return OlmoeConfig(**common, num_experts=key("expert_count"), norm_topk_prob=False)
    return MixtralConfig(
        **common,
        num_local_experts=key("expert_count"),
        sliding_window=None,
        head_dim=key("attention.key_length", hidden // common["num_attention_heads"]),
    )


def hf_rows(name: str, w: np.ndarray, hf_config) -> np.ndarray:
    """A weight's rows (dequantized, or still in quantized blocks) in HF's order."""
    if hf_config.model_type in ("llama", "mistral", "mixtral") and name.endswith(("q_proj.weight", "k_proj.weight")):
        heads = hf_config.num_attention_heads if name.endswith("q_proj.weight") else hf_config.num_key_value_heads
        return unpermute(w, heads)
    return w


def split_experts(name: str, w) -> list[tuple[str, object]]:
    """mlp.experts.gate_proj [E, rows, cols] -> each expert's mlp.experts.E.gate_proj [rows, cols], as HF
    checkpoints name them; any other tensor as it is."""
    if ".mlp.experts." in name:
        return [(name.replace(".experts.", f".experts.{e}."), w[e]) for e in range(w.shape[0])]
    return [(name, w)]


def tensor_bytes(data: np.ndarray, t: dict) -> np.ndarray:
    """A tensor's bytes in the memory-mapped file; a clear error where the file ends before them (truncated)."""
    end = t["offset"] + t["nbytes"]
    if end > len(data):
        raise ValueError(
            f"GGUF tensor {t['name']} lies at bytes {t['offset']}-{end} but the file has {len(data)}: truncated?"
        )
    return data[t["offset"] : end]


def gguf_weights(
    path: str, index: list[dict], hf_config, threads: int = 1, skip: frozenset[str] = frozenset()
) -> Iterator[tuple[str, torch.Tensor]]:
    """Dequantized tensors with HF names, read from a memory map; `threads` tensors are dequantized at once
    (numpy releases the GIL in its array loops). A stacked experts tensor comes as each expert's HF tensor.
    The GGUF tensors named in `skip` (kept quantized: gguf_quant_blocks) are not read."""
    data = np.memmap(path, np.uint8, mode="r")

    def load(t: dict) -> list[tuple[str, torch.Tensor]]:
        name, qtype = hf_name(t["name"]), gguf.GGMLQuantizationType(t["type"])
        raw = tensor_bytes(data, t)
        try:
            w = gguf.dequantize(raw, qtype).reshape(t["shape"])
        except Exception as e:
            raise ValueError(f"cannot dequantize GGUF tensor {t['name']} ({qtype.name}): {e}") from None
        w = hf_rows(name, w, hf_config)
        return split_experts(name, torch.from_numpy(w if w.flags.writeable and w.flags.c_contiguous else w.copy()))

    with ThreadPoolExecutor(threads) as pool:
        for tensors in pool.map(load, [t for t in index if t["name"] not in skip]):
            yield from tensors


def gguf_quant_blocks(path: str, index: list[dict], hf_config, names: set[str]) -> Iterator[tuple[str, torch.Tensor]]:
    """(HF name, uint8 [rows, row bytes]) of each GGUF tensor in `names` as stored, rows in HF's order (q/k
    unpermuted: a row is whole blocks); a stacked experts tensor as each expert's. Views of the memory map: the
    caller copies them where they stay."""
    data = np.memmap(path, np.uint8, mode="r")
    for t in index:
        if t["name"] in names:
            name = hf_name(t["name"])
            rows = tensor_bytes(data, t).reshape(*t["shape"][:-1], -1)
            for name, b in split_experts(name, hf_rows(name, rows, hf_config)):
                yield name, torch.from_numpy(np.array(b))  # a copy: writable (the map is read-only)


# the GGUF types the AMX bf16 decode kernel reads in place of its bf16 weights -> its block type (kernels/cpu)
AMX_TYPES = {int(gguf.GGMLQuantizationType.Q4_1): Q4_1, int(gguf.GGMLQuantizationType.Q8_0): Q8_0}


def pack_blocks(blocks: torch.Tensor, kind: int) -> torch.Tensor:
    """GGUF rows (uint8 [N, K / 32 * BLOCK_BYTES[kind]]) -> the layout linear_bf16 streams: per 16 rows, per 32
    inputs, the 16 rows' q, then their d, then (Q4_1) their m; in 2 MB pages like the other weights."""
    n = blocks.shape[0]
    b = blocks.view(n // 16, 16, -1, BLOCK_BYTES[kind]).transpose(1, 2)  # [N / 16, K / 32, 16 rows, block]
    parts = [b[..., 4:], b[..., :2], b[..., 2:4]] if kind == Q4_1 else [b[..., 2:], b[..., :2]]
    tiles = torch.cat([p.flatten(2) for p in parts], dim=2)
    out = huge_page_buffer(tiles.numel())
    out.view(tiles.shape).copy_(tiles)
    return out
