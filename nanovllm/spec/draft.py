"""Draft-model proposals: a small model sharing the target's vocabulary runs k times per step on the sequences
that speculate, in the same process, over its own small KV pool.

The draft keeps a shadow of each sequence (its own token list and blocks): its KV stays valid up to where the
sequence still agrees with what the draft saw (the proposals the target kept), is recomputed from there (the
target's own token; at first, the whole prompt), and its blocks go back with the sequence (finish, abort or
preemption)."""

import dataclasses

import torch

import nanovllm.ops as ops
from nanovllm.config import EngineConfig
from nanovllm.engine.batch import ScheduledBatch
from nanovllm.engine.block_manager import BlockManager
from nanovllm.engine.model_runner import ModelRunner
from nanovllm.engine.sequence import Sequence, Status
from nanovllm.layers.parallel import one_rank
from nanovllm.loader import load_hf_config, load_model
from nanovllm.spec.rejection import probabilities


class DraftProposer:
    def __init__(
        self, config: EngineConfig, draft_path: str, num_blocks: int, vocab_size: int, dtype: torch.dtype, backend
    ):
        """config: the target's resolved one; the draft pool has as many blocks as the target's (the draft's
        blocks are smaller by as much as the draft is)."""
        hf_config = load_hf_config(draft_path)
        if hf_config.vocab_size != vocab_size:
            raise ValueError(
                f"the draft model {draft_path!r} has a vocabulary of {hf_config.vocab_size} tokens, the "
                f"target {vocab_size}: a draft must share the target's tokenizer"
            )
        draft_config = dataclasses.replace(
            config, model=draft_path, num_kv_blocks=num_blocks, speculative_config=None, tensor_parallel_size=1
        )
        with one_rank():  # under tensor parallelism the draft is whole on rank 0 (the workers never see it)
            loaded = load_model(
                draft_path,
                dtype,
                config.device,
                config.max_model_len,
                hf_config,
                config.tokenizer or config.model,
                backend,
                config.quantization,
            )
            self.runner = ModelRunner(draft_config, loaded.model, dtype, loaded.eos_token_ids)
        self.block_manager = BlockManager(
            num_blocks, config.block_size, False, config.max_num_seqs, -(-config.max_model_len // config.block_size)
        )
        self.runner.block_tables = self.block_manager.tables
        self.shadows: dict[Sequence, tuple[Sequence, int]] = {}  # sequence -> (its shadow, its length when seen)

    @torch.inference_mode()
    def propose(self, rows: list[tuple[Sequence, int]]) -> None:
        """Set each sequence's spec_token_ids (up to its k) and spec_probs (the draft's distributions, None when
        greedy). A sequence the draft pool has no room for does not speculate this step."""
        bm, active = self.block_manager, []
        for seq, k in rows:
            shadow = self.sync(seq)
            n = shadow.num_tokens - shadow.num_computed
            if bm.can_allocate(shadow, [], n + k - 1):
                bm.allocate(shadow, [], n + k - 1)
                active.append((seq, shadow, k, n, []))
        for j in range(max((k for _, _, k, _, _ in active), default=0)):
            step = [a for a in active if a[2] > j]
            batch = ScheduledBatch([a[1] for a in step], [a[3] if j == 0 else 1 for a in step])
            with one_rank():
                logits = self.runner.forward(*self.runner.prepare(batch, range(len(step))))
            tokens, probs = self.draw(logits, batch.seqs)
            for (seq, shadow, k, n, qs), token, q, computed in zip(step, tokens, probs, batch.num_new_tokens):
                shadow.num_computed += computed
                shadow.token_ids.append(token)
                qs.append(q)
        for seq, shadow, k, n, qs in active:
            seq.spec_token_ids = shadow.token_ids[seq.num_tokens :]
            seq.spec_probs = None if qs[0] is None else torch.stack(qs)

    def sync(self, seq: Sequence) -> Sequence:
        """The sequence's shadow, its KV kept where the draft's tokens still agree with the sequence's."""
        shadow, seen = self.shadows.get(seq, (None, 0))
        if shadow is None:
            shadow = Sequence(
                seq.request_id,
                seq.index,
                list(seq.token_ids),
                seq.num_prompt_tokens,
                seq.params,
                Status.RUNNING,
                generator=seq.generator,
                bad_words=seq.bad_words,
            )
        else:
            same, end = min(seen, shadow.num_computed), min(shadow.num_computed, seq.num_tokens)
            while same < end and shadow.token_ids[same] == seq.token_ids[same]:
                same += 1
            shadow.num_computed = same
            del shadow.token_ids[same:]
            shadow.token_ids += seq.token_ids[same:]
            self.block_manager.truncate(shadow, same)
        self.shadows[seq] = (shadow, seq.num_tokens)
        return shadow

    def draw(self, logits: torch.Tensor, shadows: list[Sequence]) -> tuple[list[int], list[torch.Tensor | None]]:
        """Each row's proposal from the draft's logits, and the distribution it was drawn from (None: greedy)."""
        b = self.runner.sampler.sampling_batch_of(shadows)
        logits = self.runner.sampler.logits_processors.apply_once(logits, shadows)
        if bool((b.temperature == 0).all()):
            return ops.sample(logits, b, self.runner.sampler.generator).tolist(), [None] * len(shadows)
        q = probabilities(logits, b)
        tokens, probs = [], []
        for i, s in enumerate(shadows):
            greedy = s.params.temperature == 0
            tokens.append(
                int(q[i].argmax())
                if greedy
                else int(torch.multinomial(q[i], 1, generator=s.generator or self.runner.sampler.generator))
            )
            probs.append(None if greedy else q[i])
        return tokens, probs

    def free(self, seq: Sequence) -> None:
        shadow, _ = self.shadows.pop(seq, (None, 0))
        if shadow is not None:
            self.block_manager.free_blocks(shadow)
