from collections import deque
from dataclasses import dataclass

from nanovllm.config import EngineConfig
from nanovllm.engine.block_manager import BlockManager
from nanovllm.engine.sequence import Sequence, Status
from nanovllm.layers.sampler import StepLogprobs


@dataclass
class ScheduledBatch:
    seqs: list[Sequence]
    num_new_tokens: list[int]  # tokens of each sequence computed this step (1 for a decode, a chunk for a prefill,
                               # 1 + k for a decode verifying k proposals)

    @property
    def num_tokens(self) -> int:
        return sum(self.num_new_tokens)


class Scheduler:
    """Continuous batching under one token budget per step: running sequences first (decodes and unfinished
    prefill chunks), then new ones, in one mixed batch. When blocks run out, the most recently admitted
    sequence is preempted by recompute: its blocks are freed and it goes back to the front of the queue."""

    def __init__(self, config: EngineConfig, block_manager: BlockManager):
        self.max_num_seqs = config.max_num_seqs
        self.max_num_batched_tokens = config.max_num_batched_tokens
        self.chunked_prefill = config.enable_chunked_prefill
        self.block_manager = block_manager
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0
        self.on_free = None  # speculative decoding's hook: a sequence left the running batch (its draft blocks go)

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> ScheduledBatch:
        bm, budget = self.block_manager, self.max_num_batched_tokens
        batch = ScheduledBatch([], [])
        preempted = False
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            n = min(seq.num_tokens - seq.num_computed + len(seq.spec_token_ids), budget)
            if seq.spec_token_ids and not bm.can_allocate(seq, [], n):  # speculation never preempts
                n = 1
            del seq.spec_token_ids[max(n - 1, 0):]  # the proposals the budget leaves room for
            while not bm.can_allocate(seq, [], n):
                victim = self.running.pop()
                self.preempt(victim)
                preempted = True
                if victim is seq:
                    break
            else:
                bm.allocate(seq, [], n)
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
                hits = hits[:(len(seq.prompt_logprobs) - 1) // bm.block_size]
            n = min(seq.num_tokens - seq.num_computed - len(hits) * bm.block_size, budget)
            if not self.chunked_prefill and n < seq.num_tokens - seq.num_computed - len(hits) * bm.block_size:
                break  # the whole prompt in one step, or wait for a step with room for it
            if not bm.can_allocate(seq, hits, n):
                break
            self.waiting.remove(seq)
            bm.allocate(seq, hits, n)
            seq.status = Status.RUNNING
            self.running.append(seq)
            batch.seqs.append(seq)
            batch.num_new_tokens.append(n)
            budget -= n
        return batch

    def postprocess(self, batch: ScheduledBatch, sample_rows: list[int], tokens: list[list[int]], requests: dict,
                    eos_token_ids: set[int], max_model_len: int, logprobs: StepLogprobs | None = None) -> list:
        """After a step: each sequence's newly computed tokens (full blocks keyed for the prefix cache), the
        logprobs computed for it, each sampled token appended and checked for a stop, finished sequences out.
        Returns the requests that changed. A request whose token cannot be handled (e.g. a tokenizer that cannot
        decode it) fails alone."""
        for seq, n in zip(batch.seqs, batch.num_new_tokens):
            computed = seq.num_computed
            seq.num_computed += n - len(seq.spec_token_ids)  # proposals count once kept (keep_accepted)
            self.block_manager.cache_full_blocks(seq, computed)
        changed = {}
        for row, entries in logprobs.prompt.items() if logprobs else ():
            seq = batch.seqs[row]
            try:
                requests[seq.request_id].add_prompt_logprobs(seq, entries)
            except Exception as e:
                self.fail(changed.setdefault(seq.request_id, requests[seq.request_id]), e)
        for row, new_tokens in zip(sample_rows, tokens):
            seq = batch.seqs[row]
            request = changed[seq.request_id] = requests[seq.request_id]
            if request.error:
                continue
            try:
                if seq.logprobs is not None:
                    request.add_logprobs(seq, *logprobs.sampled[row])
                for token in new_tokens:  # several when proposals were kept (never with logprobs); none after a stop
                    if done := request.append(seq, token, eos_token_ids, max_model_len):
                        break
            except Exception as e:
                self.fail(request, e)
                continue
            if done:
                self.finish(seq, *done)
            elif seq.spec_token_ids:
                self.keep_accepted(seq)
        return list(changed.values())

    def fail(self, request, error: Exception) -> None:
        """Handling this request failed: it ends now, with the error in its output."""
        request.error = f"{type(error).__name__}: {error}"
        for seq in request.seqs:
            if not seq.finished:
                self.finish(seq, "abort")
    def keep_accepted(self, seq: Sequence) -> None:
        """After a verification: the KV of the kept proposals stays computed, the blocks that held only rejected
        ones go back, and the blocks the kept ones filled are keyed for the prefix cache."""
        verified_from = seq.num_computed
        seq.num_computed = seq.num_tokens - 1
        self.block_manager.truncate(seq, seq.num_tokens)
        self.block_manager.cache_full_blocks(seq, verified_from)
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
