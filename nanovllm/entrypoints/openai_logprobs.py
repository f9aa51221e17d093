"""Logprobs as the OpenAI API shows them: the completions API's legacy format (tokens, token_logprobs,
top_logprobs, text_offset), the chat API's content list (token, logprob, bytes, top_logprobs), and vLLM's
prompt_logprobs extra; and what a choice shows: its text (with `echo`, the prompt first) and its logprobs."""

from dataclasses import dataclass, field

from nanovllm.logprobs import Logprob, LogprobsOnePosition
from nanovllm.outputs import CompletionOutput, RequestOutput

FLOOR = -9999.0  # what OpenAI sends for a logprob of -inf (JSON has no infinity)


def token_text(lp: Logprob | None, token_id: int, tokenizer, as_ids: bool) -> str:
    """A token as the client sees it: its text alone, or "token_id:N" (vLLM's return_tokens_as_token_ids)."""
    if as_ids:
        return f"token_id:{token_id}"
    return lp.decoded_token if lp is not None and lp.decoded_token is not None else tokenizer.decode([token_id])


def by_rank(position: LogprobsOnePosition) -> list[tuple[int, Logprob]]:
    return sorted(position.items(), key=lambda item: item[1].rank)


def completion_logprobs(
    ids: list[int], positions: list[LogprobsOnePosition | None], tokenizer, offset: int = 0, as_ids: bool = False
) -> dict:
    """The legacy format: per token its text, logprob and the most likely tokens with theirs (the chosen one
    too, so up to N + 1), and where its text starts (from `offset`, the text sent before). A prompt's first token
    has no logprob (None)."""
    out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for token_id, position in zip(ids, positions):
        token = token_text(position and position.get(token_id), token_id, tokenizer, as_ids)
        out["tokens"].append(token)
        out["token_logprobs"].append(None if position is None else max(position[token_id].logprob, FLOOR))
        out["top_logprobs"].append(
            None
            if position is None
            else {token_text(lp, t, tokenizer, as_ids): max(lp.logprob, FLOOR) for t, lp in by_rank(position)}
        )
        out["text_offset"].append(offset)
        offset += len(token)
    return out


def chat_logprobs(
    ids: list[int], positions: list[LogprobsOnePosition], tokenizer, num: int, as_ids: bool = False
) -> dict:
    """The chat format: per token its text, logprob and UTF-8 bytes, and the `num` most likely tokens."""

    def entry(token_id: int, lp: Logprob) -> dict:
        token = token_text(lp, token_id, tokenizer, as_ids)
        return {"token": token, "logprob": max(lp.logprob, FLOOR), "bytes": list(token.encode("utf-8", "replace"))}

    return {
        "content": [
            {**entry(t, position[t]), "top_logprobs": [entry(*item) for item in by_rank(position)[:num]]}
            for t, position in zip(ids, positions)
        ]
    }


def prompt_logprobs_json(positions: list[LogprobsOnePosition | None] | None) -> list | None:
    """vLLM's prompt_logprobs field: per prompt token None or {token id: {logprob, rank, decoded_token}}."""
    if positions is None:
        return None
    return [
        None
        if p is None
        else {
            str(t): {"logprob": max(lp.logprob, FLOOR), "rank": lp.rank, "decoded_token": lp.decoded_token}
            for t, lp in p.items()
        }
        for p in positions
    ]


@dataclass
class ChoiceContent:
    """What each choice of a response (or each streamed chunk of it) shows, for one request body. A choice's first
    chunk has the echo; the next one's text_offsets go on from where the last one's ended."""

    tokenizer: object
    body: object  # the CompletionRequest or ChatRequest
    chat: bool
    score_only: bool  # completions' echo with max_tokens 0: the prompt alone
    offsets: dict = field(default_factory=dict)  # choice index -> where its next token's text starts

    def __call__(self, index: int, c: CompletionOutput, out: RequestOutput) -> tuple[str, dict | None]:
        """(text, logprobs) of choice `index`: completion `c` (all of it, or its new part when streaming) of
        request output `out`."""
        num, as_ids = self.body.num_logprobs(), self.body.return_tokens_as_token_ids
        if self.chat:
            return c.text, None if c.logprobs is None else chat_logprobs(
                c.token_ids, c.logprobs, self.tokenizer, num, as_ids
            )
        first, offset = index not in self.offsets, self.offsets.get(index, 0)
        text, ids, positions = ("", [], []) if self.score_only else (c.text, c.token_ids, c.logprobs or [])
        if self.body.echo and first:  # the prompt and its logprobs before the choice's first chunk
            prompt = out.prompt if out.prompt is not None else self.tokenizer.decode(out.prompt_token_ids)
            text, ids = prompt + text, out.prompt_token_ids + ids
            positions = (out.prompt_logprobs or [None] * len(out.prompt_token_ids)) + positions
        logprobs = None if num is None else completion_logprobs(ids, positions, self.tokenizer, offset, as_ids)
        self.offsets[index] = offset + (sum(map(len, logprobs["tokens"])) if logprobs else len(text))
        return text, logprobs
