from dataclasses import dataclass

import numpy as np
import torch

import nanovllm.ops as ops
from nanovllm.config import EngineConfig
from nanovllm.engine import kv_cache
from nanovllm.engine.batch import PackedStep, ScheduledBatch, Step
from nanovllm.layers.attention import AttentionMetadata
from nanovllm.logprobs import prompt_logprob_positions
from nanovllm.sampling.step_sampler import Sampler, SamplerOutput


@dataclass
class Launched:
    """A step on its way: its batch and what the sampler made of it (tokens on their way to the host)."""

    batch: ScheduledBatch
    output: SamplerOutput

    def token_ids(self) -> list[list[int]]:
        """Each sampled row's new tokens on the host (waits for their copy)."""
        return self.output.token_ids()

    def token_counts(self) -> tuple[int, int]:
        """(prefill tokens, decode tokens) of the step, for progress reports: a verification's kept tentative tokens
        count as decoded."""
        prefill, decode = self.batch.token_counts()
        return prefill, decode + self.output.num_extra_tokens


class ModelRunner:
    """Turns a scheduled batch into flat tensors, runs the model over the paged KV cache and samples.

    The ops backend (nanovllm/ops) is the one the resolved config names; its step runner, if it has one (CUDA
    graphs, the fused CPU decode step), runs the steps it covers in place of the model's forward."""

    def __init__(
        self, config: EngineConfig, model: torch.nn.Module, dtype: torch.dtype, eos_token_ids: set[int], workers=None
    ):
        self.workers, self.failed = workers, False  # rank 0 of a tensor-parallel engine drives the workers
        self.model, self.device, self.block_size = model, torch.device(config.device), config.block_size
        self.dtype, self.eos_token_ids = dtype, sorted(eos_token_ids)
        self.ops = ops.backend(config.ops)
        ops.use(self.ops)
        attn = model.model.layers[0].self_attn
        layers = len(model.model.layers)
        bytes_per_block = 2 * layers * config.block_size * attn.num_kv_heads * attn.head_dim * dtype.itemsize
        self.num_blocks = kv_cache.num_blocks(self, config, bytes_per_block)
        shape = (2, layers, self.num_blocks, config.block_size, attn.num_kv_heads, attn.head_dim)
        self.kv_cache = kv_cache.allocate(shape, dtype, self.device)
        for i, layer in enumerate(model.model.layers):
            layer.self_attn.k_cache, layer.self_attn.v_cache = self.kv_cache[0, i], self.kv_cache[1, i]
        self.block_tables: np.ndarray | None = None  # the block manager's; the engine hands it over
        self.sampler = Sampler(config, model.vocab_size, self.device, eos_token_ids)
        self.step_runner = self.ops.step_runner(self, config)

    @property
    def graphs(self):
        """The CUDA graphs, where the step runner is them."""
        return self.step_runner if self.ops.NAME == "cuda" else None

    def pack(self, batch: ScheduledBatch, sample_rows: list[int] | None = None) -> PackedStep:
        """A step's inputs. The tokens whose logits are computed: the sampled rows' (`sample_rows`, default the
        batch's) last ones, each tentative token's before them, and the prompt positions whose prompt logprobs are
        asked for. Vectorized: no loop over tokens, one over sequences per field."""
        if sample_rows is None:
            sample_rows = batch.sample_rows
        prompt_positions = prompt_logprob_positions(batch)
        seqs, bs = batch.seqs, self.block_size
        n = np.array(batch.num_new_tokens, dtype=np.int64)
        start = np.array([s.num_computed for s in seqs], dtype=np.int64)
        table_rows = np.array([s.row for s in seqs], dtype=np.int64)
        lens = np.array([len(s.token_ids) for s in seqs], dtype=np.int64)
        B, ends = len(seqs), start + n
        query_start = np.zeros(B + 1, dtype=np.int64)
        np.cumsum(n, out=query_start[1:])
        T = int(query_start[-1])
        sampled = np.array(sample_rows, dtype=np.int64)
        last = query_start[sampled + 1] - 1
        # decodes only (not a prefill chunk of one token): a sequence's one input token is its last one (a pending
        # one is filled in later)
        if T == B and (ends >= lens).all():
            input_ids = [s.token_ids[-1] for s in seqs]
            token_seq, positions = np.arange(B), start
        else:  # a pending token's slice is empty: its placeholder 0, filled in on the device; proposals follow
            input_ids = [
                t
                for s, a, k in zip(seqs, start.tolist(), batch.num_new_tokens)
                for t in (s.token_ids[a : a + k] + s.spec_token_ids) or [0]
            ]
            token_seq = np.repeat(np.arange(B), n)
            positions = np.arange(T) - np.repeat(query_start[:-1] - start, n)
            if batch.tentative_rows:  # the logits of a row's last token and of each of its tentative tokens
                k = [seqs[i].num_tentative for i in sample_rows]
                last = np.concatenate([np.arange(e - j, e + 1) for e, j in zip(last.tolist(), k)])
        tables = self.block_tables[table_rows, : -(-int(ends.max()) // bs)]
        slots = tables[token_seq, positions // bs] * bs + positions % bs
        decode_rows = np.flatnonzero(n == 1)
        decode_max = int(ends[decode_rows].max()) if len(decode_rows) else 0
        pending = np.flatnonzero(start == lens)  # their last token is still on the device
        dst, src = query_start[pending], table_rows[pending]
        if prompt_positions:  # in token order, as a step runner returns logits
            last = np.sort(
                np.concatenate(
                    [
                        last,
                        [query_start[i] + p - seqs[i].num_computed for i, ps in prompt_positions.items() for p in ps],
                    ]
                )
            )
        return PackedStep(
            input_ids=input_ids,
            positions=positions,
            slots=slots,
            query_start=query_start,
            context_lens=ends,
            block_tables=tables.ravel(),
            decode_rows=decode_rows,
            decode_tokens=query_start[decode_rows],
            logit_tokens=last,
            sample_table_rows=table_rows[sampled],
            pending_dst=dst,
            pending_src=src,
            table_width=tables.shape[1],
            decode_max_context=decode_max,
            prompt_positions=prompt_positions,
        )

    def unpack(self, packed: np.ndarray, prompt_positions: dict[int, range] | None = None) -> Step:
        """The packed inputs as tensors on the device; a pending input token is its row's last sampled token.
        (`prompt_positions`: PackedStep's, on rank 0.)"""
        lengths, numbers, values = PackedStep.layout(packed)
        split = torch.from_numpy(values.copy()).to(self.device, non_blocking=True).split(list(lengths.values()))
        dev = dict(zip(lengths, split))
        if lengths["pending_dst"]:
            dev["input_ids"][dev["pending_dst"]] = self.sampler.last_sampled[dev["pending_src"]]
        host, at = {}, 0  # what is also read on the host
        for name, n in lengths.items():
            host[name] = values[at : at + n]
            at += n
        num_seqs = lengths["context_lens"]
        meta = AttentionMetadata.for_step(
            dev["query_start"],
            dev["context_lens"],
            dev["block_tables"].view(num_seqs, numbers["table_width"]),
            dev["slots"],
            dev["decode_rows"],
            dev["decode_tokens"],
            host["query_start"].tolist(),
            host["context_lens"].tolist(),
            numbers["decode_max_context"],
        )
        return Step(
            input_ids=dev["input_ids"],
            positions=dev["positions"],
            meta=meta,
            last=dev["logit_tokens"],
            sample_table_rows=host["sample_table_rows"],
            sample_table_rows_dev=dev["sample_table_rows"],
            prompt_positions=prompt_positions or {},
        )

    def prepare(self, batch: ScheduledBatch, sample_rows: list[int] = ()):
        step = self.unpack(self.pack(batch, list(sample_rows)).pack())
        return step.input_ids, step.positions, step.meta, step.last

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata, last: torch.Tensor
    ) -> torch.Tensor | None:
        """The model over one step; the logits of the `last` rows (on rank 0; None elsewhere or if no rows).
        The step runner takes the steps it covers (every rank decides alike: same inputs)."""
        if ops.active is not self.ops:  # another engine in this process chose another backend since
            ops.use(self.ops)
        if self.step_runner is not None and self.step_runner.covers(input_ids, meta, last):
            return self.step_runner.run(input_ids, positions, meta, last)
        return self.eager_forward(input_ids, positions, meta, last)

    def eager_forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata, last: torch.Tensor
    ) -> torch.Tensor | None:
        with torch.inference_mode():
            hidden = self.model(input_ids, positions, meta)
            return self.model.compute_logits(hidden[last]) if last.numel() else None

    def execute(self, inputs: PackedStep) -> tuple[Step, torch.Tensor | None]:
        """The step on every rank (the tensor-parallel workers receive it packed first): its inputs and logits."""
        packed = inputs.pack()
        if self.workers is None:
            step = self.unpack(packed, inputs.prompt_positions)
            return step, self.forward(step.input_ids, step.positions, step.meta, step.last)
        if self.failed:
            raise RuntimeError("tensor parallelism failed earlier; this engine cannot continue")
        try:
            self.workers.send(packed)
            step = self.unpack(packed, inputs.prompt_positions)
            return step, self.forward(step.input_ids, step.positions, step.meta, step.last)
        except BaseException as e:  # the ranks are out of step now (Ctrl-C included): stop them all
            self.failed = True
            if isinstance(e, Exception):
                raise self.workers.failure(e) from e
            self.workers.kill()
            raise

    def run(self, batch: ScheduledBatch) -> Launched:
        """Launch the batch's step: its inputs packed and run on every rank, and its logits sampled (the sampler's
        tokens stay on the device, in their rows of `Sampler.last_sampled`, and start their one copy to the host)."""
        step, logits = self.execute(self.pack(batch))
        return Launched(batch=batch, output=self.sampler(batch, step, logits))

    def shutdown(self) -> None:
        if self.workers is not None:
            self.workers.shutdown()
