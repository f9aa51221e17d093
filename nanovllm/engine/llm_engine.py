import dataclasses
import os

import torch

import nanovllm.ops as ops
from nanovllm.config import EngineConfig
from nanovllm.engine.async_scheduling import OverlappedSteps
from nanovllm.engine.block_manager import BlockManager
from nanovllm.engine.model_runner import Launched, ModelRunner
from nanovllm.engine.request import Request, tokenize
from nanovllm.engine.scheduler import Scheduler
from nanovllm.engine.workers import Workers, check_tensor_parallel
from nanovllm.inputs import PromptType
from nanovllm.loader import default_model_path, generation_defaults, load_hf_config, load_model
from nanovllm.outputs import RequestOutput
from nanovllm.sampling_params import SamplingParams
from nanovllm.spec.config import SpeculativeConfig
from nanovllm.spec.draft import DraftProposer
from nanovllm.spec.speculator import Speculator
from nanovllm.structured_outputs import StructuredOutputManager

DEFAULT_BUDGET = 2048  # tokens a step computes, when not given: enough to keep a CPU's matmuls efficient


def resolve(config: EngineConfig, hf_config) -> EngineConfig:
    """The user's config with what it left open decided: device, ops backend, threads per process, and
    max_model_len (the model's limit, inside one sliding window). Checked against the model."""
    device = config.resolved_device()
    threads = config.num_threads
    if config.tensor_parallel_size > 1 and device == "cpu" and threads is None:  # a share of the cores per process
        threads = max(1, (os.cpu_count() or 1) // config.tensor_parallel_size)
    model_max = getattr(hf_config, "max_position_embeddings", None) or 4096
    window = getattr(hf_config, "sliding_window", None)
    if window and getattr(hf_config, "use_sliding_window", True):
        model_max = min(model_max, window)  # no sliding-window attention: stay inside one window
    if config.max_model_len is not None and config.max_model_len > model_max:
        raise ValueError(f"max_model_len={config.max_model_len} is longer than the model allows ({model_max})")
    if config.async_scheduling and config.tensor_parallel_size > 1:
        raise ValueError(
            "async_scheduling=True is not supported with tensor_parallel_size > 1 (the workers would "
            "need each step's sampled tokens); use one or the other"
        )
    max_len, budget = config.max_model_len or model_max, config.max_num_batched_tokens
    if not config.enable_chunked_prefill:  # as vLLM: a step must hold a whole prompt
        if budget is not None and budget < max_len:
            raise ValueError(
                f"max_num_batched_tokens={budget} is smaller than max_model_len={max_len}: without "
                f"chunked prefill a step must hold a whole prompt (enable_chunked_prefill=True, or a "
                f"larger max_num_batched_tokens)"
            )
        budget = budget or max(max_len, DEFAULT_BUDGET)
    return dataclasses.replace(
        config,
        device=device,
        ops=ops.choose(device, config.ops),
        num_threads=threads,
        max_model_len=max_len,
        max_num_batched_tokens=budget or DEFAULT_BUDGET,
    )


class LLMEngine:
    """add_request / step / abort: the synchronous core that both the offline LLM and the server drive.
    `config` is the resolved one (see resolve); the one given stays as it was."""

    def __init__(self, config: EngineConfig):
        path = config.model or default_model_path()
        hf_config = load_hf_config(path)
        resolved = resolve(dataclasses.replace(config, model=path), hf_config)
        if resolved.tensor_parallel_size > 1:
            check_tensor_parallel(resolved, hf_config)
        if resolved.num_threads:
            torch.set_num_threads(resolved.num_threads)
        self.dtype = resolved.torch_dtype()
        backend = ops.backend(resolved.ops)  # the model runner routes the ops to it
        workers = Workers(resolved) if resolved.tensor_parallel_size > 1 else None  # they load while we do
        try:
            loaded = load_model(
                path,
                self.dtype,
                resolved.device,
                resolved.max_model_len,
                hf_config,
                resolved.tokenizer,
                backend,
                resolved.quantization,
            )
            self.runner = ModelRunner(resolved, loaded.model, self.dtype, loaded.eos_token_ids, workers)
            if workers:
                torch.distributed.barrier()  # every worker has loaded
        except Exception as e:
            if workers:
                raise workers.failure(e) from e
            raise
        capacity = self.runner.num_blocks * resolved.block_size
        if resolved.max_model_len > capacity:
            if config.max_model_len is not None:
                raise ValueError(
                    f"max_model_len={resolved.max_model_len} does not fit the KV pool of {capacity} "
                    f"tokens ({self.runner.num_blocks} blocks of {resolved.block_size})"
                )
            resolved = dataclasses.replace(resolved, max_model_len=capacity)  # not asked for: what the pool holds
        self.config = resolved
        self.model_path, self.hf_config, self.eos_token_ids = path, hf_config, loaded.eos_token_ids
        self.tokenizer = loaded.tokenizer
        self.block_manager = BlockManager(
            self.runner.num_blocks,
            resolved.block_size,
            resolved.enable_prefix_caching,
            resolved.max_num_seqs,
            -(-resolved.max_model_len // resolved.block_size),
        )
        self.runner.block_tables = self.block_manager.tables
        self.in_flight: Launched | None = None  # async scheduling: the step launched last, not yet postprocessed
        if resolved.async_scheduling:
            self.step = OverlappedSteps(self)
        # speculative decoding (nanovllm/spec), when speculative_config asks for it: the scheduler's proposer and the
        # sampler's verifier
        self.speculator = None
        if resolved.speculative_config:
            spec = SpeculativeConfig.from_dict(resolved.speculative_config)
            draft = (
                DraftProposer(resolved, spec.model, self.runner.num_blocks, hf_config.vocab_size, self.dtype, backend)
                if spec.model
                else None
            )
            self.speculator = Speculator(spec, resolved.max_model_len, draft, resolved.device)
            self.runner.sampler.verifier = self.speculator.verify
        self.scheduler = Scheduler(resolved, self.block_manager, proposer=self.speculator)
        self.requests: dict[str, Request] = {}
        self.vocab_size = hf_config.vocab_size
        self.structured_outputs = StructuredOutputManager(self.runner.model.vocab_size, loaded.eos_token_ids)
        # what LLM.get_default_sampling_params and the server's requests start from
        source = {"auto": path, "vllm": None}.get(resolved.generation_config, resolved.generation_config)
        self.generation_defaults = generation_defaults(source) if source else {}
        self.last_step = (0, 0)  # (prefill tokens, decode tokens) of the last step, for progress reports

    # ---- requests -------------------------------------------------------------------------------------
    def make_request(self, request_id: str, prompt: PromptType, params: SamplingParams, tokenizer=None) -> Request:
        """Validate and tokenize without touching the engine: a batch can check every prompt before it starts.
        (The request id is checked when the request is added.) tokenizer: what encodes the prompt and the bad
        words, the caller's own copy when it runs off the engine's thread (the async engine); default the engine's."""
        if params.n > self.config.max_num_seqs:
            raise ValueError(f"n={params.n} is more than max_num_seqs={self.config.max_num_seqs} sequences")
        encoder = tokenizer or self.tokenizer
        text, ids = tokenize(encoder, prompt)
        if params.truncate_prompt_tokens is not None:  # its last k tokens (-1: as many as leave room for one)
            k = params.truncate_prompt_tokens
            ids = ids[-(self.config.max_model_len - 1 if k == -1 else k) :]
        bad = [t for t in ids if not 0 <= t < self.vocab_size]
        if bad:
            raise ValueError(f"prompt token ids {bad[:5]} are outside the vocabulary [0, {self.vocab_size})")
        if not ids:
            raise ValueError("the prompt is empty")
        if len(ids) >= self.config.max_model_len:  # vLLM's rule, the server's too: room for one token at least
            raise ValueError(
                f"the prompt has {len(ids)} tokens; with at least one token to generate that is longer "
                f"than max_model_len={self.config.max_model_len}"
            )
        for name in ("stop_token_ids", "logit_bias", "allowed_token_ids"):
            bad = [t for t in getattr(params, name) or [] if not 0 <= t < self.vocab_size]
            if bad:
                raise ValueError(f"{name} {bad[:5]} are outside the vocabulary [0, {self.vocab_size})")
        cap = self.vocab_size if self.config.max_logprobs == -1 else self.config.max_logprobs
        for name in ("logprobs", "prompt_logprobs"):  # -1 asks for the whole vocabulary (as in vLLM)
            asked = getattr(params, name)
            if asked is not None and (self.vocab_size if asked == -1 else asked) > cap:
                raise ValueError(
                    f"SamplingParams.{name} ({asked}) is more than this engine allows: max_logprobs="
                    f"{self.config.max_logprobs} (an engine argument; -1 allows the whole vocabulary)"
                )
        self.runner.sampler.logits_processors.validate(params)  # the user's processors refuse what they cannot serve
        so = params.structured_outputs  # its grammar compiles on another thread from here on
        grammar = self.structured_outputs.compile(so, encoder) if so else None
        return Request.make(request_id, text, ids, params, self.tokenizer, self.config.device, encoder, grammar)

    def add(self, request: Request) -> None:
        """Queue a request; a ValueError (nothing queued) if its id is already in use."""
        if request.request_id in self.requests:
            raise ValueError(f"request id {request.request_id!r} is already in use")
        self.requests[request.request_id] = request
        for seq in request.seqs:
            self.scheduler.add(seq)

    def add_request(self, request_id: str, prompt: PromptType, params: SamplingParams | None = None) -> None:
        self.add(self.make_request(request_id, prompt, params or SamplingParams()))

    def abort(self, request_id: str) -> None:
        """Stop a request now; its KV blocks go back to the pool at once."""
        request = self.requests.pop(request_id, None)
        for seq in request.seqs if request else []:
            if not seq.finished:
                self.scheduler.finish(seq, "abort")

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    # ---- the loop -------------------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Schedule and launch a step, then postprocess it: the outputs of the requests that changed. (With async
        scheduling `step` is an OverlappedSteps instead, which keeps one launched step in flight.)"""
        return self.collect(self.launch())

    def launch(self) -> Launched | None:
        """Schedule a batch and launch its step (None: nothing could be scheduled)."""
        batch = self.scheduler.schedule()
        if not batch.seqs:
            return None
        launched = self.runner.run(batch)
        self.scheduler.launched(batch)
        self.last_step = launched.token_counts()
        return launched

    def collect(self, launched: Launched | None) -> list[RequestOutput]:
        """A launched step's outputs; with nothing launched, a short wait for something to become schedulable."""
        if launched is None:
            self.scheduler.wait_until_ready()
            return []
        return self.postprocess(launched)

    def postprocess(self, step: Launched) -> list[RequestOutput]:
        """A launched step's sampled tokens, once on the host, appended; the outputs of the requests that changed
        (of a FINAL_ONLY request only its last)."""
        changed = self.scheduler.postprocess(step.batch, step.output, self.requests, self.eos_token_ids)
        outputs = []
        for request in changed:
            if request.final_only and not request.finished:
                continue
            out = request.output()
            if request.error and not request.finished:  # its text could not be made: it fails alone
                for seq in request.seqs:
                    if not seq.finished:
                        self.scheduler.finish(seq, "abort")
                out = request.output()
            if out.finished:
                del self.requests[request.request_id]
            outputs.append(out)
        return outputs

    def shutdown(self) -> None:
        """Stop the tensor-parallel workers, if any (also done when the engine is garbage-collected)."""
        self.runner.shutdown()
        self.structured_outputs.shutdown()

    def stats(self) -> dict:
        bm = self.block_manager
        return {
            "running": len(self.scheduler.running),
            "waiting": len(self.scheduler.waiting),
            "requests": len(self.requests),
            "num_blocks": bm.num_blocks,
            "free_blocks": bm.num_free,
            "prefix_cache_queries": bm.prefix_query_tokens,
            "prefix_cache_hits": bm.prefix_hit_tokens,
            "preemptions": self.scheduler.num_preemptions,
            **(self.speculator.metrics() if self.speculator else {}),
        }
