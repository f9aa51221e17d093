"""`nanovllm serve`: the OpenAI HTTP API (completions, chat completions, streaming) over the async engine.

Every request is checked (limits.py too) before it reaches the engine, so a bad one is answered 4xx without
touching the batch in flight; errors use OpenAI's shape {"error": {"message", "type", "param", "code"}}. A
request the engine fails while serving is a 500; a dead engine makes /health and new requests 503."""

import asyncio
import hmac
import json
import re
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import aclosing

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException

from nanovllm.engine.async_engine import AsyncEngine, EngineBusyError, EngineDeadError, merged
from nanovllm.engine.request import Request as EngineRequest
from nanovllm.engine.request import tokenize
from nanovllm.entrypoints.limits import ServerLimits, check_limits, limit_body
from nanovllm.entrypoints.metrics import ServerMetrics
from nanovllm.entrypoints.openai_logprobs import ChoiceContent, prompt_logprobs_json
from nanovllm.entrypoints.protocol import (
    ERROR_RESPONSES,
    APIError,
    ChatRequest,
    CompletionRequest,
    DetokenizeRequest,
    SamplingFields,
    TokenizeRequest,
    documented,
    engine_failure,
    error_body,
    error_response,
)
from nanovllm.entrypoints.reasoning_parsers import answer_after_reasoning, prompt_state
from nanovllm.entrypoints.tools import (
    ChatParsing,
    ChoiceParser,
    ToolRequestError,
    choice_parser,
    plan_tools,
    template_messages,
)
from nanovllm.outputs import CompletionOutput, DeltaTracker, RequestOutput
from nanovllm.sampling_params import SamplingParams, StructuredOutputsParams


# ---- the app ---------------------------------------------------------------------------------------------
def build_app(
    engine: AsyncEngine,
    model_names: str | list[str],
    api_key: str | None = None,
    chat_template: str | None = None,
    limits: ServerLimits | None = None,
    chat_parsing: ChatParsing | None = None,
) -> FastAPI:
    """model_names: the names clients may send (the first is the one reported); chat_template: the server's own,
    in place of the model's, unless a request brings one; chat_parsing: --enable-auto-tool-choice,
    --tool-call-parser and --reasoning-parser."""
    chat_parsing = chat_parsing or ChatParsing()
    names = [model_names] if isinstance(model_names, str) else list(model_names)
    model_name = names[0]
    limits = limits or ServerLimits()
    app = FastAPI(title="nanovllm", docs_url=None, redoc_url=None, responses=ERROR_RESPONSES)
    app.add_middleware(limit_body, max_bytes=limits.max_request_body_bytes)
    metrics = engine.metrics = ServerMetrics(lambda: engine.stats)
    max_len = engine.engine.config.max_model_len

    async def check_key(request: Request) -> None:  # a dependency, not middleware: that would hide disconnects
        given = request.headers.get("authorization", "")
        if api_key and not hmac.compare_digest(given.encode(), f"Bearer {api_key}".encode()):
            raise APIError(
                401, "invalid or missing API key: send 'Authorization: Bearer <key>'", code="invalid_api_key"
            )

    v1 = APIRouter(prefix="/v1", dependencies=[Depends(check_key)])

    @app.exception_handler(APIError)
    async def api_error(_, e: APIError):
        return error_response(e.status, e.message, e.param, e.code)

    @app.exception_handler(RequestValidationError)
    async def invalid_body(_, e: RequestValidationError):
        first = e.errors()[0] if e.errors() else {}
        if first.get("type") == "json_invalid":
            return error_response(400, f"the body is not valid JSON: {first.get('ctx', {}).get('error', '')}")
        loc = [str(x) for x in first.get("loc", ()) if x != "body"]
        field = loc[0] if loc else None  # deeper parts name pydantic's union members, not the user's fields
        got = f" (got {first['input']!r})" if "input" in first and field else ""
        return error_response(400, f"{field or 'body'}: {first.get('msg', 'invalid')}{got}", param=field)

    @app.exception_handler(HTTPException)
    async def http_error(_, e: HTTPException):
        message = f"no such path: {_.url.path}" if e.status_code == 404 else str(e.detail)
        return error_response(e.status_code, message, headers=e.headers)  # 405's Allow

    @app.exception_handler(EngineDeadError)
    @app.exception_handler(EngineBusyError)
    async def unavailable(_, e: RuntimeError):  # a dead engine, or a full waiting queue: retry (elsewhere)
        busy = isinstance(e, EngineBusyError)
        return error_response(
            503,
            str(e),
            code="too_many_waiting_requests" if busy else "engine_dead",
            headers={"Retry-After": "1"} if busy else None,
        )

    @app.exception_handler(Exception)
    async def internal(_, e: Exception):
        return error_response(500, f"internal error: {type(e).__name__}: {e}")

    @app.get("/health", response_class=Response, responses=documented("health"))
    async def health():
        if engine.dead:
            return error_response(503, f"the engine loop has stopped: {engine.error!r}", code="engine_dead")
        return Response(status_code=200)

    @app.get("/metrics", response_class=Response, responses=documented("metrics"))
    async def get_metrics():
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @v1.get("/models", responses=documented("models"))
    async def models():
        # root: the model's path, as vLLM's (`vllm bench serve` reads it, as the tokenizer when given none)
        return {
            "object": "list",
            "data": [
                {
                    "id": name,
                    "object": "model",
                    "created": int(time.time()),
                    "owned_by": "nanovllm",
                    "root": engine.engine.config.model,
                    "parent": None,
                    "max_model_len": max_len,
                }
                for name in names
            ],
        }

    @app.post("/tokenize", responses=documented("tokenize"))
    async def tokenize_text(body: TokenizeRequest):
        if body.messages is not None:
            ids = render_chat(engine, body.messages, body.add_generation_prompt, chat_template)
        elif body.prompt is not None:
            ids = engine.tokenizer(body.prompt, add_special_tokens=body.add_special_tokens).input_ids
        else:
            raise APIError(400, "send 'prompt' (a string) or 'messages'", param="prompt")
        return {"tokens": ids, "count": len(ids), "max_model_len": max_len}

    @app.post("/detokenize", responses=documented("detokenize"))
    async def detokenize_ids(body: DetokenizeRequest):
        ids = body.tokens
        bad = [t for t in ids if not 0 <= t < engine.engine.vocab_size]
        if bad:
            raise APIError(
                400, f"token ids {bad[:5]} are outside the vocabulary [0, {engine.engine.vocab_size})", param="tokens"
            )
        return {"prompt": engine.tokenizer.decode(ids)}

    def check_model(name: str | None) -> None:
        if name is not None and name not in names:
            raise APIError(
                400,
                f"the model {name!r} is not served here; this server serves {', '.join(names)}",
                param="model",
                code="model_not_found",
            )

    @v1.post("/completions", responses=documented("completions"))
    async def completions(body: CompletionRequest, raw: Request):
        check_model(body.model)
        score_only = body.echo and body.max_tokens == 0  # the prompt's logprobs: one token generated, not shown
        if score_only:
            body.max_tokens = 1
        prompts = body.prompt
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        if not prompts:
            raise APIError(400, "the prompt is empty", param="prompt")
        tokenized = [tokenize(engine.tokenizer, p) for p in prompts]
        requests = make_requests(
            engine, body, [{"prompt": text, "prompt_token_ids": ids} for text, ids in tokenized], default_max=16
        )
        return await respond(engine, body, requests, model_name, raw, chat=False, limits=limits, score_only=score_only)

    @v1.post("/chat/completions", responses=documented("chat"))
    async def chat_completions(body: ChatRequest, raw: Request):
        check_model(body.model)
        try:
            plan = plan_tools(body.tools, body.tool_choice, body.parallel_tool_calls, chat_parsing)
        except ToolRequestError as e:
            raise APIError(400, str(e), param=e.param) from None
        template_kwargs = dict(body.chat_template_kwargs or {})
        if body.tools:  # every choice shows them to the template, "none" too (as vLLM)
            template_kwargs["tools"] = body.tools
        ids = render_chat(
            engine,
            template_messages(body.messages),
            body.add_generation_prompt,
            body.chat_template or chat_template,
            **template_kwargs,
        )
        state = prompt_state(engine.tokenizer.decode(ids[-8:])) if chat_parsing.reasoning_parser else None
        parser = choice_parser(plan, chat_parsing, state)
        if plan is not None and plan.schema is not None:
            # compact JSON: the arguments are re-serialized anyway, and a small model cannot wander off in whitespace
            body._tool_constraint = StructuredOutputsParams(json=plan.schema, disable_any_whitespace=True)
        prefix = parser.reasoning.grammar_prefix(state) if parser is not None and parser.reasoning else None
        asked, field = body.structured()
        if prefix and asked is not None:  # the answer's constraint applies after the reasoning, as in vLLM
            try:
                body._after_reasoning = (answer_after_reasoning(asked, prefix), field)
            except ValueError as e:
                raise APIError(400, str(e), param=field) from None
        if parser is not None and parser.tool_parser is not None and parser.tool_parser.keeps_special_tokens:
            body.skip_special_tokens = False  # its markers are special tokens (vLLM does the same)
        if body.max_completion_tokens is not None:
            body.max_tokens = body.max_completion_tokens
        requests = make_requests(engine, body, [{"prompt_token_ids": ids}], default_max=None)
        return await respond(engine, body, requests, model_name, raw, chat=True, limits=limits, parser=parser)

    app.include_router(v1)
    return app


def render_chat(
    engine: AsyncEngine,
    messages: list,
    add_generation_prompt: bool = True,
    chat_template: str | None = None,
    **template_kwargs,
) -> list[int]:
    if not isinstance(messages, list) or not messages:
        raise APIError(400, "'messages' must be a non-empty list", param="messages")
    flat = []
    for m in messages:
        if not isinstance(m, dict) or "role" not in m:
            raise APIError(400, "every message needs a 'role'", param="messages")
        content = m.get("content") or ""
        if isinstance(content, list):  # OpenAI content parts: only text ones here
            texts = [part.get("text", "") for part in content if isinstance(part, dict)]
            if not all(isinstance(t, str) for t in texts):
                raise APIError(400, "a content part's 'text' must be a string", param="messages")
            content = "".join(texts)
        if not isinstance(content, str):
            raise APIError(400, "a message's content must be a string or a list of text parts", param="messages")
        flat.append({**m, "content": content})
    try:
        return tokenize(engine.tokenizer, flat, chat_template, add_generation_prompt, **template_kwargs)[1]
    except Exception as e:  # a template that rejects the conversation (roles out of order, ...)
        raise APIError(400, f"the chat template failed on these messages: {e}", param="messages") from None


# the body's fields that SamplingParams takes as they are
PASSED_FIELDS = (
    "n",
    "presence_penalty",
    "frequency_penalty",
    "seed",
    "min_tokens",
    "stop",
    "stop_token_ids",
    "ignore_eos",
    "include_stop_str_in_output",
    "skip_special_tokens",
    "spaces_between_special_tokens",
    "truncate_prompt_tokens",
    "logit_bias",
    "allowed_token_ids",
    "bad_words",
)


def make_requests(
    engine: AsyncEngine, body: SamplingFields, prompts: list[dict], default_max: int | None
) -> list[EngineRequest]:
    """Check every (tokenized) prompt and its token budget, then build the engine requests (nothing is queued yet)."""
    requests, base, defaults = [], uuid.uuid4().hex, engine.engine.generation_defaults
    max_len = engine.engine.config.max_model_len
    for i, prompt in enumerate(prompts):
        n_prompt = len(prompt["prompt_token_ids"])
        if n_prompt >= max_len:
            raise APIError(
                400,
                f"the prompt has {n_prompt} tokens, but this model's maximum context length is "
                f"{max_len} tokens (max_model_len), and at least one must be left to generate",
                param="prompt" if len(prompts) > 1 or "prompt" in prompt else "messages",
                code="context_length_exceeded",
            )
        room = max_len - n_prompt
        if body.max_tokens is not None and body.max_tokens > room:
            raise APIError(
                400,
                f"max_tokens={body.max_tokens} cannot fit: the prompt has {n_prompt} tokens and "
                f"max_model_len is {max_len}, so at most {room} tokens can be generated",
                param="max_tokens",
                code="context_length_exceeded",
            )
        # the model's sampling defaults (generation_config.json, --generation-config) where the body sets none
        given = {k: getattr(body, k) for k in ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")}
        sampling = {**given, **{k: v for k, v in defaults.items() if k in given and k not in body.model_fields_set}}
        sampling["top_k"] = sampling["top_k"] or -1
        default_max = min(defaults["max_tokens"], default_max or room) if "max_tokens" in defaults else default_max
        max_tokens = body.max_tokens if body.max_tokens is not None else min(default_max or room, room)
        try:
            params = SamplingParams(
                **{k: getattr(body, k) for k in PASSED_FIELDS},
                **sampling,
                max_tokens=max_tokens,
                logprobs=body.num_logprobs(),
                prompt_logprobs=body.num_prompt_logprobs(),
                structured_outputs=body.structured()[0],
                extra_args=body.vllm_xargs,
            )
            requests.append(engine.make_request(prompt, params, f"{base}-{i}"))
        except ValueError as e:  # SamplingParams' messages start with the field: "SamplingParams.top_p must be ..."
            field = re.match(r"SamplingParams\.(\w+)", str(e))
            raise APIError(400, str(e), param=field and field[1]) from None
    return requests


async def respond(
    engine: AsyncEngine,
    body: SamplingFields,
    requests: list[EngineRequest],
    model: str,
    raw: Request,
    chat: bool,
    limits: ServerLimits,
    score_only: bool = False,
    parser: ChoiceParser | None = None,
):
    """parser: reads each chat choice's reasoning and tool calls (a fresh one per choice); None shows the text."""
    check_limits(body, limits)
    await body.grammars_compiled([r.grammar for r in requests])
    readers = engine.submit(requests, limits.max_waiting_requests)  # queued now, or 503 before any answer
    n, created = body.n, int(time.time())
    rid = ("chatcmpl-" if chat else "cmpl-") + requests[0].request_id.split("-")[0]
    obj = "chat.completion" if chat else "text_completion"
    shown = ChoiceContent(engine.tokenizer, body, chat, score_only)
    choice_readers: dict[int, ChoiceParser] = {}  # choice index -> its reader of reasoning and tool calls

    def choice(i: int, c: CompletionOutput, out: RequestOutput, stream: bool) -> dict | None:
        """Completion c of request i as a choice (a stream's: None while its new tokens show no text yet)."""
        index = i * n + c.index
        text, logprobs = shown(index, c, out)
        reader = choice_readers.setdefault(index, parser.fresh()) if chat and parser is not None else None
        entry = {"index": index, "logprobs": logprobs}
        if not chat:
            entry["text"] = text
        elif stream:
            last = c.finish_reason is not None
            entry["delta"] = reader.delta(text, last) if reader else ({"content": text} if text else {})
        else:
            entry["message"] = reader.message(text) if reader else {"role": "assistant", "content": text}
        if stream and not (entry.get("text") or entry.get("delta")) and c.finish_reason is None and logprobs is None:
            return None
        finish_reason = c.finish_reason and ("length" if score_only else c.finish_reason)
        if finish_reason == "stop" and reader is not None and reader.calls_made:
            finish_reason = "tool_calls"
        entry["finish_reason"] = finish_reason
        if finish_reason is not None:
            entry["stop_reason"] = c.stop_reason
        return entry

    def usage(outs: dict[int, RequestOutput]) -> dict:
        prompt = sum(len(r.prompt_token_ids) for r in requests)
        completion = 0 if score_only else sum(len(c.token_ids) for o in outs.values() for c in o.outputs)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    if not body.stream:

        async def collect() -> dict[int, RequestOutput]:
            async with aclosing(merged(engine, requests, readers)) as outs:
                return {i: out async for i, out in outs}  # the last output of each wins

        task = asyncio.create_task(collect())
        while not task.done():  # a client that hangs up is not waited for: its requests are aborted
            await asyncio.wait({task}, timeout=0.5)
            if not task.done() and await raw.is_disconnected():
                task.cancel()
                return Response(status_code=499)
        try:
            final = task.result()
        except Exception as e:
            raise engine_failure(e) from None
        choices = []
        for i in range(len(requests)):
            for c in final[i].outputs:
                choices.append(choice(i, c, final[i], stream=False))
                if body.prompt_logprobs is not None and not chat:  # vLLM's extra, per choice (chat: per response)
                    choices[-1]["prompt_logprobs"] = prompt_logprobs_json(final[i].prompt_logprobs)
        extra = {"prompt_logprobs": prompt_logprobs_json(final[0].prompt_logprobs)} if chat else {}
        return {
            "id": rid,
            "object": obj,
            "created": created,
            "model": model,
            "choices": choices,
            "usage": usage(final),
            **extra,
        }

    chunk_obj = "chat.completion.chunk" if chat else "text_completion"
    include_usage = bool(body.stream_options and body.stream_options.include_usage)

    def sse(choices: list[dict], **extra) -> str:
        chunk = {"id": rid, "object": chunk_obj, "created": created, "model": model, "choices": choices, **extra}
        return f"data: {json.dumps(chunk, ensure_ascii=False)}\n\n"

    def delta_choices(i: int, out: RequestOutput, tracker: DeltaTracker) -> list[dict]:
        choices = (choice(i, c, out, stream=True) for c in tracker(out).outputs)
        return [c for c in choices if c is not None]

    async def events() -> AsyncIterator[str]:
        trackers = [DeltaTracker() for _ in requests]
        final: dict[int, RequestOutput] = {}
        try:
            async with aclosing(merged(engine, requests, readers)) as outs:
                async for i, out in outs:
                    if chat and not final:  # with the first output, as vLLM: clients time the first token by it
                        yield sse(
                            [
                                {
                                    "index": r * n + j,
                                    "delta": {"role": "assistant", "content": ""},
                                    "logprobs": None,
                                    "finish_reason": None,
                                }
                                for r in range(len(requests))
                                for j in range(n)
                            ]
                        )
                    final[i] = out
                    if choices := delta_choices(i, out, trackers[i]):
                        yield sse(choices)
        except Exception as e:  # the headers are sent: the error goes in the stream
            error = engine_failure(e)
            yield f"data: {json.dumps(error_body(error.status, error.message, code=error.code))}\n\n"
        else:
            if include_usage:
                yield sse([], usage=usage(final))
        yield "data: [DONE]\n\n"

    return StreamingResponse(events(), media_type="text/event-stream")
