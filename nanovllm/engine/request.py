"""One request: its prompt as token ids, its n sequences with their detokenizers, how each one stops, and the
RequestOutput it shows. `tokenize` is the one way a prompt (text, ids, a dict, or chat messages) becomes token
ids, for the offline front, the async engine and the server alike."""

from concurrent.futures import Future
from dataclasses import dataclass

import torch

from nanovllm.engine.detokenizer import IncrementalDetokenizer
from nanovllm.engine.sequence import Sequence
from nanovllm.inputs import PromptType
from nanovllm.logprobs import logprob_dict
from nanovllm.outputs import CompletionOutput, RequestOutput
from nanovllm.sampling_params import RequestOutputKind, SamplingParams
from nanovllm.structured_outputs import Constraint


def tokenize(
    tokenizer,
    prompt: PromptType,
    chat_template: str | None = None,
    add_generation_prompt: bool = True,
    **template_kwargs,
) -> tuple[str | None, list[int]]:
    """(the prompt's text if it had one, its token ids). Token ids are taken as they are (checked later, against
    the vocabulary); a conversation is rendered with the model's chat template (or the one given)."""
    text = None
    if isinstance(prompt, dict):
        if "prompt_token_ids" in prompt:
            text, prompt = prompt.get("prompt"), list(prompt["prompt_token_ids"])
        elif "prompt" in prompt:
            prompt = prompt["prompt"]
        else:
            raise ValueError("a prompt dict needs 'prompt' or 'prompt_token_ids'")
    if isinstance(prompt, str):
        return prompt, tokenizer(prompt).input_ids
    if isinstance(prompt, (list, tuple)) and prompt and all(isinstance(m, dict) for m in prompt):
        return None, chat_token_ids(tokenizer, list(prompt), add_generation_prompt, chat_template, **template_kwargs)
    if isinstance(prompt, (list, tuple)) and all(isinstance(t, int) for t in prompt):
        return text, list(prompt)
    raise ValueError(
        f"a prompt must be a string, a list of token ids or a list of chat messages, got {type(prompt).__name__}"
    )


def chat_token_ids(
    tokenizer, messages: list[dict], add_generation_prompt: bool = True, chat_template: str | None = None, **kwargs
) -> list[int]:
    """A conversation rendered with the model's chat template (or the one given), as token ids."""
    if chat_template is None and not getattr(tokenizer, "chat_template", None):
        raise ValueError("this model has no chat template: pass chat_template=... or use generate()")
    text = tokenizer.apply_chat_template(
        messages, add_generation_prompt=add_generation_prompt, chat_template=chat_template, tokenize=False, **kwargs
    )
    # a template that does not know a role may leave its messages out without a word (assistant messages are not
    # checked: templates rewrite them, e.g. drop an earlier turn's reasoning)
    for m in messages:
        content = m.get("content")
        if m.get("role") != "assistant" and isinstance(content, str) and content.strip() not in text:
            raise ValueError(f"the chat template does not know the role {m.get('role')!r}: it left that message out")
    return tokenizer(text, add_special_tokens=False).input_ids  # the template already holds BOS etc.


def bad_word_ids(tokenizer, words: list[str]) -> list[list[int]]:
    """Each bad word's token ids as it would be generated: alone, and after a space where that tokenizes
    differently into as many tokens (as vLLM does)."""
    out = []
    for word in words:
        plain = tokenizer(word.lstrip(), add_special_tokens=False).input_ids
        spaced = tokenizer(" " + word.lstrip(), add_special_tokens=False).input_ids
        out += [plain] + ([spaced] if spaced[0] != plain[0] and len(spaced) == len(plain) else [])
    return out


def copy(entries: list | None) -> list | None:
    """A snapshot of a growing list for an output (the caller may hold it while the list grows)."""
    return None if entries is None else list(entries)


@dataclass
class Request:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    seqs: list[Sequence]
    detoks: list[IncrementalDetokenizer]
    error: str | None = None  # set when handling this request failed; it is finished then
    final_only: bool = False  # output_kind FINAL_ONLY: no output until it ends
    tokenizer: object = None  # decodes the tokens of logprobs

    @classmethod
    def make(
        cls,
        request_id: str,
        text: str | None,
        ids: list[int],
        params: SamplingParams,
        tokenizer,
        device: str,
        encoder=None,
        grammar: Future | None = None,
    ) -> "Request":
        """n sequences of the same prompt; a seeded request's sequence i draws from its own generator (seed + i).
        `tokenizer` decodes (on the engine's thread); `encoder` (default: the same) encodes the bad words.
        `grammar`: the structured-output grammar being compiled; each sequence gets its own matcher of it."""
        seqs, detoks = [], []
        bad_words = bad_word_ids(encoder or tokenizer, params.bad_words or [])
        if bad_words:  # where the bad-words logits processor reads them (vLLM keeps them there too)
            params._bad_words_token_ids = bad_words
        for i in range(params.n):
            seq = Sequence(
                request_id,
                i,
                list(ids),
                len(ids),
                params,
                bad_words=bad_words,
                constraint=Constraint(grammar) if grammar else None,
            )
            if params.seed is not None:
                seq.generator = torch.Generator(device).manual_seed((params.seed + i) % 2**64)
            if params.logprobs is not None:
                seq.logprobs, seq.cumulative_logprob = [], 0.0
            if params.prompt_logprobs is not None and i == 0:
                seq.prompt_logprobs = [None]
            seqs.append(seq)
            detoks.append(
                IncrementalDetokenizer(
                    tokenizer, seq.token_ids, params.skip_special_tokens, params.stop, params.include_stop_str_in_output
                )
            )
        return cls(
            request_id,
            text,
            ids,
            seqs,
            detoks,
            final_only=params.output_kind == RequestOutputKind.FINAL_ONLY,
            tokenizer=tokenizer,
        )

    def add_logprobs(self, seq: Sequence, ids: list[int], values: list[float], rank: int) -> None:
        """The logprobs of the token `seq` is about to append (ids[0]) and of the most likely ones."""
        seq.logprobs.append(logprob_dict(ids, values, rank, self.decode_each(seq, ids)))
        seq.cumulative_logprob += values[0]

    def add_prompt_logprobs(self, seq: Sequence, entries: list[tuple[list[int], list[float], int]]) -> None:
        """The logprobs of the next prompt tokens, in order, each with the most likely tokens at its position."""
        decoded = iter(self.decode_each(seq, [t for ids, _, _ in entries for t in ids]))  # one call for all
        seq.prompt_logprobs += [
            logprob_dict(ids, values, rank, [next(decoded) for _ in ids]) for ids, values, rank in entries
        ]

    def decode_each(self, seq: Sequence, ids: list[int]) -> list[str | None]:
        """Each token's text alone (vLLM's decoded_token); None without detokenize."""
        return self.tokenizer.batch_decode([[t] for t in ids]) if seq.params.detokenize else [None] * len(ids)

    def check(
        self, seq: Sequence, token: int, eos_token_ids: set[int], max_model_len: int
    ) -> tuple[str, int | str | None] | None:
        """The token just appended to `seq` (its text made if a stop string is looked for); returns (finish reason,
        stop reason) if it ends the sequence: a stop or EOS token (once min_tokens are out), a stop string,
        max_tokens or max_model_len. As in vLLM, a stop string may end in the tokens after the first min_tokens,
        and begin anywhere. A structured output advances its grammar here, and ends when the grammar has accepted
        its end; a token the grammar refuses is a ValueError."""
        if seq.constraint is not None:  # advanced here only: a recomputed (preempted) sequence samples no old token
            seq.constraint.accept(token)
        p, detok = seq.params, self.detoks[seq.index]
        n = seq.num_output_tokens
        if n >= p.min_tokens and (token in p.stop_token_ids or (not p.ignore_eos and token in eos_token_ids)):
            if p.include_stop_str_in_output and p.detokenize:  # as vLLM: a stop token's text only if asked for
                detok.add(find_stop=False)
            else:
                detok.leave_out_last()
            return "stop", token if token in p.stop_token_ids else None
        if seq.constraint is not None and seq.constraint.terminated:  # its EOS, with ignore_eos
            return "stop", None
        stop_str = detok.add(find_stop=n > p.min_tokens) if p.detokenize else None
        if stop_str is not None:
            return "stop", stop_str
        if n == p.max_tokens or len(seq.token_ids) >= max_model_len:
            return "length", None
        return None

    @property
    def finished(self) -> bool:
        return all(s.finished for s in self.seqs)

    @property
    def grammar(self) -> Future | None:
        """The structured-output grammar (compiled on another thread), if the request has one."""
        return self.seqs[0].constraint.grammar if self.seqs[0].constraint else None

    def check_grammar(self) -> None:
        """Wait for the structured-output grammar, if any, to compile: a ValueError naming the problem if it cannot."""
        if self.grammar is not None:
            self.grammar.result()

    def output(self) -> RequestOutput:
        """The outputs so far: while a sequence runs, its text without a tail that could still become a stop. Text
        its tokenizer cannot make fails this request (the engine then aborts it)."""
        try:
            texts = (
                [d.text if s.finished else d.stable_text() for s, d in zip(self.seqs, self.detoks)]
                if self.seqs[0].params.detokenize
                else [""] * len(self.seqs)
            )
        except Exception as e:
            self.error, texts = self.error or f"{type(e).__name__}: {e}", [""] * len(self.seqs)
        outs = [
            CompletionOutput(
                i, text, s.output_token_ids, s.finish_reason, s.stop_reason, s.cumulative_logprob, copy(s.logprobs)
            )
            for i, (s, text) in enumerate(zip(self.seqs, texts))
        ]
        return RequestOutput(
            self.request_id,
            self.prompt,
            self.prompt_token_ids,
            outs,
            self.finished,
            max(self.seqs[0].num_cached_tokens, 0),
            self.error,
            prompt_logprobs=copy(self.seqs[0].prompt_logprobs),
        )
