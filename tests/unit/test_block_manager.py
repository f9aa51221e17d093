"""Block manager bookkeeping: ref counts, prefix hits, revival of free cached blocks, LRU eviction."""

from nanovllm.engine.block_manager import BlockManager
from nanovllm.engine.sequence import Sequence
from nanovllm.sampling_params import SamplingParams


def seq(tokens: list[int], name: str = "s") -> Sequence:
    return Sequence(name, 0, list(tokens), len(tokens), SamplingParams())


def admit(bm: BlockManager, s: Sequence) -> list[int]:
    """What the scheduler does for a new sequence: cache lookup, allocation, then the whole prompt computed."""
    hits = bm.match_prefix(s)
    n = s.num_tokens - len(hits) * bm.block_size
    assert bm.can_allocate(s, hits, n)
    bm.allocate(s, hits, n)
    s.num_computed += n
    bm.cache_full_blocks(s)
    return hits


def test_shared_prefix_blocks_are_shared_and_ref_counted():
    bm = BlockManager(8, 4)
    a, b = seq(range(10), "a"), seq([*range(8), 50, 51, 52], "b")
    admit(bm, a)
    hits = admit(bm, b)
    assert hits == a.block_table[:2] and b.block_table[:2] == a.block_table[:2]
    assert [bm.ref_counts[x] for x in a.block_table] == [2, 2, 1]
    assert b.num_cached_tokens == 8 and bm.prefix_hit_tokens == 8
    bm.free_blocks(a)
    bm.free_blocks(b)
    bm.check_all_free()


def test_last_token_is_never_served_from_cache():
    bm = BlockManager(8, 4)
    a = seq(range(8), "a")
    admit(bm, a)
    bm.free_blocks(a)
    again = seq(range(8), "again")
    hits = admit(bm, again)
    assert len(hits) == 1  # 8 tokens = 2 full blocks, but the second holds the last token: recomputed
    bm.free_blocks(again)


def test_free_cached_blocks_are_revived_then_evicted_lru():
    bm = BlockManager(4, 4)
    a = seq(range(8), "a")
    admit(bm, a)
    first = a.block_table[0]
    bm.free_blocks(a)
    assert bm.num_free == 4  # free, but still keyed
    b = seq([*range(4), 99, 98, 97, 96, 95], "b")
    assert admit(bm, b) == [first] and bm.ref_counts[first] == 1
    bm.free_blocks(b)
    # two unrelated sequences take every block: the old keys are evicted, nothing stale is matched
    c, d = seq(range(100, 108), "c"), seq(range(200, 208), "d")
    admit(bm, c)
    admit(bm, d)
    bm.free_blocks(c)
    bm.free_blocks(d)
    assert bm.match_prefix(seq(range(9))) == []
    assert len(bm.match_prefix(seq(range(100, 109)))) == 2


def test_eviction_takes_unkeyed_blocks_first():
    bm = BlockManager(4, 4)
    a = seq(range(6), "a")  # one full keyed block + one partial (unkeyed) block
    admit(bm, a)
    keyed = a.block_table[0]
    bm.free_blocks(a)
    b = seq(range(50, 54), "b")  # needs one fresh block: must not take the keyed one
    admit(bm, b)
    assert keyed not in b.block_table
    assert bm.match_prefix(seq(range(6))) == [keyed]
    bm.free_blocks(b)


def test_key_collision_is_ruled_out_by_token_ids():
    bm = BlockManager(4, 4)
    a = seq(range(5), "a")
    admit(bm, a)
    block = a.block_table[0]
    bm.tokens[block] = (9, 9, 9, 9)  # as if another block's tokens had produced the same key
    assert bm.match_prefix(seq(range(5))) == []
    bm.free_blocks(a)


def test_can_allocate_counts_revived_blocks():
    bm = BlockManager(3, 4)
    a = seq(range(9), "a")
    admit(bm, a)  # 3 blocks
    bm.free_blocks(a)
    b = seq([*range(8), 7, 7, 7, 7, 7], "b")  # hits 2 free blocks, needs 2 more: 4 > 3
    hits = bm.match_prefix(b)
    assert len(hits) == 2
    assert not bm.can_allocate(b, hits, b.num_tokens - 8)
    assert bm.can_allocate(b, hits, 4)
