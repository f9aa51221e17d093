"""The correctness bar: greedy fp32 token ids equal HF transformers' for every model and engine feature."""

from conftest import hf_greedy, random_prompts, save_tiny_model

from nanovllm import LLM, SamplingParams

MAX_NEW = 24
GREEDY = SamplingParams(temperature=0, max_tokens=MAX_NEW, ignore_eos=True)


def ours(llm: LLM, prompts, params=GREEDY) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]


def test_mixed_lengths_batch(tiny_model):
    prompts = random_prompts(8, 1, 70, seed=1)
    llm = LLM(tiny_model, dtype="float32")
    assert ours(llm, prompts) == hf_greedy(tiny_model, prompts, MAX_NEW)


def test_prefix_cache_hits(tiny_model):
    shared = random_prompts(1, 40, 40, seed=2)[0]
    prompts = random_prompts(5, 3, 20, seed=3, prefix=shared)
    llm = LLM(tiny_model, dtype="float32", block_size=8)
    first = ours(llm, prompts[:1])
    hits_before = llm.engine.stats()["prefix_cache_hits"]
    rest = ours(llm, prompts[1:])
    hits = llm.engine.stats()["prefix_cache_hits"] - hits_before
    assert hits >= 4 * 40  # every later prompt reuses the 40 shared tokens (5 blocks of 8)
    # the same prompt again: everything but the last block comes from the cache
    again = llm.generate([prompts[0]], GREEDY, use_tqdm=False)[0]
    assert again.num_cached_tokens == (len(prompts[0]) - 1) // 8 * 8
    assert first + rest == hf_greedy(tiny_model, prompts, MAX_NEW)
    assert again.outputs[0].token_ids == first[0]


def test_chunked_prefill(tiny_model):
    prompts = random_prompts(4, 30, 90, seed=4)
    llm = LLM(tiny_model, dtype="float32", max_num_batched_tokens=16)
    assert ours(llm, prompts) == hf_greedy(tiny_model, prompts, MAX_NEW)


def test_preemption(tiny_model):
    prompts = random_prompts(6, 20, 40, seed=5)
    # 12 blocks of 8 tokens hold two of these sequences at full length, not six
    llm = LLM(tiny_model, dtype="float32", block_size=8, num_kv_blocks=12, max_model_len=96)
    got = ours(llm, prompts)
    assert llm.engine.stats()["preemptions"] > 0
    assert got == hf_greedy(tiny_model, prompts, MAX_NEW)


def test_text_prompts_match_token_prompts(tiny_model):
    llm = LLM(tiny_model, dtype="float32")
    texts = ["Hello world", "The sky is", "a"]
    ids = [llm.get_tokenizer()(t).input_ids for t in texts]
    by_text = ours(llm, texts)
    assert by_text == ours(llm, ids)
    assert by_text == hf_greedy(tiny_model, ids, MAX_NEW)


def test_sharded_checkpoint(tmp_path):
    path = save_tiny_model("qwen2", str(tmp_path), max_shard_size="40KB")
    assert len(list(tmp_path.glob("*.safetensors"))) > 2
    prompts = random_prompts(3, 5, 30, seed=6)
    assert ours(LLM(path, dtype="float32"), prompts) == hf_greedy(path, prompts, MAX_NEW)
