from collections import deque
from concurrent.futures import FIRST_COMPLETED, wait
from dataclasses import dataclass, field

import numpy as np

from nanovllm.config import EngineConfig
from nanovllm.engine.block_manager import BlockManager
from nanovllm.engine.sequence import Sequence, Status
from nanovllm.sampling.sampler import StepLogprobs


@dataclass
class ScheduledBatch:
    seqs: list[Sequence]
    num_new_tokens: list[int]  # tokens of each sequence computed this step (1 for a decode, a chunk for a prefill,
    # 1 + k for a decode verifying k proposals)
    sample_rows: list[int] = field(default_factory=list)  # the sequences whose whole context is computed after it
    verifies: bool = False  # some sequence's speculative proposals are in it

    @property
    def num_tokens(self) -> int:
        return sum(self.num_new_tokens)

    def token_counts(self) -> tuple[int, int]:
        """(prefill tokens, decode tokens) of the step, for progress reports. A verifying row is a decode step of
        its sequence (the tokens it gave are counted when it is postprocessed)."""
        if self.verifies:
            decodes = [n for s, n in zip(self.seqs, self.num_new_tokens) if n == 1 + len(s.spec_token_ids)]
            return self.num_tokens - sum(decodes), len(decodes)
        decodes = self.num_new_tokens.count(1)
        return self.num_tokens - decodes, decodes


class Scheduler:
    """Continuous batching under one token budget per step: running sequences first (decodes and unfinished
    prefill chunks), then new ones, in one mixed batch. When blocks run out, the most recently admitted
    sequence is preempted by recompute: its blocks are freed and it goes back to the front of the queue."""

    def __init__(self, config: EngineConfig, block_manager: BlockManager):
        self.max_num_seqs, self.max_model_len = config.max_num_seqs, config.max_model_len
        self.max_num_batched_tokens = config.max_num_batched_tokens
        self.chunked_prefill = config.enable_chunked_prefill
        self.block_manager = block_manager
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0
        self.speculative = False  # speculative decoding: sequences may come with proposals
        self.on_free = None  # speculative decoding's hook: a sequence left the running batch (its draft blocks go)
        self.propose = None  # speculative decoding's proposer: called with (running, waiting) before each schedule

    def add(self, seq: Sequence) -> None:
        seq.check_at = min(seq.check_at, self.max_model_len)
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> ScheduledBatch:
        if self.propose is not None:
            self.propose(self.running, self.waiting)
        bm, budget, running = self.block_manager, self.max_num_batched_tokens, self.running
        bs = bm.block_size
        # Running sequences that fit the budget whole, at once: each computes what it has left (a token still on
        # the device, async scheduling, counts as one: all the others are computed then; proposals count too) and
        # is sampled; only those that need a block are looked at one by one. Where one cannot get it, the loop
        # below takes over.
        left = [len(s.token_ids) - s.num_computed or 1 for s in running]
        if self.speculative:
            left = [n + len(s.spec_token_ids) for s, n in zip(running, left)]
        i = int(np.searchsorted(np.cumsum(left), budget, side="right"))
        for j in [j for j, (s, n) in enumerate(zip(running[:i], left)) if s.num_computed + n > len(s.block_table) * bs]:
            if not bm.can_allocate(running[j], [], left[j]):
                i = j
                break
            bm.allocate(running[j], [], left[j])
        batch = ScheduledBatch(running[:i], left[:i], list(range(i)))
        budget -= sum(left[:i])
        preempted = False
        while i < len(self.running) and budget > 0:  # one at a time: a chunk the budget cuts, preemption
            seq = self.running[i]
            # a token still on the device (async scheduling; then all the others are computed) is computed like the
            # others: the step reads it there
            n = min((len(seq.token_ids) - seq.num_computed or 1) + len(seq.spec_token_ids), budget)
            if seq.spec_token_ids and not bm.can_allocate(seq, [], n):  # speculation never preempts
                n = 1
            del seq.spec_token_ids[max(n - 1, 0) :]  # the proposals the budget leaves room for
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
            # the first in line whose structured-output grammar (if any) is compiled: the others wait for theirs
            seq = next((s for s in self.waiting if s.constraint is None or s.constraint.ready), None)
            if seq is None:
                break
            hits = bm.match_prefix(seq) if not seq.block_table else []
            if seq.prompt_logprobs is not None:  # positions whose prompt logprobs are still to come are computed
                hits = hits[: (len(seq.prompt_logprobs) - 1) // bm.block_size]
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
        batch.verifies = self.speculative and any(s.spec_token_ids for s in batch.seqs)
        return batch

    def wait_until_ready(self, timeout: float = 0.01) -> None:
        """Nothing could be scheduled: if what waits waits for a structured-output grammar to compile, sleep until
        one does (briefly: requests come)."""
        pending = [s.constraint.grammar for s in self.waiting if s.constraint and not s.constraint.ready]
        wait(pending, timeout=timeout, return_when=FIRST_COMPLETED)

    @staticmethod
    def launched(batch: ScheduledBatch) -> None:
        """The batch's step is on its way: its tokens count as computed (a sampled sequence's new token is pending
        until postprocess appends it; proposals until postprocess knows which were kept)."""
        for seq, n in zip(batch.seqs, batch.num_new_tokens):
            seq.num_computed += n

    def postprocess(
        self,
        batch: ScheduledBatch,
        sample_rows: list[int],
        tokens: list[list[int]],
        requests: dict,
        eos_token_ids: set[int],
        logprobs: StepLogprobs | None = None,
    ) -> list:
        """After a step's sampled tokens reached the host: each row's new tokens (one, or the proposals kept and
        one more) appended unless its sequence ended while the step ran (then they are dropped), with its logprobs
        where asked (and prompt logprobs); a verification's rejected proposals out of the KV; newly full blocks
        keyed for the prefix cache; a look for a stop where one may have come (token by token in a kept run);
        finished sequences out. Returns the requests that changed (a FINAL_ONLY one only when a sequence of it
        ended). A request whose token cannot be handled (e.g. a tokenizer that cannot decode it) fails alone. Per
        token only list comprehensions: a loop's statements cost ~0.5 us each here."""
        bm, finished = self.block_manager, Status.FINISHED
        bs, seqs = bm.block_size, batch.seqs
        failed = {}
        if logprobs:
            self.add_logprobs(seqs, logprobs, requests, failed)
        live = [(seqs[row], new) for row, new in zip(sample_rows, tokens) if seqs[row].status is not finished]
        for seq, new in live:
            seq.token_ids += new
        for seq in [s for s, _ in live if s.spec_token_ids] if batch.verifies else ():
            self.keep_accepted(seq)
        for seq in [s for s in seqs if s.num_computed >= (s.num_keyed_blocks + 1) * bs and s.status is not finished]:
            bm.cache_full_blocks(seq)
        changed = failed | {
            s.request_id: requests[s.request_id] for s, _ in live if not requests[s.request_id].final_only
        }
        # only where a stop may have come: stop strings and tokens, min_tokens, EOS, the length limits, a kept run
        runs = batch.verifies
        for seq, new in [
            (s, n) for s, n in live if len(s.token_ids) >= s.check_at or n[0] in eos_token_ids or runs and len(n) > 1
        ]:
            if seq.status is finished:  # its request failed on another sequence's token
                continue
            request = requests[seq.request_id]
            try:
                del seq.token_ids[len(seq.token_ids) - len(new) + 1 :]  # a kept run's tokens checked one by one
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

    def add_logprobs(self, seqs: list[Sequence], logprobs: StepLogprobs, requests: dict, failed: dict) -> None:
        """A step's logprobs to their sequences (the prompt's first; none for a sequence that ended while the step
        ran); a request whose logprobs cannot be decoded fails alone, into `failed`."""
        for row, prompt, entries in [
            *((r, True, e) for r, e in logprobs.prompt.items()),
            *((r, False, e) for r, e in logprobs.sampled.items()),
        ]:
            seq = seqs[row]
            if seq.status is Status.FINISHED:
                continue
            request = requests[seq.request_id]
            try:
                if prompt:
                    request.add_prompt_logprobs(seq, entries)
                else:
                    request.add_logprobs(seq, *entries)
            except Exception as e:
                self.fail(request, e)
                failed[seq.request_id] = request

    def fail(self, request, error: Exception) -> None:
        """Handling this request failed: it ends now, with the error in its output."""
        request.error = f"{type(error).__name__}: {error}"
        for seq in request.seqs:
            if not seq.finished:
                self.finish(seq, "abort")

    def keep_accepted(self, seq: Sequence) -> None:
        """After a verification (its kept tokens appended): the KV of the kept proposals stays computed, the blocks
        that held only rejected ones go back."""
        seq.num_computed = seq.num_tokens - 1
        self.block_manager.truncate(seq, seq.num_tokens)
        seq.spec_token_ids, seq.spec_probs = [], None

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
        seq.spec_token_ids, seq.spec_probs = [], None
        if self.on_free is not None:
            self.on_free(seq)
