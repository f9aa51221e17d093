"""Prompt lookup (n-gram) proposals: text that repeats its input (an edit, a summary quoting its source, code)
continues the way an earlier occurrence of its last few tokens did. No model: a few numpy passes per sequence."""

import numpy as np


def propose(token_ids: list[int], k: int, min_n: int, max_n: int) -> list[int]:
    """Up to k tokens: those that followed the latest earlier occurrence of the longest suffix of `token_ids` of
    min_n..max_n tokens; none if no suffix of min_n tokens occurred before."""
    t = np.asarray(token_ids)
    last = len(t) - 1
    ends = np.flatnonzero(t[:last] == t[last])  # where earlier occurrences of the suffix end; grown backwards
    m, best = 1, None
    while len(ends):
        if m >= min_n:
            best = ends[-1]
        if m == max_n or m == last:
            break
        ends = ends[ends >= m]
        ends = ends[t[ends - m] == t[last - m]]
        m += 1
    return [] if best is None else t[best + 1 : best + 1 + k].tolist()
