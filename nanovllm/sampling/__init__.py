"""Sampling: a step's sampling (step_sampler.py: Sampler, SamplerOutput, the verifier hook), the reference sampler
(sampler.py), the logits processors that adjust each request's logits before it (logits_processor.py: vLLM's
interface; builtin.py: min_tokens, logit_bias, allowed_token_ids, bad_words; persistent_batch.py: runs them over the
batch), the sampling table (table.py), and the logprobs read off the logits (nanovllm/logprobs.py)."""
