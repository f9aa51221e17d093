class IncrementalDetokenizer:
    """Turns a sequence's growing token ids into the text of its output, a piece at a time, and finds stop strings.

    Each new token is decoded together with a few tokens before it and only the difference is taken,
    so that tokenizers which drop a leading space or need several byte tokens for one character
    (the replacement character shows that it is not complete yet) give the same text as one full decode.
    Without stop strings to look for, nothing needs the text until it is read: the tokens wait and are decoded
    together then (an offline request's text is decoded once, at its end).
    """

    def __init__(
        self,
        tokenizer,
        ids: list[int],
        skip_special_tokens: bool = True,
        stop: list[str] | None = None,
        include_stop: bool = False,
    ):
        """ids: the sequence's token ids, the prompt so far: the list itself, which grows (read here, never
        written)."""
        # the Rust tokenizer itself where transformers' decode would only wrap it (no space clean-up): its
        # argument handling costs more than the decode (two decodes per token)
        backend = getattr(tokenizer, "_tokenizer", None)
        if backend is not None and not getattr(tokenizer, "clean_up_tokenization_spaces", True):
            self.decode = lambda ids: backend.decode(ids, skip_special_tokens=skip_special_tokens)
        else:
            self.decode = lambda ids: tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)
        self.ids = ids
        # 6 tokens of prompt as context, so that the first output token decodes as in the middle of text
        self.prefix_offset, self.read_offset = max(len(ids) - 6, 0), len(ids)
        self.end: int | None = None  # where the text ends, if before the last token (a stop token left out)
        self.stop, self.include_stop = stop or [], include_stop
        self._text = ""

    @property
    def text(self) -> str:
        if (self.end or len(self.ids)) > self.read_offset:
            self.catch_up()
        return self._text

    def stable_text(self) -> str:
        """The text a stream may show before the end: a tail that could still become a stop string (and then be
        cut) is held back."""
        hold = max((len(s) for s in self.stop), default=1) - 1
        return self.text[: max(len(self.text) - hold, 0)]

    def add(self, find_stop: bool = True) -> str | None:
        """The ids grew by a token: returns the stop string it completed, if any (then `text` is cut there). With
        find_stop False (before min_tokens) no stop string ends in this token's text."""
        if not self.stop:
            return None
        old_len = len(self._text)
        if not self.catch_up() or not find_stop:
            return None
        # a stop string can only end in the new text: start each search just far enough back (as vLLM does, also
        # into text made before min_tokens allowed a stop: a stop string may begin there and end here)
        found = [(at, s) for s in self.stop if (at := self._text.find(s, max(0, old_len - len(s) + 1))) != -1]
        if not found:
            return None
        at, s = min(found)
        self._text = self._text[: at + len(s)] if self.include_stop else self._text[:at]
        return s

    def leave_out_last(self) -> None:
        """The last token (a stop token) gets no text."""
        self.end = len(self.ids) - 1

    def catch_up(self) -> bool:
        """Decode the tokens added since the last text was made; whether any text came of them. Together, unless
        a character is not finished at their end: then one at a time, so that the ones before it make their text."""
        end = self.end or len(self.ids)
        if end > self.read_offset + 1 and self.decode(self.ids[end - 1 : end]).endswith("\ufffd"):
            return any([self.decode_to(i) for i in range(self.read_offset + 1, end + 1)])
        return self.decode_to(end)

    def decode_to(self, end: int) -> bool:
        before = self.decode(self.ids[self.prefix_offset : self.read_offset])
        after = self.decode(self.ids[self.prefix_offset : end])
        if len(after) <= len(before) or after.endswith("\ufffd"):
            return False
        self.prefix_offset, self.read_offset = self.read_offset, end
        self._text += after[len(before) :]
        return True
