"""Speculative decoding: proposers guess a sequence's next k tokens cheaply (ngram.py: prompt lookup; draft.py: a
small draft model), the target model checks all of them in one forward, and rejection.py keeps the longest run it
agrees with plus one token of its own, so the output is exactly what the target alone would give (greedy) or has
its distribution (sampling). speculator.py is what the engine holds; config.py is vLLM's speculative_config."""
