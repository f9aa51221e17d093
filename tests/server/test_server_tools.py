"""Tool calling and reasoning through `nanovllm serve --enable-auto-tool-choice --tool-call-parser hermes
--reasoning-parser qwen3` on the embedded SmolLM2, driven by the openai client: "required" and named tool_choice
always give calls whose arguments validate (structured outputs), streamed in pieces; the follow-up turn with a
`tool` message goes through the template; "auto" reads the calls the model writes; thinking goes to
reasoning_content; bad tool requests are 400s naming the field, and the engine keeps serving."""

import json
import os

import httpx2 as httpx
import jsonschema
import openai
import pytest
from conftest import serve_in_thread, start_server, stop_server

from nanovllm.engine.async_engine import AsyncEngine
from nanovllm.engine.llm_engine import LLMEngine
from nanovllm.engine_args import engine_config
from nanovllm.entrypoints.server import build_app

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The current weather in a city",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "enum": ["Paris", "London", "Tokyo"]},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
            },
            "required": ["city", "unit"],
        },
    },
}
TIME = {
    "type": "function",
    "function": {
        "name": "get_time",
        "description": "The time now in a time zone",
        "parameters": {
            "type": "object",
            "properties": {"utc_offset": {"type": "integer", "minimum": -12, "maximum": 14}},
            "required": ["utc_offset"],
        },
    },
}
TOOLS = [WEATHER, TIME]
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
ASK = [{"role": "user", "content": "What is the weather in Paris, in celsius?"}]
# a template that opens <think> in the prompt, closed at once when enable_thinking is false (as Qwen3's does)
THINKING_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n<think>\n"
    "{% if enable_thinking is defined and not enable_thinking %}\n</think>\n\n{% endif %}{% endif %}"
)


@pytest.fixture(scope="module")
def server():
    proc, url = start_server(
        [
            *("--dtype", "float32", "--max-model-len", "1024", "--kv-cache-gib", "0.5"),
            *("--enable-auto-tool-choice", "--tool-call-parser", "hermes", "--reasoning-parser", "qwen3"),
        ],
        env=os.environ.copy(),
        timeout=600,  # a loaded machine loads the model slowly
    )
    yield url
    stop_server(proc)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server + "/v1", api_key="none", max_retries=0, timeout=600)


def chat(client, **kw):
    kw = {"temperature": 0, "max_tokens": 40, **kw}
    return client.chat.completions.create(model="SmolLM2-135M-Instruct", **kw)


def joined_stream(chunks) -> tuple[str, dict[int, dict], list[str], int]:
    """(content, calls by index {id, name, arguments}, finish reasons, how many deltas carried arguments)."""
    content, calls, finishes, argument_deltas = "", {}, [], 0
    for chunk in chunks:
        for c in chunk.choices:
            content += c.delta.content or ""
            for tc in c.delta.tool_calls or []:
                slot = calls.setdefault(tc.index, {"id": None, "name": None, "arguments": ""})
                if tc.id:
                    slot["id"], slot["name"] = tc.id, tc.function.name
                if tc.function and tc.function.arguments:
                    slot["arguments"] += tc.function.arguments
                    argument_deltas += 1
            if c.finish_reason:
                finishes.append(c.finish_reason)
    return content, calls, finishes, argument_deltas


def assert_valid(name: str, arguments: str) -> dict:
    args = json.loads(arguments)
    jsonschema.validate(args, SCHEMAS[name])
    return args


def test_required_gives_calls_that_validate(client):
    out = chat(client, messages=ASK, tools=TOOLS, tool_choice="required")
    choice = out.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.tool_calls
    for call in choice.message.tool_calls:
        assert call.type == "function" and call.id.startswith("chatcmpl-tool-")
        assert_valid(call.function.name, call.function.arguments)
    # one call only when parallel calls are off (the schema's list holds one item)
    single = chat(client, messages=ASK, tools=TOOLS, tool_choice="required", parallel_tool_calls=False)
    assert len(single.choices[0].message.tool_calls) == 1


def test_named_choice_streams_its_arguments_in_pieces(client):
    named = {"type": "function", "function": {"name": "get_time"}}
    whole = chat(client, messages=ASK, tools=TOOLS, tool_choice=named)
    (call,) = whole.choices[0].message.tool_calls
    assert call.function.name == "get_time" and whole.choices[0].finish_reason == "tool_calls"
    args = assert_valid("get_time", call.function.arguments)
    content, calls, finishes, argument_deltas = joined_stream(
        chat(client, messages=ASK, tools=TOOLS, tool_choice=named, stream=True)
    )
    assert content == "" and finishes == ["tool_calls"] and argument_deltas > 1
    assert calls[0]["name"] == "get_time" and calls[0]["id"]
    assert assert_valid("get_time", calls[0]["arguments"]) == args  # streamed as generated, whole re-serialized


def test_streamed_required_equals_whole(client):
    whole = chat(client, messages=ASK, tools=TOOLS, tool_choice="required").choices[0].message.tool_calls
    _, calls, finishes, _ = joined_stream(chat(client, messages=ASK, tools=TOOLS, tool_choice="required", stream=True))
    assert finishes == ["tool_calls"]
    assert [(c["name"], json.loads(c["arguments"])) for _, c in sorted(calls.items())] == [
        (c.function.name, json.loads(c.function.arguments)) for c in whole
    ]


def test_two_turns_with_a_tool_message(client, server):
    first = chat(client, messages=ASK, tools=TOOLS, tool_choice="required", parallel_tool_calls=False)
    call = first.choices[0].message.tool_calls[0]
    messages = [
        *ASK,
        first.choices[0].message.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": call.id, "content": "Sunny, 24 degrees."},
    ]
    second = chat(client, messages=messages, tools=TOOLS, tool_choice="none")
    assert second.choices[0].finish_reason in ("stop", "length") and second.choices[0].message.content
    assert not second.choices[0].message.tool_calls
    # the tool's answer reached the prompt through the chat template
    prompt = httpx.post(server + "/tokenize", json={"messages": messages[:1] + messages[2:]}).json()["tokens"]
    assert second.usage.prompt_tokens > len(prompt)


HERMES_CALL = r'Sure\. <tool_call>\n\{"name": "get_time", "arguments": \{"utc_offset": [1-9]\}\}\n</tool_call>'


def test_auto_reads_the_calls_the_model_writes(client):
    """The embedded model's template does not show tools, so a regex makes it write a hermes call: "auto" reads
    it out, the text before it stays content, streamed or not. (Thinking is off, closed in the prompt: else the
    grammar would let the model think first, and a 135M model may think past max_tokens.)"""
    no_thinking = {"chat_template": THINKING_TEMPLATE, "chat_template_kwargs": {"enable_thinking": False}}
    kw = dict(messages=ASK, tools=TOOLS, max_tokens=60)
    kw["extra_body"] = {"structured_outputs": {"regex": HERMES_CALL}, **no_thinking}
    whole = chat(client, **kw).choices[0]
    assert whole.finish_reason == "tool_calls" and whole.message.content == "Sure."
    (call,) = whole.message.tool_calls
    assert call.function.name == "get_time" and assert_valid("get_time", call.function.arguments)
    content, calls, finishes, _ = joined_stream(chat(client, stream=True, **kw))
    assert content == "Sure." and finishes == ["tool_calls"]
    assert json.loads(calls[0]["arguments"]) == json.loads(call.function.arguments)
    # a call that is not JSON comes back as plain content
    bad = chat(
        client,
        **{
            **kw,
            "extra_body": {
                "structured_outputs": {"regex": r"<tool_call>\nweather\(Paris\)\n</tool_call>"},
                **no_thinking,
            },
        },
    )
    assert bad.choices[0].message.content == "<tool_call>\nweather(Paris)\n</tool_call>"
    assert not bad.choices[0].message.tool_calls and bad.choices[0].finish_reason == "stop"
    # no tool call written: plain content
    plain = chat(client, messages=ASK, tools=TOOLS, max_tokens=12).choices[0]
    assert plain.message.content and not plain.message.tool_calls and plain.finish_reason == "length"


def test_reasoning_content_and_enable_thinking(client):
    thinking = chat(client, messages=ASK, max_tokens=16, extra_body={"chat_template": THINKING_TEMPLATE}).choices[0]
    assert thinking.message.model_extra["reasoning_content"] and thinking.message.content is None
    off = chat(
        client,
        messages=ASK,
        max_tokens=16,
        extra_body={"chat_template": THINKING_TEMPLATE, "chat_template_kwargs": {"enable_thinking": False}},
    ).choices[0]
    assert off.message.content and off.message.model_extra["reasoning_content"] is None
    stream = chat(client, messages=ASK, max_tokens=16, stream=True, extra_body={"chat_template": THINKING_TEMPLATE})
    reasoning = "".join(
        (c.delta.model_extra or {}).get("reasoning_content") or "" for chunk in stream for c in chunk.choices
    )
    assert reasoning == thinking.message.model_extra["reasoning_content"]


@pytest.mark.parametrize(
    "body, param, words",
    [
        ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice", "'nope'"),
        ({"tools": TOOLS, "tool_choice": "always"}, "tool_choice", "'always'"),
        (
            {"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "objekt"}}}]},
            "tools",
            "not a valid JSON schema",
        ),
        ({"tools": [{"type": "function", "function": {"parameters": {}}}]}, "tools", "function.name"),
        (
            {"tools": TOOLS, "tool_choice": "required", "response_format": {"type": "json_object"}},
            "response_format",
            "tool_choice",
        ),
    ],
)
def test_bad_tool_requests_are_400s_naming_the_field(server, client, body, param, words):
    r = httpx.post(server + "/v1/chat/completions", json={"messages": ASK, **body}, timeout=60)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == param and words in error["message"]
    assert chat(client, messages=ASK, max_tokens=2).choices[0].message.content  # still serving


def test_tools_on_completions_are_refused(server):
    r = httpx.post(server + "/v1/completions", json={"prompt": "hi", "tools": TOOLS}, timeout=60)
    assert r.status_code == 400 and r.json()["error"]["param"] == "tools"


def test_auto_without_the_flags_is_vllms_400(model_path):
    engine = AsyncEngine(LLMEngine(engine_config(model_path, dtype="float32", max_model_len=128, kv_cache_gib=0.05)))
    server, thread, url = serve_in_thread(build_app(engine, "tiny"))
    try:
        r = httpx.post(url + "/v1/chat/completions", json={"messages": ASK, "tools": TOOLS}, timeout=60)
        assert r.status_code == 400
        assert r.json()["error"]["message"] == (
            '"auto" tool choice requires --enable-auto-tool-choice and --tool-call-parser to be set'
        )
        r = httpx.post(
            url + "/v1/chat/completions",
            json={"messages": ASK, "tools": TOOLS, "tool_choice": "required", "max_tokens": 60},
            timeout=60,
        )
        assert r.status_code == 200  # "required" needs no parser: the grammar writes the calls
        message = r.json()["choices"][0]
        assert message["finish_reason"] in ("tool_calls", "length")
    finally:
        server.should_exit = True
        thread.join(10)
