"""The tool-call and reasoning parsers on recorded model outputs: each complete text gives the message vLLM gives
for it (content, reasoning_content, tool_calls with JSON-string arguments), and the same text streamed piece by
piece (one character, or a few) joins up to the same message; malformed calls are plain content."""

import json

import pytest

from nanovllm.entrypoints.reasoning_parsers import get_reasoning_parser, prompt_state
from nanovllm.entrypoints.tool_parsers import TOOL_PARSERS, get_tool_parser
from nanovllm.entrypoints.tools import ChatParsing, ChoiceParser, ToolPlan, forced_schema, plan_tools

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "unit": {"type": "string", "enum": ["c", "f"]}},
            "required": ["city"],
        },
    },
}
TIME = {
    "type": "function",
    "function": {"name": "get_time", "parameters": {"type": "object", "properties": {"tz": {"type": "string"}}}},
}


def call(name: str, **args) -> tuple[str, dict]:
    return name, args


# (parser, the model's text, content, [(name, arguments)]) as vLLM's parsers return them for that text
RECORDED = [
    (
        "hermes",
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "c"}}\n</tool_call>',
        None,
        [call("get_weather", city="Paris", unit="c")],
    ),
    (
        "hermes",  # Qwen2.5's parallel calls, text before them
        'Let me check both.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>\n'
        '<tool_call>\n{"name": "get_time", "arguments": {"tz": "Europe/Oslo"}}\n</tool_call>',
        "Let me check both.",
        [call("get_weather", city="Oslo"), call("get_time", tz="Europe/Oslo")],
    ),
    (
        "hermes",  # stopped right after the JSON: the block is left open
        '<tool_call>\n{"name": "get_time", "arguments": {"tz": "UTC \\"Z\\" {}"}}',
        None,
        [call("get_time", tz='UTC "Z" {}')],
    ),
    ("hermes", "The weather is fine today.", "The weather is fine today.", []),
    (
        "hermes",  # not JSON: all content
        "Sure <tool_call>\nget_weather(Paris)\n</tool_call>",
        "Sure <tool_call>\nget_weather(Paris)\n</tool_call>",
        [],
    ),
    (
        "hermes",  # no name: all content
        '<tool_call>{"arguments": {"city": "Rome"}}</tool_call>',
        '<tool_call>{"arguments": {"city": "Rome"}}</tool_call>',
        [],
    ),
    (
        "hermes",  # arguments not an object
        '<tool_call>{"name": "get_weather", "arguments": "Rome"}</tool_call>',
        '<tool_call>{"name": "get_weather", "arguments": "Rome"}</tool_call>',
        [],
    ),
    (
        "llama3_json",
        '{"name": "get_weather", "parameters": {"city": "San Francisco, CA", "unit": "f"}}',
        None,
        [call("get_weather", city="San Francisco, CA", unit="f")],
    ),
    (
        "llama3_json",
        '<|python_tag|>{"name": "get_weather", "parameters": {"city": "Lima"}}; '
        '{"name": "get_time", "parameters": {"tz": "America/Lima"}}',
        None,
        [call("get_weather", city="Lima"), call("get_time", tz="America/Lima")],
    ),
    ("llama3_json", "It is sunny in Lima.", "It is sunny in Lima.", []),
    ("llama3_json", '{"city": "Lima"}', '{"city": "Lima"}', []),  # JSON, but not a call
    (
        "mistral",
        '[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Paris"}}, '
        '{"name": "get_time", "arguments": {"tz": "CET"}}]',
        None,
        [call("get_weather", city="Paris"), call("get_time", tz="CET")],
    ),
    (
        "mistral",  # tokenizer v11+: name[ARGS]{...}, each call after its own [TOOL_CALLS]
        'Checking.[TOOL_CALLS]get_weather[ARGS]{"city": "Nice"}[TOOL_CALLS]get_time[ARGS]{"tz": "CET"}',
        "Checking.",
        [call("get_weather", city="Nice"), call("get_time", tz="CET")],
    ),
    ("mistral", '[TOOL_CALLS]get_weather{"city": "Nice"}', None, [call("get_weather", city="Nice")]),
    ("mistral", "[TOOL_CALLS][{oops", "[TOOL_CALLS][{oops", []),
    ("mistral", "No tools needed [TOOL", "No tools needed [TOOL", []),
]


def chunks(text: str, size: int) -> list[str]:
    return [text[i : i + size] for i in range(0, len(text), size)]


def stream(parser: ChoiceParser, pieces: list[str]) -> dict:
    """The deltas of a stream joined as the openai client joins them."""
    joined = {"content": "", "reasoning_content": "", "tool_calls": {}}
    for i, piece in enumerate(pieces):
        delta = parser.delta(piece, final=i == len(pieces) - 1)
        joined["content"] += delta.get("content", "")
        joined["reasoning_content"] += delta.get("reasoning_content", "")
        for tc in delta.get("tool_calls", []):
            slot = joined["tool_calls"].setdefault(tc["index"], {"name": None, "arguments": "", "id": None})
            if "id" in tc:
                assert slot["id"] is None, "a call's id and name come once, in its first delta"
                slot["id"], slot["name"] = tc["id"], tc["function"]["name"]
            slot["arguments"] += tc["function"].get("arguments", "")
    return joined


def auto_parser(name: str, reasoning: str | None = None, state: str | None = None) -> ChoiceParser:
    plan = ToolPlan(tools=[WEATHER, TIME], choice="auto")
    return ChoiceParser(plan, get_tool_parser(name), reasoning and get_reasoning_parser(reasoning), state)


@pytest.mark.parametrize("name, text, content, calls", RECORDED)
def test_recorded_outputs(name, text, content, calls):
    message = auto_parser(name).message(text)
    assert message["content"] == content
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in message["tool_calls"]] == calls
    for c in message["tool_calls"]:
        assert c["type"] == "function" and c["id"]
        assert c["function"]["arguments"] == json.dumps(json.loads(c["function"]["arguments"]))  # vLLM's spacing
    if name == "mistral":
        assert all(len(c["id"]) == 9 and c["id"].isalnum() for c in message["tool_calls"])
    # vLLM's offline entry point on the same text
    extracted = get_tool_parser(name).extract_tool_calls(text)
    assert extracted.tools_called == bool(calls) and extracted.content == content
    for size in (1, 3, 7):
        joined = stream(auto_parser(name), chunks(text, size))
        assert joined["content"] == (content or ""), size
        got = [(c["name"], json.loads(c["arguments"])) for _, c in sorted(joined["tool_calls"].items())]
        assert got == calls, size


def test_streamed_arguments_come_in_pieces():
    text = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "c"}}\n</tool_call>'
    parser = auto_parser("hermes")
    deltas = [parser.delta(piece, final=False) for piece in chunks(text, 2)] + [parser.delta("", final=True)]
    calls = [tc for d in deltas for tc in d.get("tool_calls", [])]
    assert calls[0]["function"]["name"] == "get_weather" and calls[0]["index"] == 0
    assert len(calls) > 5 and all("id" not in tc for tc in calls[1:])  # the arguments follow in many pieces
    assert not any("content" in d for d in deltas)  # the markers never leak as content
    assert "".join(tc["function"]["arguments"] for tc in calls) == '{"city": "Paris", "unit": "c"}'


def test_text_held_back_only_while_it_may_be_a_marker():
    parser = auto_parser("hermes")
    assert parser.delta("Hi <tool_", final=False) == {"content": "Hi"}  # the space may end the content
    assert parser.delta("box> there", final=False) == {"content": " <tool_box> there"}


def test_parallel_tool_calls_false_keeps_the_first():
    plan = ToolPlan(tools=[WEATHER, TIME], choice="auto", parallel=False)
    text = RECORDED[1][1]
    message = ChoiceParser(plan, get_tool_parser("hermes"), None).message(text)
    assert [c["function"]["name"] for c in message["tool_calls"]] == ["get_weather"]
    assert len(stream(ChoiceParser(plan, get_tool_parser("hermes"), None), chunks(text, 4))["tool_calls"]) == 1


# ---- reasoning ---------------------------------------------------------------------------------------------
REASONING = [
    # (parser, text, prompt state, reasoning, content) as vLLM's qwen3 / deepseek_r1 parsers split them
    ("qwen3", "<think>\nThe user asks 2+2.\n</think>\n\n4", None, "\nThe user asks 2+2.\n", "\n\n4"),
    ("qwen3", "4", None, None, "4"),  # enable_thinking=False: no <think> in the answer
    ("qwen3", "4", "closed", None, "4"),
    ("qwen3", "Let me think.</think>4", "open", "Let me think.", "4"),  # the template opened <think>
    ("qwen3", "<think>cut short by max_tokens", None, "cut short by max_tokens", None),
    ("deepseek_r1", "Hmm, 2+2.</think>The answer is 4.", None, "Hmm, 2+2.", "The answer is 4."),
    ("deepseek_r1", "<think>Hmm.</think>4", None, "Hmm.", "4"),
    ("deepseek_r1", "still thinking", None, "still thinking", None),
]


@pytest.mark.parametrize("name, text, state, reasoning, content", REASONING)
def test_reasoning_split(name, text, state, reasoning, content):
    parser = get_reasoning_parser(name)
    assert parser.split(text, prompt_state=state) == (reasoning, content)
    if state is None:
        assert parser.extract_reasoning(text) == (reasoning, content)
    message = ChoiceParser(None, None, parser, state).message(text)
    assert (message["reasoning_content"], message["content"]) == (reasoning, content)
    for size in (1, 4):
        joined = stream(ChoiceParser(None, None, parser, state), chunks(text, size))
        assert (joined["reasoning_content"], joined["content"]) == (reasoning or "", content or ""), size


def test_prompt_state_from_the_templates_tail():
    assert prompt_state("<|im_start|>assistant\n<think>\n\n</think>\n\n") == "closed"  # Qwen3, thinking off
    assert prompt_state("<｜Assistant｜><think>\n") == "open"  # DeepSeek-R1
    assert prompt_state("<|im_start|>assistant\n") is None


def test_tool_calls_after_reasoning():
    call = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Bern"}}\n</tool_call>'
    text = "<think>Weather needs a tool.</think>\n\n" + call
    message = auto_parser("hermes", "qwen3").message(text)
    assert message["reasoning_content"] == "Weather needs a tool."
    assert message["content"] is None and json.loads(message["tool_calls"][0]["function"]["arguments"]) == {
        "city": "Bern"
    }
    joined = stream(auto_parser("hermes", "qwen3"), chunks(text, 3))
    assert joined["reasoning_content"] == "Weather needs a tool." and joined["content"] == ""
    assert joined["tool_calls"][0]["name"] == "get_weather"


# ---- required and named choices -----------------------------------------------------------------------------
def test_required_and_named_schemas_as_vllm_builds_them():
    plan = plan_tools([WEATHER, TIME], "required", None, ChatParsing())
    schema = forced_schema(plan)
    assert schema["type"] == "array" and schema["minItems"] == 1 and "maxItems" not in schema
    names = [v["properties"]["name"]["enum"] for v in schema["items"]["anyOf"]]
    assert names == [["get_weather"], ["get_time"]]
    assert schema["items"]["anyOf"][0]["properties"]["parameters"] == WEATHER["function"]["parameters"]
    assert forced_schema(plan_tools([WEATHER, TIME], "required", False, ChatParsing()))["maxItems"] == 1
    named = plan_tools([WEATHER, TIME], {"type": "function", "function": {"name": "get_time"}}, None, ChatParsing())
    assert named.choice == "named" and named.schema == TIME["function"]["parameters"]


def test_required_and_named_answers_read_as_calls():
    plan = plan_tools([WEATHER, TIME], "required", None, ChatParsing())
    text = (
        '[{"name": "get_time", "parameters": {"tz": "UTC"}}, {"name": "get_weather", "parameters": {"city": "Rome"}}]'
    )
    message = ChoiceParser(plan, None, None).message(text)
    assert [c["function"]["name"] for c in message["tool_calls"]] == ["get_time", "get_weather"]
    assert message["content"] is None
    joined = stream(ChoiceParser(plan, None, None), chunks(text, 2))
    assert [json.loads(c["arguments"]) for c in joined["tool_calls"].values()] == [{"tz": "UTC"}, {"city": "Rome"}]
    named = plan_tools([WEATHER], {"type": "function", "function": {"name": "get_weather"}}, None, ChatParsing())
    message = ChoiceParser(named, None, None).message('{ "city": "Rome" }')
    assert message["tool_calls"][0]["function"] == {"name": "get_weather", "arguments": '{"city": "Rome"}'}
    joined = stream(ChoiceParser(named, None, None), chunks('{ "city": "Rome" }', 3))
    assert joined["tool_calls"][0]["name"] == "get_weather"
    assert json.loads(joined["tool_calls"][0]["arguments"]) == {"city": "Rome"}


@pytest.mark.parametrize(
    "tools, choice, parsing, param, words",
    [
        ([WEATHER], "auto", ChatParsing(), "tool_choice", "--enable-auto-tool-choice and --tool-call-parser"),
        ([WEATHER], {"type": "function", "function": {"name": "nope"}}, ChatParsing(), "tool_choice", "'nope'"),
        ([WEATHER], "sometimes", ChatParsing(), "tool_choice", "'sometimes'"),
        ([WEATHER], {"type": "function"}, ChatParsing(), "tool_choice", "{'name': ...}"),
        ([WEATHER], {"type": "function", "function": ["f"]}, ChatParsing(), "tool_choice", "{'name': ...}"),
        (
            [{"type": "function", "function": {"name": "f", "parameters": {"$schema": [1]}}}],
            "required",
            ChatParsing(),
            "tools",
            "not a valid JSON schema",
        ),
        (
            [{"type": "function", "function": {"name": "f", "parameters": {"type": "objekt"}}}],
            "required",
            ChatParsing(),
            "tools",
            "tools[0].function.parameters",
        ),
        (
            [{"type": "function", "function": {"name": "f", "parameters": 3}}],
            "required",
            ChatParsing(),
            "tools",
            "got int",
        ),
        ([{"type": "function", "function": {}}], "required", ChatParsing(), "tools", "tools[0].function.name"),
        ([{"type": "retrieval"}], "required", ChatParsing(), "tools", "tools[0]"),
        ([], "required", ChatParsing(), "tool_choice", "needs tools"),
    ],
)
def test_bad_tool_requests_name_the_field(tools, choice, parsing, param, words):
    from nanovllm.entrypoints.tools import ToolRequestError

    with pytest.raises(ToolRequestError) as e:
        plan_tools(tools, choice, None, parsing)
    assert e.value.param == param and words in str(e.value)


def test_server_flags_checked_at_start_up():
    assert set(TOOL_PARSERS) >= {"hermes", "llama3_json", "mistral"}
    with pytest.raises(ValueError, match="--tool-call-parser"):
        ChatParsing(enable_auto_tool_choice=True)
    with pytest.raises(ValueError, match="unknown tool call parser 'pythonic'"):
        ChatParsing(True, "pythonic")
    with pytest.raises(ValueError, match="unknown reasoning parser"):
        ChatParsing(reasoning_parser="o1")
    assert plan_tools([WEATHER], "auto", None, ChatParsing(True, "hermes")).choice == "auto"
    assert plan_tools([WEATHER], "none", None, ChatParsing()).choice == "none"  # no flags needed


@pytest.mark.parametrize(
    "name, state, accepted",
    [
        ("qwen3", None, [True, True, False, False]),  # may think first, or answer at once
        ("qwen3", "open", [False, True, True, False]),  # the template opened <think>: reasoning first
        ("qwen3", "closed", [True, False, False, False]),  # enable_thinking=False: the answer at once
        ("deepseek_r1", None, [False, True, True, False]),
    ],
)
def test_structured_answer_after_the_reasoning(name, state, accepted):
    """The constraint (here a JSON schema) applies to the answer after </think>, not to the reasoning."""
    import xgrammar as xgr

    from nanovllm.entrypoints.reasoning_parsers import answer_after_reasoning
    from nanovllm.sampling_params import StructuredOutputsParams

    params = StructuredOutputsParams(
        json={"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]},
        disable_any_whitespace=True,
    )
    prefix = get_reasoning_parser(name).grammar_prefix(state)
    assert (prefix is None) == (state == "closed")
    grammar = answer_after_reasoning(params, prefix).grammar if prefix else None
    compiler = xgr.GrammarCompiler(xgr.TokenizerInfo(["a", "b"]))

    def accepts(text: str) -> bool:
        compiled = compiler.compile_grammar(grammar) if grammar else compiler.compile_json_schema(params.json)
        matcher = xgr.GrammarMatcher(compiled)
        return matcher.accept_string(text) and matcher.is_completed()

    texts = ['{"a": 1}', '<think>a plan</think>\n\n{"a": 1}', 'a plan</think>{"a": 1}', 'a plan</think>{"a": x}']
    assert [accepts(t) for t in texts] == accepted


def test_offline_chat_shows_tools_to_the_template(llm):
    """LLM.chat(..., tools=[...], chat_template_kwargs=...) as vLLM's: the tools and the kwargs reach the template,
    an earlier call's JSON-string arguments reach it as an object."""
    template = (
        "{% if tools %}TOOLS:{{ tools | map(attribute='function.name') | join(',') }}\n{% endif %}"
        "{% if enable_thinking is defined %}THINK:{{ enable_thinking }}\n{% endif %}"
        "{% for m in messages %}{{ m['role'] }}:{{ m['content'] or '' }}"
        "{% for c in m.get('tool_calls') or [] %}CALL:{{ c.function.name }}(city={{ c.function.arguments.city }})"
        "{% endfor %}\n{% endfor %}"
    )
    messages = [
        {"role": "user", "content": "Weather?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}
            ],
        },
        {"role": "tool", "tool_call_id": "c1", "content": "rain"},
    ]
    from nanovllm import SamplingParams

    out = llm.chat(
        messages,
        SamplingParams(max_tokens=1),
        use_tqdm=False,
        chat_template=template,
        tools=[WEATHER, TIME],
        chat_template_kwargs={"enable_thinking": False},
    )[0]
    prompt = llm.tokenizer.decode(out.prompt_token_ids)
    assert "TOOLS:get_weather,get_time\nTHINK:False\n" in prompt
    assert "CALL:get_weather(city=Oslo)" in prompt and "tool:rain" in prompt
