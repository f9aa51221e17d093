"""Structured outputs: a request's grammar (a JSON schema, a regex, a choice, an EBNF/GBNF or Lark grammar, or any
JSON object) compiled with xgrammar on a thread of its own, and each constrained sequence's matcher, which gives the
bitmask of the tokens its grammar allows next (the sampler masks the rest) and advances with every token the
sequence accepts. Why xgrammar: docs/design.md; benchmarks/grammar_libraries.py measures the candidates.

xgrammar is imported on the compile thread, by the first request that needs it (it takes seconds to import):
engines without structured outputs never load it."""

import copy
import json
import re
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from nanovllm.sampling_params import StructuredOutputsParams

if TYPE_CHECKING:
    import xgrammar as xgr

CACHE_SIZE = 256  # compiled grammars kept, by (kind, spec); the least recently asked for goes first
WHAT = {
    "json": "JSON schema",
    "regex": "regex",
    "grammar": "grammar",
    "lark": "Lark grammar",
    "choice": "choice",
    "json_object": "JSON object grammar",
}


def grammar_key(p: StructuredOutputsParams) -> tuple[str, str, bool]:
    """(kind, spec, free whitespace): what a grammar is compiled from, and the cache's key."""
    any_whitespace = not p.disable_any_whitespace
    if p.json is not None:
        return "json", p.json if isinstance(p.json, str) else json.dumps(p.json), any_whitespace
    if p.json_object:
        return "json_object", "", any_whitespace
    if p.regex is not None:
        return "regex", p.regex, False
    if p.choice is not None:  # as vLLM does: one EBNF alternative per choice
        escaped = (c.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") for c in p.choice)
        return "choice", "root ::= " + " | ".join(f'"{c}"' for c in escaped), False
    # EBNF/GBNF rules are `name ::= ...`; otherwise Lark (`name: ...`), as vLLM tells them apart
    return ("grammar" if "::=" in p.grammar else "lark"), p.grammar, False


class StructuredOutputManager:
    """Compiles grammars on its own thread, so the step loop never waits for one (a request waits in the queue
    until its grammar is ready), and keeps them by (kind, spec). One per engine."""

    def __init__(self, vocab_size: int, eos_token_ids: set[int]):
        self.vocab_size, self.eos_token_ids = vocab_size, sorted(eos_token_ids)
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="nanovllm-grammar")
        self.compiler: Future | None = None  # made by the first request that needs it: ~0.3 s for a 49k vocabulary
        self.cache: dict[tuple, Future] = {}
        self.lock = threading.Lock()

    def compile(self, params: StructuredOutputsParams, tokenizer) -> Future:
        """The compiled grammar, as a Future (done at once when cached). A bad spec makes it raise a ValueError that
        names the problem. `tokenizer`: the caller's; the compile thread reads its own copy."""
        key = grammar_key(params)
        with self.lock:
            if self.compiler is None:
                self.compiler = self.pool.submit(self._make_compiler, copy.deepcopy(tokenizer))
            future = self.cache.pop(key, None) or self.pool.submit(self._compile, key)
            self.cache[key] = future  # the most recently asked for last
            while len(self.cache) > CACHE_SIZE:
                del self.cache[next(iter(self.cache))]
        return future

    def _make_compiler(self, tokenizer) -> "xgr.GrammarCompiler":
        import xgrammar as xgr

        info = xgr.TokenizerInfo.from_huggingface(
            tokenizer, vocab_size=self.vocab_size, stop_token_ids=self.eos_token_ids
        )
        return xgr.GrammarCompiler(info, max_threads=1, cache_enabled=False)  # our cache is the one above

    def _compile(self, key: tuple[str, str, bool]) -> "xgr.CompiledGrammar":
        kind, spec, any_whitespace = key
        compiler = self.compiler.result()
        try:
            if kind == "json":
                return compiler.compile_json_schema(spec, any_whitespace=any_whitespace)
            if kind == "json_object":
                return compiler.compile_json_schema(
                    '{"type": "object"}', any_whitespace=any_whitespace, strict_mode=False
                )
            if kind == "regex":
                return compiler.compile_regex(spec)
            return compiler.compile_lark(spec) if kind == "lark" else compiler.compile_grammar(spec)
        except RuntimeError as e:  # xgrammar's message starts with the time and its source line: drop those
            reason = re.sub(r"^\[[\d:]+\] \S+:\d+: (Check failed: .*? is false: )?", "", str(e).strip())
            raise ValueError(f"invalid {WHAT[kind]} for structured outputs: {reason}") from None

    def shutdown(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)


@dataclass(eq=False)
class Constraint:
    """One sequence's grammar (a Future until compiled) and its matcher, made on the loop thread at first use."""

    grammar: Future
    matcher: "xgr.GrammarMatcher | None" = None

    @property
    def ready(self) -> bool:
        return self.grammar.done()

    @property
    def usable(self) -> bool:
        """Compiled without error (a request whose grammar failed is failed when its first token comes)."""
        return self.grammar.done() and self.grammar.exception() is None

    def _matcher(self) -> "xgr.GrammarMatcher":
        if self.matcher is None:
            import xgrammar as xgr  # already imported by the compile thread

            self.matcher = xgr.GrammarMatcher(self.grammar.result())  # raises the compile's ValueError
        return self.matcher

    def fill(self, bitmask: torch.Tensor, row: int) -> None:
        """Row `row` of an int32 bitmask [rows, ceil(vocab / 32)]: bit t (little-endian words) set where the grammar
        allows token t next."""
        self._matcher().fill_next_token_bitmask(bitmask, row)

    def accept(self, token: int) -> None:
        """Advance past a sampled token; a ValueError if the grammar does not allow it (or failed to compile)."""
        if not self._matcher().accept_token(token):
            raise ValueError(f"token {token} is not allowed by the structured-output grammar")

    @property
    def terminated(self) -> bool:
        """The grammar is complete and has accepted its end (an EOS token): the output ends here."""
        return self.matcher is not None and self.matcher.is_terminated()
