"""The OpenAI API's request bodies as nanovllm serves them (unknown fields are ignored, as OpenAI does; known ones
that nanovllm does not implement are refused), its error shape {"error": {"message", "type", "param", "code"}},
and what the OpenAPI document (/openapi.json) says each route answers: the responses are built as plain dicts,
so these models describe them without filtering."""

import asyncio
from typing import Any, ClassVar, Literal

from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, field_validator, model_validator

from nanovllm.engine.async_engine import EngineDeadError, RequestTimeoutError
from nanovllm.sampling_params import StructuredOutputsParams


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code


ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    405: "invalid_request_error",
    408: "timeout_error",
    413: "invalid_request_error",
    500: "internal_error",
    503: "service_unavailable",
}


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": ERROR_TYPES.get(status, "error"), "param": param, "code": code}}


def engine_failure(e: Exception) -> APIError:
    """What a request that failed while the engine served it answers."""
    if isinstance(e, RequestTimeoutError):
        return APIError(408, str(e), code="request_timeout")
    if isinstance(e, EngineDeadError):
        return APIError(500, f"the engine failed while serving this request ({e})", code="engine_dead")
    return APIError(500, str(e) if isinstance(e, RuntimeError) else f"internal error: {type(e).__name__}: {e}")


def error_response(
    status: int, message: str, param: str | None = None, code: str | None = None, headers: dict | None = None
) -> JSONResponse:
    return JSONResponse(error_body(status, message, param, code), status_code=status, headers=headers)


class StreamOptions(BaseModel):
    include_usage: bool = False
    continuous_usage_stats: bool = False  # vLLM's: usage in every chunk (not implemented: refused)

    @model_validator(mode="after")
    def refuse_unsupported(self):
        if self.continuous_usage_stats:
            raise APIError(
                400, "stream_options.continuous_usage_stats is not supported by nanovllm", param="stream_options"
            )
        return self


# Known OpenAI and vLLM request fields that nanovllm does not implement, with the values that ask for nothing
# (what clients send by default): any other value is a 400 naming the field, never silently ignored.
UNSUPPORTED = {
    "best_of": (1,),
    "use_beam_search": (False,),
    "length_penalty": (1.0,),
    "tools": ([],),
    "tool_choice": ("none", "auto"),
    "functions": ([],),
    "function_call": ("none", "auto"),
    "prediction": (),
    "audio": (),
    "modalities": (["text"],),
    "web_search_options": (),
    "reasoning_effort": (),
    "verbosity": (),
    "priority": (0,),
    "cache_salt": (),
    "kv_transfer_params": (),
    "logits_processors": ([],),
    "prompt_embeds": (),
    "mm_processor_kwargs": ({},),
    "return_token_ids": (False,),
}


class JsonSchemaFormat(BaseModel):
    name: str | None = None
    schema_: dict | None = Field(None, alias="schema")  # "schema" would shadow a BaseModel method
    description: str | None = None
    strict: bool | None = None  # xgrammar's JSON schemas are always strict: no properties the schema does not name


class ResponseFormat(BaseModel):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class SamplingFields(BaseModel):
    model_config = ConfigDict(extra="ignore")
    unsupported: ClassVar[dict] = UNSUPPORTED

    @model_validator(mode="before")
    @classmethod
    def refuse_unsupported(cls, data):
        if not isinstance(data, dict):
            return data
        data = {k: v for k, v in data.items() if v is not None}  # clients send "temperature": null for "not set"
        for name, off in cls.unsupported.items():
            if name in data and data[name] not in off:
                raise APIError(400, f"{name} is not supported by nanovllm (got {repr(data[name])[:80]})", param=name)
        if data.get("stream") and "prompt_logprobs" in data:
            raise APIError(
                400, "prompt_logprobs are not available when stream=true (as in vLLM)", param="prompt_logprobs"
            )
        return data

    model: str | None = None
    max_tokens: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    n: int = 1
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    stream: bool = False
    stream_options: StreamOptions | None = None
    # vLLM's extras (the OpenAI client sends them through extra_body)
    top_k: int | None = None
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    ignore_eos: bool = False
    min_tokens: int = 0
    stop_token_ids: list[int] | None = None
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    spaces_between_special_tokens: bool = True
    truncate_prompt_tokens: int | None = None
    logit_bias: dict[int, float] | None = None  # OpenAI's keys are token ids as strings
    allowed_token_ids: list[int] | None = None
    bad_words: list[str] | None = None
    prompt_logprobs: int | None = None
    return_tokens_as_token_ids: bool = False
    vllm_xargs: dict[str, Any] | None = None  # SamplingParams.extra_args: the logits processors' arguments

    @field_validator("logit_bias")
    @classmethod
    def clamp_bias(cls, bias: dict[int, float] | None) -> dict[int, float] | None:  # OpenAI's range, as vLLM
        return {t: min(100.0, max(-100.0, b)) for t, b in bias.items()} if bias else bias

    # structured outputs: OpenAI's response_format, or one of vLLM's extras
    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputsParams | None = None
    guided_json: str | dict | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None

    def structured(self) -> tuple[StructuredOutputsParams | None, str | None]:
        """The structured-output constraint this body asks for and the field that asks; at most one may."""
        fmt = self.response_format
        asked = {
            "structured_outputs": self.structured_outputs,
            "guided_json": self.guided_json,
            "guided_regex": self.guided_regex,
            "guided_choice": self.guided_choice,
            "guided_grammar": self.guided_grammar,
            "response_format": fmt if fmt and fmt.type != "text" else None,
        }
        asked = {k: v for k, v in asked.items() if v is not None}
        if len(asked) > 1:
            raise APIError(
                400,
                f"give one structured-output constraint, not {len(asked)}: {', '.join(asked)}",
                param=list(asked)[1],
            )
        if not asked:
            return None, None
        field, value = asked.popitem()
        if field == "structured_outputs":
            return value, field
        if field != "response_format":
            kind = {field.removeprefix("guided_"): value}  # guided_json -> json, guided_regex -> regex, ...
        elif fmt.type == "json_object":
            kind = {"json_object": True}
        elif fmt.json_schema and fmt.json_schema.schema_ is not None:
            kind = {"json": fmt.json_schema.schema_}
        else:
            raise APIError(400, "response_format of type json_schema needs json_schema.schema", param=field)
        try:
            return StructuredOutputsParams(**kind), field
        except ValueError as e:
            raise APIError(400, f"{field}: {e}", param=field) from None

    async def grammars_compiled(self, grammars: list) -> None:
        """Wait (not blocking the event loop) for the requests' grammars, which compile off the engine's loop: an
        invalid one is a 400 naming the field that asked for it."""
        try:
            for grammar in grammars:
                if grammar is not None:
                    await asyncio.wrap_future(grammar)
        except ValueError as e:
            raise APIError(400, str(e), param=self.structured()[1]) from None


class CompletionRequest(SamplingFields):
    unsupported: ClassVar[dict] = {**UNSUPPORTED, "suffix": ("",), "add_special_tokens": (True,)}
    prompt: str | list[str] | list[int] | list[list[int]]
    echo: bool = False
    logprobs: int | None = None

    def num_logprobs(self) -> int | None:
        return self.logprobs

    def num_prompt_logprobs(self) -> int | None:
        """vLLM's prompt_logprobs, else with echo the logprobs asked for (echo shows the prompt's)."""
        return self.prompt_logprobs if self.prompt_logprobs is not None else self.logprobs if self.echo else None


CHAT_IMPLEMENTS = ("tools", "tool_choice")  # refused by completions, served by chat (entrypoints/tools.py)


class ChatRequest(SamplingFields):
    unsupported: ClassVar[dict] = {
        **{k: v for k, v in UNSUPPORTED.items() if k not in CHAT_IMPLEMENTS},
        "echo": (False,),
        "continue_final_message": (False,),
        "add_special_tokens": (False,),
        "documents": ([],),
    }
    messages: list[dict]
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    chat_template: str | None = None
    add_generation_prompt: bool = True
    chat_template_kwargs: dict | None = None  # e.g. {"enable_thinking": false}, passed to the chat template
    # tools: checked and served by entrypoints/tools.py (the server's flags decide what "auto" may do)
    tools: list | None = None
    tool_choice: str | dict | None = None
    parallel_tool_calls: bool | None = None
    # the constraint a "required" or named tool_choice puts on the answer (set by the server, which knows the flags)
    _tool_constraint: StructuredOutputsParams | None = PrivateAttr(None)
    # the constraint and its field once the server has put it after the reasoning (--reasoning-parser)
    _after_reasoning: tuple[StructuredOutputsParams, str] | None = PrivateAttr(None)

    def structured(self) -> tuple[StructuredOutputsParams | None, str | None]:
        if self._after_reasoning is not None:
            return self._after_reasoning
        asked, field = super().structured()
        if self._tool_constraint is None:
            return asked, field
        if asked is not None:
            raise APIError(
                400,
                f"tool_choice {self.tool_choice!r} constrains the answer to a tool call: it cannot take {field} too",
                param=field,
            )
        return self._tool_constraint, "tool_choice"

    def num_logprobs(self) -> int | None:
        if self.top_logprobs is not None and not self.logprobs:
            raise APIError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
        return (self.top_logprobs or 0) if self.logprobs else None

    def num_prompt_logprobs(self) -> int | None:
        return self.prompt_logprobs


class TokenizeRequest(BaseModel):  # vLLM's /tokenize: a prompt, or chat messages
    prompt: str | None = None
    messages: list[dict] | None = None
    add_special_tokens: bool = True
    add_generation_prompt: bool = True


class DetokenizeRequest(BaseModel):
    tokens: list[int]


# ---- what the OpenAPI document says the routes answer ---------------------------------------------------
class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(BaseModel):
    error: ErrorDetail


class Choice(BaseModel):  # a completion's `text` or a chat's `message`; in a stream, `text` or `delta`
    model_config = ConfigDict(extra="allow")
    index: int
    finish_reason: str | None
    logprobs: Any = None


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionResponse(BaseModel):
    model_config = ConfigDict(extra="allow")
    id: str
    object: str
    created: int
    model: str
    choices: list[Choice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: str
    created: int
    owned_by: str
    root: str
    parent: str | None
    max_model_len: int


class ModelList(BaseModel):
    object: str
    data: list[ModelCard]


class TokenizeResponse(BaseModel):
    tokens: list[int]
    count: int
    max_model_len: int


class DetokenizeResponse(BaseModel):
    prompt: str


ERROR_RESPONSES = {  # every route: "4XX" also stands in for FastAPI's 422, which this server never answers
    "4XX": {
        "model": ErrorResponse,
        "description": "the request is invalid or over a limit; the message names it "
        "(401 API key, 404 no such path, 408 request timeout, 413 body "
        "too large)",
    },
    "5XX": {
        "model": ErrorResponse,
        "description": "500: the engine failed while serving the request; 503: the "
        "engine is dead, or the waiting queue is full (Retry-After)",
    },
}
_STREAM = {
    "text/event-stream": {
        "schema": {
            "type": "string",
            "description": 'with "stream": true: server-sent events, each a chunk of the JSON shape above, then [DONE]',
        }
    }
}


def documented(route: str) -> dict:
    """The 200 response of a route for the OpenAPI document (the errors are ERROR_RESPONSES, on every route)."""
    return {
        200: {
            "health": {"description": "the engine is alive (503 when its loop has stopped)", "content": None},
            "metrics": {"description": "Prometheus metrics", "content": {"text/plain": {"schema": {"type": "string"}}}},
            "models": {"model": ModelList},
            "tokenize": {"model": TokenizeResponse},
            "detokenize": {"model": DetokenizeResponse},
            "completions": {"model": CompletionResponse, "content": _STREAM},
            "chat": {"model": CompletionResponse, "content": _STREAM},
        }[route]
    }
