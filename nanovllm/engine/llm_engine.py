import os
from dataclasses import dataclass

import torch

from nanovllm.config import EngineConfig
from nanovllm.engine.block_manager import BlockManager
from nanovllm.engine.detokenizer import IncrementalDetokenizer
from nanovllm.engine.model_runner import ModelRunner
from nanovllm.engine.scheduler import Scheduler
from nanovllm.engine.sequence import Sequence
from nanovllm.engine.workers import Workers, check_tensor_parallel
from nanovllm.loader import default_model_path, load_hf_config, load_model
from nanovllm.outputs import CompletionOutput, RequestOutput
from nanovllm.sampling_params import SamplingParams

Prompt = str | list[int] | dict


def chat_token_ids(tokenizer, messages: list[dict], add_generation_prompt: bool = True,
                   chat_template: str | None = None, **kwargs) -> list[int]:
    """A conversation rendered with the model's chat template (or the one given), as token ids."""
    if chat_template is None and not getattr(tokenizer, "chat_template", None):
        raise ValueError("this model has no chat template: pass chat_template=... or use generate()")
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt,
                                         chat_template=chat_template, tokenize=False, **kwargs)
    return tokenizer(text, add_special_tokens=False).input_ids  # the template already holds BOS etc.


@dataclass
class Request:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    seqs: list[Sequence]
    detoks: list[IncrementalDetokenizer]
    error: str | None = None  # set when handling this request failed; it is finished then


class LLMEngine:
    """add_request / step / abort: the synchronous core that both the offline LLM and the server drive."""

    def __init__(self, config: EngineConfig):
        self.config = config
        path = config.model = config.model or default_model_path()
        hf_config = load_hf_config(path)
        tp = config.tensor_parallel_size
        if tp > 1:
            check_tensor_parallel(config, hf_config)
            if config.device == "cpu" and config.num_threads is None:  # one share of the cores per process
                config.num_threads = max(1, (os.cpu_count() or 1) // tp)
        if config.num_threads:
            torch.set_num_threads(config.num_threads)
        model_max = getattr(hf_config, "max_position_embeddings", None) or 4096
        window = getattr(hf_config, "sliding_window", None)
        if window and getattr(hf_config, "use_sliding_window", True):
            model_max = min(model_max, window)  # no sliding-window attention: stay inside one window
        derived_len = config.max_model_len is None
        if derived_len:
            config.max_model_len = model_max
        elif config.max_model_len > model_max:
            raise ValueError(f"max_model_len={config.max_model_len} is longer than the model allows ({model_max})")
        self.dtype = config.torch_dtype()
        workers = Workers(config) if tp > 1 else None  # they load their shares while this process loads its own
        try:
            loaded = load_model(path, self.dtype, config.device, config.max_model_len, hf_config, config.tokenizer)
            self.runner = ModelRunner(config, loaded.model, self.dtype, loaded.eos_token_ids, workers)
            if workers:
                torch.distributed.barrier()  # every worker has loaded
        except Exception as e:
            if workers:
                raise workers.failure(e) from e
            raise
        self.model_path, self.hf_config, self.eos_token_ids = path, hf_config, loaded.eos_token_ids
        self.tokenizer = loaded.tokenizer
        capacity = self.runner.num_blocks * config.block_size
        if config.max_model_len > capacity:
            if derived_len:  # not asked for: shrink it to what the pool holds
                config.max_model_len = capacity
            else:
                raise ValueError(f"max_model_len={config.max_model_len} does not fit the KV pool of {capacity} "
                                 f"tokens ({self.runner.num_blocks} blocks of {config.block_size})")
        self.block_manager = BlockManager(self.runner.num_blocks, config.block_size, config.enable_prefix_caching)
        self.scheduler = Scheduler(config, self.block_manager)
        self.requests: dict[str, Request] = {}
        self.vocab_size = hf_config.vocab_size
        self.last_step = (0, 0)  # (prefill tokens, decode tokens) of the last step, for progress reports

    # ---- requests -------------------------------------------------------------------------------------
    def tokenize(self, prompt: Prompt) -> tuple[str | None, list[int]]:
        """A string, a list of token ids, or {"prompt_token_ids": [...], "prompt": optional text}."""
        text = None
        if isinstance(prompt, dict):
            if "prompt_token_ids" in prompt:
                text, prompt = prompt.get("prompt"), list(prompt["prompt_token_ids"])
            elif "prompt" in prompt:
                prompt = prompt["prompt"]
            else:
                raise ValueError("a prompt dict needs 'prompt' or 'prompt_token_ids'")
        if isinstance(prompt, str):
            text, ids = prompt, self.tokenizer(prompt).input_ids
        elif isinstance(prompt, (list, tuple)) and all(isinstance(t, int) for t in prompt):
            ids = list(prompt)
            bad = [t for t in ids if not 0 <= t < self.vocab_size]
            if bad:
                raise ValueError(f"prompt token ids {bad[:5]} are outside the vocabulary [0, {self.vocab_size})")
        else:
            raise ValueError(f"a prompt must be a string or a list of token ids, got {type(prompt).__name__}")
        if not ids:
            raise ValueError("the prompt is empty")
        if len(ids) > self.config.max_model_len:
            raise ValueError(f"the prompt has {len(ids)} tokens, longer than max_model_len={self.config.max_model_len}")
        return text, ids

    def make_request(self, request_id: str, prompt: Prompt, params: SamplingParams) -> Request:
        """Validate and tokenize without touching the engine: a batch can check every prompt before it starts."""
        if request_id in self.requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        if params.n > self.config.max_num_seqs:
            raise ValueError(f"n={params.n} is more than max_num_seqs={self.config.max_num_seqs} sequences")
        text, ids = self.tokenize(prompt)
        bad = [t for t in params.stop_token_ids if t >= self.vocab_size]
        if bad:
            raise ValueError(f"stop_token_ids {bad[:5]} are outside the vocabulary [0, {self.vocab_size})")
        seqs, detoks = [], []
        for i in range(params.n):
            seq = Sequence(request_id, i, list(ids), len(ids), params)
            if params.seed is not None:
                seq.generator = torch.Generator(self.config.device).manual_seed((params.seed + i) % 2**64)
            seqs.append(seq)
            detoks.append(IncrementalDetokenizer(self.tokenizer, ids, params.skip_special_tokens, params.stop,
                                                 params.include_stop_str_in_output))
        return Request(request_id, text, ids, seqs, detoks)

    def add(self, request: Request) -> None:
        self.requests[request.request_id] = request
        for seq in request.seqs:
            self.scheduler.add(seq)

    def add_request(self, request_id: str, prompt: Prompt, params: SamplingParams | None = None) -> None:
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
        """One forward over a scheduled batch; returns the outputs of the requests that changed."""
        batch = self.scheduler.schedule()
        if not batch.seqs:
            return []
        sample_rows = [i for i, (s, n) in enumerate(zip(batch.seqs, batch.num_new_tokens))
                       if s.num_computed + n == s.num_tokens]
        tokens = self.runner.run(batch, sample_rows)
        for seq, n in zip(batch.seqs, batch.num_new_tokens):
            seq.num_computed += n
            self.block_manager.cache_full_blocks(seq, seq.num_computed - n)
        decodes = sum(1 for n in batch.num_new_tokens if n == 1)
        self.last_step = (batch.num_tokens - decodes, decodes)
        changed: dict[str, Request] = {}
        for row, token in zip(sample_rows, tokens):
            seq = batch.seqs[row]
            request = self.requests[seq.request_id]
            changed[request.request_id] = request
            if request.error:
                continue
            seq.token_ids.append(token)
            try:
                self.check_stop(seq, request.detoks[seq.index], token)
            except Exception as e:  # e.g. a token the tokenizer cannot decode: fail this request, not the batch
                request.error = f"{type(e).__name__}: {e}"
                for other in request.seqs:
                    if not other.finished:
                        self.scheduler.finish(other, "abort")
        outputs = [self.output(r) for r in changed.values()]
        for out in outputs:
            if out.finished:
                del self.requests[out.request_id]
        return outputs

    def check_stop(self, seq: Sequence, detok: IncrementalDetokenizer, token: int) -> None:
        p = seq.params
        may_stop = seq.num_output_tokens >= p.min_tokens
        if may_stop and (token in p.stop_token_ids or (not p.ignore_eos and token in self.eos_token_ids)):
            if p.include_stop_str_in_output:  # as vLLM: a stop token's own text is left out unless asked for
                detok.add(token, find_stop=False)
            return self.scheduler.finish(seq, "stop", token if token in p.stop_token_ids else None)
        stop_str = detok.add(token, may_stop)
        if stop_str is not None:
            return self.scheduler.finish(seq, "stop", stop_str)
        if seq.num_output_tokens == p.max_tokens or seq.num_tokens >= self.config.max_model_len:
            self.scheduler.finish(seq, "length")

    def output(self, request: Request) -> RequestOutput:
        outs = [CompletionOutput(i, d.text if s.finished else d.stable_text(), s.output_token_ids, s.finish_reason,
                                 s.stop_reason) for i, (s, d) in enumerate(zip(request.seqs, request.detoks))]
        return RequestOutput(request.request_id, request.prompt, request.prompt_token_ids, outs,
                             all(s.finished for s in request.seqs), max(request.seqs[0].num_cached_tokens, 0),
                             request.error)

    def shutdown(self) -> None:
        """Stop the tensor-parallel workers, if any (also done when the engine is garbage-collected)."""
        self.runner.shutdown()

    def stats(self) -> dict:
        bm = self.block_manager
        return {"running": len(self.scheduler.running), "waiting": len(self.scheduler.waiting),
                "num_blocks": bm.num_blocks, "free_blocks": bm.num_free,
                "prefix_cache_queries": bm.prefix_query_tokens, "prefix_cache_hits": bm.prefix_hit_tokens,
                "preemptions": self.scheduler.num_preemptions}
