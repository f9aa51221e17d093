"""`nanovllm generate | chat | serve`: one CLI; errors are one line on stderr, not a traceback."""

import argparse
import json
import os
import sys

from nanovllm.entrypoints.reasoning_parsers import REASONING_PARSERS
from nanovllm.entrypoints.tool_parsers import TOOL_PARSERS


def add_engine_args(p: argparse.ArgumentParser, engine_seed: bool = False) -> None:
    """The engine's knobs under vLLM's flag names, in vLLM's groups; the flags vLLM has and nanovllm need not
    act on are accepted (docs/from-vllm.md), and the values it does not support are refused by engine_args.
    engine_seed: --seed seeds the engine (serve), where generate and chat take it as the requests' seed."""
    m = p.add_argument_group("ModelConfig")
    m.add_argument("--model", default=None, help="HF folder or .gguf file (default: embedded SmolLM2-135M-Instruct)")
    m.add_argument("--tokenizer", default=None, help="a tokenizer folder (default: the model's own)")
    m.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16", "half", "float"])
    m.add_argument("--max-model-len", type=int, default=None)
    m.add_argument(
        "--quantization",
        "-q",
        default=None,
        help="a GGUF file on CPU: 'gguf' (the default) keeps its quantized weights, 'gguf_int8' too with "
        "activations in int8 (llama.cpp's numerics, faster in batches), 'dequantize' loads floats",
    )
    if engine_seed:
        m.add_argument("--seed", dest="engine_seed", type=int, default=0)
    m.add_argument("--enforce-eager", action="store_true", help="CUDA: no CUDA graphs for decode steps")
    m.add_argument("--trust-remote-code", action="store_true", help="accepted: no checkpoint code is ever run")
    m.add_argument("--max-logprobs", type=int, default=20, help="the most logprobs a request may ask for (-1: all)")
    m.add_argument(
        "--generation-config",
        default="auto",
        help="'auto': sampling defaults from the model's generation_config.json; 'vllm': none; or a "
        "folder holding a generation_config.json",
    )
    c = p.add_argument_group("CacheConfig")
    c.add_argument("--block-size", type=int, default=16)
    c.add_argument("--kv-cache-gib", type=float, default=4.0, help="CPU: the KV pool's size per process")
    c.add_argument("--kv-cache-dtype", default="auto", help="'auto' only: the model's dtype")
    c.add_argument("--gpu-memory-utilization", type=float, default=0.9, help="CUDA: share of the GPU to use")
    c.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction, default=True)
    c.add_argument("--no-prefix-caching", dest="enable_prefix_caching", action="store_false", help=argparse.SUPPRESS)
    s = p.add_argument_group("SchedulerConfig")
    s.add_argument(
        "--max-num-seqs",
        type=int,
        default=None,
        help="default: generate, the number of prompts; chat, 1; serve, 256 (the KV pool is sized by it)",
    )
    s.add_argument("--max-num-batched-tokens", type=int, default=None, help="per-step token budget (default 2048)")
    s.add_argument("--enable-chunked-prefill", action=argparse.BooleanOptionalAction, default=True)
    s.add_argument("--async-scheduling", action="store_true", help="schedule step N+1 while step N runs")
    q = p.add_argument_group("ParallelConfig")
    q.add_argument(
        "--tensor-parallel-size",
        "-tp",
        type=int,
        default=1,
        help="split the model over this many processes (GPUs on CUDA)",
    )
    q.add_argument("--num-threads", type=int, default=None, help="CPU threads for torch per process")
    v = p.add_argument_group("VllmConfig")
    v.add_argument(
        "--speculative-config",
        "-sc",
        type=json.loads,
        default=None,
        help='speculative decoding, as JSON: {"method": "ngram", "num_speculative_tokens": 4, '
        '"prompt_lookup_max": 4, "prompt_lookup_min": 2} or {"model": DRAFT, '
        '"num_speculative_tokens": 4}',
    )
    v.add_argument(
        "--logits-processors",
        nargs="+",
        default=None,
        metavar="MODULE:CLASS",
        help="logits processors to load (vLLM's interface, nanovllm.logits_processor); a request passes them "
        "arguments in vllm_xargs",
    )


# the flags add_engine_args adds that go to the engine under their own names
ENGINE_FLAGS = (
    "tokenizer",
    "dtype",
    "max_model_len",
    "max_num_batched_tokens",
    "enable_chunked_prefill",
    "block_size",
    "kv_cache_gib",
    "kv_cache_dtype",
    "enable_prefix_caching",
    "num_threads",
    "tensor_parallel_size",
    "gpu_memory_utilization",
    "enforce_eager",
    "trust_remote_code",
    "generation_config",
    "async_scheduling",
    "max_logprobs",
    "speculative_config",
    "quantization",
    "logits_processors",
)


def engine_kwargs(args: argparse.Namespace, seqs: int | None = None) -> dict:
    """seqs: max_num_seqs unless given (None: the device's default, 512 on CUDA, 256 on CPU). The KV pool holds at
    most that many full-length sequences and is allocated (every page touched) at start-up, so a command that runs
    a few sequences starts sooner."""
    return {
        **{name: getattr(args, name) for name in ENGINE_FLAGS},
        "seed": getattr(args, "engine_seed", 0),
        "max_num_seqs": args.max_num_seqs or seqs,
    }


def add_sampling_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("sampling")
    g.add_argument("--max-tokens", type=int, default=128)
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=-1)
    g.add_argument("--min-p", type=float, default=0.0)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")


def generate(args: argparse.Namespace) -> None:
    from nanovllm import LLM

    params = sampling_params(args)
    llm = LLM(args.model, **engine_kwargs(args, seqs=len(args.prompts)))
    use_chat = not args.raw and getattr(llm.tokenizer, "chat_template", None)
    if len(args.prompts) == 1:  # one prompt streams: the first token shows as soon as it is sampled
        prompt = args.prompts[0]
        if use_chat:
            prompt = {"prompt_token_ids": llm.apply_chat_template([{"role": "user", "content": prompt}])}
        else:
            print(prompt, end="", flush=True)
        started = not use_chat  # the chat reply's leading whitespace is dropped, as in the batch output
        for delta in llm.stream(prompt, params):
            piece = delta.outputs[0].text
            if not started:
                piece = piece.lstrip()
                started = bool(piece)
            print(piece, end="", flush=True)
        print()
        return
    if use_chat:
        outs = llm.chat([[{"role": "user", "content": p}] for p in args.prompts], params, use_tqdm=False)
    else:
        outs = llm.generate(args.prompts, params, use_tqdm=False)
    for prompt, out in zip(args.prompts, outs):
        if len(args.prompts) > 1:
            print(f"### {prompt}")
        print(out.outputs[0].text.strip() if use_chat else prompt + out.outputs[0].text)


def sampling_params(args: argparse.Namespace):
    from nanovllm import SamplingParams

    return SamplingParams(
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        min_p=args.min_p,
        seed=args.seed,
        stop=args.stop,
    )


def chat(args: argparse.Namespace) -> None:
    """A conversation on the terminal: each reply is printed token by token as it is generated."""
    from nanovllm import LLM

    params = sampling_params(args)
    llm = LLM(args.model, **engine_kwargs(args, seqs=1))
    messages = [{"role": "system", "content": args.system}] if args.system else []
    interactive = sys.stdin.isatty()
    turns = iter(args.messages) if args.messages else None
    while True:
        if turns is not None:
            user = next(turns, None)
        else:
            try:
                user = input("> ") if interactive else sys.stdin.readline() or None
            except EOFError:
                user = None
        if user is None:
            break
        if not user.strip():
            continue
        messages.append({"role": "user", "content": user.rstrip("\n")})
        reply = ""
        for delta in llm.stream({"prompt_token_ids": llm.apply_chat_template(messages)}, params):
            piece = delta.outputs[0].text if delta.outputs else ""
            print(piece, end="", flush=True)
            reply += piece
        print()
        messages.append({"role": "assistant", "content": reply})


def serve(args: argparse.Namespace) -> None:
    import uvicorn

    from nanovllm.engine.async_engine import AsyncEngine
    from nanovllm.engine_args import engine_config
    from nanovllm.entrypoints.server import ServerLimits, build_app
    from nanovllm.entrypoints.tools import ChatParsing

    model = args.model_pos or args.model
    ChatParsing(args.enable_auto_tool_choice, args.tool_call_parser, args.reasoning_parser)  # before the model loads
    server = None

    def on_death(error: BaseException) -> None:  # on the engine's thread, once every request has its 500
        print(f"nanovllm: the engine loop has stopped: {type(error).__name__}: {error}", file=sys.stderr, flush=True)
        if args.exit_on_engine_death and server is not None:
            server.should_exit = True  # uvicorn finishes the answers in flight, then serve() exits non-zero

    engine = AsyncEngine(engine_config(model, **engine_kwargs(args)), args.request_timeout, on_death)
    names = args.served_model_name or [model or "SmolLM2-135M-Instruct"]
    template = args.chat_template
    if template and os.path.isfile(template):
        with open(template) as f:
            template = f.read()
    limits = ServerLimits(
        args.max_request_body_bytes,
        args.max_n,
        args.max_stop_strings,
        args.max_stop_string_length,
        args.max_waiting_requests,
    )
    parsing = ChatParsing(args.enable_auto_tool_choice, args.tool_call_parser, args.reasoning_parser)
    app = build_app(engine, names, args.api_key or os.environ.get("NANOVLLM_API_KEY"), template, limits, parsing)
    print(f"nanovllm: serving {names[0]!r} on http://{args.host}:{args.port}/v1", file=sys.stderr, flush=True)
    server = uvicorn.Server(
        uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level, timeout_graceful_shutdown=2)
    )
    server.run()
    if engine.dead and args.exit_on_engine_death:
        sys.exit(1)  # a supervisor restarts the server


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nanovllm", description="A small, fast LLM inference engine.")
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="generate text for one or more prompts")
    gen.add_argument("prompts", nargs="+", help="prompt text")
    gen.add_argument("--raw", action="store_true", help="plain completion, without the model's chat template")
    add_engine_args(gen)
    add_sampling_args(gen)
    gen.set_defaults(func=generate)

    ch = sub.add_parser("chat", help="chat on the terminal; replies stream as they are generated")
    ch.add_argument("messages", nargs="*", help="user turns to send in order (default: read lines from stdin)")
    ch.add_argument("--system", default=None, help="a system message")
    add_engine_args(ch)
    add_sampling_args(ch)
    ch.set_defaults(func=chat, max_tokens=512)

    sv = sub.add_parser("serve", help="an OpenAI-compatible HTTP server")
    sv.add_argument("model_pos", nargs="?", metavar="MODEL", help="same as --model")
    f = sv.add_argument_group("Frontend")
    f.add_argument("--host", default="127.0.0.1")
    f.add_argument("--port", type=int, default=8000)
    f.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on /v1 (or $NANOVLLM_API_KEY)")
    f.add_argument(
        "--served-model-name",
        nargs="+",
        default=None,
        help="the model names clients may use (default: MODEL); the first is reported",
    )
    f.add_argument("--chat-template", default=None, help="a chat template (a file or the template itself)")
    f.add_argument(
        "--uvicorn-log-level",
        "--log-level",
        dest="log_level",
        default="warning",
        choices=["critical", "error", "warning", "info", "debug", "trace"],
    )
    f.add_argument("--disable-log-requests", action="store_true", help="accepted: requests are not logged anyway")
    f.add_argument(
        "--exit-on-engine-death",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="exit with status 1 once the engine loop has failed, so a supervisor restarts the server "
        "(off: stay up, /health and new requests answered 503)",
    )
    t = sv.add_argument_group("Tools and reasoning", "chat's tool calls and reasoning, read as vLLM reads them")
    t.add_argument(
        "--enable-auto-tool-choice",
        action="store_true",
        help='serve tool_choice "auto": the model may call the tools; needs --tool-call-parser',
    )
    t.add_argument(
        "--tool-call-parser",
        default=None,
        choices=list(TOOL_PARSERS),
        help="how the model writes tool calls: hermes (Qwen2.5/Qwen3, <tool_call> JSON), llama3_json, mistral",
    )
    t.add_argument(
        "--reasoning-parser",
        default=None,
        choices=list(REASONING_PARSERS),
        help="split <think>...</think> into the message's reasoning_content",
    )
    lim = sv.add_argument_group("Limits", "what one request may ask; over a limit is a 4xx naming it")
    lim.add_argument("--max-request-body-bytes", type=int, default=4 * 2**20, help="else 413 (default 4 MiB)")
    lim.add_argument("--max-n", type=int, default=16, help="completions per prompt (`n`)")
    lim.add_argument("--max-stop-strings", type=int, default=16, help="stop strings per request")
    lim.add_argument("--max-stop-string-length", type=int, default=256, help="characters per stop string")
    lim.add_argument(
        "--max-waiting-requests",
        type=int,
        default=None,
        help="sequences waiting for the batch; beyond it 503 with Retry-After (default: no limit)",
    )
    lim.add_argument(
        "--request-timeout",
        type=float,
        default=None,
        help="seconds from arrival to last token; beyond it the request is aborted, its blocks freed, "
        "and answered 408 (default: none)",
    )
    add_engine_args(sv, engine_seed=True)
    sv.set_defaults(func=serve)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (ValueError, FileNotFoundError, OSError) as e:
        print(f"nanovllm: error: {e}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
