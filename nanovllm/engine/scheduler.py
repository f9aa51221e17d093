from collections import deque
from collections.abc import Iterable
from concurrent.futures import FIRST_COMPLETED, wait
from typing import Protocol

import numpy as np

from nanovllm.config import EngineConfig
from nanovllm.engine.batch import ScheduledBatch
from nanovllm.engine.block_manager import BlockManager
from nanovllm.engine.sequence import Sequence, Status
from nanovllm.logprobs import add_step_logprobs
from nanovllm.sampling.step_sampler import SamplerOutput


class Proposer(Protocol):
    """What the scheduler consults for tentative tokens (speculative decoding's Speculator, nanovllm/spec)."""

    def propose(self, running: list[Sequence], waiting: Iterable[Sequence]) -> None:
        """Before each schedule: set the running sequences' tentative tokens (`Sequence.spec_token_ids`)."""

    def release(self, seq: Sequence) -> None:
        """A sequence left the running batch (finished, aborted, preempted): its tentative tokens and whatever the
        proposer holds for it go."""


class Scheduler:
    """Continuous batching under one token budget per step: running sequences first (decodes and unfinished
    prefill chunks), then new ones, in one mixed batch. When blocks run out, the most recently admitted
    sequence is preempted by recompute: its blocks are freed and it goes back to the front of the queue.
    `proposer` (None: none) gives running sequences tentative tokens before each schedule; they are computed with
    the sequence's own, never preempt anyone (the budget or the pool short: they go instead), and after the step the
    sequence keeps those the sampler kept."""

    def __init__(self, config: EngineConfig, block_manager: BlockManager, proposer: Proposer | None = None):
        self.max_num_seqs, self.max_model_len = config.max_num_seqs, config.max_model_len
        self.max_num_batched_tokens = config.max_num_batched_tokens
        self.chunked_prefill = config.enable_chunked_prefill
        self.block_manager = block_manager
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0
        self.proposer = proposer

    def add(self, seq: Sequence) -> None:
        seq.check_at = min(seq.check_at, self.max_model_len)
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> ScheduledBatch:
        if self.proposer is not None:
            self.proposer.propose(self.running, self.waiting)
        bm, budget, running = self.block_manager, self.max_num_batched_tokens, self.running
        bs = bm.block_size
        # Running sequences that fit the budget whole, at once: each computes what it has left (Sequence.num_to_compute)
        # and is sampled; only those that need a block are looked at one by one. Where one cannot get it, the loop
        # below takes over. Without a proposer nothing is tentative: what is left is Sequence.num_uncomputed, inline
        # (a property per sequence and step cost 5% of the host's step at 256 sequences)
        if self.proposer is None:
            left = [len(s.token_ids) - s.num_computed or 1 for s in running]
        else:
            left = [s.num_to_compute for s in running]
        i = int(np.searchsorted(np.cumsum(left), budget, side="right"))
        for j in [j for j, (s, n) in enumerate(zip(running[:i], left)) if s.num_computed + n > len(s.block_table) * bs]:
            if not bm.can_allocate(running[j], [], left[j]):
                i = j
                break
            bm.allocate(running[j], [], left[j])
        batch = ScheduledBatch(seqs=running[:i], num_new_tokens=left[:i], sample_rows=list(range(i)))
        budget -= sum(left[:i])
        preempted = False
        while i < len(self.running) and budget > 0:  # one at a time: a chunk the budget cuts, preemption
            seq = self.running[i]
            n = min(seq.num_to_compute, budget)
            if n > seq.num_uncomputed and not bm.can_allocate(seq, [], n):  # tentative tokens never preempt: they go
                n = seq.num_uncomputed
            seq.cut_tentative(n)
            if (seq.num_computed + n + bs - 1) // bs > len(seq.block_table):  # it needs a block
                while not bm.can_allocate(seq, [], n):
                    victim = self.running.pop()
                    self.preempt(victim)
                    preempted = True
                    if victim is seq:
                        break
                else:
                    bm.allocate(seq, [], n)
                if preempted and seq.status is Status.WAITING:
                    continue
            if seq.num_computed + n >= len(seq.token_ids):
                batch.sample_rows.append(len(batch.seqs))
            batch.seqs.append(seq)
            batch.num_new_tokens.append(n)
            budget -= n
            i += 1
        # New sequences only when nothing had to be preempted: admitting them would just evict others again.
        while self.waiting and not preempted and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = next((s for s in self.waiting if s.ready), None)  # the first in line that waits for nothing
            if seq is None:
                break
            hits = bm.match_prefix(seq) if not seq.block_table else []  # within its cacheable_prefix
            n = min(seq.num_tokens - seq.num_computed - len(hits) * bm.block_size, budget)
            if not self.chunked_prefill and n < seq.num_tokens - seq.num_computed - len(hits) * bm.block_size:
                break  # the whole prompt in one step, or wait for a step with room for it
            if not bm.can_allocate(seq, hits, n):
                break
            self.waiting.remove(seq)
            bm.allocate(seq, hits, n)
            seq.status = Status.RUNNING
            self.running.append(seq)
            if seq.num_computed + n == seq.num_tokens:
                batch.sample_rows.append(len(batch.seqs))
            batch.seqs.append(seq)
            batch.num_new_tokens.append(n)
            budget -= n
        if self.proposer is not None:
            batch.tentative_rows = [i for i, s in enumerate(batch.seqs) if s.num_tentative]
        return batch

    def wait_until_ready(self, timeout: float = 0.01) -> None:
        """Nothing could be scheduled: if waiting sequences wait for something (`Sequence.waits_for`: a
        structured-output grammar compiling), sleep until one is ready (briefly: requests come)."""
        pending = [s.waits_for for s in self.waiting if not s.ready]
        wait(pending, timeout=timeout, return_when=FIRST_COMPLETED)

    @staticmethod
    def launched(batch: ScheduledBatch) -> None:
        """The batch's step is on its way: its tokens count as computed (a sampled sequence's new token is pending
        until postprocess appends it; tentative tokens until postprocess knows which were kept)."""
        for seq, n in zip(batch.seqs, batch.num_new_tokens):
            seq.num_computed += n

    def postprocess(
        self, batch: ScheduledBatch, output: SamplerOutput, requests: dict, eos_token_ids: set[int]
    ) -> list:
        """After a step's sampled tokens reached the host: each row's new tokens (one, or a kept run of tentative
        tokens and one more) appended unless its sequence ended while the step ran (then they are dropped), with
        their logprobs where asked (and prompt logprobs); a sequence that computed tentative tokens keeps the K/V of
        those kept (roll_back); newly full blocks keyed for the prefix cache; a look for a stop where one may have
        come (token by token in a run); finished sequences out. Returns the requests that changed (a FINAL_ONLY one
        only when a sequence of it ended). A request whose token cannot be handled (e.g. a tokenizer that cannot
        decode it) fails alone. Per token only list comprehensions: a loop's statements cost ~0.5 us each here."""
        bm, finished = self.block_manager, Status.FINISHED
        bs, seqs = bm.block_size, batch.seqs
        tokens = output.token_ids()
        failed = add_step_logprobs(output.logprobs, seqs, requests, self.fail) if output.logprobs else {}
        live = [(seqs[row], new) for row, new in zip(batch.sample_rows, tokens) if seqs[row].status is not finished]
        for seq, new in live:
            seq.token_ids += new
        for seq in [seqs[row] for row in batch.tentative_rows if seqs[row].status is not finished]:
            self.roll_back(seq)
        for seq in [s for s in seqs if s.num_computed >= (s.num_keyed_blocks + 1) * bs and s.status is not finished]:
            bm.cache_full_blocks(seq)
        changed = failed | {
            s.request_id: requests[s.request_id] for s, _ in live if not requests[s.request_id].final_only
        }
        # only where a stop may have come: stop strings and tokens, min_tokens, EOS, the length limits, a run
        runs = bool(batch.tentative_rows)
        for seq, new in [
            (s, n) for s, n in live if len(s.token_ids) >= s.check_at or n[0] in eos_token_ids or runs and len(n) > 1
        ]:
            if seq.status is finished:  # its request failed on another sequence's token
                continue
            request = requests[seq.request_id]
            try:
                del seq.token_ids[len(seq.token_ids) - len(new) + 1 :]  # a run's tokens checked one by one
                for j, token in enumerate(new):
                    if j:
                        seq.token_ids.append(token)
                    if done := request.check(seq, token, eos_token_ids, self.max_model_len):
                        break
            except Exception as e:
                self.fail(request, e)
                changed[seq.request_id] = request
                continue
            if done:
                self.finish(seq, *done)
                changed[seq.request_id] = request
        return list(changed.values())

    def fail(self, request, error: Exception) -> None:
        """Handling this request failed: it ends now, with the error in its output."""
        request.error = f"{type(error).__name__}: {error}"
        for seq in request.seqs:
            if not seq.finished:
                self.finish(seq, "abort")

    def roll_back(self, seq: Sequence) -> None:
        """After a step that computed its tentative tokens (the kept ones appended): the K/V of those kept stays
        computed, the blocks that held only the others go back."""
        seq.num_computed = seq.num_tokens - 1
        self.block_manager.truncate(seq, seq.num_tokens)
        seq.clear_tentative()

    def preempt(self, seq: Sequence) -> None:
        self.num_preemptions += 1
        self.release(seq)
        seq.num_computed = 0
        seq.status = Status.WAITING
        self.waiting.appendleft(seq)

    def finish(self, seq: Sequence, reason: str, stop_reason: int | str | None = None) -> None:
        """Take a sequence out of the schedule for good (stopped, length, aborted) and free its blocks now."""
        seq.status, seq.finish_reason, seq.stop_reason = Status.FINISHED, reason, stop_reason
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.release(seq)

    def release(self, seq: Sequence) -> None:
        self.block_manager.free_blocks(seq)
        if self.proposer is not None:
            self.proposer.release(seq)
