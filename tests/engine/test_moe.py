"""Mixture-of-experts models (Qwen3-MoE, Mixtral, OLMoE): greedy token for token what HF transformers gives in fp32,
under prefix caching, chunked prefill, preemption and TP=2; the grouped expert product (the torch reference and the
fused MoE Triton kernel, in Triton's interpreter) against a per-token reference, and in bf16 on CPU reading only
the experts a decode step selected; a tiny MoE GGUF of each family (quantized experts) against transformers' logits
for the same file or weights, and its Q8_0 / Q4_1 experts' blocks kept and read in bf16 with the tokens unchanged."""

import os

import pytest
import torch
import torch.nn.functional as F

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported

from conftest import add_byte_vocabulary, byte_tokenizer, hf_greedy, random_prompts, save_tiny_model

from nanovllm import LLM, SamplingParams
from nanovllm.layers.moe import FusedMoE
from nanovllm.ops import torch_ops

ARCHS = ["qwen3_moe", "mixtral", "olmoe"]
GREEDY = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)


@pytest.fixture(scope="module", params=ARCHS)
def moe_model(request, tmp_path_factory) -> tuple[str, list[list[int]], list[list[int]]]:
    """(the tiny model's folder, prompts of mixed lengths, four sharing a 40-token prefix, HF's greedy tokens)."""
    path = save_tiny_model(request.param, str(tmp_path_factory.mktemp(request.param)))
    shared = random_prompts(1, 40, 40, seed=5)[0]
    prompts = random_prompts(5, 5, 60, seed=1) + random_prompts(4, 3, 20, seed=2, prefix=shared)
    return path, prompts, hf_greedy(path, prompts, GREEDY.max_tokens)


def test_greedy_equals_hf_with_prefix_cache_chunks_and_preemption(moe_model):
    path, prompts, ref = moe_model
    with LLM(path, dtype="float32", num_kv_blocks=14, max_num_batched_tokens=48) as llm:
        counts = []  # tokens per expert, per MoE layer call
        for m in llm.engine.runner.model.modules():
            if isinstance(m, FusedMoE):
                m.register_forward_hook(
                    lambda m, args, out: counts.append(
                        torch.bincount(args[2].flatten(), minlength=m.w13_weight.shape[0])
                    )
                )
        out = llm.generate(prompts, GREEDY, use_tqdm=False)
        stats = llm.engine.stats()
    assert [o.outputs[0].token_ids for o in out] == ref
    assert stats["preemptions"] > 0 and stats["prefix_cache_hits"] > 0
    # the batches routed unevenly: some step left an expert without a token, and some expert had several
    assert any((c == 0).any() for c in counts) and max(int(c.max()) for c in counts) > 1


# each rank holds every expert's half (Mixtral's split is Qwen3-MoE's code); OLMoE's q/k norm spans both ranks
@pytest.mark.parametrize("moe_model", ["qwen3_moe", "olmoe"], indirect=True)
def test_tp2_greedy_equals_hf(moe_model):
    path, prompts, ref = moe_model
    with LLM(path, dtype="float32", tensor_parallel_size=2, max_num_batched_tokens=48) as llm:
        out = llm.generate(prompts, GREEDY, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in out] == ref


def per_token(x, w13, w2, weights, ids):
    """The equation, one token and one choice at a time."""
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for j in range(ids.shape[1]):
            gate, up = (w13[ids[t, j]] @ x[t]).chunk(2)
            out[t] += weights[t, j] * (w2[ids[t, j]] @ (F.silu(gate) * up))
    return out


def routing_cases(g: torch.Generator, tokens: int, experts: int, k: int):
    """(name, topk_ids): random distinct choices avoiding expert 3 (zero tokens); every token's first choice on
    expert 1 (one expert gets all tokens); k = 1 and every token on expert 0."""

    def draw(pool):
        return torch.stack([pool[torch.randperm(len(pool), generator=g)[:k]] for _ in range(tokens)])

    pool = torch.tensor([e for e in range(experts) if e != 3])
    one = draw(torch.tensor([e for e in range(experts) if e != 1]))
    one[:, 0] = 1
    return [
        ("expert 3 empty", draw(pool)),
        ("all on expert 1", one),
        ("k=1, all on expert 0", torch.zeros(tokens, 1, dtype=torch.long)),
    ]


def kernels():
    yield "torch", torch_ops.fused_experts
    pytest.importorskip("triton")
    from nanovllm.kernels.moe import triton_fused_experts

    yield "triton", triton_fused_experts


# the last: enough pairs per expert for the kernel's 64-row tiles
@pytest.mark.parametrize("tokens,hidden,inter,experts,k", [(7, 48, 40, 6, 2), (70, 32, 24, 8, 3), (100, 32, 24, 4, 3)])
def test_grouped_experts_equal_per_token_reference(tokens, hidden, inter, experts, k):
    g = torch.Generator().manual_seed(tokens)
    x = torch.randn(tokens, hidden, generator=g)
    w13 = torch.randn(experts, 2 * inter, hidden, generator=g) * 0.2
    w2 = torch.randn(experts, hidden, inter, generator=g) * 0.2
    device = "cuda" if torch.cuda.is_available() else "cpu"
    for case, ids in routing_cases(g, tokens, experts, k):
        weights = torch.rand(ids.shape, generator=g)
        expected = per_token(x, w13, w2, weights, ids)
        for name, fused in kernels():
            got = fused(*(t.to(device) if name == "triton" else t for t in (x, w13, w2, weights, ids))).cpu()
            assert (got - expected).abs().max().item() < 1e-4, (case, name)


def test_cpu_bf16_decode_reads_only_the_selected_experts():
    """The unselected experts hold NaN: any product that touched them (a dense compute-all-then-mask would) would
    carry NaN into the output."""
    import nanovllm.ops.cpu_ops as cpu_ops

    g = torch.Generator().manual_seed(1)
    experts, hidden, inter = 16, 64, 32
    w13 = (torch.randn(experts, 2 * inter, hidden, generator=g) * 0.2).bfloat16()
    w2 = (torch.randn(experts, hidden, inter, generator=g) * 0.2).bfloat16()
    x = torch.randn(4, hidden, generator=g).bfloat16()  # a decode step of 4 sequences, top 2
    ids = torch.tensor([[0, 5], [5, 9], [0, 12], [9, 5]])
    weights = torch.rand(ids.shape, generator=g).bfloat16()
    expected = per_token(x.float(), w13.float(), w2.float(), weights.float(), ids)
    unselected = torch.ones(experts, dtype=torch.bool)
    unselected[ids.unique()] = False
    w13[unselected], w2[unselected] = float("nan"), float("nan")
    got = cpu_ops.fused_experts(x, w13, w2, weights, ids).float()
    assert got.isfinite().all() and (got - expected).abs().max().item() < 0.05


# ---- GGUF --------------------------------------------------------------------------------------------------
LAYER_TENSORS = {
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "self_attn.q_norm": "attn_q_norm",
    "self_attn.k_norm": "attn_k_norm",
    "mlp.gate": "ffn_gate_inp",
}
EXPERT_TENSORS = {"gate_proj": "ffn_gate_exps", "up_proj": "ffn_up_exps", "down_proj": "ffn_down_exps"}
MIXTRAL_EXPERTS = {"gate_proj": "w1", "up_proj": "w3", "down_proj": "w2"}
GGUF_ARCH = {"qwen3_moe": "qwen3moe", "mixtral": "llama", "olmoe": "olmoe"}  # llama.cpp writes Mixtral as a llama


def llama_cpp_permute(w: torch.Tensor, heads: int) -> torch.Tensor:
    """convert_hf_to_gguf.py's permute of a llama's q/k rows (interleaved per head for its non-NeoX rope)."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_moe_gguf(folder: str, file: str, qtype: str = "Q8_0") -> None:
    """An HF MoE folder as llama.cpp's converter writes it: Qwen3-MoE as qwen3moe, Mixtral as llama (expert_count
    set, q/k rows permuted), OLMoE as olmoe; experts stacked [E, rows, cols] and the attention's projections in
    `qtype`, the rest F32, the byte tokenizer as a gpt2 vocabulary. The folder's quantized weights are then
    overwritten with their dequantized values, so that HF loading the folder computes with the GGUF's weights."""
    import gguf
    from safetensors.torch import load_file, save_file
    from transformers import AutoConfig

    weights = os.path.join(folder, "model.safetensors")
    cfg, sd, qtype = AutoConfig.from_pretrained(folder), load_file(weights), gguf.GGMLQuantizationType[qtype]
    mixtral, experts = cfg.model_type == "mixtral", getattr(cfg, "num_experts", None) or cfg.num_local_experts
    w = gguf.GGUFWriter(file, GGUF_ARCH[cfg.model_type])
    w.add_context_length(cfg.max_position_embeddings)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    if cfg.model_type == "qwen3_moe":
        w.add_expert_feed_forward_length(cfg.moe_intermediate_size)
        w.add_key_length(cfg.head_dim)
        w.add_value_length(cfg.head_dim)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    w.add_expert_count(experts)
    w.add_expert_used_count(cfg.num_experts_per_tok)
    add_byte_vocabulary(w)
    for hf, name in (("model.embed_tokens", "token_embd"), ("model.norm", "output_norm"), ("lm_head", "output")):
        w.add_tensor(f"{name}.weight", sd[f"{hf}.weight"].numpy())
    moe = "block_sparse_moe" if mixtral else "mlp"
    for i in range(cfg.num_hidden_layers):
        layer = f"model.layers.{i}."
        for hf, name in LAYER_TENSORS.items():
            key = f"{layer}{hf.replace('mlp.', moe + '.')}.weight"
            if key not in sd:  # q/k norms: Qwen3-MoE and OLMoE only
                continue
            t = sd[key]
            if hf.endswith("_proj"):  # the attention's projections in `qtype` too
                t = torch.from_numpy(gguf.quantize(t.numpy(), qtype))
                sd[key] = torch.from_numpy(gguf.dequantize(t.numpy(), qtype))
            if mixtral and hf in ("self_attn.q_proj", "self_attn.k_proj"):  # (rows: the blocks are along a row)
                t = llama_cpp_permute(t, cfg.num_attention_heads if "q_proj" in hf else cfg.num_key_value_heads)
            w.add_tensor(f"blk.{i}.{name}.weight", t.numpy(), raw_dtype=qtype if hf.endswith("_proj") else None)
        for hf, name in EXPERT_TENSORS.items():
            keys = [f"{layer}{moe}.experts.{e}.{MIXTRAL_EXPERTS[hf] if mixtral else hf}.weight" for e in range(experts)]
            q = gguf.quantize(torch.stack([sd[k] for k in keys]).numpy(), qtype)
            w.add_tensor(f"blk.{i}.{name}.weight", q, raw_dtype=qtype)
            sd.update(zip(keys, torch.from_numpy(gguf.dequantize(q, qtype)).unbind()))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    save_file({k: v.contiguous() for k, v in sd.items()}, weights, metadata={"format": "pt"})


def gguf_moe(arch: str, tmp_path, qtype: str = "Q8_0") -> tuple[str, str]:
    """(a tiny MoE GGUF, the HF folder holding its weights): every layer sparse, as llama.cpp's archs have them;
    experts' sizes in whole blocks of 32."""
    sizes = {"moe_intermediate_size": 64, "mlp_only_layers": []} if arch == "qwen3_moe" else {"intermediate_size": 64}
    folder = save_tiny_model(arch, str(tmp_path / "hf"), **sizes)
    write_moe_gguf(folder, str(tmp_path / "moe.gguf"), qtype)
    return str(tmp_path / "moe.gguf"), folder


def assert_same_logits(llm: LLM, hf) -> None:
    """Our logits over a random prompt are HF's (fp32, 1e-4), argmax for argmax."""
    from test_embedded import our_logits

    ids = random_prompts(1, 24, 24, seed=3)[0]
    with torch.no_grad():
        expected = hf(torch.tensor([ids])).logits[0]
    got = our_logits(llm, ids)
    assert (got - expected).abs().max().item() < 1e-4
    assert torch.equal(got.argmax(-1), expected.argmax(-1))


def test_moe_gguf_logits_match_transformers(tmp_path):
    """Qwen3-MoE: transformers reads the GGUF itself."""
    from transformers import AutoConfig, AutoModelForCausalLM

    path, _ = gguf_moe("qwen3_moe", tmp_path)
    llm = LLM(path, dtype="float32", quantization="dequantize")  # HF's float weights (kept blocks: test_gguf_quant)
    # transformers does not map expert_feed_forward_length: given here
    cfg = AutoConfig.from_pretrained(tmp_path, gguf_file="moe.gguf")
    cfg.moe_intermediate_size = 64
    hf = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="moe.gguf", config=cfg, dtype=torch.float32).eval()
    assert_same_logits(llm, hf)


@pytest.mark.parametrize("arch", ["mixtral", "olmoe"])
def test_moe_gguf_transformers_cannot_read_gives_hf_logits_of_its_weights(arch, tmp_path):
    """Mixtral (llama.cpp's llama with experts, q/k rows permuted) and OLMoE GGUFs, which transformers cannot read
    (it takes the first for a dense Llama and rejects the second): our loader builds their config from the
    file's metadata; the logits are HF's from the same weights in safetensors."""
    from transformers import AutoModelForCausalLM

    from nanovllm.loader import load_hf_config
    from nanovllm.models.moe import num_experts

    path, folder = gguf_moe(arch, tmp_path)
    llm = LLM(path, dtype="float32", quantization="dequantize")  # HF's float weights (kept blocks: test_gguf_quant)
    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    cfg = load_hf_config(path)
    assert cfg.architectures == hf.config.architectures
    for field in (
        "num_experts_per_tok",
        "intermediate_size",
        "num_key_value_heads",
        "rope_parameters",
        "tie_word_embeddings",
        "vocab_size",
        "norm_topk_prob",
    ):
        assert getattr(cfg, field, None) == getattr(hf.config, field, None), field
    assert num_experts(cfg) == num_experts(hf.config)
    assert cfg.rms_norm_eps == pytest.approx(hf.config.rms_norm_eps, rel=1e-6)  # the file holds it in fp32
    text = "héllo wörld"
    assert llm.get_tokenizer()(text).input_ids == byte_tokenizer()(text).input_ids
    assert_same_logits(llm, hf)


def unpack_blocks(packed: torch.Tensor, kind: int, rows: int) -> torch.Tensor:
    """pack_blocks' inverse: the CPU kernel's tiles -> GGUF rows, uint8 [rows, K / 32 * block bytes]."""
    from nanovllm.kernels.cpu import BLOCK_BYTES, Q4_1

    scales = 2 if kind == Q4_1 else 1  # Q4_1: d and m, Q8_0: d (fp16 each)
    tiles = packed.view(rows // 16, -1, 16 * BLOCK_BYTES[kind])  # per 16 rows, per 32 inputs: q, d, (m)
    q, *dm = (p.unflatten(2, (16, -1)) for p in tiles.split([16 * (BLOCK_BYTES[kind] - 2 * scales)] + [32] * scales, 2))
    return torch.cat([*dm, q], 3).transpose(1, 2).reshape(rows, -1)


def dequantized(blocks: tuple[int, torch.Tensor], shape) -> torch.Tensor:
    """A kept expert's blocks as the bf16 weight they stand for (the gguf package's dequantize)."""
    import gguf

    from nanovllm.kernels.cpu import Q4_1

    kind, packed = blocks
    qtype = gguf.GGMLQuantizationType.Q4_1 if kind == Q4_1 else gguf.GGMLQuantizationType.Q8_0
    return torch.from_numpy(gguf.dequantize(unpack_blocks(packed, kind, shape[0]).numpy(), qtype)).bfloat16()


@pytest.mark.parametrize("kernel", ["amx", "torch"])
@pytest.mark.parametrize("arch,qtype", [("qwen3_moe", "Q8_0"), ("mixtral", "Q4_1")])
def test_gguf_quantized_experts_keep_their_blocks(arch, qtype, kernel, tmp_path, monkeypatch):
    """In bf16 on CPU where the loader keeps a GGUF's blocks (AMX), every layer's Q8_0 / Q4_1 experts keep theirs
    as the attention's projections do: each expert's blocks are the very values of the bf16 expert loaded beside
    them, the matmuls read them, and the greedy tokens are those of the bf16 weights alone. kernel="torch"
    runs anywhere: the AMX linear is replaced by its equivalent in torch (the blocks unpacked and dequantized),
    which checks the loading and the per-expert dispatch; kernel="amx" runs the C kernel (a CPU with AMX only)."""
    import torch.nn.functional as F

    import nanovllm.ops.cpu_ops as cpu_ops
    from nanovllm.kernels import cpu as cpu_kernel

    if kernel == "amx" and not cpu_kernel.has_amx():
        pytest.skip("this CPU (or its compiler) has no AMX")
    read = []
    if kernel == "torch":

        def amx_linear(x, weight, bias, blocks=None):  # what the kernel computes, where it reads blocks
            if blocks is None or not 0 < x.shape[0] <= cpu_kernel.LINEAR_ROWS:
                return None
            read.append((blocks[0], blocks[1].data_ptr()))
            return F.linear(x, dequantized(blocks, weight.shape), bias)

        monkeypatch.setattr(cpu_kernel, "amx_linear", amx_linear)
        monkeypatch.setattr(cpu_ops, "keeps_gguf_blocks", lambda dtype: dtype == torch.bfloat16)
    path, _ = gguf_moe(arch, tmp_path, qtype)
    llm = LLM(path, dtype="bfloat16", enable_prefix_caching=False)
    model = llm.engine.runner.model
    experts = [m for m in model.modules() if isinstance(m, FusedMoE)]
    kind = getattr(cpu_kernel, qtype)
    for m in experts:
        for w, (k, packed) in ((m.w13_weight, m.w13_blocks), (m.w2_weight, m.w2_blocks)):
            assert k == kind and packed.shape[0] == w.shape[0]
            assert all(torch.equal(dequantized((k, packed[e]), w.shape[1:]), w[e]) for e in range(w.shape[0]))
    for layer in model.model.layers:  # the dense projections' blocks alike (Mixtral's q/k rows unpermuted too)
        for m in (layer.self_attn.qkv_proj, layer.self_attn.o_proj):
            assert m.blocks[0] == kind and torch.equal(dequantized(m.blocks, m.weight.shape), m.weight)
    prompts = random_prompts(4, 5, 30, seed=4)
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    with_blocks = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    expert_blocks = {(kind, b.data_ptr()) for m in experts for _, p in (m.w13_blocks, m.w2_blocks) for b in p}
    assert kernel == "amx" or {k for k, _ in read} == {kind} and len(expert_blocks & set(read)) > len(experts)
    for m in experts:
        m.w13_blocks = m.w2_blocks = None
    for layer in model.model.layers:
        layer.self_attn.qkv_proj.blocks = layer.self_attn.o_proj.blocks = None
    assert with_blocks == [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
