from array import array
from collections import OrderedDict

import numpy as np
import xxhash

from nanovllm.engine.sequence import Sequence


def block_key(parent: int, tokens: list[int]) -> int:
    """Chained key of a full block: it names the block's tokens and everything before them."""
    return xxhash.xxh3_64_intdigest(array("Q", [parent, *tokens]).tobytes())


class BlockManager:
    """Owns the paged KV pool's bookkeeping: which blocks each sequence holds, ref counts, the prefix cache.

    Free blocks keep their key until they are handed out again, so a later request with the same prefix
    revives them. The free list is an LRU: blocks without a key sit at its front and go first.

    A sequence that holds blocks also holds a row of `tables`, its block table as the model runner reads it: a
    step's tables are one gather of rows, and a table grows by one entry with each block, never rebuilt.
    """

    def __init__(
        self,
        num_blocks: int,
        block_size: int,
        enable_prefix_caching: bool = True,
        max_num_seqs: int = 256,
        max_blocks_per_seq: int | None = None,
    ):
        self.num_blocks, self.block_size = num_blocks, block_size
        self.tables = np.zeros((max_num_seqs, max_blocks_per_seq or num_blocks), dtype=np.int64)
        self.free_rows = list(range(max_num_seqs - 1, -1, -1))
        self.enable_prefix_caching = enable_prefix_caching
        self.ref_counts = [0] * num_blocks
        self.keys: list[int | None] = [None] * num_blocks
        self.tokens: list[tuple[int, ...] | None] = [None] * num_blocks  # rules out key collisions
        self.cached: dict[int, int] = {}  # key -> block id
        self.free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self.prefix_query_tokens = 0
        self.prefix_hit_tokens = 0

    @property
    def num_free(self) -> int:
        return len(self.free)

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def match_prefix(self, seq: Sequence) -> list[int]:
        """Cached blocks for the longest run of full blocks inside the sequence's `cacheable_prefix` (the last token is
        never served from cache)."""
        if not self.enable_prefix_caching:
            return []
        hits, parent, bs = [], 0, self.block_size
        for i in range(seq.cacheable_prefix // bs):
            chunk = seq.token_ids[i * bs : (i + 1) * bs]
            parent = block_key(parent, chunk)
            block = self.cached.get(parent)
            if block is None or self.tokens[block] != tuple(chunk):
                break
            hits.append(block)
        return hits

    def can_allocate(self, seq: Sequence, hits: list[int], num_new_tokens: int) -> bool:
        held = len(seq.block_table) + len(hits)
        needed = self.blocks_for(seq.num_computed + len(hits) * self.block_size + num_new_tokens) - held
        revived = sum(1 for b in hits if self.ref_counts[b] == 0)  # these leave the free list too
        return max(needed, 0) + revived <= self.num_free

    def allocate(self, seq: Sequence, hits: list[int], num_new_tokens: int) -> None:
        """Give `seq` the cache hits and enough fresh blocks for `num_new_tokens` more tokens."""
        if seq.num_cached_tokens < 0:  # first admission only: a preempted sequence's recompute is no query
            self.prefix_query_tokens += seq.num_tokens
            self.prefix_hit_tokens += len(hits) * self.block_size
            seq.num_cached_tokens = len(hits) * self.block_size
        if seq.row < 0:
            seq.row = self.free_rows.pop()
        table = self.tables[seq.row]
        for block in hits:
            if self.ref_counts[block] == 0:
                del self.free[block]
            self.ref_counts[block] += 1
            table[len(seq.block_table)] = block
            seq.block_table.append(block)
        if hits:  # keyed already
            seq.num_computed += len(hits) * self.block_size
            seq.num_keyed_blocks = len(hits)
        for _ in range(self.blocks_for(seq.num_computed + num_new_tokens) - len(seq.block_table)):
            block, _ = self.free.popitem(last=False)
            if self.keys[block] is not None:
                if self.cached.get(self.keys[block]) == block:
                    del self.cached[self.keys[block]]
                self.keys[block] = self.tokens[block] = None
            self.ref_counts[block] = 1
            table[len(seq.block_table)] = block
            seq.block_table.append(block)

    def cache_full_blocks(self, seq: Sequence) -> None:
        """Key the blocks that became full, computed (or launched) and known on the host since the last call, so
        later requests can share them."""
        bs = self.block_size
        full = min(seq.num_computed, len(seq.token_ids)) // bs
        start, seq.num_keyed_blocks = seq.num_keyed_blocks, full
        if not self.enable_prefix_caching:
            return
        for i in range(start, full):
            block = seq.block_table[i]
            if self.keys[block] is not None:  # a cache hit: already keyed
                continue
            parent = self.keys[seq.block_table[i - 1]] if i > 0 else 0
            chunk = seq.token_ids[i * bs : (i + 1) * bs]
            self.keys[block], self.tokens[block] = block_key(parent, chunk), tuple(chunk)
            self.cached.setdefault(self.keys[block], block)

    def free_blocks(self, seq: Sequence) -> None:
        self.truncate(seq, 0)

    def truncate(self, seq: Sequence, num_tokens: int) -> None:
        """Keep only the blocks of the first `num_tokens` tokens (speculative decoding: the blocks that held only
        rejected proposals go back). Tail blocks are freed first so that an LRU eviction takes a prefix's end
        before its start."""
        keep = self.blocks_for(num_tokens)
        for block in reversed(seq.block_table[keep:]):
            self.ref_counts[block] -= 1
            if self.ref_counts[block] == 0:
                self.free[block] = None
                if self.keys[block] is None:
                    self.free.move_to_end(block, last=False)
        seq.block_table = seq.block_table[:keep]  # the table row's later entries are never read
        seq.num_keyed_blocks = min(seq.num_keyed_blocks, keep)
        if keep == 0 and seq.row >= 0:
            self.free_rows.append(seq.row)
            seq.row = -1

    def reset_prefix_cache(self) -> bool:
        """Forget every cached block's key (a new model state, a benchmark's cold start); False while any block is
        held, since a running sequence's blocks must stay as they are."""
        if self.num_free != self.num_blocks:
            return False
        self.cached.clear()
        self.keys = [None] * self.num_blocks
        self.tokens = [None] * self.num_blocks
        return True

    def check_all_free(self) -> None:
        """Invariant for tests: no block is held once no sequence is alive."""
        held = [b for b, r in enumerate(self.ref_counts) if r != 0]
        if held or self.num_free != self.num_blocks:
            raise AssertionError(f"blocks still held: {held[:10]}, free {self.num_free}/{self.num_blocks}")
