from dataclasses import dataclass

from nanovllm.logprobs import PromptLogprobs, SampleLogprobs


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None = None  # "stop" | "length" | "abort" | None while running
    stop_reason: int | str | None = None  # the stop token id or stop string that ended it
    cumulative_logprob: float | None = None  # the sum of the tokens' logprobs, when SamplingParams.logprobs is set
    logprobs: SampleLogprobs | None = None  # one {token id: Logprob} per token, when SamplingParams.logprobs is set

    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    num_cached_tokens: int = 0
    error: str | None = None  # why handling this request failed (it is finished, its outputs aborted)
    metrics: object | None = None  # vLLM's field; no per-request timings are kept (the server's /metrics has them)
    prompt_logprobs: PromptLogprobs | None = None  # one per prompt token, when SamplingParams.prompt_logprobs is set


class DeltaTracker:
    """Turns one request's cumulative outputs into deltas: per completion, the text, token ids and logprobs that
    are new since the last call, and its finish reason once (the prompt's logprobs come with the first delta, as
    vLLM does). Completions with nothing new are left out."""

    def __init__(self):
        self.sent: dict[int, tuple[int, int, bool]] = {}  # index -> (chars, tokens, finished) already sent
        self.sent_prompt = False

    def __call__(self, out: RequestOutput) -> RequestOutput:
        deltas = []
        for c in out.outputs:
            chars, tokens, done = self.sent.get(c.index, (0, 0, False))
            finished = c.finish_reason is not None
            if done or (len(c.text) == chars and len(c.token_ids) == tokens and not finished):
                continue
            self.sent[c.index] = (len(c.text), len(c.token_ids), finished)
            deltas.append(
                CompletionOutput(
                    c.index,
                    c.text[chars:],
                    c.token_ids[tokens:],
                    c.finish_reason,
                    c.stop_reason,
                    c.cumulative_logprob,
                    None if c.logprobs is None else c.logprobs[tokens:],
                )
            )
        prompt_logprobs = None if self.sent_prompt else out.prompt_logprobs
        self.sent_prompt = True
        return RequestOutput(
            out.request_id,
            out.prompt,
            out.prompt_token_ids,
            deltas,
            out.finished,
            out.num_cached_tokens,
            out.error,
            prompt_logprobs=prompt_logprobs,
        )
