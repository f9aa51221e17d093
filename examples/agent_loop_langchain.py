"""An agent loop of LangChain's ChatOpenAI against `nanovllm serve`, unchanged from what it would run against
vLLM: the model calls a tool (bind_tools), the tool's result goes back as a ToolMessage, and the model answers.

    pip install langchain-openai
    python examples/agent_loop_langchain.py                  # starts `nanovllm serve` on the embedded model
    python examples/agent_loop_langchain.py --base-url URL   # or uses a server already running

The embedded SmolLM2-135M's chat template does not show tools to the model, so the call is forced with
tool_choice="required" (served under a JSON schema: the call always parses); a model whose template shows tools,
served with --enable-auto-tool-choice --tool-call-parser NAME, would choose it with tool_choice="auto"."""

import argparse
import json
import socket
import subprocess
import sys
import time
import urllib.request

from langchain_core.messages import HumanMessage, ToolMessage
from langchain_core.tools import tool
from langchain_openai import ChatOpenAI


@tool
def get_weather(city: str) -> str:
    """The current weather in a city."""
    return json.dumps({"city": city, "sky": "sunny", "celsius": 24})


def start_server() -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    args = ["serve", "--port", str(port), "--max-model-len", "2048", "--kv-cache-gib", "0.5"]
    args += ["--enable-auto-tool-choice", "--tool-call-parser", "hermes"]
    proc = subprocess.Popen([sys.executable, "-m", "nanovllm.entrypoints.cli", *args])
    url = f"http://127.0.0.1:{port}"
    while True:
        try:
            if urllib.request.urlopen(url + "/health", timeout=1).status == 200:
                return proc, url + "/v1"
        except OSError:
            if proc.poll() is not None:
                sys.exit("the server did not start")
            time.sleep(0.5)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base-url", default=None, help="a running server's /v1 (default: start one)")
    parser.add_argument("--model", default="SmolLM2-135M-Instruct")
    args = parser.parse_args()
    proc, base_url = (None, args.base_url) if args.base_url else start_server()
    try:
        llm = ChatOpenAI(model=args.model, base_url=base_url, api_key="none", temperature=0, max_tokens=64)
        messages = [HumanMessage("What is the weather in Paris?")]
        asked = llm.bind_tools([get_weather], tool_choice="required").invoke(messages)
        print("tool calls:", asked.tool_calls)
        messages.append(asked)
        for call in asked.tool_calls:  # run each tool, hand its result back
            result = get_weather.invoke(call["args"])
            print(f"{call['name']}({call['args']}) -> {result}")
            messages.append(ToolMessage(result, tool_call_id=call["id"]))
        answer = llm.bind_tools([get_weather], tool_choice="none").invoke(messages)
        print("answer:", answer.content)
        assert asked.tool_calls and asked.tool_calls[0]["name"] == "get_weather" and answer.content
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(10)


if __name__ == "__main__":
    main()
