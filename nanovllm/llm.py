import itertools
import time
from collections.abc import Sequence as Seq

from tqdm.auto import tqdm

from nanovllm.config import EngineConfig
from nanovllm.engine.llm_engine import LLMEngine, Prompt
from nanovllm.outputs import RequestOutput
from nanovllm.sampling_params import SamplingParams


class LLM:
    """Offline generation with vLLM's API. `LLM()` loads the embedded SmolLM2-135M-Instruct."""

    def __init__(self, model: str | None = None, **engine_args):
        self.engine = LLMEngine(EngineConfig(model=model, **engine_args))
        self.tokenizer = self.engine.tokenizer
        self._ids = itertools.count()

    def get_tokenizer(self):
        return self.tokenizer

    def generate(self, prompts: Prompt | Seq[Prompt], sampling_params: SamplingParams | Seq[SamplingParams] | None = None,
                 use_tqdm: bool = True) -> list[RequestOutput]:
        """Run every prompt to completion; outputs come back in input order.

        Every prompt is validated before any starts: one bad prompt raises a ValueError naming its index
        and nothing is generated (as vLLM does)."""
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
            except ValueError as e:
                raise ValueError(f"prompt {i}: {e}") from None
        for r in requests:
            self.engine.add(r)
        return self._run([r.request_id for r in requests], use_tqdm)

    def chat(self, messages: list[dict] | list[list[dict]], sampling_params: SamplingParams | None = None,
             use_tqdm: bool = True, add_generation_prompt: bool = True, chat_template: str | None = None,
             **template_kwargs) -> list[RequestOutput]:
        """One conversation (a list of messages) or many; each is rendered with the model's chat template."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        prompts = [{"prompt_token_ids": self.apply_chat_template(c, add_generation_prompt, chat_template,
                                                                 **template_kwargs)} for c in conversations]
        return self.generate(prompts, sampling_params, use_tqdm)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True,
                            chat_template: str | None = None, **kwargs) -> list[int]:
        if chat_template is None and not getattr(self.tokenizer, "chat_template", None):
            raise ValueError("this model has no chat template: pass chat_template=... or use generate()")
        text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt,
                                                  chat_template=chat_template, tokenize=False, **kwargs)
        # the template already holds the special tokens (BOS etc.)
        return self.tokenizer(text, add_special_tokens=False).input_ids

    def _run(self, request_ids: list[str], use_tqdm: bool) -> list[RequestOutput]:
        done: dict[str, RequestOutput] = {}
        bar = tqdm(total=len(request_ids), desc="Processed prompts", dynamic_ncols=True, disable=not use_tqdm)
        prefill = decode = 0
        start = time.perf_counter()
        try:
            while len(done) < len(request_ids):
                for out in self.engine.step():
                    if out.finished:
                        done[out.request_id] = out
                        bar.update(1)
                p, d = self.engine.last_step
                prefill, decode = prefill + p, decode + d
                elapsed = max(time.perf_counter() - start, 1e-9)
                bar.set_postfix_str(f"prefill {prefill / elapsed:.0f} tok/s, decode {decode / elapsed:.0f} tok/s",
                                    refresh=False)
        except BaseException:
            for rid in request_ids:  # an interrupted batch must not leave its requests holding KV blocks
                self.engine.abort(rid)
            raise
        finally:
            bar.close()
        return [done[rid] for rid in request_ids]
