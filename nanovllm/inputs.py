"""vLLM's prompt types (`vllm.inputs`): a prompt is a string, a TextPrompt or a TokensPrompt (or plain token ids).
engine/request.py's `tokenize` reads them."""

from typing import TypedDict


class TextPrompt(TypedDict):
    prompt: str


class _TokenIds(TypedDict):
    prompt_token_ids: list[int]


class TokensPrompt(_TokenIds, total=False):
    prompt: str  # the text the ids came from (optional), returned in RequestOutput.prompt


PromptType = str | TextPrompt | TokensPrompt
