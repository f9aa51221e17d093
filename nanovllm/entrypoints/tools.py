"""A chat request's tools and reasoning, as vLLM serves them: the `tools` and `tool_choice` checked, the JSON schema
that makes "required" and named choices always produce a valid call (structured outputs), the messages made ready
for the chat template, and each choice's text turned into OpenAI's message (content, reasoning_content,
tool_calls) or, streamed, into its deltas.

How `tool_choice` is served:
- "none": the tools reach the template (the model may read them), nothing is parsed out of the answer;
- "auto": the server's --tool-call-parser reads the calls the model chose to write (needs
  --enable-auto-tool-choice, as in vLLM);
- "required": the answer is generated under a JSON schema, a list of {"name", "parameters"} objects, one per call;
- {"type": "function", "function": {"name": N}}: the answer is the arguments object of N, under N's schema."""

import copy
import json
from dataclasses import dataclass, field

from nanovllm.entrypoints.reasoning_parsers import ReasoningParser, get_reasoning_parser
from nanovllm.entrypoints.tool_parsers import (
    CallText,
    ParsedText,
    ToolParser,
    call_id,
    get_tool_parser,
    normal_arguments,
    parse_required,
)

AUTO_NEEDS_FLAGS = '"auto" tool choice requires --enable-auto-tool-choice and --tool-call-parser to be set'
JSON_TYPES = {"object", "array", "string", "number", "integer", "boolean", "null"}


class ToolRequestError(ValueError):
    """A 400 naming the request field at fault."""

    def __init__(self, message: str, param: str):
        super().__init__(message)
        self.param = param


@dataclass(frozen=True)
class ChatParsing:
    """The server's flags: --enable-auto-tool-choice, --tool-call-parser, --reasoning-parser."""

    enable_auto_tool_choice: bool = False
    tool_call_parser: str | None = None
    reasoning_parser: str | None = None

    def __post_init__(self) -> None:
        if self.enable_auto_tool_choice and not self.tool_call_parser:
            raise ValueError("--enable-auto-tool-choice needs --tool-call-parser NAME (as in vLLM)")
        if self.tool_call_parser:
            get_tool_parser(self.tool_call_parser)  # an unknown name fails at start-up, not per request
        if self.reasoning_parser:
            get_reasoning_parser(self.reasoning_parser)


@dataclass
class ToolPlan:
    """What one request asks of its tools: how the answer is read, and the schema that forces a call."""

    tools: list[dict]
    choice: str  # "none", "auto", "required" or "named"
    named: str | None = None  # the function a named tool_choice forces
    parallel: bool = True
    schema: dict | None = None  # the structured-output schema of "required" and named choices


def check_parameters(schema, where: str) -> None:
    """A tool's parameters must be a JSON schema: checked with jsonschema where it is installed, else its shape."""
    if not isinstance(schema, dict):
        raise ToolRequestError(f"{where}.parameters must be a JSON schema object, got {type(schema).__name__}", "tools")
    try:
        import jsonschema
    except ImportError:
        jsonschema = None
    if jsonschema is not None:
        try:
            jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator).check_schema(schema)
        except jsonschema.SchemaError as e:
            raise ToolRequestError(f"{where}.parameters is not a valid JSON schema: {e.message}", "tools") from None
        except Exception as e:  # a schema odd enough to break the checker itself ("$schema": [...], ...)
            raise ToolRequestError(f"{where}.parameters is not a valid JSON schema: {e!r}", "tools") from None
        return
    kinds = schema.get("type", "object")
    for kind in kinds if isinstance(kinds, list) else [kinds]:
        if kind not in JSON_TYPES:
            raise ToolRequestError(f"{where}.parameters has an unknown type {kind!r}", "tools")
    if not isinstance(schema.get("properties", {}), dict) or not isinstance(schema.get("required", []), list):
        raise ToolRequestError(f"{where}.parameters: properties must be an object and required a list", "tools")


def plan_tools(
    tools: list | None, tool_choice, parallel_tool_calls: bool | None, parsing: ChatParsing
) -> ToolPlan | None:
    """The request's tools checked against the server's flags; None when it has none (or only "none" of them)."""
    if not tools:
        if tool_choice not in (None, "none", "auto"):
            raise ToolRequestError(f"tool_choice {tool_choice!r} needs tools", "tool_choice")
        return None
    if not isinstance(tools, list):
        raise ToolRequestError("tools must be a list of {'type': 'function', 'function': {...}}", "tools")
    names = []
    for i, tool in enumerate(tools):
        where = f"tools[{i}]"
        fn = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(tool, dict) or tool.get("type", "function") != "function" or not isinstance(fn, dict):
            raise ToolRequestError(f"{where} must be {{'type': 'function', 'function': {{...}}}}", "tools")
        if not isinstance(fn.get("name"), str) or not fn["name"]:
            raise ToolRequestError(f"{where}.function.name must be a non-empty string", "tools")
        check_parameters(fn.get("parameters", {"type": "object"}), f"{where}.function")
        names.append(fn["name"])
    choice, named = tool_choice if tool_choice is not None else "auto", None
    if isinstance(choice, dict):
        fn = choice.get("function") if choice.get("type") == "function" else None
        named = fn.get("name") if isinstance(fn, dict) else None
        if not isinstance(named, str):
            raise ToolRequestError(
                "tool_choice must be 'none', 'auto', 'required' or {'type': 'function', 'function': {'name': ...}}",
                "tool_choice",
            )
        if named not in names:
            raise ToolRequestError(
                f"tool_choice names the function {named!r}, which is not in tools ({', '.join(names)})", "tool_choice"
            )
        choice = "named"
    elif choice not in ("none", "auto", "required"):
        raise ToolRequestError(
            f"tool_choice must be 'none', 'auto', 'required' or a named function, got {choice!r}", "tool_choice"
        )
    if choice == "auto" and not (parsing.enable_auto_tool_choice and parsing.tool_call_parser):
        # the field to blame: the tool_choice asked for, or (auto by default) the tools sent without the flags
        raise ToolRequestError(AUTO_NEEDS_FLAGS, "tools" if tool_choice is None else "tool_choice")
    plan = ToolPlan(tools=tools, choice=choice, named=named, parallel=parallel_tool_calls is not False)
    plan.schema = forced_schema(plan)
    return plan


def parameters_of(tool: dict) -> dict:
    return tool["function"].get("parameters") or {"type": "object", "properties": {}}


def forced_schema(plan: ToolPlan) -> dict | None:
    """The JSON schema the answer is generated under, as vLLM builds it: a named choice's own parameters, or for
    "required" a list of calls, each {"name": one of the tools, "parameters": that tool's}."""
    if plan.choice == "named":
        return next(parameters_of(t) for t in plan.tools if t["function"]["name"] == plan.named)
    if plan.choice != "required":
        return None
    defs: dict = {}
    variants = []
    for tool in plan.tools:
        params = copy.deepcopy(parameters_of(tool))
        for name, definition in params.pop("$defs", {}).items():  # refs point at the root's $defs
            if defs.setdefault(name, definition) != definition:
                raise ToolRequestError(f"two tools define $defs.{name} differently", "tools")
        variants.append(
            {
                "type": "object",
                "properties": {"name": {"type": "string", "enum": [tool["function"]["name"]]}, "parameters": params},
                "required": ["name", "parameters"],
            }
        )
    schema = {"type": "array", "minItems": 1, "items": {"type": "object", "anyOf": variants}}
    if not plan.parallel:
        schema["maxItems"] = 1
    if defs:
        schema["$defs"] = defs
    return schema


def template_messages(messages: list) -> list:
    """Messages as chat templates read them: an assistant's tool_calls arguments as objects, not JSON strings (the
    templates serialize them themselves), as vLLM passes them."""
    out = []
    for m in messages:
        if isinstance(m, dict) and isinstance(m.get("tool_calls"), list):
            m = {**m, "tool_calls": [with_object_arguments(c) for c in m["tool_calls"]]}
        out.append(m)
    return out


def with_object_arguments(call):
    fn = call.get("function") if isinstance(call, dict) else None
    if isinstance(fn, dict) and isinstance(fn.get("arguments"), str):
        try:
            return {**call, "function": {**fn, "arguments": json.loads(fn["arguments"])}}
        except ValueError:
            pass  # left as written: the template shows it as text
    return call


# ---- the answer -------------------------------------------------------------------------------------------
@dataclass
class Parsed:
    reasoning: str | None
    content: str | None
    calls: ParsedText


@dataclass
class ChoiceParser:
    """One choice's text read as reasoning, content and tool calls: its whole message, or its stream's deltas
    (each the difference between the parse of the text so far and what was sent)."""

    plan: ToolPlan | None
    tool_parser: ToolParser | None  # the server's, for "auto"
    reasoning: ReasoningParser | None
    prompt_state: str | None = None
    text: str = ""
    sent_reasoning: int = 0
    sent_content: int = 0
    sent_calls: list[dict] = field(default_factory=list)  # per streamed call: its id, the arguments' length sent
    message_calls: int = 0  # the calls of the whole answer's message

    def parse(self, final: bool) -> Parsed:
        reasoning, answer = None, self.text
        if self.reasoning is not None:
            reasoning, answer = self.reasoning.split(self.text, final, self.prompt_state)
            answer = answer or ""
        choice = self.plan.choice if self.plan else "none"
        if choice == "named":
            calls = ParsedText(calls=[])
            if answer.strip() or final:
                calls.calls.append(CallText(self.plan.named, answer.strip(), complete=final))
        elif choice == "required":
            calls = parse_required(answer, final)
        elif choice == "auto":
            calls = self.tool_parser.parse(answer, final)
        else:
            calls = ParsedText(content=answer)
        if self.plan and not self.plan.parallel:
            calls.calls = calls.calls[:1]
        return Parsed(reasoning, calls.content or None, calls)

    def make_id(self) -> str:
        return self.tool_parser.make_id() if self.tool_parser else call_id()

    def message(self, text: str) -> dict:
        """The whole answer's message."""
        self.text = text
        parsed = self.parse(final=True)
        message = {"role": "assistant", "content": parsed.content}
        if self.reasoning is not None:
            message["reasoning_content"] = parsed.reasoning
        if self.plan is not None and self.plan.choice != "none":
            message["tool_calls"] = [
                {
                    "id": self.make_id(),
                    "type": "function",
                    "function": {"name": c.name, "arguments": normal_arguments(c.arguments)},
                }
                for c in parsed.calls.calls
            ]
            self.message_calls = len(message["tool_calls"])
            if not message["tool_calls"] and message["content"] is None:
                message["content"] = ""
        elif message["content"] is None and self.reasoning is None:
            message["content"] = ""
        return message

    @property
    def calls_made(self) -> int:
        """The tool calls this choice's answer made (so far, when streamed)."""
        return len(self.sent_calls) or self.message_calls

    def fresh(self) -> "ChoiceParser":
        """A parser with the same settings for another choice."""
        return ChoiceParser(self.plan, self.tool_parser, self.reasoning, self.prompt_state)

    def delta(self, new_text: str, final: bool) -> dict:
        """The stream's delta for the text's new piece (final: the choice's last, held-back text released)."""
        self.text += new_text
        parsed = self.parse(final)
        delta: dict = {}
        if parsed.reasoning and len(parsed.reasoning) > self.sent_reasoning:
            delta["reasoning_content"] = parsed.reasoning[self.sent_reasoning :]
            self.sent_reasoning = len(parsed.reasoning)
        if parsed.content and len(parsed.content) > self.sent_content:
            delta["content"] = parsed.content[self.sent_content :]
            self.sent_content = len(parsed.content)
        pieces = []
        for index, call in enumerate(parsed.calls.calls):
            if call.name is None or not (call.arguments or call.complete):
                break  # shown once its arguments have begun as an object: a malformed call shows as content
            if index == len(self.sent_calls):  # the call's first delta: its id and name
                self.sent_calls.append({"id": self.make_id(), "arguments": 0})
                piece = {"index": index, "id": self.sent_calls[index]["id"], "type": "function"}
                piece["function"] = {"name": call.name, "arguments": call.arguments}
            else:
                sent = self.sent_calls[index]["arguments"]
                if len(call.arguments) <= sent:
                    continue
                piece = {"index": index, "function": {"arguments": call.arguments[sent:]}}
            self.sent_calls[index]["arguments"] = len(call.arguments)
            pieces.append(piece)
        if pieces:
            delta["tool_calls"] = pieces
        return delta


def choice_parser(plan: ToolPlan | None, parsing: ChatParsing, prompt_state: str | None) -> ChoiceParser | None:
    """The parser of each choice's text, or None when the text is shown as it is (no tools, no reasoning)."""
    reasoning = get_reasoning_parser(parsing.reasoning_parser) if parsing.reasoning_parser else None
    if (plan is None or plan.choice == "none") and reasoning is None:
        return None
    tool_parser = get_tool_parser(parsing.tool_call_parser) if plan and plan.choice == "auto" else None
    return ChoiceParser(plan, tool_parser, reasoning, prompt_state)
