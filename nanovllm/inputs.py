"""The prompt types, vLLM's (`vllm.inputs`): a prompt is a string, plain token ids, a TextPrompt or a TokensPrompt;
the engine also takes a conversation (ChatMessages), rendered with the model's chat template. The one definition:
the fronts and the engine (engine/request.py's `tokenize` reads them) all use PromptType."""

from typing import TypedDict


class TextPrompt(TypedDict):
    prompt: str


class _TokenIds(TypedDict):
    prompt_token_ids: list[int]


class TokensPrompt(_TokenIds, total=False):
    prompt: str  # the text the ids came from (optional), returned in RequestOutput.prompt


# a conversation: {"role", "content"} messages, rendered with the chat template
ChatMessages = list[dict]

PromptType = str | list[int] | TextPrompt | TokensPrompt | ChatMessages
