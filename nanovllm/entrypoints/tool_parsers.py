"""Tool calls read out of a model's text, as vLLM's `--tool-call-parser NAME` reads them: `hermes` (Qwen2.5/Qwen3,
SmolLM3, Hermes: `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`), `llama3_json` (Llama 3.1+: a JSON
object `{"name": ..., "parameters": {...}}`, several joined by `;`, after an optional `<|python_tag|>`) and
`mistral` (`[TOOL_CALLS]` then a JSON list of calls, or `name{...}` / `name[ARGS]{...}` on newer tokenizers).

Every parser is one function of the text so far: parse(text, final) gives the content outside the calls and each
call's name and arguments as far as they are written. A stream is the difference between two parses (tools.py), so
streamed and complete answers come from the same code: while `final` is False, text that may still turn into a
marker (`<tool_c`) or whitespace that may end the content is held back, a name shows once its closing quote is
written, and the arguments are the raw JSON text written so far (each parse's a prefix of the next one's).

A malformed call (not JSON, no name, arguments not an object) makes the whole text plain content, never an
error: `final` parses check it."""

import json
import re
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

WHITESPACE = " \t\r\n"


@dataclass
class CallText:
    """One tool call as far as the text has written it."""

    name: str | None = None  # None until its closing quote is written
    arguments: str = ""  # the raw JSON text of the arguments so far
    complete: bool = False  # the call's JSON has ended


@dataclass
class ParsedText:
    content: str = ""
    calls: list[CallText] = field(default_factory=list)


class Malformed(ValueError):
    """The text opened a tool call that is not one."""


# ---- a JSON scanner that reads unfinished text ------------------------------------------------------------
def skip_ws(text: str, i: int) -> int:
    while i < len(text) and text[i] in WHITESPACE:
        i += 1
    return i


def string_end(text: str, i: int) -> int | None:
    """Index just past the JSON string opening at text[i] (a quote), or None when the text ends inside it."""
    i += 1
    while i < len(text):
        if text[i] == "\\":
            i += 2
            continue
        if text[i] == '"':
            return i + 1
        i += 1
    return None


def value_end(text: str, i: int) -> int | None:
    """Index just past the JSON value starting at text[i], or None when the text ends inside it. Brackets are
    only counted, not checked: json.loads checks the finished value."""
    if text[i] == '"':
        return string_end(text, i)
    if text[i] not in "{[":  # a number, true, false or null: it ends at the next delimiter
        j = i
        while j < len(text) and text[j] not in WHITESPACE + ",}]":
            j += 1
        return j if j < len(text) else None
    depth = 0
    while i < len(text):
        ch = text[i]
        if ch == '"':
            end = string_end(text, i)
            if end is None:
                return None
            i = end
            continue
        if ch in "{[":
            depth += 1
        elif ch in "}]":
            depth -= 1
            if depth == 0:
                return i + 1
        i += 1
    return None


def object_fields(text: str, i: int) -> tuple[dict[str, tuple[int, int | None]], int | None]:
    """The fields of the JSON object opening at text[i] ('{'): name -> (start of its value, end or None), and the
    index just past the object (None while unfinished). A Malformed where the text is not an object's."""
    if i >= len(text) or text[i] != "{":
        raise Malformed("a tool call must be a JSON object")
    fields: dict[str, tuple[int, int | None]] = {}
    i = skip_ws(text, i + 1)
    while i < len(text):
        if text[i] == "}":
            return fields, i + 1
        if text[i] != '"':
            raise Malformed(f"expected a field name at {text[i : i + 10]!r}")
        key_end = string_end(text, i)
        if key_end is None:
            return fields, None
        key = json.loads(text[i:key_end])
        i = skip_ws(text, key_end)
        if i >= len(text):
            return fields, None
        if text[i] != ":":
            raise Malformed(f"expected ':' after the field {key!r}")
        i = skip_ws(text, i + 1)
        if i >= len(text):
            return fields, None
        end = value_end(text, i)
        fields[key] = (i, end)
        if end is None:
            return fields, None
        i = skip_ws(text, end)
        if i < len(text) and text[i] == ",":
            i = skip_ws(text, i + 1)
        elif i < len(text) and text[i] != "}":
            raise Malformed(f"expected ',' or '}}' after the field {key!r}")
    return fields, None


def call_object(text: str, i: int, argument_keys: tuple[str, ...]) -> tuple[CallText, int | None]:
    """The call written as a JSON object {"name": ..., ARGUMENTS: {...}} at text[i], and where it ends."""
    fields, end = object_fields(text, i)
    call = CallText(complete=end is not None)
    if "name" in fields and fields["name"][1] is not None:
        start, stop = fields["name"]
        name = json.loads(text[start:stop])
        if not isinstance(name, str):
            raise Malformed("a tool call's name must be a string")
        call.name = name
    for key in argument_keys:
        if key in fields:
            start, stop = fields[key]
            if text[start] != "{":
                raise Malformed("a tool call's arguments must be a JSON object")
            call.arguments = text[start:stop] if stop is not None else text[start:].rstrip(WHITESPACE)
            break
    return call, end


def held(text: str, marker: str) -> str:
    """text without its longest ending that is the start of `marker` (it may be the marker being written)."""
    for n in range(min(len(marker) - 1, len(text)), 0, -1):
        if text.endswith(marker[:n]):
            return text[:-n]
    return text


def check(parsed: ParsedText, whole: str) -> ParsedText:
    """A final parse: every call finished, named and with an object for arguments, else all of it is content."""
    for call in parsed.calls:
        try:
            args = json.loads(call.arguments) if call.arguments else {}
        except ValueError:
            args = None
        if not call.complete or call.name is None or not isinstance(args, dict):
            return ParsedText(content=whole)
    if parsed.calls:
        parsed.content = parsed.content.rstrip(WHITESPACE)
    return parsed


def finish(parsed: ParsedText, text: str, final: bool) -> ParsedText:
    if final:
        return check(parsed, text)
    parsed.content = parsed.content.rstrip(WHITESPACE)  # trailing whitespace may end the content: shown later
    return parsed


# ---- the parsers ------------------------------------------------------------------------------------------
HERMES_START, HERMES_END = "<tool_call>", "</tool_call>"


def parse_hermes(text: str, final: bool) -> ParsedText:
    """Content is the text outside the <tool_call> blocks; each block holds one JSON call (the last may be
    unclosed, as a model that stops after its JSON leaves it)."""
    parsed, pos = ParsedText(), 0
    try:
        while True:
            start = text.find(HERMES_START, pos)
            if start < 0:
                parsed.content += text[pos:] if final else held(text[pos:], HERMES_START)
                break
            parsed.content += text[pos:start]
            end = text.find(HERMES_END, start)
            body = text[start + len(HERMES_START) : end if end >= 0 else len(text)]
            i = skip_ws(body, 0)
            if i < len(body):
                parsed.calls.append(call_object(body, i, ("arguments", "parameters"))[0])
            elif final or end >= 0:
                raise Malformed("an empty <tool_call>")
            if end < 0:
                break
            pos = end + len(HERMES_END)
    except (Malformed, ValueError):
        if final:
            return ParsedText(content=text)
        parsed.calls = [c for c in parsed.calls if c.name is not None]
    return finish(parsed, text, final)


LLAMA_TAG = "<|python_tag|>"


def parse_llama3_json(text: str, final: bool) -> ParsedText:
    """Calls only when the text opens with a JSON object (or <|python_tag|>): one or more objects joined by ';'.
    Text that opens otherwise is all content, as in vLLM."""
    begin = skip_ws(text, 0)
    rest = text[begin:]
    if not final and (not rest or LLAMA_TAG.startswith(rest)):
        return ParsedText()  # nothing yet, or the tag being written
    if rest.startswith(LLAMA_TAG):
        begin = skip_ws(text, begin + len(LLAMA_TAG))
    elif not rest.startswith("{"):
        return ParsedText(content=text)
    parsed, pos = ParsedText(), begin
    try:
        while pos < len(text) and text[pos] == "{":
            call, end = call_object(text, pos, ("parameters", "arguments"))
            parsed.calls.append(call)
            if end is None:
                break
            pos = skip_ws(text, end)
            if pos < len(text) and text[pos] == ";":
                pos = skip_ws(text, pos + 1)
        else:
            parsed.content = text[pos:]
    except (Malformed, ValueError):
        if final:
            return ParsedText(content=text)
        parsed.calls = [c for c in parsed.calls if c.name is not None]
    return finish(parsed, text, final)


MISTRAL_TAG, MISTRAL_ARGS = "[TOOL_CALLS]", "[ARGS]"


def parse_mistral(text: str, final: bool) -> ParsedText:
    """Content before [TOOL_CALLS]; after it a JSON list of {"name", "arguments"} objects, or (tokenizers v11+)
    `name{...}` / `name[ARGS]{...}`, each call after its own [TOOL_CALLS]."""
    start = text.find(MISTRAL_TAG)
    if start < 0:
        return finish(ParsedText(content=text if final else held(text, MISTRAL_TAG)), text, final)
    parsed = ParsedText(content=text[:start])
    try:
        pos = skip_ws(text, start + len(MISTRAL_TAG))
        if pos < len(text) and text[pos] == "[":
            parsed.calls = json_list_calls(text, pos, ("arguments",))
        else:
            for piece in text[start:].split(MISTRAL_TAG)[1:]:
                name = re.match(r"\s*([A-Za-z0-9_.\-]+)", piece)
                if name is None or name.end() == len(piece):
                    break  # the name is still being written
                after = skip_ws(piece, name.end())
                if piece.startswith(MISTRAL_ARGS, after):
                    after = skip_ws(piece, after + len(MISTRAL_ARGS))
                elif MISTRAL_ARGS.startswith(piece[after:]):
                    break
                if after >= len(piece):
                    break
                if piece[after] != "{":
                    raise Malformed("mistral arguments must be a JSON object")
                fields_end = value_end(piece, after)
                args = piece[after:fields_end] if fields_end is not None else piece[after:].rstrip(WHITESPACE)
                parsed.calls.append(CallText(name[1], args, complete=fields_end is not None))
    except (Malformed, ValueError):
        if final:
            return ParsedText(content=text)
        parsed.calls = [c for c in parsed.calls if c.name is not None]
    return finish(parsed, text, final)


def json_list_calls(text: str, pos: int, argument_keys: tuple[str, ...]) -> list[CallText]:
    """The calls of a JSON list of call objects opening at text[pos] ('[')."""
    calls = []
    pos = skip_ws(text, pos + 1)
    while pos < len(text) and text[pos] != "]":
        call, end = call_object(text, pos, argument_keys)
        calls.append(call)
        if end is None:
            break
        pos = skip_ws(text, end)
        if pos < len(text) and text[pos] == ",":
            pos = skip_ws(text, pos + 1)
        elif pos < len(text) and text[pos] != "]":
            raise Malformed("expected ',' or ']' between tool calls")
    return calls


def parse_required(text: str, final: bool) -> ParsedText:
    """tool_choice "required": the grammar makes the whole answer a JSON list of {"name", "parameters"}."""
    pos = skip_ws(text, 0)
    try:
        calls = json_list_calls(text, pos, ("parameters",)) if pos < len(text) else []
    except (Malformed, ValueError):
        return ParsedText(content=text) if final else ParsedText()
    return finish(ParsedText(calls=calls), text, final) if calls or not final else ParsedText(content=text)


def mistral_call_id() -> str:
    """Mistral's chat templates take call ids of exactly 9 letters and digits."""
    return uuid.uuid4().hex[:9]


def call_id() -> str:
    return f"chatcmpl-tool-{uuid.uuid4().hex}"


@dataclass(frozen=True)
class ToolParser:
    """One `--tool-call-parser`: how calls are written, and the ids its model's template takes for them."""

    name: str
    parse: Callable[[str, bool], ParsedText]
    make_id: Callable[[], str] = call_id
    # the markers are special tokens in some vocabularies: the text must keep them to be parsed
    keeps_special_tokens: bool = False

    def extract_tool_calls(self, text: str) -> "ExtractedToolCalls":
        """vLLM's ToolParser.extract_tool_calls for a finished text: the calls (OpenAI's shape, the arguments a JSON
        string) and the content around them (None when there is none)."""
        parsed = self.parse(text, True)
        calls = [
            {
                "id": self.make_id(),
                "type": "function",
                "function": {"name": c.name, "arguments": normal_arguments(c.arguments)},
            }
            for c in parsed.calls
        ]
        return ExtractedToolCalls(bool(calls), calls, parsed.content or None)


def normal_arguments(raw: str) -> str:
    """The arguments as vLLM sends them in a whole answer: re-serialized, not as the model spaced them (text that
    is not JSON, a named call cut short by max_tokens, is sent as it is)."""
    try:
        return json.dumps(json.loads(raw) if raw else {}, ensure_ascii=False)
    except ValueError:
        return raw


@dataclass
class ExtractedToolCalls:
    tools_called: bool
    tool_calls: list[dict]
    content: str | None


TOOL_PARSERS = {
    "hermes": ToolParser("hermes", parse_hermes),
    "llama3_json": ToolParser("llama3_json", parse_llama3_json, keeps_special_tokens=True),
    "mistral": ToolParser("mistral", parse_mistral, make_id=mistral_call_id, keeps_special_tokens=True),
}


def get_tool_parser(name: str) -> ToolParser:
    if name not in TOOL_PARSERS:
        raise ValueError(f"unknown tool call parser {name!r}; nanovllm has {', '.join(TOOL_PARSERS)}")
    return TOOL_PARSERS[name]
