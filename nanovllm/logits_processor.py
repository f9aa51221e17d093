"""vLLM's logits processors, where a vLLM user imports them (`vllm.v1.sample.logits_processor`): subclass
LogitsProcessor (or AdapterLogitsProcessor for a per-request function) and pass the class to
`LLM(model, logits_processors=[MyProcessor])` or `nanovllm serve --logits-processors package.module:Class`; a
request's arguments come in `SamplingParams.extra_args` (`vllm_xargs` on the server)."""

from nanovllm.sampling.builtin import (
    AllowedTokenIdsLogitsProcessor,
    BadWordsLogitsProcessor,
    LogitBiasLogitsProcessor,
    MinTokensLogitsProcessor,
)
from nanovllm.sampling.logits_processor import (
    AdapterLogitsProcessor,
    AddedRequest,
    BatchUpdate,
    LogitsProcessor,
    MoveDirectionality,
    MovedRequest,
    RemovedRequest,
    RequestLogitsProcessor,
    process_dict_updates,
)

__all__ = [
    "AdapterLogitsProcessor",
    "AddedRequest",
    "AllowedTokenIdsLogitsProcessor",
    "BadWordsLogitsProcessor",
    "BatchUpdate",
    "LogitBiasLogitsProcessor",
    "LogitsProcessor",
    "MinTokensLogitsProcessor",
    "MoveDirectionality",
    "MovedRequest",
    "RemovedRequest",
    "RequestLogitsProcessor",
    "process_dict_updates",
]
