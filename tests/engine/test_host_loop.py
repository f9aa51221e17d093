"""The host's side of a step: block tables kept as rows that grow in place, a sampler that never reads the device,
text made when it is read (and a request whose text cannot be made fails alone)."""

import pytest
import torch
from conftest import hf_greedy, random_prompts

import nanovllm.ops as ops
from nanovllm import LLM, SamplingParams
from nanovllm.engine.block_manager import BlockManager
from nanovllm.engine.detokenizer import IncrementalDetokenizer
from nanovllm.engine.sequence import Sequence


def test_a_block_table_is_a_row_that_grows_in_place():
    bm = BlockManager(8, 4, max_num_seqs=2, max_blocks_per_seq=4)
    a, b = (Sequence(name, 0, list(range(6)), 6, SamplingParams()) for name in "ab")
    bm.allocate(a, [], 6)
    bm.allocate(b, [], 6)
    a.num_computed = 6
    bm.allocate(a, [], 3)  # a third block, written where the row ends
    assert a.row != b.row
    assert bm.tables[a.row, :3].tolist() == a.block_table and bm.tables[b.row, :2].tolist() == b.block_table
    row = a.row
    bm.free_blocks(a)
    assert a.row == -1 and row in bm.free_rows
    bm.free_blocks(b)
    bm.check_all_free()


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(temperature=0),
        SamplingParams(temperature=0.8),
        SamplingParams(temperature=0.8, seed=1),
        SamplingParams(temperature=0.8, top_k=5, top_p=0.9, min_p=0.05),
        SamplingParams(temperature=0.7, n=2, seed=3, repetition_penalty=1.2),
        SamplingParams(temperature=0.5, min_tokens=4, stop_token_ids=[7], logit_bias={9: 2.0}, bad_words=["ab"]),
    ],
    ids=["greedy", "temperature", "seed", "filters", "penalties", "lists"],
)
def test_the_sampler_never_reads_the_device(llm, params, monkeypatch):
    """What the sampler branches on comes from the host; on a GPU a bool(), int() or .item() of a device tensor
    would wait for the device. The sampled ids are the step's one copy to the host, after the sampler."""
    real = ops.sample

    def strict(*args):
        with monkeypatch.context() as m:
            for name in ("__bool__", "__int__", "__float__", "item", "tolist"):
                m.setattr(torch.Tensor, name, lambda *a, name=name: pytest.fail(f"the sampler read a tensor: {name}"))
            return real(*args)

    monkeypatch.setattr(ops, "sample", strict)
    params.max_tokens, params.ignore_eos = 6, True
    outs = llm.generate(["Hello", "abc"], [params, SamplingParams(temperature=0, max_tokens=6)], use_tqdm=False)
    assert all(1 <= len(c.token_ids) <= 6 for c in outs[0].outputs)


def test_text_without_stop_strings_is_made_when_read_and_equals_the_incremental_one(llm):
    tok = llm.get_tokenizer()
    ids = tok("abhéllo wörld 日本語 🙂 done").input_ids  # "ab": the prompt
    for stop in ([], ["never"]):  # made when read, and made token by token (a stop string is looked for)
        tokens = ids[:2]
        detok = IncrementalDetokenizer(tok, tokens, stop=stop)
        seen = []
        for t in ids[2:]:
            tokens.append(t)
            detok.add()
            seen.append(detok.text)
        assert seen[-1] == tok.decode(ids[2:]) and all(a == b[: len(a)] for a, b in zip(seen, seen[1:]))


def test_a_request_whose_text_cannot_be_made_fails_alone(llm, monkeypatch):
    engine = llm.engine
    real = IncrementalDetokenizer.decode_to

    def decode_to(self, end):
        if 33 in self.ids[self.read_offset : end]:
            raise UnicodeDecodeError("utf-8", b"\xff", 0, 1, "cannot decode this token")
        return real(self, end)

    monkeypatch.setattr(IncrementalDetokenizer, "decode_to", decode_to)
    params = SamplingParams(temperature=0, max_tokens=5, ignore_eos=True, logit_bias={33: 100.0})
    engine.add_request("bad", "Hello", params)
    engine.add_request("good", "Hello", SamplingParams(temperature=0, max_tokens=5, ignore_eos=True))
    outs = {}
    while engine.has_unfinished():
        outs.update((o.request_id, o) for o in engine.step())
    assert outs["bad"].finished and "cannot decode this token" in outs["bad"].error
    assert outs["good"].error is None and len(outs["good"].outputs[0].token_ids) == 5


def test_a_one_token_prefill_chunk_beside_decodes(model_path):
    """A step of one token per sequence is not all decodes when a prompt's chunk is one token: its input is the
    prompt's next token, not its last."""
    prompts = random_prompts(2, 6, 6, seed=4)
    llm = LLM(model_path, dtype="float32", max_num_batched_tokens=2)
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True), use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == hf_greedy(model_path, prompts, 8)
