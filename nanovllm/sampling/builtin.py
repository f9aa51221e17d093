"""The engine's own per-request logits adjustments, as logits processors of vLLM's interface: allowed_token_ids,
logit_bias, min_tokens and bad_words (applied in that order, before penalties, temperature and the filters, as
vLLM applies them). Each keeps a dict row -> what it needs for that row, and does nothing for a batch where no
row asked."""

from collections.abc import Sequence

import torch

from nanovllm.config import EngineConfig
from nanovllm.sampling.logits_processor import BatchUpdate, LogitsProcessor, process_dict_updates
from nanovllm.sampling_params import SamplingParams


class BuiltinLogitsProcessor(LogitsProcessor):
    """A built-in processor: `rows` maps each batch row it acts on to what it needs there."""

    rows: dict

    def active(self) -> bool:
        """Whether it acts on any row (if none does, the engine stops tracking the batch)."""
        return bool(self.rows)

    def is_argmax_invariant(self) -> bool:  # each of them can mask or raise the most likely token
        return False


def pending_tokens(output_ids: Sequence[int]) -> int:
    """Output tokens sampled but not yet on the host (async scheduling: at most one); 0 for a plain list."""
    return getattr(output_ids, "num_pending", 0)


class AllowedTokenIdsLogitsProcessor(BuiltinLogitsProcessor):
    """allowed_token_ids: every other token of that row to -inf."""

    def __init__(self, vllm_config: EngineConfig, device: torch.device, is_pin_memory: bool) -> None:
        self.rows: dict[int, list[int]] = {}

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        process_dict_updates(self.rows, batch_update, lambda params, _, __: params.allowed_token_ids or None)

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        for row, tokens in self.rows.items():
            keep = torch.tensor(tokens, device=logits.device)
            masked = torch.ones_like(logits[row], dtype=torch.bool).index_fill_(0, keep, False)
            logits[row] = logits[row].masked_fill(masked, float("-inf"))
        return logits


class LogitBiasLogitsProcessor(BuiltinLogitsProcessor):
    """logit_bias: each listed token's value added to its logit."""

    def __init__(self, vllm_config: EngineConfig, device: torch.device, is_pin_memory: bool) -> None:
        self.rows: dict[int, dict[int, float]] = {}

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        process_dict_updates(self.rows, batch_update, lambda params, _, __: params.logit_bias or None)

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        if self.rows:
            rows = [row for row, bias in self.rows.items() for _ in bias]
            tokens = [token for bias in self.rows.values() for token in bias]
            values = [value for bias in self.rows.values() for value in bias.values()]
            logits[rows, tokens] += torch.tensor(values, device=logits.device, dtype=logits.dtype)
        return logits


class MinTokensLogitsProcessor(BuiltinLogitsProcessor):
    """min_tokens: EOS and the stop tokens cannot be drawn before that many tokens were generated (as in vLLM).
    A row leaves the dict once it has them."""

    def __init__(
        self, vllm_config: EngineConfig, device: torch.device, is_pin_memory: bool, eos_token_ids: Sequence[int] = ()
    ) -> None:
        self.eos_token_ids = list(eos_token_ids)
        self.rows: dict[int, tuple[int, Sequence[int], list[int]]] = {}  # row -> (min_tokens, output, stops)

    def new_state(self, params: SamplingParams, _, output_ids: Sequence[int]):
        if len(output_ids) + pending_tokens(output_ids) >= params.min_tokens:
            return None
        return params.min_tokens, output_ids, [*self.eos_token_ids, *params.stop_token_ids]

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        process_dict_updates(self.rows, batch_update, self.new_state)
        for row in [r for r, (n, out, _) in self.rows.items() if len(out) + pending_tokens(out) >= n]:
            del self.rows[row]

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        if self.rows:
            rows = [row for row, (_, _, stops) in self.rows.items() for _ in stops]
            tokens = [token for _, _, stops in self.rows.values() for token in stops]
            logits[rows, tokens] = float("-inf")
        return logits


class BadWordsLogitsProcessor(BuiltinLogitsProcessor):
    """bad_words: a word's last token is banned where the output ends with the rest of it (a one-token word always;
    as in vLLM). The words' token ids are the ones the request was made with (`SamplingParams._bad_words_token_ids`,
    set when the engine tokenized them)."""

    def __init__(self, vllm_config: EngineConfig, device: torch.device, is_pin_memory: bool) -> None:
        self.rows: dict[int, tuple[list[list[int]], Sequence[int]]] = {}  # row -> (words as ids, output ids)

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        process_dict_updates(
            self.rows,
            batch_update,
            lambda params, _, output_ids: (
                (ids, output_ids) if (ids := getattr(params, "_bad_words_token_ids", None)) else None
            ),
        )

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        banned = [
            (row, word[-1])
            for row, (words, output_ids) in self.rows.items()
            for word in words
            if len(word) == 1 or list(output_ids[-(len(word) - 1) :]) == word[:-1]
        ]
        if banned:
            rows, tokens = zip(*banned)
            logits[list(rows), list(tokens)] = float("-inf")
        return logits
