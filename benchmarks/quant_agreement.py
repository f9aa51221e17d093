"""How far GGUF weights kept quantized (our C kernels: activations in 16 bits by default, in int8 with
--quantization gguf_int8) move the embedded model from its float path (quantization="dequantize": every weight
dequantized at load, HF's values), teacher-forced.

    python benchmarks/quant_agreement.py                    # 32 prompts x 64 tokens, fp32
    python benchmarks/quant_agreement.py --quantization gguf_int8
    python benchmarks/quant_agreement.py --dtype bfloat16 --prompts 8

The float path continues each prompt greedily for --tokens tokens; then each path scores the same token sequences
(prompt + continuation) in one forward each, and at every continuation position we compare the two: top-1
agreement (%) and the mean |logprob difference| of the token the float path chose. The scoring forward is a
prefill, which the kept path would run through dequantized tiles (the float path's values); --kernel-rows (default:
every row) makes our quantized-linear kernel, the decode path, compute it instead: what decoding sees.
"""

import argparse
import platform

import torch

from nanovllm import LLM, SamplingParams
from nanovllm.engine.batch import ScheduledBatch
from nanovllm.engine.sequence import Sequence

TOPICS = ["the ocean", "a small town", "bread", "the moon", "a bicycle", "rain", "chess", "a library"]
TEMPLATES = [
    "Write a short story about {}.",
    "Explain to a child what {} is.",
    "List three facts about {}.",
    "Describe {} in one paragraph.",
]


def prompts(llm: LLM, n: int) -> list[list[int]]:
    """n chat prompts (the model's template), topic by template."""
    texts = [t.format(topic) for t in TEMPLATES for topic in TOPICS][:n]
    tok = llm.get_tokenizer()
    chats = [
        tok.apply_chat_template([{"role": "user", "content": t}], add_generation_prompt=True, tokenize=False)
        for t in texts
    ]
    return [tok(c, add_special_tokens=False).input_ids for c in chats]


@torch.inference_mode()
def logprobs(llm: LLM, ids: list[int]) -> torch.Tensor:
    """log_softmax of the logits at every position of `ids`, in one forward (a prefill of the whole sequence)."""
    engine = llm.engine
    seq = Sequence("score", 0, list(ids), len(ids), SamplingParams())
    engine.block_manager.allocate(seq, [], len(ids))
    try:
        input_ids, positions, meta, _ = engine.runner.prepare(ScheduledBatch([seq], [len(ids)]))
        model = engine.runner.model
        return torch.log_softmax(model.compute_logits(model(input_ids, positions, meta)).float(), dim=-1)
    finally:
        engine.block_manager.free_blocks(seq)


def score(llm: LLM, sequences: list[tuple[list[int], list[int]]]) -> list[torch.Tensor]:
    """Each (prompt, continuation)'s logprobs at the positions that predict the continuation's tokens."""
    return [logprobs(llm, p + c)[len(p) - 1 : len(p) + len(c) - 1] for p, c in sequences]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="a .gguf file (default: the embedded SmolLM2 Q4_1)")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--kernel-rows", type=int, default=1 << 30, help="rows up to which the C kernel runs")
    ap.add_argument("--quantization", default="gguf", choices=["gguf", "gguf_int8"], help="the kept path's")
    args = ap.parse_args()
    import nanovllm.kernels.cpu.quant as quant
    from nanovllm.kernels.cpu.build import library

    if library() is None:
        raise SystemExit("this needs our C kernels (kernels/cpu: a C compiler)")
    common = dict(dtype=args.dtype, device="cpu", ops="cpu", kv_cache_gib=1, enable_prefix_caching=False)
    reference = LLM(args.model, quantization="dequantize", **common)
    greedy = SamplingParams(temperature=0, max_tokens=args.tokens, ignore_eos=True)
    ps = prompts(reference, args.prompts)
    outs = reference.generate([{"prompt_token_ids": p} for p in ps], greedy, use_tqdm=False)
    sequences = [(p, o.outputs[0].token_ids) for p, o in zip(ps, outs)]
    expected = score(reference, sequences)
    del reference
    kept = LLM(args.model, quantization=args.quantization, **common)
    quant.TILE_FROM_ROWS = args.kernel_rows + 1  # where the kernel wrapper switches to dequantized tiles
    got = score(kept, sequences)
    chosen = [torch.tensor(c) for _, c in sequences]
    top1 = torch.cat([(g.argmax(-1) == e.argmax(-1)) for g, e in zip(got, expected)]).float().mean().item()
    diff = torch.cat([(g - e).gather(1, c[:, None]).abs().squeeze(1) for g, e, c in zip(got, expected, chosen)])
    print(f"# {platform.processor() or platform.machine()}, torch {torch.__version__}, {args.dtype}")
    print(f"# {args.prompts} prompts x {args.tokens} tokens, teacher-forced; kernel up to {args.kernel_rows} rows")
    print(f"# quantization={args.quantization!r} against 'dequantize'")
    print(f"top-1 agreement:           {100 * top1:.2f}%")
    print(f"mean |logprob difference|: {diff.mean().item():.5f} (max {diff.max().item():.4f})")


if __name__ == "__main__":
    main()
