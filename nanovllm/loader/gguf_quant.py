"""Which of a GGUF model's weights stay in their quantized blocks on CPU, and filling them with this rank's blocks.

Kept (the point: SmolLM2's Q4_1 file is 92 MiB of weights, its fp32 copy 540 MB): every projection (the layer
weights tensor parallelism splits: qkv, o, gate/up, down), the LM head, the token embedding (its lookup gathers
rows: Model.embed) and the experts, where all of a weight's GGUF tensors have one supported type (layers/quant.py).
A kept weight has no float copy: Linear.quant / the embedding's .quant / FusedMoE.w13_quant, w2_quant (a
QuantWeight per expert) hold the blocks, and the ops read those (ops/cpu_ops.py, ops/torch_ops.py).
A fused weight whose parts have different types is kept where they widen to one exactly: Q4_0 and Q5_0 blocks
are Q8_0 blocks with fewer bits (w = d (q - 8), d (q - 16): the same fp16 d, q - offset an int8), so a mix of
them and Q8_0 (SmolLM2's "Q4_K_M": Q5_0 q/k beside some layers' Q8_0 v) is kept as Q8_0, the same values. Other
mixes (a larger model's Q4_K_M: q/k in Q4_K beside v in Q6_K, which no one type holds exactly) keep each part in
its own type (layers/quant.py QuantParts: a QuantWeight per part, multiplied one after another).
Stays float: norms, routers, biases, F32 / BF16 tensors; experts of mixed types; a row-parallel weight whose
per-rank K is not whole blocks (see plan_quant)."""

import itertools
from collections import defaultdict
from dataclasses import dataclass, field

import gguf
import torch
from torch import nn

from nanovllm.layers.parallel import tp_size
from nanovllm.layers.quant import BLOCK_SIZES, SUPPORTED, QuantParts, QuantWeight, high_bits, nibbles, row_bytes
from nanovllm.loader.gguf import gguf_quant_blocks, hf_name
from nanovllm.memory import huge_page_buffer

T = gguf.GGMLQuantizationType
FLOAT_TYPES = {int(T.F32), int(T.F64), int(T.BF16)}  # not quantized: such a weight simply stays float
EMBEDDING = "model.embed_tokens.weight"
Q4_0, Q5_0, Q8_0 = int(T.Q4_0), int(T.Q5_0), int(T.Q8_0)
WIDEN_TO_Q8_0 = {Q4_0, Q5_0, Q8_0}  # a fused weight mixing these is kept as Q8_0 (module docstring)


def widen_to_q8_0(qtype: int, blocks: torch.Tensor) -> torch.Tensor:
    """Rows of Q4_0, Q5_0 or Q8_0 blocks (uint8 [rows, row bytes]) as Q8_0 rows of the same values."""
    if qtype == Q8_0:
        return blocks
    b = blocks.reshape(-1, BLOCK_SIZES[qtype][1])  # a block a row
    if qtype == Q4_0:
        q = nibbles(b[:, 2:], 16).to(torch.int8) - 8
    else:
        q = (nibbles(b[:, 6:], 16) | (high_bits(b[:, 2:6]) << 4)).to(torch.int8) - 16
    return torch.cat([b[:, :2], q.view(torch.uint8)], dim=1).reshape(blocks.shape[0], -1)


@dataclass
class QuantTarget:
    """A parameter that becomes blocks: its module and attribute, this rank's float shape ([N, K], experts
    [E, N, K]), the GGUF type and the GGUF tensors that fill it. A fused weight kept per part (QuantParts):
    qtype None, and each part's type and this rank's rows of it, in the fused order."""

    module: nn.Module
    attr: str
    shape: tuple[int, ...]
    qtype: int | None
    tensors: list[str] = field(default_factory=list)
    part_types: tuple[int, ...] = ()
    part_rows: tuple[int, ...] = ()


class PartRows:
    """Stands in for a fused parameter kept per part while model.load_weight fills it: load_weight slices the
    fused rows of one part (param.data[start:stop]) and copies that part's blocks there; this hands it the
    part's own buffer (its rows in its own type's row bytes) instead."""

    def __init__(self, parts: list[torch.Tensor], rows: tuple[int, ...]):
        self.parts, self.starts = parts, list(itertools.accumulate(rows, initial=0))

    @property
    def data(self) -> "PartRows":
        return self

    def __getitem__(self, rows: slice) -> torch.Tensor:
        i = self.starts.index(rows.start) if rows.start in self.starts[:-1] else -1
        if i < 0 or rows.stop != self.starts[i + 1]:
            raise ValueError(f"rows {rows.start}:{rows.stop} are not one part of {self.starts}")
        return self.parts[i]


def split_dim(model: nn.Module, name: str) -> int | None:
    """Along which dim tensor parallelism splits the parameter a checkpoint tensor fills (0 its rows, 1 its K),
    for the weights that may stay quantized; None for the others (norms, routers, biases)."""
    target, weight, part = model.locate(name)
    if isinstance(part, tuple):  # an expert's gate / up (rows) or down (K)
        return 1 if part[1] == 2 else 0
    if target in (EMBEDDING, "lm_head.weight"):  # vocabulary rows
        return 0
    if weight is not None and weight.split is not None and target.endswith(".weight"):
        return weight.split
    return None


def plan_quant(model: nn.Module, index: list[dict], strict: bool = True) -> dict[str, QuantTarget]:
    """The parameters (names as in named_parameters, of the model still on the meta device) that stay quantized.
    strict: raise for a weight stored in a quantized type we cannot keep (quantization='dequantize' loads it as
    floats); else such a weight stays float."""
    params = dict(model.named_parameters())
    types, ks, tensors, splits = defaultdict(set), {}, defaultdict(list), {}
    part_types, fused = defaultdict(dict), {}  # a fused weight's type per part; its layer weight's name
    for t in index:
        name = hf_name(t["name"])
        probe = name.replace(".experts.", ".experts.0.") if ".mlp.experts." in name else name  # experts: stacked
        split = split_dim(model, probe)
        target, weight, part = model.locate(probe)
        if isinstance(part, int):
            part_types[target][part], fused[target] = t["type"], weight.name
        if split is None or target not in params:
            continue
        if strict and t["type"] not in BLOCK_SIZES and t["type"] not in FLOAT_TYPES:
            raise ValueError(
                f"GGUF tensor {t['name']} is {T(t['type']).name}, which is not supported quantized (supported: "
                f"{SUPPORTED}); quantization='dequantize' loads every type gguf-py reads as float weights"
            )
        types[target].add(t["type"])
        ks[target], splits[target] = t["shape"][-1], split
        tensors[target].append(t["name"])
    plan = {}
    for target, kinds in types.items():
        qtype = next(iter(kinds))
        experts = any(".experts." in name for name in tensors[target])
        module, attr = target.rsplit(".", 1)
        shape = tuple(params[target].shape)
        if len(kinds) > 1 and kinds <= WIDEN_TO_Q8_0 and not experts:
            qtype = Q8_0  # parts of types that widen to Q8_0 exactly (fill_quant widens them)
        elif len(kinds) > 1 and kinds <= BLOCK_SIZES.keys() and target in fused and not experts:
            types_in_order = tuple(part_types[target][p] for p in sorted(part_types[target]))
            rows = tuple(model.fused_sizes[fused[target]])  # this rank's rows of each part
            submodule = model.get_submodule(module)
            plan[target] = QuantTarget(submodule, attr, shape, None, tensors[target], types_in_order, rows)
            continue
        elif len(kinds) > 1 or qtype not in BLOCK_SIZES:  # experts of two types, or a float tensor: stays float
            continue
        # a row-parallel weight's rank holds K / tp of each row: whole blocks only (else it stays float)
        if splits[target] == 1 and (ks[target] // tp_size()) % BLOCK_SIZES[qtype][0]:
            continue
        plan[target] = QuantTarget(model.get_submodule(module), attr, shape, qtype, tensors[target])
    return plan


def drop_float_weights(model: nn.Module, plan: dict[str, QuantTarget]) -> None:
    """No float copy of a kept weight (before the model is allocated: nothing is ever allocated for it)."""
    for target in plan.values():
        setattr(target.module, target.attr, None)
    if model.tie_word_embeddings and EMBEDDING in plan:
        model.lm_head.weight = None


def fill_quant(
    model: nn.Module,
    path: str,
    index: list[dict],
    hf_config,
    plan: dict[str, QuantTarget],
    int8_activations: bool = False,
) -> set[str]:
    """Read the planned weights' blocks (this rank's rows, or K range, as load_weight shards floats) into one
    2 MB-page buffer, and hand them to their modules; returns the names load_weight filled (name#part).
    int8_activations: their QuantWeights multiply with x in int8 (quantization="gguf_int8")."""
    shapes = {  # each weight's buffers: one, or one per part of a weight kept per part
        n: [(rows, row_bytes(kind, t.shape[-1])) for kind, rows in zip(t.part_types, t.part_rows)]
        if t.part_types
        else [(*t.shape[:-1], row_bytes(t.qtype, t.shape[-1]))]
        for n, t in plan.items()
    }

    def aligned(shape: tuple[int, ...]) -> int:  # each buffer 64-byte aligned
        return -(-torch.Size(shape).numel() // 64) * 64

    buf, offset, shadows = huge_page_buffer(sum(aligned(s) for each in shapes.values() for s in each)), 0, {}
    for n, each in shapes.items():
        views = []
        for s in each:
            views.append(buf[offset : offset + torch.Size(s).numel()].view(s))
            offset += aligned(s)
        shadows[n] = PartRows(views, plan[n].part_rows) if plan[n].part_types else views[0]
    names = {name for t in plan.values() for name in t.tensors}
    stored = {t["name"]: t["type"] for t in index}
    widen = {  # the parts of a mix kept as Q8_0 that are stored in another type: (HF name) -> that type
        hf_name(name): stored[name]
        for t in plan.values()
        if t.qtype == Q8_0
        for name in t.tensors
        if stored[name] != Q8_0
    }
    filled = set()
    for name, blocks in gguf_quant_blocks(path, index, hf_config, names):
        if name in widen:
            blocks = widen_to_q8_0(widen[name], blocks)
        filled.add(model.load_weight(name, blocks, shadows))
    for n, t in plan.items():
        blocks = shadows[n]
        if t.part_types:
            parts = [
                QuantWeight(kind, b, (b.shape[0], t.shape[1]), int8_activations)
                for kind, b in zip(t.part_types, blocks.parts)
            ]
            t.module.quant = QuantParts(parts)
        elif t.attr == "weight":
            t.module.quant = QuantWeight(t.qtype, blocks, (t.shape[0], t.shape[1]), int8_activations)
            if model.tie_word_embeddings and n == EMBEDDING:  # the LM head reads the embedding's blocks
                model.lm_head.quant = t.module.quant
        else:  # FusedMoE.w13_weight -> w13_quant: each expert's blocks
            quant = [
                QuantWeight(t.qtype, blocks[e], (t.shape[1], t.shape[2]), int8_activations) for e in range(t.shape[0])
            ]
            setattr(t.module, t.attr.replace("weight", "quant"), quant)
    return filled
