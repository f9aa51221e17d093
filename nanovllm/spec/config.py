"""vLLM's `speculative_config`, as a dict to `LLM(...)` or JSON to `--speculative-config`, checked once."""

from dataclasses import dataclass

KEYS = ("method", "model", "num_speculative_tokens", "prompt_lookup_max", "prompt_lookup_min", "disable_by_batch_size")


@dataclass(frozen=True)
class SpeculativeConfig:
    method: str  # ngram (prompt lookup) | draft_model (a small model sharing the vocabulary)
    num_speculative_tokens: int  # k: tokens proposed, and checked, per step
    model: str | None = None  # the draft model's folder or .gguf file
    prompt_lookup_max: int = 0  # ngram: the longest suffix looked up...
    prompt_lookup_min: int = 0  # ...and the shortest that may propose
    # no proposals in a step where this many sequences run (None: the engine's default for its device)
    disable_by_batch_size: int | None = None

    @classmethod
    def from_dict(cls, d: dict) -> "SpeculativeConfig":
        """vLLM's rules: `model` alone means a draft model; for ngram a missing lookup bound takes the other's
        value, and both missing are 5."""
        if not isinstance(d, dict):
            raise ValueError(f"speculative_config must be a dict, got {type(d).__name__}")
        unknown = sorted(set(d) - set(KEYS))
        if unknown:
            raise ValueError(f"speculative_config keys {unknown} are not supported; supported: {', '.join(KEYS)}")
        k = d.get("num_speculative_tokens")
        if not isinstance(k, int) or k < 1:
            raise ValueError(f"speculative_config needs num_speculative_tokens, an integer >= 1, got {k!r}")
        off = d.get("disable_by_batch_size")
        if off is not None and (not isinstance(off, int) or off < 1):
            raise ValueError(f"speculative_config disable_by_batch_size must be an integer >= 1, got {off!r}")
        method = d.get("method") or ("draft_model" if d.get("model") else None)
        if method == "ngram":
            hi, lo = d.get("prompt_lookup_max"), d.get("prompt_lookup_min")
            hi, lo = hi or lo or 5, lo or hi or 5
            if not (isinstance(lo, int) and isinstance(hi, int) and 1 <= lo <= hi):
                raise ValueError(
                    f"speculative_config needs 1 <= prompt_lookup_min <= prompt_lookup_max, got {lo!r} and {hi!r}"
                )
            return cls("ngram", k, prompt_lookup_max=hi, prompt_lookup_min=lo, disable_by_batch_size=off)
        if method == "draft_model":
            if not d.get("model"):
                raise ValueError("speculative_config method 'draft_model' needs 'model': the draft's folder or file")
            return cls("draft_model", k, model=d["model"], disable_by_batch_size=off)
        raise ValueError(
            f"speculative_config method={method!r} is not supported; supported: 'ngram', or a draft "
            f"'model' ('draft_model')"
        )
