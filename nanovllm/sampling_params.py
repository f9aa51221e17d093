import copy
import json as json_module
from dataclasses import dataclass
from enum import IntEnum


class RequestOutputKind(IntEnum):
    """What a streamed request's outputs hold (vLLM's names): all so far, only what is new, or only the final."""

    CUMULATIVE = 0
    DELTA = 1
    FINAL_ONLY = 2


@dataclass
class StructuredOutputsParams:
    """vLLM's structured-output constraint: exactly one of `json` (a JSON schema, as a dict or a JSON string),
    `regex`, `choice` (one of these strings), `grammar` (EBNF/GBNF, or Lark) or `json_object` (any JSON object).
    nanovllm/structured_outputs.py compiles it (with xgrammar) and masks every token it does not allow."""

    json: str | dict | None = None
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None
    disable_fallback: bool = False  # one backend, so never a fallback
    disable_any_whitespace: bool = False  # JSON without whitespace between its tokens
    disable_additional_properties: bool = False  # what xgrammar does anyway: only the schema's properties
    whitespace_pattern: str | None = None  # outlines' knob: refused
    structural_tag: str | None = None  # refused

    def __post_init__(self) -> None:
        kinds = [
            k for k in ("json", "regex", "choice", "grammar", "json_object") if getattr(self, k) not in (None, False)
        ]
        if len(kinds) != 1:
            raise ValueError(
                f"StructuredOutputsParams needs exactly one of json, regex, choice, grammar, json_object; "
                f"got {', '.join(kinds) or 'none'}"
            )
        for name in ("whitespace_pattern", "structural_tag"):
            if getattr(self, name) is not None:
                raise ValueError(
                    f"StructuredOutputsParams.{name} is not supported (nanovllm's grammar library, "
                    f"xgrammar, has no {name}; disable_any_whitespace=True gives compact JSON)"
                )
        if isinstance(self.json, str):
            try:
                json_module.loads(self.json)
            except ValueError as e:
                raise ValueError(f"StructuredOutputsParams.json is not valid JSON: {e}") from None
        elif self.json is not None and not isinstance(self.json, dict):
            raise ValueError(
                f"StructuredOutputsParams.json must be a JSON schema (a dict or a JSON string), got "
                f"{type(self.json).__name__}"
            )
        if self.choice is not None and not (
            isinstance(self.choice, list) and self.choice and all(isinstance(c, str) for c in self.choice)
        ):
            raise ValueError(f"StructuredOutputsParams.choice must be a non-empty list of strings, got {self.choice!r}")
        for name in ("regex", "grammar"):
            value = getattr(self, name)
            if value is not None and not (isinstance(value, str) and value):
                raise ValueError(f"StructuredOutputsParams.{name} must be a non-empty string")


GuidedDecodingParams = StructuredOutputsParams  # vLLM's name before 0.11


@dataclass
class SamplingParams:
    """Per-request sampling and stopping knobs, with vLLM's names, defaults and meaning."""

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    max_tokens: int | None = 16
    min_tokens: int = 0
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True  # as HF: only slow tokenizers put spaces there; ours are fast
    detokenize: bool = True  # False: token ids only, no text (and no stop strings)
    truncate_prompt_tokens: int | None = None  # keep the prompt's last k tokens (-1: max_model_len - 1)
    logit_bias: dict[int, float] | None = None  # added to those tokens' logits before sampling
    allowed_token_ids: list[int] | None = None  # only these tokens may be sampled
    bad_words: list[str] | None = None  # words never generated (their last token is banned after the rest)
    output_kind: RequestOutputKind = RequestOutputKind.CUMULATIVE
    logprobs: int | None = None  # per generated token: its logprob and the N most likely (-1: all)
    prompt_logprobs: int | None = None  # the same for each prompt token (its cached prefix is recomputed)
    structured_outputs: StructuredOutputsParams | None = None  # a grammar the output must follow
    guided_decoding: StructuredOutputsParams | None = None  # vLLM's name before 0.11 (moved to structured_outputs)
    extra_args: dict | None = None  # arguments for the logits processors (nanovllm/logits_processor.py)

    def __post_init__(self) -> None:
        def check(ok: bool, name: str, allowed: str) -> None:
            if not ok:
                raise ValueError(f"SamplingParams.{name} must be {allowed}, got {getattr(self, name)!r}")

        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            check(
                value is None or (isinstance(value, int) and not isinstance(value, bool) and value >= -1),
                name,
                "None, -1 (the whole vocabulary) or an integer >= 0",
            )
        check(isinstance(self.n, int) and self.n >= 1, "n", "an integer >= 1")
        check(self.temperature >= 0, "temperature", ">= 0")
        check(0 < self.top_p <= 1, "top_p", "in (0, 1]")
        check(isinstance(self.top_k, int) and (self.top_k == -1 or self.top_k >= 1), "top_k", "-1 (off) or >= 1")
        check(0 <= self.min_p <= 1, "min_p", "in [0, 1]")
        check(-2 <= self.presence_penalty <= 2, "presence_penalty", "in [-2, 2]")
        check(-2 <= self.frequency_penalty <= 2, "frequency_penalty", "in [-2, 2]")
        check(self.repetition_penalty > 0, "repetition_penalty", "> 0")
        check(
            self.max_tokens is None or (isinstance(self.max_tokens, int) and self.max_tokens >= 1),
            "max_tokens",
            "None or an integer >= 1",
        )
        check(isinstance(self.min_tokens, int) and self.min_tokens >= 0, "min_tokens", "an integer >= 0")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise ValueError(f"SamplingParams.min_tokens ({self.min_tokens}) must be <= max_tokens ({self.max_tokens})")
        check(self.seed is None or isinstance(self.seed, int), "seed", "None or an integer")
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        check(all(isinstance(s, str) and s for s in self.stop), "stop", "a list of non-empty strings")
        if self.stop and not self.detokenize:
            raise ValueError("SamplingParams.stop needs detokenize=True: stop strings are found in the text")
        self.stop_token_ids = list(self.stop_token_ids or [])
        check(
            all(isinstance(t, int) and t >= 0 for t in self.stop_token_ids),
            "stop_token_ids",
            "a list of token ids >= 0",
        )
        check(
            self.truncate_prompt_tokens is None
            or (
                isinstance(self.truncate_prompt_tokens, int)
                and (self.truncate_prompt_tokens >= 1 or self.truncate_prompt_tokens == -1)
            ),
            "truncate_prompt_tokens",
            "None, -1 or an integer >= 1",
        )
        self.logit_bias = {int(t): float(b) for t, b in (self.logit_bias or {}).items()} or None
        check(
            self.allowed_token_ids is None
            or (len(self.allowed_token_ids) > 0 and all(isinstance(t, int) and t >= 0 for t in self.allowed_token_ids)),
            "allowed_token_ids",
            "None or a non-empty list of token ids",
        )
        check(all(isinstance(w, str) and w for w in self.bad_words or []), "bad_words", "a list of non-empty strings")
        self.output_kind = RequestOutputKind(self.output_kind)
        if self.guided_decoding is not None:
            if self.structured_outputs is not None:
                raise ValueError("SamplingParams: give structured_outputs or guided_decoding (its old name), not both")
            self.structured_outputs, self.guided_decoding = self.guided_decoding, None
        check(
            self.structured_outputs is None or isinstance(self.structured_outputs, StructuredOutputsParams),
            "structured_outputs",
            "None or a StructuredOutputsParams",
        )

    def clone(self) -> "SamplingParams":
        return copy.deepcopy(self)
