"""vLLM's logits processor interface (V1): a processor sees the whole batch's logits once per step and changes
them in place; it keeps its own per-row state, told each step which requests left, joined or moved rows.

A processor written for vLLM (`vllm.v1.sample.logits_processor`) runs here with only its imports changed: the
names, signatures and the order of a BatchUpdate's operations are vLLM's. The engine's own per-request adjustments
(min_tokens, logit_bias, allowed_token_ids, bad_words) are processors of this interface too
(nanovllm/sampling/builtin.py); nanovllm/sampling/persistent_batch.py runs them all."""

import importlib
import inspect
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import Enum, auto
from functools import partial
from typing import TypeVar

import torch

from nanovllm.config import EngineConfig
from nanovllm.sampling_params import SamplingParams


class MoveDirectionality(Enum):
    UNIDIRECTIONAL = auto()  # the request at `from` goes to `to`; `from` is left empty
    SWAP = auto()  # the requests at the two rows trade places


RemovedRequest = int  # the row a request left
# (row, its parameters, its prompt's token ids, its output token ids): the output list is live, it grows as the
# request generates (so a processor reads the latest tokens without being told)
AddedRequest = tuple[int, SamplingParams, list[int] | None, Sequence[int]]
MovedRequest = tuple[int, int, MoveDirectionality]  # (from row, to row, how)


@dataclass(frozen=True)
class BatchUpdate:
    """How the batch changed since the last step. Apply in this order: removed, added, moved (an added or moved
    request may take a row another one left; a row in `removed` is never in `added` of the same update)."""

    batch_size: int  # rows in the batch now: the logits `apply` gets have this many
    removed: Sequence[RemovedRequest]
    added: Sequence[AddedRequest]
    moved: Sequence[MovedRequest]


class LogitsProcessor(ABC):
    """One kind of logits adjustment over the whole batch. The engine makes one instance at start-up
    (`__init__(config, device, is_pin_memory)`), calls `update_state` before each step's sampling, then `apply`."""

    @classmethod
    def validate_params(cls, sampling_params: SamplingParams) -> None:
        """Refuse a request this processor cannot serve: raise ValueError (a 400 on the server). Called when the
        request is made, before it is queued."""
        return None

    @abstractmethod
    def __init__(self, vllm_config: EngineConfig, device: torch.device, is_pin_memory: bool) -> None:
        raise NotImplementedError

    @abstractmethod
    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        """The batch's logits [batch_size, vocab] after this processor (changed in place or a new tensor)."""
        raise NotImplementedError

    @abstractmethod
    def is_argmax_invariant(self) -> bool:
        """True if it never changes which token is the most likely: then a step whose rows are all greedy skips
        its apply (update_state is still called)."""
        raise NotImplementedError

    @abstractmethod
    def update_state(self, batch_update: BatchUpdate | None) -> None:
        """Before each step's sampling: None when no request left, joined or moved since the last call."""
        raise NotImplementedError


T = TypeVar("T")


def process_dict_updates(
    req_entries: dict[int, T],
    batch_update: BatchUpdate | None,
    new_state: Callable[[SamplingParams, list[int] | None, Sequence[int]], T | None],
) -> bool:
    """Keep a per-row dict in step with the batch: a removed row's entry goes, an added request gets
    `new_state(params, prompt ids, output ids)` (None: this processor does not act on it), a moved entry follows
    its request. Returns whether the dict changed."""
    if batch_update is None:
        return False
    changed = False
    for index in batch_update.removed:
        if req_entries.pop(index, None) is not None:
            changed = True
    for index, params, prompt_ids, output_ids in batch_update.added:
        state = new_state(params, prompt_ids, output_ids)
        if state is not None:
            req_entries[index] = state
            changed = True
        elif req_entries.pop(index, None) is not None:
            changed = True
    for source, target, direction in batch_update.moved:
        moving = req_entries.pop(source, None)
        displaced = req_entries.pop(target, None)
        if moving is not None:
            req_entries[target] = moving
            changed = True
        if displaced is not None:
            changed = True
            if direction is MoveDirectionality.SWAP:
                req_entries[source] = displaced
    return changed


# a request's own logits function: (output ids, logits row [vocab]) -> logits row, or with the prompt's ids first
RequestLogitsProcessor = (
    Callable[[list[int], torch.Tensor], torch.Tensor] | Callable[[list[int], list[int], torch.Tensor], torch.Tensor]
)


class AdapterLogitsProcessor(LogitsProcessor):
    """A batch processor made of per-request functions: `new_req_logits_processor(params)` returns the function
    for one request (None: it does not apply), and `apply` calls each on its row."""

    def __init__(self, vllm_config: EngineConfig, device: torch.device, is_pin_memory: bool) -> None:
        self.req_info: dict[int, Callable[[torch.Tensor], torch.Tensor]] = {}

    @abstractmethod
    def new_req_logits_processor(self, params: SamplingParams) -> RequestLogitsProcessor | None:
        raise NotImplementedError

    def bound(self, params: SamplingParams, prompt_ids: list[int] | None, output_ids: Sequence[int]):
        """The request's function with its token lists bound: only the logits row is left to pass."""
        function = self.new_req_logits_processor(params)
        if function is None:
            return None
        if len(inspect.signature(function).parameters) == 3:  # (prompt ids, output ids, logits)
            return partial(function, prompt_ids, output_ids)
        return partial(function, output_ids)

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        process_dict_updates(self.req_info, batch_update, self.bound)

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        for row, function in self.req_info.items():
            logits[row] = function(logits[row])
        return logits


def load(spec: "type[LogitsProcessor] | str") -> type[LogitsProcessor]:
    """A processor class, given as the class or as "package.module:Class" (the server's --logits-processors; a
    "package.module.Class" path is accepted too)."""
    if isinstance(spec, str):
        module_name, sep, name = spec.partition(":")
        if not sep:
            module_name, _, name = spec.rpartition(".")
        if not module_name or not name:
            raise ValueError(f"logits processor {spec!r}: expected 'package.module:Class'")
        try:
            spec = getattr(importlib.import_module(module_name), name)
        except (ImportError, AttributeError) as e:
            raise ValueError(f"logits processor {spec!r} cannot be loaded: {e}") from e
    if not (isinstance(spec, type) and issubclass(spec, LogitsProcessor)):
        raise ValueError(
            f"logits processor {spec!r} is not a LogitsProcessor subclass (nanovllm.logits_processor.LogitsProcessor)"
        )
    return spec
