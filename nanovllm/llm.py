import itertools
import time
from collections.abc import Iterator
from collections.abc import Sequence as Seq

from tqdm.auto import tqdm

from nanovllm.engine.llm_engine import LLMEngine
from nanovllm.engine.request import chat_token_ids
from nanovllm.engine_args import engine_config
from nanovllm.entrypoints.tools import template_messages
from nanovllm.inputs import PromptType
from nanovllm.outputs import DeltaTracker, RequestOutput
from nanovllm.sampling_params import SamplingParams


class LLM:
    """Offline generation with vLLM's API. `LLM()` loads the embedded SmolLM2-135M-Instruct. The keyword arguments
    are EngineConfig's and vLLM's engine arguments (nanovllm/engine_args.py, docs/from-vllm.md)."""

    def __init__(self, model: str | None = None, **engine_args):
        self.engine = LLMEngine(engine_config(model, **engine_args))
        self.tokenizer = self.engine.tokenizer
        self._ids = itertools.count()
        self._streaming = False  # a stream() is open: it steps the engine itself

    def shutdown(self) -> None:
        """Stop the tensor-parallel worker processes now (garbage collection and interpreter exit do it too)."""
        self.engine.shutdown()

    def __enter__(self) -> "LLM":
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()

    @property
    def llm_engine(self) -> LLMEngine:
        return self.engine

    def get_tokenizer(self):
        return self.tokenizer

    def get_default_sampling_params(self) -> SamplingParams:
        """SamplingParams with the model's generation_config.json defaults (temperature, top_p, top_k, min_p,
        repetition_penalty, max_new_tokens as max_tokens), as vLLM gives them; vLLM's defaults where it has none."""
        return SamplingParams(**self.engine.generation_defaults)

    def reset_prefix_cache(self) -> bool:
        """Forget every cached prefix block; False (nothing done) while a request still holds blocks."""
        return self.engine.block_manager.reset_prefix_cache()

    def generate(
        self,
        prompts: PromptType | Seq[PromptType],
        sampling_params: SamplingParams | Seq[SamplingParams] | None = None,
        use_tqdm: bool = True,
        lora_request=None,
    ) -> list[RequestOutput]:
        """Run every prompt to completion; outputs come back in input order.

        Every prompt is validated before any starts: one bad prompt raises a ValueError naming its index
        and nothing is generated (as vLLM does)."""
        self._refuse_while_streaming()
        if lora_request is not None:
            raise ValueError("lora_request is not supported: nanovllm serves no LoRA adapters")
        if isinstance(prompts, (str, dict)) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        params = sampling_params or SamplingParams()
        params = list(params) if isinstance(params, Seq) else [params] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError(f"got {len(params)} SamplingParams for {len(prompts)} prompts")
        requests = []
        for i, (prompt, p) in enumerate(zip(prompts, params)):
            try:
                requests.append(self.engine.make_request(str(next(self._ids)), prompt, p))
                requests[-1].check_grammar()  # an invalid schema, regex or grammar: a ValueError before any starts
            except ValueError as e:
                raise ValueError(f"prompt {i}: {e}") from None
        for r in requests:
            r.final_only = True  # only the final outputs are read (vLLM's generate sets FINAL_ONLY alike)
            self.engine.add(r)
        return self._run([r.request_id for r in requests], use_tqdm)

    def chat(
        self,
        messages: list[dict] | list[list[dict]],
        sampling_params: SamplingParams | None = None,
        use_tqdm: bool = True,
        lora_request=None,
        chat_template: str | None = None,
        add_generation_prompt: bool = True,
        continue_final_message: bool = False,
        tools: list[dict] | None = None,
        chat_template_kwargs: dict | None = None,
        **template_kwargs,
    ) -> list[RequestOutput]:
        """One conversation (a list of messages) or many; each is rendered with the model's chat template.
        continue_final_message: the last (assistant) message is left open for the model to continue. tools: OpenAI's
        function tools, shown to the template (read the calls out of the text with
        nanovllm.entrypoints.tool_parsers, as vLLM's parsers); an assistant message's tool_calls may carry their
        arguments as JSON strings, as the OpenAI API does. chat_template_kwargs: more template variables (e.g.
        enable_thinking)."""
        if continue_final_message and add_generation_prompt:
            raise ValueError("continue_final_message=True needs add_generation_prompt=False (as in vLLM)")
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        conversations = [template_messages(c) for c in conversations]
        template_kwargs = {**(chat_template_kwargs or {}), **template_kwargs}
        if tools:
            template_kwargs["tools"] = tools
        prompts = [
            {
                "prompt_token_ids": self.apply_chat_template(
                    c,
                    add_generation_prompt,
                    chat_template,
                    continue_final_message=continue_final_message,
                    **template_kwargs,
                )
            }
            for c in conversations
        ]
        return self.generate(prompts, sampling_params, use_tqdm, lora_request)

    def apply_chat_template(
        self, messages: list[dict], add_generation_prompt: bool = True, chat_template: str | None = None, **kwargs
    ) -> list[int]:
        return chat_token_ids(self.tokenizer, messages, add_generation_prompt, chat_template, **kwargs)

    def stream(self, prompt: PromptType, sampling_params: SamplingParams | None = None) -> Iterator[RequestOutput]:
        """Generate for one prompt, yielding deltas as tokens come: each RequestOutput holds, per completion,
        only the new text and token ids (text that could still turn into a stop string is held back).
        Joined, the deltas equal what generate() returns. Leaving the loop early aborts the request. One stream
        at a time (the iterator drives the engine itself)."""
        self._refuse_while_streaming()
        if self.engine.has_unfinished():  # each stream steps the engine: a second one would eat the first's outputs
            raise RuntimeError(
                "LLM.stream runs one request at a time and another is still in flight; for "
                "concurrent streams use the AsyncEngine (nanovllm.engine.async_engine) or the server"
            )
        request = self.engine.make_request(str(next(self._ids)), prompt, sampling_params or SamplingParams())
        request.check_grammar()
        self.engine.add(request)
        self._streaming = True
        delta = DeltaTracker()
        try:
            while request.request_id in self.engine.requests:  # else it ended without telling this loop
                for out in self.engine.step():
                    if out.request_id == request.request_id:
                        self._raise_if_failed(out)
                        yield delta(out)
                        if out.finished:
                            return
            raise RuntimeError(f"request {request.request_id} was taken out of the engine before it finished")
        finally:
            self._streaming = False
            self.engine.abort(request.request_id)

    def _refuse_while_streaming(self) -> None:
        if self._streaming:
            raise RuntimeError(
                "a stream() of this LLM is still open: finish or close it first (it drives the "
                "engine itself, and its outputs would be lost)"
            )

    @staticmethod
    def _raise_if_failed(out: RequestOutput) -> None:
        if out.error:
            raise RuntimeError(f"request {out.request_id} failed: {out.error}")

    def _run(self, request_ids: list[str], use_tqdm: bool) -> list[RequestOutput]:
        done: dict[str, RequestOutput] = {}
        bar = tqdm(total=len(request_ids), desc="Processed prompts", dynamic_ncols=True, disable=not use_tqdm)
        prefill = decode = 0
        start = time.perf_counter()
        try:
            while len(done) < len(request_ids):
                for out in self.engine.step():
                    self._raise_if_failed(out)
                    if out.finished:
                        done[out.request_id] = out
                        bar.update(1)
                p, d = self.engine.last_step
                prefill, decode = prefill + p, decode + d
                elapsed = max(time.perf_counter() - start, 1e-9)
                bar.set_postfix_str(
                    f"prefill {prefill / elapsed:.0f} tok/s, decode {decode / elapsed:.0f} tok/s", refresh=False
                )
        except BaseException:
            for rid in request_ids:  # an interrupted batch must not leave its requests holding KV blocks
                self.engine.abort(rid)
            raise
        finally:
            bar.close()
        return [done[rid] for rid in request_ids]
