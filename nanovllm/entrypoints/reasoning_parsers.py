"""Reasoning split from the answer, as vLLM's `--reasoning-parser NAME`: `qwen3` and `deepseek_r1` both read
`<think>reasoning</think>answer`. They differ where the text has no `</think>`: Qwen3 thinks only when it opens
`<think>` itself (or its template opened it in the prompt), so a text without one is all answer; DeepSeek-R1's
template opens `<think>` in the prompt, so a text that never closes it is all reasoning.

As the tool parsers, one function of the text so far serves the whole answer and the stream: while `final` is
False, a piece that may be the start of a marker is held back."""

from dataclasses import dataclass

from nanovllm.entrypoints.tool_parsers import held
from nanovllm.sampling_params import StructuredOutputsParams

START, END = "<think>", "</think>"


@dataclass(frozen=True)
class ReasoningParser:
    name: str
    thinks_unopened: bool  # a text that opens no <think> is reasoning until </think>

    def split(self, text: str, final: bool = True, prompt_state: str | None = None) -> tuple[str | None, str | None]:
        """(reasoning, content) of the text so far; None where there is none. prompt_state: "open" when the prompt
        ends inside <think> (the template opened it), "closed" when it ends right after </think> (thinking was
        turned off, e.g. Qwen3's enable_thinking=False), None when it has neither."""
        if prompt_state == "closed":
            return None, text or None
        thinking = prompt_state == "open" or self.thinks_unopened
        body = text.lstrip()
        if body.startswith(START):
            body, thinking = body[len(START) :], True
        elif not final and START.startswith(body):
            return None, None  # nothing yet, or <think> being written
        elif not thinking:
            body = text
        if END in body:  # vLLM's parsers split at </think> even when no <think> opened the text
            reasoning, _, content = body.partition(END)
            return reasoning, content or None
        if not thinking:
            return None, body or None
        return (body if final else held(body, END)) or None, None

    def grammar_prefix(self, prompt_state: str | None) -> str | None:
        """The EBNF grammar of the reasoning a structured answer follows (None: the answer starts at once): the
        reasoning may hold any text but "</" (a close approximation of "anything before </think>")."""
        if prompt_state == "closed":
            return None
        thought = '([^<] | "<" [^/])* "</think>" [ \\n]*'
        if prompt_state == "open":
            return f"root ::= {thought}"
        if self.thinks_unopened:
            return f'root ::= "<think>"? {thought}'
        return f'root ::= ("<think>" {thought})?'

    def extract_reasoning(self, text: str) -> tuple[str | None, str | None]:
        """vLLM's ReasoningParser.extract_reasoning (the older extract_reasoning_content) for a finished text."""
        return self.split(text)


REASONING_PARSERS = {
    "qwen3": ReasoningParser("qwen3", thinks_unopened=False),
    "deepseek_r1": ReasoningParser("deepseek_r1", thinks_unopened=True),
}


def get_reasoning_parser(name: str) -> ReasoningParser:
    if name not in REASONING_PARSERS:
        raise ValueError(f"unknown reasoning parser {name!r}; nanovllm has {', '.join(REASONING_PARSERS)}")
    return REASONING_PARSERS[name]


def prompt_state(prompt_tail: str) -> str | None:
    """Where the prompt's end leaves the reasoning (see ReasoningParser.split): its last few tokens' text."""
    tail = prompt_tail.rstrip()
    if tail.endswith(END):
        return "closed"
    if tail.endswith(START):
        return "open"
    return None


def answer_after_reasoning(params: StructuredOutputsParams, prefix: str) -> StructuredOutputsParams:
    """A structured-output constraint that applies after the reasoning, as vLLM applies it: one grammar, the
    reasoning's (`prefix`, EBNF) then the answer's. A ValueError when the answer's spec is invalid."""
    import xgrammar as xgr  # imported here: it takes seconds, and only requests with a grammar need it

    from nanovllm.structured_outputs import WHAT, grammar_key

    kind, spec, any_whitespace = grammar_key(params)
    try:
        if kind == "json":
            answer = xgr.Grammar.from_json_schema(spec, any_whitespace=any_whitespace)
        elif kind == "json_object":
            answer = xgr.Grammar.from_json_schema(
                '{"type": "object"}', any_whitespace=any_whitespace, strict_mode=False
            )
        elif kind == "regex":
            answer = xgr.Grammar.from_regex(spec)
        elif kind == "lark":
            answer = xgr.Grammar.from_lark(spec)
        else:
            answer = xgr.Grammar.from_ebnf(spec)
    except RuntimeError as e:
        raise ValueError(f"invalid {WHAT[kind]} for structured outputs: {e}") from None
    return StructuredOutputsParams(grammar=str(xgr.Grammar.concat(xgr.Grammar.from_ebnf(prefix), answer)))
