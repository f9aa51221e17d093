"""The scheduler's extension points without a model: a proposer's tentative tokens (counted, cut to the budget,
dropped rather than preempt anyone, rolled back to those the sampler kept, released with the sequence), admission
waiting for `Sequence.ready`, and the prefix cache kept within `Sequence.cacheable_prefix`."""

from concurrent.futures import Future
from types import SimpleNamespace

from nanovllm.engine.block_manager import BlockManager
from nanovllm.engine.scheduler import Scheduler
from nanovllm.engine.sequence import Sequence
from nanovllm.sampling.step_sampler import SamplerOutput
from nanovllm.sampling_params import SamplingParams
from nanovllm.structured_outputs import Constraint

BLOCK = 4
PARAMS = SamplingParams(max_tokens=100, ignore_eos=True)


class FixedProposer:
    """Proposes the same tokens after every sequence about to decode; remembers what it released."""

    def __init__(self, tokens: list[int]) -> None:
        self.tokens, self.released = tokens, []

    def propose(self, running, waiting) -> None:
        for seq in running:
            seq.clear_tentative()
            if seq.num_tokens - seq.num_computed == 1:
                seq.spec_token_ids = list(self.tokens)

    def release(self, seq: Sequence) -> None:
        seq.clear_tentative()
        self.released.append(seq)


class QuietRequest:
    """What Scheduler.postprocess asks of a request, with no stop ever."""

    final_only = False

    def check(self, seq, token, eos_token_ids, max_model_len):
        return None


def scheduler(num_blocks: int, budget: int, proposer=None) -> Scheduler:
    config = SimpleNamespace(
        max_num_seqs=8, max_model_len=64, max_num_batched_tokens=budget, enable_chunked_prefill=True
    )
    return Scheduler(config, BlockManager(num_blocks, BLOCK, max_num_seqs=8, max_blocks_per_seq=16), proposer)


def prefilled(s: Scheduler, prompts: list[list[int]]) -> list[Sequence]:
    """Sequences admitted and prefilled, each with one sampled token appended: about to decode."""
    seqs = [Sequence(str(i), 0, list(p), len(p), PARAMS) for i, p in enumerate(prompts)]
    for seq in seqs:
        s.add(seq)
    budget, s.max_num_batched_tokens = s.max_num_batched_tokens, 64  # every prompt whole in one step
    batch = s.schedule()
    s.max_num_batched_tokens = budget
    assert batch.seqs == seqs and not batch.tentative_rows
    s.launched(batch)
    for seq in seqs:
        seq.token_ids.append(7)
    return seqs


def test_tentative_tokens_are_computed_with_the_sequence_and_rolled_back_to_those_kept():
    proposer = FixedProposer([11, 12, 13])
    s = scheduler(num_blocks=16, budget=64, proposer=proposer)
    (seq,) = prefilled(s, [[1, 2, 3, 4, 5]])
    assert seq.num_to_compute == 1
    batch = s.schedule()
    assert batch.num_new_tokens == [4] and batch.tentative_rows == [0] and batch.sample_rows == [0]
    assert seq.num_to_compute == 4 and len(seq.block_table) == 3  # 9 tokens: 3 blocks of 4
    s.launched(batch)
    output = SamplerOutput(needs_tokens=True, kept=[[11, 20]])  # the first proposal kept, the second rejected
    s.postprocess(batch, output, {seq.request_id: QuietRequest()}, eos_token_ids={0})
    assert seq.token_ids == [1, 2, 3, 4, 5, 7, 11, 20]
    assert seq.num_computed == seq.num_tokens - 1 == 7  # the kept proposal's K/V stays computed
    assert len(seq.block_table) == 2 and seq.num_tentative == 0  # the block of rejected ones went back
    s.finish(seq, "abort")
    assert proposer.released == [seq]
    s.block_manager.check_all_free()


def test_tentative_tokens_are_cut_to_the_budget():
    s = scheduler(num_blocks=16, budget=2 + 3, proposer=FixedProposer([11, 12, 13]))
    a, b = prefilled(s, [[1, 2, 3], [4, 5, 6]])
    batch = s.schedule()  # a takes 1 + 3, b what is left: its own token and no proposal
    assert batch.seqs == [a, b] and batch.num_new_tokens == [4, 1] and batch.tentative_rows == [0]
    assert a.spec_token_ids == [11, 12, 13] and b.spec_token_ids == []


def test_tentative_tokens_never_preempt():
    # two sequences of 4 tokens each in 2 of the 3 blocks: a's proposals would need a third block, b's a fourth
    s = scheduler(num_blocks=3, budget=64, proposer=FixedProposer([11, 12, 13, 14]))
    a, b = prefilled(s, [[1, 2, 3], [4, 5, 6]])
    batch = s.schedule()
    assert batch.seqs == [a, b] and s.num_preemptions == 0
    assert batch.num_new_tokens == [5, 1] and b.spec_token_ids == []  # b's proposals went, not a's blocks


def test_admission_waits_until_ready():
    s = scheduler(num_blocks=16, budget=64)
    grammar = Future()
    waiting = Sequence("g", 0, [1, 2, 3], 3, PARAMS, constraint=Constraint(grammar))
    plain = Sequence("p", 0, [4, 5, 6], 3, PARAMS)
    s.add(waiting)
    s.add(plain)
    assert not waiting.ready and waiting.waits_for is grammar and plain.ready and plain.waits_for is None
    assert s.schedule().seqs == [plain]  # the first in line that waits for nothing
    grammar.set_result(None)
    assert waiting.ready and s.schedule().seqs == [plain, waiting]


def test_prefix_cache_stays_within_the_cacheable_prefix():
    bm = BlockManager(16, BLOCK)
    first = Sequence("a", 0, list(range(13)), 13, PARAMS)
    bm.allocate(first, [], 13)
    first.num_computed = 13
    bm.cache_full_blocks(first)
    same = Sequence("b", 0, list(range(13)), 13, PARAMS)
    assert same.cacheable_prefix == 12 and len(bm.match_prefix(same)) == 3
    asks = Sequence("c", 0, list(range(13)), 13, SamplingParams(prompt_logprobs=1), prompt_logprobs=[None])
    assert asks.cacheable_prefix == 0 and bm.match_prefix(asks) == []  # every prompt position gives a logprob
    asks.prompt_logprobs += [{}] * 8  # recorded up to position 8 (a recompute after a preemption)
    assert asks.cacheable_prefix == 8 and len(bm.match_prefix(asks)) == 2
